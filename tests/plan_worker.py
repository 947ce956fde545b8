"""One process of tests/test_plan_restore.py's multi-process job (through the launcher).

    python tests/plan_worker.py --dir CKPT --out OUT

Saves a step on this job's slice (mesh data=2,fsdp=2), then for each target slice plans
the restore (every process alike, from metadata) and restores onto the slice's mesh with
each leaf's saved spec; each process writes its own plan and read figures to OUT.<index>.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt.state import nnx_state

SPECS = {"w": P("fsdp", None), "v": P(None, "fsdp"), "b": P(), "r": P("data")}
TARGETS = {"2x2:data=2,fsdp=2": SPECS,
           "2x2:fsdp=4": {"w": P("fsdp", None), "v": P(None, "fsdp"), "b": P(), "r": P()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    distckpt.initialize()
    rng = np.random.default_rng(0)
    shapes = {"w": ((256, 384), np.float32), "v": ((128, 512), np.float32),
              "b": ((1000,), np.float32), "r": ((64, 8), np.int32)}
    data = {k: rng.standard_normal(s).astype(d) for k, (s, d) in shapes.items()}
    mesh = distckpt.make_mesh("data=2,fsdp=2")

    def put(name: str) -> jax.Array:
        sharding = NamedSharding(mesh, SPECS[name])
        return jax.make_array_from_callback(data[name].shape, sharding,
                                            lambda index: data[name][index])

    with distckpt.CheckpointService(a.dir) as ckpt:
        ckpt.save(1, {"m": {k: put(k) for k in shapes}})
        ckpt.wait()
    runs = []
    for to, specs in TARGETS.items():
        plan = distckpt.plan_restore(a.dir, to, memory_mb=1, read_gbps=1.0)
        target_mesh = distckpt.make_mesh(to.split(":")[1])
        target = {"m": {k: jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(target_mesh,
                                                                             specs[k]))
                        for k, (s, d) in shapes.items()}}
        options = distckpt.CheckpointOptions(read_only=True, restore_memory_mb=1)
        with distckpt.CheckpointService(a.dir, options) as ckpt:
            restored = ckpt.restore(target)
        mine = plan.hosts[jax.process_index()]
        shards = sum(s.data.nbytes for leaf in nnx_state.flatten_items(restored.items)
                     for s in leaf.value.addressable_shards)
        runs.append({"to": to, "planned": mine.bytes, "read": restored.read_bytes,
                     "planned_shards": mine.shard_bytes, "shards": shards,
                     "verified": restored.verified, "strict": plan.strict,
                     "files": mine.files})
    with open(f"{a.out}.{jax.process_index()}", "w") as f:
        json.dump({"process": jax.process_index(), "runs": runs}, f)


if __name__ == "__main__":
    main()
