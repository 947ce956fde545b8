"""The worker side of ``distckpt drill``: what runs inside each launched process.

:func:`distckpt.tools.drill.run_drill` launches every phase through the local launcher as
``python -m distckpt.tools.drill_worker save|restore SPEC.json``, one process per simulated
host. ``save`` trains and saves on the *from* slice (:func:`worker_save`), ``restore``
restores onto the *to* slice and checks what it got (:func:`worker_restore`); the primary
process writes the phase's result JSON to ``spec["out"]``. Workers report progress as
``DRILL <kind> <json>`` lines on stdout, which the drill parses (``drill._PROGRESS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _train_config(spec: dict[str, Any]):
    from distckpt.tools.model import ModelConfig
    from distckpt.tools.train import TrainConfig

    return TrainConfig(model=ModelConfig(**spec["model"]), batch=spec["batch"])


def _leaf_arrays(state) -> dict[str, Any]:
    from distckpt.state import nnx_state

    return {leaf.name: leaf.value for leaf in nnx_state.flatten_items(state)}


def _emit(kind: str, **fields) -> None:
    print(f"DRILL {kind} {json.dumps(fields)}", flush=True)


def _write_result(path: str, value: dict[str, Any]) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def worker_save(spec: dict[str, Any]) -> None:
    import signal

    import jax

    from distckpt.checkpoint.service import CheckpointOptions, CheckpointService
    from distckpt.multihost import coordinator
    from distckpt.multihost.preemption import PreemptionGuard
    from distckpt.state import digest
    from distckpt.state.mesh import make_mesh
    from distckpt.state.process_state import FaultPoint
    from distckpt.storage import warm
    from distckpt.tools import train

    warm(spec["ckpt_dir"])  # s3:// packages load while the hosts connect
    coordinator.initialize()
    cfg = _train_config(spec)
    mesh = make_mesh(spec["mesh"])
    state = train.new_state(cfg, mesh)
    step_fn = train.make_train_step(mesh)
    losses: dict[int, float] = {}
    digests: dict[int, dict[str, str]] = {}
    kill_step = spec.get("kill_step")

    def fault_hook(point: FaultPoint, step: int) -> None:
        # Every host dies inside the background commit of `kill_step` (a power loss).
        if point is FaultPoint.PROCESS_STATE_WRITE and step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    options = CheckpointOptions(max_to_keep=None, save_interval_steps=spec["save_every"],
                                fault_hook=fault_hook if kill_step is not None else None,
                                local_directory=spec.get("local_dir"))
    lose_host = spec.get("lose_host")
    result: dict[str, Any] = {"losses": losses, "digests": digests, "save_stats": [],
                              "preempted_at": None, "process_count": jax.process_count(),
                              "devices": jax.device_count()}
    with PreemptionGuard("drill") as guard, CheckpointService(spec["ckpt_dir"], options) as ckpt:
        reference = spec["steps"] % spec["save_every"] == 0 or lose_host is not None
        last = spec["steps"] + (1 if reference else 0)
        for step in range(1, last + 1):
            tokens = train.tokens_for_step(step, cfg, mesh)
            losses[step] = float(step_fn(state["model"], state["optimizer"], tokens))
            if step > spec["steps"] and lose_host is not None:
                _lose_host(ckpt, lose_host, result, spec["out"])
            if step > spec["steps"]:  # the reference update past the last save; not saved
                break
            preempted = guard.reached_sync_point(step, final=step == spec["steps"])
            saved = ckpt.save(step, state, metrics={"loss": losses[step]},
                              process_state={"next_step": step + 1}, force=preempted)
            if saved:
                digests[step] = digest.digests(_leaf_arrays(state), f"drill:save:step={step}")
            if preempted:
                ckpt.wait()
                result["preempted_at"] = step
            result["save_stats"] = [dataclasses.asdict(s) for s in ckpt.save_stats]
            if coordinator.is_primary():
                # Written as the run goes, so a killed run still says what it did.
                _write_result(spec["out"], result)
                _emit("progress", phase="save", step=step, loss=losses[step], saved=saved)
            if step == spec.get("preempt_after"):
                _await_notice(guard)
            if preempted:
                # One more update, for the restore side's loss comparison (not saved).
                losses[step + 1] = float(step_fn(state["model"], state["optimizer"],
                                                 train.tokens_for_step(step + 1, cfg, mesh)))
                break
        ckpt.wait()
        result["save_stats"] = [dataclasses.asdict(s) for s in ckpt.save_stats]
    if coordinator.is_primary():
        _write_result(spec["out"], result)


def _lose_host(ckpt, host: int, result: dict[str, Any], out: str) -> None:
    """--fault lose-host: once every host's last local save is done (its peer holds a copy),
    SIGKILL `host`; the others wait for the launcher to stop them, as a job does when a
    machine dies."""
    import signal

    from distckpt.multihost import coordinator

    if ckpt.local is not None:
        ckpt.local.wait()
    if coordinator.is_primary():
        _write_result(out, result)
    coordinator.barrier("drill:lose-host", 120.0)
    if coordinator.topology().process_index == host:
        _emit("progress", phase="save", stage="killed", host=host)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(3.0)  # the others die too, as a job's processes do when one machine is lost
    os.kill(os.getpid(), signal.SIGKILL)


def _await_notice(guard, limit_s: float = 120.0) -> None:
    """--fault preempt: the drill signals one host after this step's progress line; every
    host waits here until the notice has reached it, so the signal lands before the run
    can end however loaded the machine is (the agreed step is then the next one)."""
    deadline = time.monotonic() + limit_s
    while guard.notice is None and time.monotonic() < deadline:
        time.sleep(0.01)


def worker_restore(spec: dict[str, Any]) -> None:
    import jax
    import numpy as np

    from distckpt.checkpoint.service import CheckpointOptions, CheckpointService
    from distckpt.multihost import coordinator
    from distckpt.state import digest
    from distckpt.state.mesh import make_mesh
    from distckpt.storage import warm
    from distckpt.tools import train

    warm(spec["ckpt_dir"])  # s3:// packages load while the hosts connect
    coordinator.initialize()
    saved = json.loads(Path(spec["saved"]).read_text())
    cfg = _train_config(spec)
    mesh = make_mesh(spec["mesh"])
    target = train.target(cfg, mesh)
    want_shardings = {k: v.sharding for k, v in _leaf_arrays(target).items()}
    _emit("progress", phase="restore", stage="restoring")
    options = CheckpointOptions(read_only=True, local_directory=spec.get("local_dir"))
    with CheckpointService(spec["ckpt_dir"], options) as ckpt:
        t0 = time.perf_counter()
        restored = ckpt.restore(target, process_state_remap=train.remap_data_position)
        jax.block_until_ready(jax.tree.leaves(restored.items))
        restore_seconds = time.perf_counter() - t0
    arrays = _leaf_arrays(restored.items)
    _emit("progress", phase="restore", stage="verifying", step=restored.step)
    got = digest.digests(arrays, f"drill:restore:step={restored.step}")
    expected = saved["digests"].get(str(restored.step), {})
    content_mismatch = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
    sharding_mismatch = sorted(
        k for k, a in arrays.items()
        if not a.sharding.is_equivalent_to(want_shardings[k], a.ndim))
    step = restored.step + 1
    loss = float(train.make_train_step(mesh)(restored.items["model"], restored.items["optimizer"],
                                             train.tokens_for_step(step, cfg, mesh)))
    first_step_wall = time.time()
    total_bytes = int(sum(np.dtype(a.dtype).itemsize * a.size if not
                          jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                          else jax.random.key_data(a).nbytes for a in arrays.values()))
    if coordinator.is_primary():
        Path(spec["out"]).write_text(json.dumps({
            "restored_step": restored.step, "restore_seconds": restore_seconds,
            "restore_seconds_inside": restored.seconds, "content_mismatch": content_mismatch,
            "sharding_mismatch": sharding_mismatch, "next_loss": loss, "next_step": step,
            "leaves": len(arrays), "bytes": total_bytes, "process_count": jax.process_count(),
            "process_state": restored.process_state, "verified_by_service": restored.verified,
            "skipped": [list(x) for x in restored.skipped],
            "restored_from": list(restored.restored_from), "first_step_wall": first_step_wall}))


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m distckpt.tools.drill_worker save|restore SPEC.json``."""
    parser = argparse.ArgumentParser(prog="python -m distckpt.tools.drill_worker",
                                     description="internal: one phase of distckpt drill")
    parser.add_argument("phase", choices=["save", "restore"])
    parser.add_argument("spec")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=os.environ.get("DISTCKPT_LOG", "WARNING"), force=True,
                        format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(args.spec).read_text())
    (worker_save if args.phase == "save" else worker_restore)(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
