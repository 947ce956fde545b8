"""``distckpt plan-restore``: what restoring a step onto a target slice will do, per host,
before any array data is read.

For the newest committed step (or a given one) and a target slice
(``HOSTSxDEVICES[:AXIS=SIZE,...]``, the drill's syntax), :func:`plan_restore` says, for
each host: where it reads from (the tier), which files and how many bytes, the predicted
peak host memory and read time; and whether the target matches the step strictly. The
arithmetic is :mod:`distckpt.checkpoint.plan`'s; this module picks the step, the target
shardings and the read bandwidth.

**The target.** A user with a checkpoint directory and a slice expects the run's own
logical partitioning on the new mesh, and most runs keep their partition specs when they
change slices (``data=2,fsdp=4`` -> ``fsdp=8``). So by default every leaf gets the
PartitionSpec it was saved with (the step's provenance), applied to the target mesh's
axes. The match is strict when every saved spec names only axes the target mesh has and
each sharded dimension divides by its axes' sizes; otherwise each offending leaf is a
mismatch and is planned replicated along the missing axes (as distckpt's logical rules
drop a mesh axis a mesh lacks). A run whose rules shard onto axes the saving mesh did not
have (``tensor`` appearing) restores into other specs: pass the restore target itself
(``target=``, e.g. ``distckpt.abstract_target(factory, AbstractMesh(...))``), whose
shardings are then used, and whose paths, shapes and dtypes are matched against the step
as :func:`~distckpt.checkpoint.target.check_target` does.

**The read bandwidth.** ``read_gbps`` (GB/s per host) when given; otherwise measured now
by reading up to 16 MiB of the step's largest array data file (the one array-data read
the plan does; a page-cached file reads faster than a cold one). The predicted time is a
host's bytes at that bandwidth: I/O only, hosts reading in parallel.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from etils import epath
from jax.sharding import NamedSharding

from distckpt import storage
from distckpt.checkpoint import committed, plan, reader, target
from distckpt.errors import NoCheckpointError, StepProblem, StepUnusableError
from distckpt.state import nnx_state
from distckpt.state.mesh import MeshSpec
from distckpt.tools.drill import SliceSpec

__all__ = ["RestorePlan", "plan_restore"]

SAMPLE_BYTES = 16 << 20
"""How much of the step's array data the bandwidth probe reads."""


@dataclasses.dataclass(frozen=True)
class RestorePlan:
    """What restoring `step` onto `target` will do, host by host."""

    directory: str
    """The checkpoint directory."""
    step: int
    """The step planned (the newest committed one unless one was asked for)."""
    target: str
    """The target slice, ``HOSTSxDEVICES:AXIS=SIZE,...``."""
    saved: str
    """What saved the step: processes, devices and mesh."""
    hosts: tuple[plan.HostPlan, ...]
    """One plan per host of the target slice, by process index."""
    strict: bool
    """Whether the target matches the step strictly (no mismatches)."""
    mismatches: tuple[str, ...]
    """Why not: one line per leaf."""
    new_axes: tuple[str, ...]
    """Axes (of size > 1) of the target mesh that the saving mesh did not have. Planned
    from the saved specs, no leaf is sharded over them; a run whose rules shard onto them
    restores into other specs: plan it with ``target=``."""
    exact: bool
    """Whether ``bytes`` is what storage serves (raw zarr v2 chunks) rather than the
    decoded bytes of chunks TensorStore reads itself (compressed or zarr3)."""
    memory_mb: int | None
    """The restore memory budget planned with (``CheckpointOptions.restore_memory_mb``;
    None: the default, which depends on each host's bytes, see
    :func:`distckpt.checkpoint.streaming.budget`)."""
    read_gbps: float
    """The read bandwidth per host the times assume (GB/s, 1e9 bytes)."""
    read_gbps_measured: bool
    """Whether it was measured from the step's files (else it was given)."""

    @property
    def bytes(self) -> int:
        return sum(h.bytes for h in self.hosts)

    @property
    def seconds(self) -> float:
        """The slowest host's read time (hosts read in parallel)."""
        return max((h.seconds for h in self.hosts), default=0.0)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["hosts"] = [dataclasses.asdict(h) for h in self.hosts]
        out["mismatches"] = list(self.mismatches)
        out["new_axes"] = list(self.new_axes)
        out["bytes"], out["seconds"] = self.bytes, self.seconds
        return out


def plan_restore(directory: epath.PathLike | storage.Location, to: str | SliceSpec,
                 step: int | None = None, *, target: Mapping[str, Any] | None = None,
                 memory_mb: int | None = None,
                 read_gbps: float | None = None, local_directory: str | None = None,
                 host_names: Sequence[str] | None = None) -> RestorePlan:
    """Plan restoring `step` (default: the newest committed) of `directory` onto the slice
    `to`: per host the tier, files, bytes, peak memory and time, and whether the target
    matches strictly. Reads metadata only (and, without `read_gbps`, a bandwidth sample
    of the step's data); needs no device of the target slice.

    `target`: the restore target's items (ShapeDtypeStructs with NamedShardings on a mesh
    or AbstractMesh shaped like the slice's); default: each leaf's saved PartitionSpec on
    the slice's mesh. Raises ValueError (bad slice, memory or bandwidth) or
    NoCheckpointError (no such directory, no committed step, step not committed).

    `local_directory` (the service's template, with ``{host}``) plans the local tier too,
    as the restore would choose it: each host's directory is the template with ``{host}``
    replaced by its name in `host_names` (default ``host0``, ``host1``, ...: the
    launcher's simulated hosts), read without changing anything. When the hosts can
    rebuild a step at least as new as the persistent one from local copies, the plan is
    that step's: each host's tier (``local``, or ``peer`` for a host that fetches its
    shards from the host holding its copy), the copy's files, and its bytes (what
    ``Restored.read_bytes`` then reports: bytes read from the local directory, plus a
    copy read to send to a peer, or bytes pulled from a peer).
    """
    slice_ = SliceSpec.parse(to) if isinstance(to, str) else to
    if local_directory is not None:
        local = _plan_local(directory, slice_, step, local_directory, host_names,
                            read_gbps, memory_mb)
        if local is not None:
            return local
    if memory_mb is not None and (isinstance(memory_mb, bool) or not isinstance(memory_mb, int)
                                  or memory_mb < 1):
        raise ValueError(f"memory_mb must be None or an int >= 1 (MiB), got {memory_mb!r}")
    if read_gbps is not None and not 0 < read_gbps < float("inf"):
        raise ValueError(f"read_gbps must be a positive number of GB/s, got {read_gbps!r}")
    _, path = storage.open_directory(directory)
    step = _pick_step(path, step)
    step_reader = reader.StepReader(path, step)
    record = step_reader.provenance
    stored = step_reader.array_metadata()
    if target is None:
        leaves, mismatches = _saved_specs(record["leaves"], stored, slice_.mesh)
    else:
        leaves, mismatches = _target_specs(target, record["leaves"], stored, slice_.mesh, step)
    measured = read_gbps is None
    if read_gbps is None:
        read_gbps = measure_read_gbps(step_reader.path, step_reader.record)
    try:
        hosts, exact = plan.plan_hosts(
            step_reader.path, step_reader.path / reader.STATE_ITEM, leaves, slice_.mesh,
            slice_.hosts, memory_bytes=None if memory_mb is None else memory_mb << 20,
            bytes_per_s=read_gbps * 1e9)
    except Exception as e:  # TensorStore/Orbax errors: the step's array metadata
        raise StepUnusableError(step, f"array metadata is unreadable ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})",
                                kind=StepProblem.CORRUPT) from e
    mesh = record.get("mesh") or {}
    new_axes = () if target is not None else tuple(
        n for n, size in slice_.mesh.axes if size > 1 and n not in mesh.get("axis_names", []))
    saved_mesh = ",".join(f"{n}={s}" for n, s in zip(mesh.get("axis_names", []),
                                                       mesh.get("shape", []), strict=False))
    return RestorePlan(
        directory=str(path), step=step, target=str(slice_),
        saved=f"{record.get('process_count')} processes, {record.get('device_count')} "
              f"devices, mesh {saved_mesh or 'none'}",
        hosts=tuple(hosts), strict=not mismatches, mismatches=tuple(mismatches),
        new_axes=new_axes, exact=exact,
        memory_mb=memory_mb, read_gbps=read_gbps, read_gbps_measured=measured)


def _plan_local(directory: epath.PathLike | storage.Location, slice_: SliceSpec,
                step: int | None, template: str, host_names: Sequence[str] | None,
                read_gbps: float | None, memory_mb: int | None) -> RestorePlan | None:
    """The local tier's plan (None: the restore would read the persistent tier)."""
    from distckpt.checkpoint.local_restore import choose
    from distckpt.checkpoint.local_tier import RECORD, LocalDir, expand
    from distckpt.checkpoint.service import JOB_FILE

    names = list(host_names) if host_names else [f"host{i}" for i in range(slice_.hosts)]
    if len(names) != slice_.hosts:
        raise ValueError(f"{len(names)} host names for a slice of {slice_.hosts} hosts")
    expand(template, names[0])  # a bad template is a ValueError before anything is read
    _, path = storage.open_directory(directory)
    job_file = path / JOB_FILE
    if not job_file.exists():
        return None  # no local tier was ever used with this directory
    roots = [expand(template, n) for n in names]
    inventories = [LocalDir.peek(root) for root in roots]
    steps = committed.committed_steps(path)
    job = {"process_count": slice_.hosts, "devices_per_process": slice_.devices,
           "job": job_file.read_text().strip()}
    chosen = choose(inventories, job, newest_persistent=steps[-1] if steps else None, step=step)
    if chosen is None:
        return None
    s = chosen["step"]
    copies: list[tuple[int, str]] = []  # (host, copy name) each host reads
    extra: dict[int, list[tuple[int, str]]] = {}
    for c, src in enumerate(chosen["sources"]):
        if src[0] == "fetch":
            extra.setdefault(src[1], []).append((src[1], src[2]))
            copies.append((src[1], src[2]))
        else:
            copies.append((c, "own" if src[0] == "own" else src[1]))
    gbps = read_gbps if read_gbps is not None else _measure_local(
        [roots[h] / str(s) / n for h, n in copies])
    hosts = []
    for c, (holder, name) in enumerate(copies):
        reads = [(holder, name)] + extra.get(c, [])
        files: dict[str, int] = {}
        for h, n in reads:
            record = json.loads((roots[h] / str(s) / n / RECORD).read_text())
            for leaf in record["leaves"]:
                for shard in leaf["shards"]:
                    key = f"{names[h]}:{s}/{n}/{shard['file']}"
                    files[key] = files.get(key, 0) + shard["nbytes"]
        total = sum(files.values())
        mine = sum(v for k, v in files.items() if k.startswith(f"{names[holder]}:{s}/{name}/"))
        hosts.append(plan.HostPlan(
            process=c, tier="peer" if chosen["sources"][c][0] == "fetch" else "local",
            # On CPU devices: the copy read into host memory, then the device buffers.
            bytes=total, files=files, shard_bytes=mine,
            peak_memory_bytes=2 * total, seconds=total / (gbps * 1e9)))
    return RestorePlan(
        directory=str(path), step=s, target=str(slice_),
        saved=f"{slice_.hosts} processes, {slice_.hosts * slice_.devices} devices (local tier)",
        hosts=tuple(hosts), strict=True, mismatches=(), new_axes=(), exact=True,
        memory_mb=memory_mb, read_gbps=gbps, read_gbps_measured=read_gbps is None)


def _measure_local(copy_dirs: Sequence[Path]) -> float:
    """GB/s reading up to SAMPLE_BYTES of the largest shard file of the copies."""
    files = [f for d in copy_dirs for f in d.glob("*.bin")]
    if not files:
        return 1.0
    biggest = max(files, key=lambda f: f.stat().st_size)
    t0 = time.perf_counter()
    with open(biggest, "rb") as f:
        n = len(f.read(SAMPLE_BYTES))
    return max(n, 1) / max(time.perf_counter() - t0, 1e-6) / 1e9


def _pick_step(path: epath.Path, step: int | None) -> int:
    if committed.is_local(path) and not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise NoCheckpointError(f"{path} {what}; give a checkpoint directory")
    if step is None:
        newest = committed.newest_committed(path)
        if newest is None:
            raise NoCheckpointError(f"no committed step in {path}; nothing to plan")
        return newest
    steps = committed.committed_steps(path)
    if step not in steps:
        raise NoCheckpointError(f"step {step} is not a committed step in {path}; committed "
                                f"steps: {steps or 'none'}")
    return step


def _resolve(name: str, saved: list[Any] | None, shape: tuple[int, ...], mesh: MeshSpec
             ) -> tuple[plan.Spec, list[str]]:
    """A saved spec on `mesh`: axes the mesh lacks dropped, with why it does not fit."""
    sizes = dict(mesh.axes)
    out: list[str | tuple[str, ...] | None] = []
    problems = []
    for dim, entry in zip(shape, list(saved or []), strict=False):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        lacking = [a for a in axes if a not in sizes]
        if lacking:
            problems.append(f"  {name}: saved spec names mesh axis {', '.join(lacking)}, which "
                            f"mesh {mesh} lacks; planned replicated along it")
        kept = tuple(a for a in axes if a in sizes)
        ways = 1
        for a in kept:
            ways *= sizes[a]
        if dim % ways:
            problems.append(f"  {name}: dimension {dim} does not divide over mesh axes "
                            f"{kept} ({ways} ways)")
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return tuple(out), problems


def _saved_specs(saved: Mapping[str, Any], stored: Mapping[str, Any], mesh: MeshSpec
                 ) -> tuple[list[plan.LeafTarget], list[str]]:
    leaves, problems = [], []
    for name in saved:
        if name not in stored:
            problems.append(f"  {name}: in the provenance but not in the array metadata")
            continue
        path, shape, dtype = stored[name]
        spec, why = _resolve(name, saved[name].get("spec"), shape, mesh)
        problems += why
        leaves.append(plan.LeafTarget(name, path, shape, dtype, spec))
    return leaves, problems


def _target_specs(items: Mapping[str, Any], saved: Mapping[str, Any],
                  stored: Mapping[str, Any], mesh: MeshSpec, step: int
                  ) -> tuple[list[plan.LeafTarget], list[str]]:
    given = nnx_state.flatten_items(items)
    problems = target.target_problems(saved, given, step, partial=False)
    leaves = []
    for leaf in given:
        rec = saved.get(leaf.name)
        if (rec is None or leaf.name not in stored or list(leaf.shape) != list(rec["shape"])
                or leaf.dtype != rec["dtype"]):
            continue  # a mismatch (listed): the restore would refuse the target
        sharding = getattr(leaf.value, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            raise ValueError(f"target leaf {leaf.name!r} has no NamedSharding; build the "
                             "target with distckpt.abstract_target(factory, mesh)")
        have = MeshSpec(tuple((str(n), int(s)) for n, s in sharding.mesh.shape.items()))
        if have != mesh:
            raise ValueError(f"target leaf {leaf.name!r} is sharded on mesh {have}, not the "
                             f"slice's mesh {mesh}")
        path, shape, dtype = stored[leaf.name]
        spec = tuple(None if e is None else e if isinstance(e, str) else tuple(e)
                     for e in sharding.spec)
        leaves.append(plan.LeafTarget(leaf.name, path, shape, dtype, spec))
    return leaves, problems


def measure_read_gbps(step_dir: epath.Path, record: Mapping[str, Any],
                      sample_bytes: int = SAMPLE_BYTES) -> float:
    """GB/s of one sequential read of up to `sample_bytes` of the step's largest array
    data file (the commit record lists every file and its size)."""
    files = record.get("files") or {}
    data = [rel for rel in files if rel.startswith(f"{reader.STATE_ITEM}/")]
    rel = max(data or files, key=lambda r: files[r], default=None)
    if rel is None or not files[rel]:
        return 1.0
    t0 = time.perf_counter()
    with (step_dir / rel).open("rb") as f:
        n = len(f.read(min(sample_bytes, files[rel])))
    return max(n, 1) / max(time.perf_counter() - t0, 1e-6) / 1e9
