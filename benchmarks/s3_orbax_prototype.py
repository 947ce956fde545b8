"""Orbax on s3:// end to end: real processes, a real S3 server, bit-exact restores.

    python benchmarks/s3_orbax_prototype.py [--scale N] [--url s3://bucket/prefix] [--json PATH]

Without ``--url`` it starts a private SeaweedFS server (``distckpt.tools.s3server``) and
uses ``s3://distckpt-test/prototype``; with ``--url`` it uses the ``AWS_*`` environment.
Then, through ``distckpt.tools.launcher.launch`` (every process calls ``jax.distributed.initialize``):

1. 2 processes x 2 CPU devices (mesh data=2,fsdp=2) save a tree of sharded arrays with stock
   Orbax (CheckpointManager + PyTreeCheckpointHandler, OCDBT, async) as step 1;
2. 2 x 2 restore it onto mesh fsdp=4, and 1 x 2 onto mesh fsdp=2; every process compares
   each shard it holds byte for byte with the values the tree was built from;
3. for scale, the same number of bytes is PUT and GET as 4 MiB objects straight through
   TensorStore's s3 kvstore (one process), the ceiling the checkpoint could reach.

``--scale N`` multiplies every leaf's first dimension (N=1 is 12.6 KiB; N=20000 ~ 246 MiB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distckpt import storage  # noqa: E402
from distckpt.testing import orbax_roundtrip, s3server  # noqa: E402


def raw_put_get(url: str, nbytes: int, object_bytes: int = 4 << 20) -> dict[str, float]:
    """PUT then GET `nbytes` as `object_bytes` objects through TensorStore's s3 kvstore."""
    import tensorstore as ts

    location = storage.Location.parse(url)
    kv = ts.KvStore.open(location.kvstore_spec()).result()
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
    moved = count * object_bytes
    return {"bytes": moved, "put_s": put_s, "get_s": get_s,
            "put_mib_s": moved / put_s / 2**20, "get_mib_s": moved / get_s / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="s3://bucket/prefix (default: a private SeaweedFS)")
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        url = args.url
        if url is None:
            server = stack.enter_context(s3server.seaweedfs())
            env = server.env()
            os.environ.update(env)
            url = server.url("prototype", str(int(time.time())))
        workdir = stack.enter_context(tempfile.TemporaryDirectory())
        report: dict = {"url": url, "location": storage.Location.parse(url).describe()}
        t0 = time.perf_counter()
        report["save_2x2"] = orbax_roundtrip.run("save", url, 2, 2, mesh="data=2,fsdp=2",
                                                 scale=args.scale, env=env, workdir=workdir,
                                                 timeout_s=1200)
        report["save_2x2"]["wall_s"] = time.perf_counter() - t0
        for hosts, mesh in ((2, "fsdp=4"), (1, "fsdp=2")):
            t0 = time.perf_counter()
            got = orbax_roundtrip.run("restore", url, hosts, 2, mesh=mesh, scale=args.scale,
                                      env=env, workdir=workdir, timeout_s=1200)
            got["wall_s"] = time.perf_counter() - t0
            report[f"restore_{hosts}x2"] = got
        total = report["save_2x2"]["total_bytes"]
        report["raw"] = raw_put_get(url, total)
    ok = all(not p["mismatches"] for k in ("restore_2x2", "restore_1x2")
             for p in report[k]["checked"])
    report["bit_exact"] = ok
    mib = total / 2**20
    print(f"{url}: {mib:.2f} MiB in {len(orbax_roundtrip.LEAVES)} leaves")
    print(f"  save    2x2 data=2,fsdp=2: {report['save_2x2']['save_s']:.2f}s "
          f"({mib / report['save_2x2']['save_s']:.1f} MiB/s), "
          f"stall {report['save_2x2']['stall_s']:.2f}s")
    for key in ("restore_2x2", "restore_1x2"):
        r = report[key]
        print(f"  restore {key[-3:]} {r['mesh']}: {r['restore_s']:.2f}s "
              f"({mib / r['restore_s']:.1f} MiB/s), shards checked "
              f"{sum(p['shards'] for p in r['checked'])}, bit-exact "
              f"{not any(p['mismatches'] for p in r['checked'])}")
    raw = report["raw"]
    print(f"  raw TensorStore s3 PUT {raw['put_mib_s']:.1f} MiB/s, GET {raw['get_mib_s']:.1f} "
          f"MiB/s ({raw['bytes'] / 2**20:.1f} MiB as 4 MiB objects)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
