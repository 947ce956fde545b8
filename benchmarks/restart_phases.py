"""Where a restart of `distckpt goodput`'s trainer goes: launch -> first training step.

    python benchmarks/restart_phases.py [--hosts 4] [--devices-per-host 2] [--restarts 4]
                                        [--s3-server local]

One job trains 8 steps with both tiers (local every 4 steps on /dev/shm, persistent every
8, the compiled step kept in an executable cache, as goodput's jobs do); then each restart
launches the same trainer for two more steps, restoring the newest step (from the local
tier: nothing was lost). For each restart, seconds since the launch, from the trainer's
``--progress`` events on host 0: ``init`` (every process imported JAX and
``jax.distributed`` is up), ``resumed`` (checkpoint service opened, state restored;
``restore_s`` of it in ``restore()``), ``first step`` (the first step done; ``build_s`` of
it loading the compiled step). Then the medians. ``--s3-server local`` puts the
persistent tier on a private SeaweedFS (``weed``, the test extra) instead of local disk.
The figures in docs/goodput.md ("Where a restart goes") come from this script.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("init", "resumed", "restore_s", "build_s", "first step")


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from distckpt.tools.goodput import PROGRESS, GoodputConfig, train_command
    from distckpt.tools.launcher import launch
    from distckpt.tools.s3server import private_server

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--devices-per-host", type=int, default=2)
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--s3-server", choices=["local"], default=None,
                    help="persistent tier on a private SeaweedFS instead of local disk")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distckpt-restart-"))
    local = Path(tempfile.mkdtemp(prefix="distckpt-restart-", dir="/dev/shm"))
    cfg = GoodputConfig(duration_s=60, mtbf_s=60, hosts=args.hosts,
                        devices_per_host=args.devices_per_host)

    def job(ckpt: str, steps: int) -> dict[str, float]:
        cmd = train_command(cfg, ckpt, steps, 8, local, 4)
        cmd += ["--executable-cache", str(work / "executables")]
        out, t0 = io.StringIO(), time.time()
        events: list[dict] = []

        def on_line(_host: int, line: str) -> None:  # goodput's supervisor reads them so
            if match := PROGRESS.match(line):
                events.append(json.loads(match.group(1)))

        res = launch(cmd, args.hosts, args.devices_per_host, out=out, timeout_s=600,
                     grace_s=0.0, line_callback=on_line)
        if res.returncode != 0:
            raise SystemExit(f"the trainer failed (exit {res.returncode}):\n"
                             f"{out.getvalue()[-3000:]}")
        seen: dict[str, float] = {}
        for event in events:
            name = "first step" if event["event"] == "step" else event["event"]
            if name in seen:
                continue
            seen[name] = event["t"] - t0
            if name == "resumed":
                seen["restore_s"] = event["restore_s"]
                seen["tier"] = event.get("tier")
            if name == "program":
                seen["build_s"] = event["build_s"]
        return seen

    rows: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        if args.s3_server:
            stack.enter_context(private_server("distckpt-restart"))
            ckpt = "s3://distckpt-restart/ckpt"
        else:
            ckpt = str(work / "ckpt")
        try:
            job(ckpt, 8)
            for i in range(args.restarts):
                row = job(ckpt, 8 + 2 * (i + 1))
                rows.append(row)
                print(f"restart {i + 1} (from {row.get('tier')}): "
                      + ", ".join(f"{k} {row[k]:.2f}" for k in PHASES if k in row), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(local, ignore_errors=True)
    where = "SeaweedFS" if args.s3_server else "local disk"
    print(f"median of {len(rows)} ({args.hosts}x{args.devices_per_host}, persistent tier on "
          f"{where}): " + ", ".join(f"{k} {statistics.median(r[k] for r in rows):.2f} s"
                                    for k in PHASES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
