"""How long a job takes to start: launch -> every host imported -> `jax.distributed` up.

    python benchmarks/job_start.py [--hosts 4] [--devices-per-host 2] [--repeats 5]

Each repeat launches ``--hosts`` processes on this machine (``distckpt launch``); each
imports what ``distckpt train`` imports and initializes ``jax.distributed``. Printed per
repeat, as seen by host 0: seconds from the launch until its imports were done and until
``jax.distributed`` was initialized (every host must be up for that), then the medians.
This is the floor of every restart ``distckpt goodput`` measures (docs/goodput.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CHILD = """
import os, time
t0 = float(os.environ["DISTCKPT_START_T0"])
import distckpt.tools.train  # what `distckpt train` imports
from distckpt.multihost import coordinator
t1 = time.time()
coordinator.initialize()
t2 = time.time()
import jax
if jax.process_index() == 0:
    print(f"START {t1 - t0:.3f} {t2 - t0:.3f}", flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--devices-per-host", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    imported, initialized = [], []
    for i in range(args.repeats):
        env = {**os.environ, "DISTCKPT_START_T0": repr(time.time())}
        res = subprocess.run([sys.executable, "-m", "distckpt.tools.cli", "launch",
                              "--hosts", str(args.hosts), "--devices-per-host",
                              str(args.devices_per_host), "--", sys.executable, "-c", CHILD],
                             env=env, capture_output=True, text=True, timeout=300)
        line = next((x for x in res.stdout.splitlines() if "START " in x), None)
        if res.returncode != 0 or line is None:
            print(res.stdout + res.stderr, file=sys.stderr)
            return 1
        a, b = (float(x) for x in line.split("START ", 1)[1].split())
        imported.append(a)
        initialized.append(b)
        print(f"repeat {i + 1}: imports done {a:.2f} s, jax.distributed initialized {b:.2f} s")
    print(f"median of {args.repeats}: imports done {statistics.median(imported):.2f} s, "
          f"initialized {statistics.median(initialized):.2f} s "
          f"({args.hosts} hosts x {args.devices_per_host} devices, {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
