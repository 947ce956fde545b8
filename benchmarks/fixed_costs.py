"""Fixed costs of a save: save() stall and commit of a tiny state, and cross-host round trips.

    distckpt launch --hosts 1 --devices-per-host 2 -- python benchmarks/fixed_costs.py
    distckpt launch --hosts 4 --devices-per-host 2 -- python benchmarks/fixed_costs.py --mib 1

Saves a state of 8 random float32 arrays (``--mib`` in total, sharded over every device)
``--saves`` times with plain Orbax (``CheckpointManager``, ``StandardSave``) and with
distckpt's ``CheckpointService``, alternating, each save followed by its wait; then times
``--rounds`` barriers, all_gathers and Orbax's ``sync_global_processes``. Process 0 prints
medians (the first two saves of each are warm-up). docs/benchmarks.md's "What the targets say"
quotes it: what a save costs before any byte is written.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import distckpt


def _ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1e3:.1f} ms (min {min(values) * 1e3:.1f}, " \
           f"max {max(values) * 1e3:.1f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=1.0, help="state size (default 1 MiB)")
    parser.add_argument("--saves", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--dir", help="checkpoint root (default: a new temp dir; shared by "
                        "all processes when given)")
    args = parser.parse_args()
    distckpt.initialize()

    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec
    from orbax.checkpoint._src.multihost import multihost

    from distckpt.multihost import coordinator

    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    n = max(jax.device_count(), int(args.mib * 2**20 / 4 / 8) // jax.device_count()
            * jax.device_count())
    data = np.random.default_rng(0).random(n, dtype=np.float32)
    state = {f"w{i}": jax.make_array_from_callback((n,), sharding, lambda idx: data[idx])
             for i in range(8)}

    class Model(nnx.Module):
        def __init__(self):
            for name, value in state.items():
                setattr(self, name, nnx.Param(value))

    model = Model()
    root = args.dir or coordinator.primary_decides(
        "fixed-costs:dir", lambda: tempfile.mkdtemp(prefix="distckpt-fixed-"), 60)
    manager = ocp.CheckpointManager(Path(root) / "orbax",
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    service = distckpt.CheckpointService(Path(root) / "distckpt",
                                         distckpt.CheckpointOptions(max_to_keep=2))
    times: dict[str, list[tuple[float, float]]] = {"orbax": [], "distckpt": []}
    for step in range(args.saves):
        t0 = time.perf_counter()
        manager.save(step, args=ocp.args.StandardSave(state))
        t1 = time.perf_counter()
        manager.wait_until_finished()
        times["orbax"].append((t1 - t0, time.perf_counter() - t0))
        t0 = time.perf_counter()
        service.save(step, {"model": model}, force=True)
        t1 = time.perf_counter()
        service.wait()
        times["distckpt"].append((t1 - t0, time.perf_counter() - t0))
    manager.close()
    service.close()

    rounds: dict[str, list[float]] = {"barrier": [], "all_gather": [],
                                      "orbax sync_global_processes": []}
    for i in range(args.rounds):
        t0 = time.perf_counter()
        coordinator.barrier(f"fixed-costs:b{i}", 60)
        t1 = time.perf_counter()
        coordinator.all_gather(f"fixed-costs:g{i}", i, 60)
        t2 = time.perf_counter()
        multihost.sync_global_processes(f"fixed-costs:o{i}")
        t3 = time.perf_counter()
        rounds["barrier"].append(t1 - t0)
        rounds["all_gather"].append(t2 - t1)
        rounds["orbax sync_global_processes"].append(t3 - t2)
    if jax.process_index() == 0:
        print(f"{jax.process_count()} process(es) x {jax.local_device_count()} devices, "
              f"state {8 * n * 4 / 2**20:.2f} MiB")
        for name, pairs in times.items():
            kept = pairs[2:] or pairs
            print(f"{name:9s} save() stall {_ms([p[0] for p in kept])}")
            print(f"{name:9s} committed    {_ms([p[1] for p in kept])}")
        for name, values in rounds.items():
            print(f"{name}: {_ms(values[5:] or values)}")


if __name__ == "__main__":
    main()
