"""One process of a multi-tier test job (the local tier plus the persistent directory).

    python tests/tier_worker.py save|restore OUT_DIR --dir CKPT --local LOCAL [options]

``save`` trains the round-trip model, saving a local step every step and a persistent
step every ``--persist-every``, and writes each step's fingerprint (primary host) to
OUT_DIR/saved.json. ``restore`` restores on this job and writes, per process,
OUT_DIR/restored.<process>.json: the step, tier, restored_from, the fingerprint and
the process state it got.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent.parent))

import distckpt  # noqa: E402
from distckpt.multihost import coordinator  # noqa: E402
from tests.mp_worker import factory, fingerprint, train_step  # noqa: E402


def options(a, **kw) -> distckpt.CheckpointOptions:
    return distckpt.CheckpointOptions(
        max_to_keep=None, save_interval_steps=a.persist_every, local_directory=a.local,
        local_interval_steps=1, local_timeout_s=300, timeout_s=300, **kw)


def kill_hook(a):
    """SIGKILL this process at --kill-at of step --kill-step (on --kill-process only)."""
    if not a.kill_at or jax.process_index() != a.kill_process:
        return None

    def hook(point: str, step: int) -> None:
        if point == a.kill_at and step == a.kill_step:
            print(f"KILL at {point} step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def batch(mesh):
    return jax.device_put(jnp.linspace(-1, 1, 32, dtype=jnp.float32).reshape(4, 8),
                          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def save(a) -> None:
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    items = distckpt.init_sharded(factory(), mesh)
    x = batch(mesh)
    saved = {}
    with distckpt.CheckpointService(a.dir, options(a, fault_hook=kill_hook(a))) as ckpt:
        for step in range(1, a.steps + 1):
            train_step(items["model"], items["optimizer"], x)
            saved[step] = fingerprint(items)
            if distckpt.is_primary():  # before the save: a crash may come inside it
                Path(a.out, "saved.json").write_text(json.dumps({"fingerprints": saved}))
            ckpt.save(step, items, metadata={"step": step},
                      process_state={"process": jax.process_index(), "pos": step * 10})
        ckpt.wait()
        if a.lose is not None:  # a machine dies once its last local step is copied
            coordinator.barrier("tier-worker:lose", 120)
            if jax.process_index() == a.lose:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(2)  # the others die with the job
            os.kill(os.getpid(), signal.SIGKILL)
        failures = ckpt.local.failures if ckpt.local else []
    Path(a.out, f"save.{jax.process_index()}.json").write_text(json.dumps(
        {"failures": failures, "machine": os.environ.get("DISTCKPT_HOST")}))


def restore(a) -> None:
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    target = distckpt.abstract_target(factory(), mesh)
    with distckpt.CheckpointService(a.dir, options(a, read_only=a.read_only)) as ckpt:
        restored = ckpt.restore(target, process_state_remap=(
            None if a.same_hosts else distckpt.drop_process_state))
        finger = fingerprint(restored.items)
    Path(a.out, f"restored.{jax.process_index()}.json").write_text(json.dumps({
        "step": restored.step, "tier": restored.tier,
        "restored_from": list(restored.restored_from), "fingerprint": finger,
        "process_state": restored.process_state, "metadata": restored.metadata,
        "machine": os.environ.get("DISTCKPT_HOST"), "verified": restored.verified,
        "read_bytes": restored.read_bytes}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["save", "restore"])
    p.add_argument("out")
    p.add_argument("--dir", required=True)
    p.add_argument("--local", required=True)
    p.add_argument("--mesh", default="data=2,fsdp=4")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--persist-every", type=int, default=4)
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--other-hosts", dest="same_hosts", action="store_false")
    p.add_argument("--kill-at", help="a FaultPoint of the local tier")
    p.add_argument("--lose", type=int, help="SIGKILL this process after the last save")
    p.add_argument("--kill-step", type=int, default=6)
    p.add_argument("--kill-process", type=int, default=1)
    a = p.parse_args()
    {"save": save, "restore": restore}[a.phase](a)


if __name__ == "__main__":
    main()
