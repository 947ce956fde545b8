"""One process of the policy-agreement test (tests/test_policy.py), run through the launcher.

    python tests/policy_worker.py OUT CKPT_DIR

Every process runs the same policies on its own clock (a different rate per process) and
its own loss (process 0 steady, the others oscillating), once agreed (should_save) and once
alone (decide), and writes both decision lists to OUT.<process>.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distckpt import CheckpointOptions, CheckpointService
from distckpt.checkpoint.policy import LossAdaptivePolicy, RestartLog, YoungDalyPolicy
from distckpt.multihost import coordinator


class Tiny(nnx.Module):
    def __init__(self, value: jax.Array):
        self.w = nnx.Param(value)


def service_decisions(ckpt_dir: str, pid: int, now: list[float]) -> dict:
    """CheckpointService(save_policy=...) saves what the primary's policy decides, with
    the cost it measured from the service's own saves (no cost given)."""
    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    n = 4 * jax.device_count()
    value = jax.make_array_from_callback(
        (n,), sharding, lambda idx: np.arange(n, dtype=np.float32)[idx])
    policy = YoungDalyPolicy(mtbf_s=100.0, clock=lambda: now[0], name="svc-yd")
    saved = []
    options = CheckpointOptions(save_policy=policy, save_on_steps=(29,), max_to_keep=None)
    with CheckpointService(f"{ckpt_dir}/svc", options) as ckpt:
        for step in range(1, 31):
            now[0] = step * (3.0 + pid)
            if ckpt.save(step, {"model": Tiny(value)}, metrics={"loss": 1.0 + pid}):
                saved.append(step)
            ckpt.wait()  # the next decision sees this save's measured cost
        steps = ckpt.all_steps()
    return {"svc_saved": saved, "svc_steps": steps,
            "svc_cost_s": policy.cost_estimate_s if pid == 0 else None}


def main(out: str, ckpt_dir: str) -> None:
    coordinator.initialize()
    pid = jax.process_index()
    now = [0.0]

    def clock() -> float:
        return now[0]

    def young_daly(name: str) -> YoungDalyPolicy:
        return YoungDalyPolicy(mtbf_s=100.0, cost_s=0.5, clock=clock, name=name)  # 10 s

    def adaptive(name: str) -> LossAdaptivePolicy:
        return LossAdaptivePolicy(base_interval=4, min_interval=1, max_interval=8, window=3,
                                  threshold=0.1, name=name)

    agreed_yd, local_yd = young_daly("yd"), young_daly("yd-local")
    agreed_ad, local_ad = adaptive("ad"), adaptive("ad-local")
    got: dict[str, list] = {"young_daly": [], "young_daly_local": [], "adaptive": [],
                            "adaptive_local": []}
    for step in range(1, 31):
        now[0] = step * (3.0 + pid)  # each process's clock runs at its own rate
        metrics = {"loss": 1.0 + 0.5 * pid * ((step // 2) % 2)}
        got["young_daly"].append(agreed_yd.should_save(step))
        got["young_daly_local"].append(local_yd.decide(step, clock(), None))
        got["adaptive"].append(agreed_ad.should_save(step, metrics=metrics))
        got["adaptive_local"].append(local_ad.decide(step, clock(), metrics))
    wall = [1000.0 + 7 * pid]  # skewed wall clocks: only the primary's is written
    log = RestartLog(ckpt_dir, wall_clock=lambda: wall[0])
    got["failures"] = [log.record_start(), log.record_start(resumed_step=5)]
    got["runs"] = len(log.runs())
    got.update(service_decisions(ckpt_dir, pid, now))
    with open(f"{out}.{pid}", "w") as f:
        json.dump(got, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
