"""One process of an object-storage test job (tests/test_s3_service.py), via the launcher.

    python tests/s3_worker.py kill URL POINT STEP OUT_JSON

``kill``: save step 1, then step STEP with a fault hook that SIGKILLs this process at
the save point POINT ('commit:renamed' runs on the primary only, 'process_state:write'
on every process). Never returns normally once STEP's save reaches POINT.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

import distckpt  # noqa: E402
from tests.mp_worker import factory  # noqa: E402


def scenario_kill(url: str, point: str, step: int, out: str) -> None:
    distckpt.initialize()
    import jax

    mesh = distckpt.make_mesh(f"fsdp={jax.device_count()}")
    items = distckpt.init_sharded(factory(), mesh)

    def fault_hook(where: str, at: int) -> None:
        if where == point and at == step:
            os.kill(os.getpid(), signal.SIGKILL)

    opts = distckpt.CheckpointOptions(max_to_keep=None, fault_hook=fault_hook)
    with distckpt.CheckpointService(url, opts) as ckpt:
        ckpt.save(1, items)
        ckpt.wait()
        if distckpt.is_primary():
            Path(out).write_text(json.dumps({"steps": ckpt.all_steps()}))
        ckpt.save(step, items)
        ckpt.wait()
    raise SystemExit(f"the fault hook at {point} never fired")


def main() -> None:
    scenario, *args = sys.argv[1:]
    if scenario != "kill":
        raise SystemExit(f"unknown scenario {scenario!r}")
    url, point, step, out = args
    scenario_kill(url, point, int(step), out)


if __name__ == "__main__":
    main()
