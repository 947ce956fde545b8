"""Plain Orbax save/restore of a sharded array tree at any location, by real processes.

This is the object-storage prototype's proof: N processes (each calls
``jax.distributed.initialize`` through the launcher) save a tree of sharded
``jax.Array``\\ s with Orbax's ``CheckpointManager`` + ``PyTreeCheckpointHandler`` (OCDBT)
to a location such as ``s3://bucket/prefix``, and the same or another topology restores
it. Every process checks each shard it holds byte for byte against the values the tree
was built from, so a pass means bit-exact whatever the sharding.

Only :func:`distckpt.storage.prepare` and :func:`distckpt.storage.temporary_path_base`
come from distckpt; the rest is stock Orbax 0.12.8.

    python -m distckpt.testing.orbax_roundtrip save URL OUT.json [--step N] [--mesh data=2,fsdp=2]
    python -m distckpt.testing.orbax_roundtrip restore URL OUT.json [--step N] [--mesh fsdp=4]

(run each through :func:`distckpt.tools.launcher.launch`; :func:`run` does that.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# name -> (global shape, dtype, logical partition over the mesh axes)
LEAVES: dict[str, tuple[tuple[int, ...], str, tuple[str | None, ...]]] = {
    "params/w": ((64, 48), "float32", ("data", "fsdp")),
    "params/b": ((48,), "bfloat16", (None,)),
    "opt/count": ((8, 16), "int32", ("fsdp", None)),
    "opt/mask": ((33,), "uint8", (None,)),
}


def expected(name: str, scale: int = 1) -> Any:
    """The values leaf `name` was built from: a pure function of its name."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    import numpy as np

    shape, dtype, _ = LEAVES[name]
    shape = (shape[0] * scale, *shape[1:])
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if dtype in ("int32", "uint8"):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def _sharding(mesh, axes):
    import jax

    spec = [a if a in mesh.axis_names else None for a in axes]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _manager(url: str):
    import orbax.checkpoint as ocp

    from distckpt import storage

    location = storage.Location.parse(url)
    directory = storage.prepare(location)
    mp = ocp.options.MultiprocessingOptions(primary_host=0)
    options = ocp.CheckpointManagerOptions(
        temporary_path_class=storage.temporary_path_base(location),
        multiprocessing_options=mp, enable_async_checkpointing=True, max_to_keep=None)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, multiprocessing_options=mp)
    return ocp.CheckpointManager(directory, item_names=("state",),
                                 item_handlers={"state": handler}, options=options)


def _tree(mesh, scale: int) -> dict[str, Any]:
    import jax

    out = {}
    for name, (_, _, axes) in LEAVES.items():
        values = expected(name, scale)
        out[name] = jax.make_array_from_callback(values.shape, _sharding(mesh, axes),
                                                 values.__getitem__)
    return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        group, leaf = name.split("/")
        tree.setdefault(group, {})[leaf] = value
    return tree


def worker(phase: str, url: str, out: str, step: int, mesh_spec: str, scale: int) -> None:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from distckpt.multihost import coordinator
    from distckpt.state.mesh import make_mesh

    coordinator.initialize()
    mesh = make_mesh(mesh_spec)
    report: dict[str, Any] = {"phase": phase, "process_count": jax.process_count(),
                              "devices": jax.device_count(), "mesh": mesh_spec, "step": step}
    with _manager(url) as manager:
        if phase == "save":
            tree = _nest(_tree(mesh, scale))
            t0 = time.perf_counter()
            manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
            report["stall_s"] = time.perf_counter() - t0
            manager.wait_until_finished()
            report["save_s"] = time.perf_counter() - t0
            report["steps"] = manager.all_steps()
        else:
            manager.reload()
            report["steps"] = manager.all_steps()
            abstract = _nest({
                name: jax.ShapeDtypeStruct(expected(name, scale).shape, np.dtype(dtype),
                                           sharding=_sharding(mesh, axes))
                for name, (_, dtype, axes) in LEAVES.items()})
            t0 = time.perf_counter()
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))["state"]
            jax.block_until_ready(restored)
            report["restore_s"] = time.perf_counter() - t0
            mismatches, shards, nbytes = [], 0, 0
            for name, (_, _, axes) in LEAVES.items():
                group, leaf = name.split("/")
                array, want = restored[group][leaf], expected(name, scale)
                if not array.sharding.is_equivalent_to(_sharding(mesh, axes), array.ndim):
                    mismatches.append(f"{name}: sharding {array.sharding}")
                for shard in array.addressable_shards:
                    got = np.asarray(shard.data)
                    shards += 1
                    nbytes += got.nbytes
                    if got.dtype != want.dtype or got.tobytes() != want[shard.index].tobytes():
                        mismatches.append(f"{name}{shard.index}: contents differ")
            local = {"process": jax.process_index(), "shards": shards, "bytes": nbytes,
                     "mismatches": mismatches}
            report["checked"] = coordinator.all_gather(f"roundtrip:{step}:checked", local)
    report["total_bytes"] = int(sum(expected(n, scale).nbytes for n in LEAVES))
    if jax.process_index() == 0:
        Path(out).write_text(json.dumps(report))


def run(phase: str, url: str, hosts: int, devices: int, *, mesh: str, step: int = 1,
        scale: int = 1, env: Mapping[str, str] | None = None, timeout_s: float = 300,
        workdir: str | os.PathLike) -> dict[str, Any]:
    """Run one phase as `hosts` processes x `devices` CPU devices; return the report."""
    from distckpt.tools.launcher import launch

    out = Path(workdir) / f"{phase}-{hosts}x{devices}-step{step}.json"
    out.unlink(missing_ok=True)
    buf = io.StringIO()
    repo = str(Path(__file__).resolve().parents[2])
    base = {**os.environ, **(env or {})}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (repo, base.get("PYTHONPATH")) if p)
    result = launch([sys.executable, "-m", "distckpt.testing.orbax_roundtrip", phase, url,
                     str(out), "--step", str(step), "--mesh", mesh, "--scale", str(scale)],
                    hosts, devices, out=buf, timeout_s=timeout_s, forward_signals=False,
                    env=base)
    if result.returncode != 0 or not out.exists():
        raise RuntimeError(f"{phase} on {hosts}x{devices} failed ({result.returncodes}):\n"
                           f"{buf.getvalue()[-6000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("save", "restore"))
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--step", type=int, default=1)
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--scale", type=int, default=1,
                        help="multiply every leaf's first dimension (bigger checkpoints)")
    args = parser.parse_args(argv)
    worker(args.phase, args.url, args.out, args.step, args.mesh, args.scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
