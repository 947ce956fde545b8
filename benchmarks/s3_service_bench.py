"""CheckpointService on s3:// against raw object PUT/GET of the same bytes (issue 6).

    python benchmarks/s3_service_bench.py [--mib 64] [--reps 3] [--url s3://bucket/prefix]
                                          [--json PATH]

One process with 8 simulated CPU devices (mesh fsdp=8) saves a state of random float32
(``--mib`` in 8 leaves, sharded 8 ways) with :class:`distckpt.CheckpointService`
(async, content digests, commit record), ``--reps`` times under new steps, then restores
the newest step with and without verification. The ceiling: the same number of bytes PUT
and then GET as 4 MiB objects straight through TensorStore's s3 kvstore from the same
process. Figures are medians. Without ``--url`` it starts a private SeaweedFS server
(``distckpt.testing.s3server``); with ``--url`` it uses the ``AWS_*`` environment.
``distckpt bench`` (local disk, many contenders, several processes) does not take
``s3://`` yet.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = float(2**20)
LEAVES = 8


def state(mib: float, seed: int):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("fsdp",))
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    rows = max(8, int(mib * MiB / LEAVES / 4 / 1024) // 8 * 8)
    rng = np.random.default_rng(seed)
    return {"state": {f"w{i}": jax.device_put(rng.standard_normal((rows, 1024), np.float32),
                                              sharding) for i in range(LEAVES)}}


def abstract(tree):
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        tree)


def raw_put_get(url: str, nbytes: int, object_bytes: int = 4 << 20) -> dict[str, float]:
    """PUT then GET `nbytes` as `object_bytes` objects through TensorStore's s3 kvstore."""
    import tensorstore as ts

    from distckpt import storage

    kv = ts.KvStore.open(storage.Location.parse(url).kvstore_spec()).result()
    payload = os.urandom(object_bytes)
    count = max(1, -(-nbytes // object_bytes))
    t0 = time.perf_counter()
    for f in [kv.write(f"raw/{i}", payload) for i in range(count)]:
        f.result()
    put_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in [kv.read(f"raw/{i}") for i in range(count)]:
        f.result()
    get_s = time.perf_counter() - t0
    kv.delete_range(ts.KvStore.KeyRange(inclusive_min="raw/", exclusive_max="raw0")).result()
    return {"put_s": put_s, "get_s": get_s, "bytes": count * object_bytes}


def run(url: str, mib: float, reps: int) -> dict:
    import jax
    import numpy as np

    import distckpt

    items = state(mib, seed=0)
    nbytes = sum(int(a.nbytes) for a in jax.tree.leaves(items))
    saves, commits, restores, restores_noverify, raws = [], [], [], [], []
    opts = distckpt.CheckpointOptions(max_to_keep=2)
    with distckpt.CheckpointService(url, opts) as ckpt:
        ckpt.save(0, items)  # compiles the digests; not timed
        ckpt.wait()
        for rep in range(1, reps + 1):
            t0 = time.perf_counter()
            ckpt.save(rep, items)
            saves.append(time.perf_counter() - t0)
            ckpt.wait()
            commits.append(time.perf_counter() - t0)
    ro = distckpt.CheckpointOptions(read_only=True)
    with distckpt.CheckpointService(url, ro) as ckpt:
        ckpt.restore(abstract(items))  # compiles the digests of the restored shards; not timed
        for verify, out in ((True, restores), (False, restores_noverify)):
            for _ in range(reps):
                t0 = time.perf_counter()
                got = ckpt.restore(abstract(items), verify=verify)
                jax.block_until_ready(jax.tree.leaves(got.items))
                out.append(time.perf_counter() - t0)
    for name, a in got.items["state"].items():
        assert np.array_equal(np.asarray(a), np.asarray(items["state"][name])), name
    for _ in range(reps):
        raws.append(raw_put_get(url.rstrip("/") + "-raw", nbytes))
    med = statistics.median
    put_s, get_s = med(r["put_s"] for r in raws), med(r["get_s"] for r in raws)
    return {
        "url": url, "bytes": nbytes, "reps": reps, "load_average": os.getloadavg(),
        "save_stall_s": med(saves), "commit_s": med(commits),
        "restore_s": med(restores), "restore_noverify_s": med(restores_noverify),
        "raw_put_s": put_s, "raw_get_s": get_s,
        "save_mib_s": nbytes / med(commits) / MiB, "restore_mib_s": nbytes / med(restores) / MiB,
        "raw_put_mib_s": nbytes / put_s / MiB, "raw_get_mib_s": nbytes / get_s / MiB,
        "save_vs_put": put_s / med(commits), "restore_vs_get": get_s / med(restores),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="s3://bucket/prefix (default: a private SeaweedFS)")
    parser.add_argument("--mib", type=float, default=64.0, help="state size (default 64)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    from distckpt.testing import s3server

    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            server = stack.enter_context(s3server.seaweedfs())
            os.environ.update(server.env())
            url = server.url(f"service-bench-{int(time.time())}")
        result = run(url, args.mib, args.reps)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
