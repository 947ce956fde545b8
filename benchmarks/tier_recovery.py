"""Recovery time from the local tier (own copies; a replaced host fed by its peer) against
the persistent tier, for the same state on the same job.

    python benchmarks/tier_recovery.py [--size-mib 256] [--hosts 4 --devices 2] [--dir DIR]

One job (simulated hosts through the launcher) saves one step of `--size-mib` of float32
arrays sharded over all devices, with a local tier under DIR/local/{host} and the
persistent directory DIR/ckpt; then, in fresh jobs, restores it three ways and prints the
restore times each host measured (``Restored.seconds``, verification included):
``local`` (every host reads its own copy), ``peer`` (host 1's local directory wiped first:
it pulls its shards from host 2's copy) and ``persistent`` (the service opened without
the local tier, the step's files evicted from the page cache first, as ``distckpt bench``
does). RAM-backed storage is what the local tier is for: DIR defaults to a new directory
under /dev/shm for the local tier, and the persistent directory under the system temp
directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)


def worker(phase: str, ckpt: str, local: str, size_mib: int, out: str) -> None:
    import logging

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import distckpt

    logging.basicConfig(level=os.environ.get("DISTCKPT_LOG", "WARNING"), force=True)
    distckpt.initialize()
    mesh = distckpt.make_mesh(f"fsdp={jax.device_count()}")
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    rows = (size_mib << 20) // 4 // 4096 // 8
    shape = (rows - rows % jax.device_count(), 4096)

    def make(i: int) -> jax.Array:
        return jax.jit(lambda: jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
                       * (i + 1), out_shardings=sharding)()

    if phase == "stall":
        stall(ckpt, local, make, out)
        return
    options = distckpt.CheckpointOptions(
        max_to_keep=None, local_directory=None if phase == "persistent" else local,
        read_only=phase != "save")
    with distckpt.CheckpointService(ckpt, options) as svc:
        if phase == "save":
            svc.save(1, {"state": {f"w{i}": make(i) for i in range(8)}}, force=True)
            svc.wait()
            return
        target = {"state": {f"w{i}": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
                            for i in range(8)}}
        restored = svc.restore(target)
        jax.block_until_ready(jax.tree.leaves(restored.items))
    Path(out, f"{phase}.{jax.process_index()}.json").write_text(json.dumps(
        {"seconds": restored.seconds, "from": restored.restored_from[jax.process_index()],
         "step": restored.step}))


def stall(ckpt: str, local: str, make, out: str) -> None:
    """save() stall of a local-only save, a save due in both tiers and a persistent-only
    save of the same state (the median of 3, after one warm-up save each)."""
    import statistics
    import time

    import jax

    import distckpt

    state = {"state": {f"w{i}": make(i) for i in range(8)}}
    got = {}
    for name, options, where in [
            ("local", distckpt.CheckpointOptions(save_interval_steps=None, max_to_keep=2,
                                                 local_directory=local.replace("{host}",
                                                                               "stall-{host}")),
             f"{ckpt}-stall-local"),
            ("both", distckpt.CheckpointOptions(max_to_keep=2, local_directory=local.replace(
                "{host}", "both-{host}")), f"{ckpt}-stall-both"),
            ("persistent", distckpt.CheckpointOptions(max_to_keep=2), f"{ckpt}-stall-persistent")]:
        with distckpt.CheckpointService(where, options) as svc:
            times = []
            for step in range(1, 5):
                jax.block_until_ready(state)
                t0 = time.perf_counter()
                svc.save(step, state)
                times.append(time.perf_counter() - t0)
                svc.wait()
        got[name] = statistics.median(times[1:])
    Path(out, f"stall.{jax.process_index()}.json").write_text(json.dumps(got))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--dir", help="work directory (default: a new temp directory)")
    p.add_argument("--s3", action="store_true",
                   help="persistent tier on s3:// (a local SeaweedFS server, started here)")
    p.add_argument("--only", choices=("restore", "stall"),
                   help="measure only the restores or only the save stalls")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        phase, ckpt, local, size, out = a.worker
        worker(phase, ckpt, local, int(size), out)
        return
    work = Path(a.dir or tempfile.mkdtemp(prefix="distckpt-tiers-"))
    shm = Path(tempfile.mkdtemp(prefix="distckpt-tiers-", dir="/dev/shm"
                                if os.path.isdir("/dev/shm") else None))
    local, out = str(shm / "{host}"), work / "out"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": ROOT}
    try:
        with contextlib.ExitStack() as stack:
            ckpt: Path | str = work / "ckpt"
            if a.s3:
                from distckpt.tools.s3server import seaweedfs

                server = stack.enter_context(seaweedfs(work / "s3"))
                env.update(server.env())
                ckpt = server.url("tiers")
            run(a, shm, ckpt, local, out, env)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)


def run(a, shm: Path, ckpt: Path | str, local: str, out: Path, env) -> None:
    from distckpt.tools.launcher import launch

    def job(phase: str) -> None:
        r = launch([sys.executable, __file__, "--worker", phase, str(ckpt), local,
                    str(a.size_mib), str(out)], a.hosts, a.devices, env=env, timeout_s=900)
        if r.returncode:
            raise SystemExit(f"{phase} job failed ({r.returncode})")

    if a.only != "stall":
        restores(a, shm, ckpt, out, job)
    if a.only != "restore":
        job("stall")
        stalls = [json.loads((out / f"stall.{i}.json").read_text()) for i in range(a.hosts)]
        for name, what in (("local", "a local-only save"), ("both", "a save due in both tiers"),
                           ("persistent", "a persistent-only save")):
            print(f"save() stall of {what}: {max(s[name] for s in stalls):.3f} s "
                  "(slowest host, median of 3)")


def restores(a, shm: Path, ckpt: Path | str, out: Path, job) -> None:
    from distckpt.bench.measure import evict, files_under

    job("save")
    rows = {}
    for phase in ("local", "peer", "persistent"):
        if phase == "peer":
            shutil.rmtree(shm / "host1")
        if phase == "persistent" and isinstance(ckpt, Path):
            evict(files_under(ckpt))
        job(phase)
        got = [json.loads((out / f"{phase}.{i}.json").read_text()) for i in range(a.hosts)]
        rows[phase] = {"seconds": max(g["seconds"] for g in got),
                       "from": [g["from"] for g in got], "step": got[0]["step"]}
    print(json.dumps({"size_mib": a.size_mib, "hosts": a.hosts, "devices": a.devices,
                      "persistent": "s3" if a.s3 else "local disk", "restore": rows},
                     indent=1))
    base = rows["persistent"]["seconds"]
    for phase in ("local", "peer"):
        print(f"{phase}: {rows[phase]['seconds']:.3f} s, persistent {base:.3f} s: "
              f"{base / rows[phase]['seconds']:.1f}x faster")


if __name__ == "__main__":
    main()
