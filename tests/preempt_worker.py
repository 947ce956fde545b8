"""One process of a preemption test job (tests/test_preemption.py); run through the launcher.

    python tests/preempt_worker.py --dir DIR --steps N [--save-every K] [--step-delay S]
        [--user-handler] [--term-in-commit STEP] [--term-before-guard] [--commit-delay S]

A cheap stand-in for `distckpt train` (no model to compile): one float32 array sharded
over every device, updated by a step whose result needs a cross-process reduction, so
the processes run in lockstep as real training does. The loop is the reference loop's:
inside a PreemptionGuard, save every K steps and on the agreed preemption step, wait for
the commit, return. A restart resumes from the newest committed step. Each process
prints ``READY <pid>`` once it has trained a step and ``RESULT <json>`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

import distckpt
from distckpt.multihost.preemption import PreemptionGuard, _address, _read_action


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--user-handler", action="store_true",
                   help="install a Python SIGTERM handler after entering the guard")
    p.add_argument("--term-in-commit", type=int, default=None, metavar="STEP",
                   help="process 1 sends itself SIGTERM inside the background commit of STEP")
    p.add_argument("--term-before-guard", action="store_true",
                   help="process 1 sends itself SIGTERM after initialize, before the guard")
    p.add_argument("--commit-delay", type=float, default=0.0,
                   help="every background commit sleeps this long (a slow save)")
    p.add_argument("--term-at-step", type=int, default=None, metavar="STEP",
                   help="process 1 sends itself SIGTERM right before its sync point of STEP")
    p.add_argument("--no-final", action="store_true",
                   help="do not pass final=True on the last step (the old loop)")
    a = p.parse_args()

    distckpt.initialize()
    me = jax.process_index()
    if a.term_before_guard and me == 1:
        # With JAX's preemption service on, its native handler takes this one.
        print(f"[process={me}] SIGTERM to myself before entering the guard", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    mesh = distckpt.make_mesh(f"fsdp={jax.device_count()}")
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    shape = (2 * jax.device_count(),)

    @jax.jit
    def update(x, step):
        return x * 0.5 + jnp.sum(x) * 1e-3 + step  # the sum crosses processes

    def hook(point: str, step: int) -> None:  # runs in the background commit
        if point != "process_state:write":
            return
        if step == a.term_in_commit and me == 1:
            print(f"[process={me}] SIGTERM to myself during the commit of step {step}",
                  flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(max(a.commit_delay, 1.0))  # the save is certainly still in flight
        elif a.commit_delay:
            time.sleep(a.commit_delay)

    user_calls = []
    native_before = _address(_read_action(signal.SIGTERM))  # JAX's notifier, if enabled
    options = distckpt.CheckpointOptions(max_to_keep=None, save_interval_steps=a.save_every,
                                         fault_hook=hook, timeout_s=120)
    preempted_at = None
    with PreemptionGuard("worker", timeout_s=120) as guard, \
            distckpt.CheckpointService(a.dir, options) as ckpt:
        if a.user_handler:
            signal.signal(signal.SIGTERM, lambda s, _f: user_calls.append(s))
        start = 0
        if ckpt.all_steps():
            target = {"state": {"x": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)}}
            restored = ckpt.restore(target)
            start, x = restored.step, restored.items["state"]["x"]
        else:
            x = jax.device_put(jnp.zeros(shape, jnp.float32), sharding)
        values = {}
        for step in range(start + 1, a.steps + 1):
            x = update(x, step)
            values[step] = float(jnp.sum(x))  # gathers from every process
            if step == start + 1:
                print(f"READY {os.getpid()}", flush=True)
            time.sleep(a.step_delay)
            if step == a.term_at_step and me == 1:
                print(f"[process={me}] SIGTERM to myself at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
            preempted = guard.reached_sync_point(
                step, final=step == a.steps and not a.no_final)
            ckpt.save(step, {"state": {"x": x}}, process_state={"next": step + 1},
                      force=preempted)
            if preempted:
                ckpt.wait()
                preempted_at = step
                break
        ckpt.wait()
        saved = ckpt.all_steps()
    print("RESULT " + json.dumps({
        "process": me, "start_step": start, "preempted_at": preempted_at, "steps": saved,
        "values": values, "user_handler_calls": len(user_calls),
        "handler_restored": _address(_read_action(signal.SIGTERM)) == native_before,
        "native_handler": native_before not in (0, None),
        "jax_service": jax._src.distributed.global_state.preemption_sync_manager is not None,
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
