"""What content checksums cost: save stall added, and restore time added by verification.

    python benchmarks/integrity_cost.py [--mib 256] [--saves 5] [--devices 8]

One process with N simulated CPU devices saves a random float32 state of the given
size (sharded over all devices) several times, then restores it with and without
verification, alternating. Prints a JSON line per measurement and a summary:
the checksum enqueue time inside each save's blocking stall (`digest_s`; the first
save also compiles the checksum kernels), and restore time with vs without
verification (median), and the checksum kernel alone against XLA's plain sum of the
same 64 MiB on one device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def kernel_ms(jax, jnp, np, mib: int = 64) -> dict[str, float]:
    """The checksum kernel alone on one device and `mib` MiB, against XLA's plain sum of
    the same bytes (the floor of any checksum computed this way): best of 5, in ms."""
    from distckpt.state import digest

    x = jnp.asarray(np.random.default_rng(1).random((mib * 2**18,), dtype=np.float32))
    starts = jnp.zeros((1,), jnp.uint32)
    plain_sum = jax.jit(lambda a: jnp.sum(jax.lax.bitcast_convert_type(a, jnp.uint32)))

    def best(fn, *args) -> float:
        fn(*args).block_until_ready()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times)

    return {f"digest_kernel_{mib}mib_ms": best(digest._shard_lanes, x, starts),
            f"xla_sum_{mib}mib_ms": best(plain_sum, x)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=256, help="state size in MiB (default 256)")
    p.add_argument("--saves", type=int, default=5, help="saves (default 5)")
    p.add_argument("--restores", type=int, default=5, help="restores of each kind (default 5)")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (default 8)")
    p.add_argument("--dir", help="checkpoint directory (default: a new temp dir)")
    a = p.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import distckpt

    mesh = jax.make_mesh((a.devices,), ("fsdp",))
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    leaves = 8
    rows = max(a.devices, int(a.mib * 2**20 / 4 / leaves / 1024) // a.devices * a.devices)
    rng = np.random.default_rng(0)
    state = {"w": {str(i): jax.device_put(jnp.asarray(
        rng.standard_normal((rows, 1024), dtype=np.float32)), sharding) for i in range(leaves)}}
    nbytes = sum(x.nbytes for x in state["w"].values())
    directory = a.dir or tempfile.mkdtemp(prefix="distckpt-integrity-")
    opts = distckpt.CheckpointOptions(max_to_keep=2)
    out = {"bytes": nbytes, "devices": a.devices, "saves": [], "restore": [],
           "restore_verified": []}
    with distckpt.CheckpointService(directory, opts) as ckpt:
        for step in range(1, a.saves + 1):
            ckpt.save(step, state)
            ckpt.wait()
            s = ckpt.save_stats[-1]
            out["saves"].append({"step": step, "stall_s": s.stall_s, "digest_s": s.digest_s,
                                 "commit_s": s.commit_s})
            print(json.dumps(out["saves"][-1]), flush=True)
        target = {"w": {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                        for k, v in state["w"].items()}}
        ckpt.restore(target, verify=True)  # warm-up (compiles the checksum kernels)
        for _ in range(a.restores):
            for verify in (False, True):
                t0 = time.perf_counter()
                r = ckpt.restore(target, verify=verify)
                jax.block_until_ready(jax.tree.leaves(r.items))
                dt = time.perf_counter() - t0
                key = "restore_verified" if verify else "restore"
                out[key].append({"seconds": dt, "verify_seconds": r.verify_seconds})
                print(json.dumps({key: out[key][-1]}), flush=True)
    later = out["saves"][1:] or out["saves"]
    plain = statistics.median(r["seconds"] for r in out["restore"])
    checked = statistics.median(r["seconds"] for r in out["restore_verified"])
    summary = {
        "state_mib": nbytes / 2**20,
        "first_save_stall_s": out["saves"][0]["stall_s"],
        "first_save_digest_s": out["saves"][0]["digest_s"],
        "later_saves_median_stall_s": statistics.median(s["stall_s"] for s in later),
        "later_saves_median_digest_s": statistics.median(s["digest_s"] for s in later),
        "restore_median_s": plain, "restore_verified_median_s": checked,
        "verify_overhead": checked / plain - 1.0,
        **kernel_ms(jax, jnp, np),
    }
    print(json.dumps({"summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
