"""A restore plan: what each host of a target slice will read from a committed step,
worked out from the step's metadata before any array data is touched.

**Which pieces.** A target host is a block of consecutive devices in mesh order: host
``h`` of a slice of ``D`` devices per host owns the mesh's flat (row-major) positions
``h*D .. h*D+D-1``, as ``jax.make_mesh`` on CPU, the drill and the launcher lay them out
(on TPU and GPU, ``jax.make_mesh`` may order devices by their physical topology; the
per-host split can then differ, the totals do not). Each device's box of each array
follows from the mesh shape and the PartitionSpec alone (:func:`device_boxes`, the
arithmetic of ``NamedSharding.devices_indices_map``), so no device of the target slice
has to exist. A host reads every distinct box its devices hold once (devices holding
the same box get a device-to-device copy), split into pieces exactly as
:mod:`distckpt.checkpoint.streaming` splits them for the restore budget.

**Which bytes.** For raw zarr v2 chunks (distckpt's default layout) a piece is read as
byte ranges of the saved chunks (:func:`distckpt.checkpoint.streaming.slabs`): those
ranges are the host's bytes, exactly what the restore then reads
(``Restored.read_bytes``). Other layouts (``compression=True``, zarr3) are read by
TensorStore itself; for them ``bytes`` counts the decoded pieces, not what storage serves
(compressed chunks are smaller, and TensorStore reads whole zarr v2 chunks), and the plan
says it is not exact. OCDBT's manifests and b-tree nodes (a few KiB, read once per
process) are not counted.

**Which files.** The step's OCDBT b-tree (``tensorstore.ocdbt.dump``, metadata only)
names the file and byte offset of every saved chunk: a chunk larger than OCDBT's inline
limit (1 KiB as Orbax writes) lives in a data file ``state/ocdbt.process_N/d/...``; a
smaller one is stored inside a b-tree node file (``state/d/...``), and that node is the
file listed. Without OCDBT each chunk is its own file. For layouts TensorStore reads
itself, the array's directory in the state item is listed instead of files.

**Memory** and **time** models: :func:`memory_profile` and :class:`HostPlan`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from distckpt.checkpoint import direct_read, streaming
from distckpt.checkpoint.direct_read import Stored, ocdbt_files
from distckpt.checkpoint.streaming import Box
from distckpt.state import digest
from distckpt.state.mesh import MeshSpec

__all__ = ["TIER_PERSISTENT", "HostPlan", "LeafTarget", "Stored", "device_boxes", "memory_profile",
           "ocdbt_files", "plan_hosts"]

TIER_PERSISTENT = "persistent"
"""A host reading from the checkpoint directory itself (every host, for now; a local tier
would fill in hosts that read their shards from their own disk or a peer's)."""

Spec = tuple[str | tuple[str, ...] | None, ...]
"""A PartitionSpec's entries, one per dimension: a mesh axis, several, or None."""


@dataclasses.dataclass(frozen=True)
class LeafTarget:
    """One saved array as the target restores it."""

    name: str
    """The leaf's saved name (``model/layers/0/w``)."""
    path: tuple[str, ...]
    """Its key path in the saved tree."""
    shape: tuple[int, ...]
    """Its shape as stored (a typed PRNG key: its key data's)."""
    dtype: str
    """Its dtype as stored."""
    spec: Spec
    """Its PartitionSpec on the target mesh."""


@dataclasses.dataclass(frozen=True)
class HostPlan:
    """What one host of the target slice does in the restore."""

    process: int
    """The host's process index in the target slice."""
    tier: str
    """Where it reads from: ``"persistent"`` (the checkpoint directory)."""
    bytes: int
    """Array bytes it reads from storage (see the module docstring for what counts)."""
    files: dict[str, int]
    """File (relative to the step directory) -> bytes this host reads from it."""
    shard_bytes: int
    """Bytes of the restored shards on its devices, every device's copy counted."""
    peak_memory_bytes: int
    """Predicted peak growth of the host's memory over the restore, on CPU devices (the
    shards are then host memory): ``shard_bytes`` plus the streaming transient. On
    accelerators the shards are device memory and the host's part is the transient."""
    seconds: float
    """Predicted read time: ``bytes`` at the plan's read bandwidth (I/O only)."""

    @property
    def transient_bytes(self) -> int:
        """Host memory beyond the shards: reads in flight and the piece being landed."""
        return self.peak_memory_bytes - self.shard_bytes


def device_boxes(shape: Sequence[int], spec: Spec, mesh: MeshSpec) -> list[Box]:
    """The box of an array of `shape` each device of `mesh` holds under `spec`, devices in
    the mesh's flat (row-major) order: ``NamedSharding.devices_indices_map``'s arithmetic
    (a dimension over mesh axes ``(a, b)`` is split ``size(a) * size(b)`` ways, ``a``
    major; a split that does not divide gives ceil-sized blocks, the last ones short)."""
    sizes = dict(mesh.axes)
    where = {name: i for i, name in enumerate(mesh.names)}
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for position in itertools.product(*(range(n) for n in mesh.shape)):
        lo, hi = [], []
        for dim, entry in zip(shape, entries, strict=True):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            index, ways = 0, 1
            for axis in axes:
                index = index * sizes[axis] + position[where[axis]]
                ways *= sizes[axis]
            block = -(-dim // ways)
            lo.append(min(index * block, dim))
            hi.append(min((index + 1) * block, dim))
        out.append((tuple(lo), tuple(hi)))
    return out


@dataclasses.dataclass
class _Task:
    """One piece a host reads: as streaming.read's loop sees it."""

    shard: int
    """Which of the host's shards it lands in."""
    nbytes: int
    """The piece's own bytes (what the read-ahead window counts)."""
    read: int
    """The bytes its reads return from storage."""
    elements: int
    """The piece's elements (the digest kernel's temporaries are uint32 per element)."""
    in_place: bool = False
    """Whether it is read from a local file straight into the shard's memory
    (``streaming._destination``): it then holds no memory of its own."""


@dataclasses.dataclass
class _Held:
    """One shard a host holds."""

    nbytes: int
    """Its bytes on one device."""
    copies: int
    """How many of the host's devices hold it."""
    pieces: int
    """How many pieces it is read in."""
    carrier: bool
    """Whether it is assembled in an integer carrier dtype and reinterpreted at the end
    (floats of 1 or 2 bytes read in several pieces: streaming._carrier)."""


class _Layouts:
    """The saved layout of every requested array, and the file holding each saved chunk."""

    def __init__(self, step_dir: epath.Path, state_dir: epath.Path,
                 leaves: Sequence[LeafTarget]):
        requests = [streaming.Request(leaf.name, leaf.path,
                                      jax.ShapeDtypeStruct(leaf.shape, np.dtype(leaf.dtype)))
                    for leaf in leaves]
        opened = streaming._open(state_dir, requests, direct=False)
        self.opened = {r.name: o for r, o in zip(requests, opened, strict=True)}
        rel = str(state_dir.relative_to(step_dir)) if state_dir != step_dir else ""
        self._state = f"{rel}/" if rel else ""
        # name -> (key prefix in the state item, its OCDBT database's spec or None)
        self._where: dict[str, tuple[str, str | None]] = {}
        self._bases: dict[str, Any] = {}  # an OCDBT database's spec -> its base kvstore
        self._ocdbt: dict[str, dict[str, Stored]] = {}
        for name, leaf in self.opened.items():
            kvstore = leaf.store.kvstore
            spec = kvstore.spec().to_json()
            path = spec.get("path", "")
            if spec.get("driver") == "ocdbt":  # the path is the key prefix in the database
                base = json.dumps(spec["base"], sort_keys=True)
                self._bases.setdefault(base, kvstore.base)
                self._where[name] = (path, base)
            else:  # a directory per array: its last component is the array's name
                self._where[name] = (path.rstrip("/").rsplit("/", 1)[-1] + "/", None)

    def file_of(self, name: str, key: str) -> str:
        """The file (relative to the step directory) holding chunk `key` of array `name`."""
        prefix, base = self._where[name]
        if base is None:
            return self._state + prefix + key
        files = self._ocdbt.get(base)
        if files is None:
            files = self._ocdbt[base] = ocdbt_files(self._bases[base])
        found = files.get(prefix + key)
        return self._state + (found.file if found is not None else prefix)

    def array_dir(self, name: str) -> str:
        """The array's key prefix in the state item (its directory without OCDBT)."""
        return self._state + self._where[name][0]


def _host_boxes(leaf: LeafTarget, mesh: MeshSpec, hosts: int
                ) -> list[list[tuple[Box, int]]]:
    """Per host: its distinct boxes of `leaf` in device order, each with its device count."""
    per_host = mesh.size // hosts
    held: list[dict[Box, int]] = [{} for _ in range(hosts)]
    for position, box in enumerate(device_boxes(leaf.shape, leaf.spec, mesh)):
        mine = held[position // per_host]
        mine[box] = mine.get(box, 0) + 1
    return [list(h.items()) for h in held]


def plan_hosts(step_dir: epath.Path, state_dir: epath.Path, leaves: Sequence[LeafTarget],
               mesh: MeshSpec, hosts: int, *, memory_bytes: int | None, bytes_per_s: float
               ) -> tuple[list[HostPlan], bool]:
    """Every host's plan, and whether its bytes are exact (every array in raw chunks)."""
    if mesh.size % hosts:
        raise ValueError(f"mesh {mesh} has {mesh.size} devices, not a multiple of {hosts} hosts")
    layouts = _Layouts(step_dir, state_dir, leaves)
    exact = all(layouts.opened[leaf.name].raw is not None for leaf in leaves)
    tasks: list[list[_Task]] = [[] for _ in range(hosts)]
    files: list[collections.Counter[str]] = [collections.Counter() for _ in range(hosts)]
    shards: list[list[_Held]] = [[] for _ in range(hosts)]
    boxes_of = {leaf.name: _host_boxes(leaf, mesh, hosts) for leaf in leaves}
    budgets = [streaming.budget(memory_bytes, sum(
        _size(box) * np.dtype(leaf.dtype).itemsize for leaf in leaves
        for box, _ in boxes_of[leaf.name][host])) for host in range(hosts)]
    index = direct_read.chunk_locations()
    for leaf in leaves:
        raw = layouts.opened[leaf.name].raw
        dtype = np.dtype(leaf.dtype)
        item = dtype.itemsize
        direct = (None if raw is None else
                  index.resolver(raw.kvstore, math.prod(raw.chunks) * item))
        for host, boxes in enumerate(boxes_of[leaf.name]):
            piece_bytes = budgets[host][1]
            for box, copies in boxes:
                extent = [h - a for a, h in zip(*box, strict=True)]
                if raw is not None:
                    extent = [max(e, c) for e, c in zip(extent, raw.chunks, strict=True)]
                pieces = streaming._pieces(box, extent, item, piece_bytes)
                carrier = len(pieces) > 1 and streaming._carrier(dtype) != dtype
                shards[host].append(_Held(_size(box) * item, copies, len(pieces), carrier))
                for piece in pieces:
                    read = _read(layouts, leaf, raw, piece, item, files[host])
                    in_place = (direct is not None and raw is not None
                                and _in_place(piece, box, len(pieces), raw, direct))
                    tasks[host].append(_Task(len(shards[host]) - 1, _size(piece) * item,
                                             read, _size(piece), in_place))
    out = []
    for host in range(hosts):
        total = sum(files[host].values())
        shard_bytes = sum(s.nbytes * s.copies for s in shards[host])
        peak = memory_profile(tasks[host], shards[host], budgets[host][0])
        out.append(HostPlan(process=host, tier=TIER_PERSISTENT, bytes=total,
                            files=dict(sorted(files[host].items())), shard_bytes=shard_bytes,
                            peak_memory_bytes=max(peak, shard_bytes),
                            seconds=total / bytes_per_s))
    return out, exact


def _size(box: Box) -> int:
    return math.prod(h - a for a, h in zip(*box, strict=True))


def _in_place(piece: Box, box: Box, pieces: int, raw: Any, direct: Any) -> bool:
    """Whether ``streaming._Read`` reads `piece` of shard `box` straight into the shard's
    memory on a CPU device: one range of one chunk located in a local file, landing in a
    contiguous part of the shard (always, when the shard is one piece)."""
    if not piece[0] or not _size(piece):
        return False
    ranges = streaming.slabs(piece, raw.chunks)
    if len(ranges) != 1 or math.prod(ranges[0].shape) != _size(piece):
        return False
    if direct(raw.separator.join(map(str, ranges[0].chunk))) is None:
        return False
    if pieces == 1:
        return True
    # A block of a C-order array is contiguous when every dim after its first one of
    # more than one index is whole.
    extents = [h - a for a, h in zip(*piece, strict=True)]
    whole = [h - a for a, h in zip(*box, strict=True)]
    first = next((d for d, e in enumerate(extents) if e > 1), len(extents))
    return extents[first + 1:] == whole[first + 1:]


def _read(layouts: _Layouts, leaf: LeafTarget, raw: Any, piece: Box, item: int,
          files: collections.Counter[str]) -> int:
    """The bytes reading `piece` fetches, added to `files` by the file they come from."""
    lo, _ = piece
    if not _size(piece):
        return 0
    if raw is None:  # TensorStore reads it (see the module docstring)
        files[layouts.array_dir(leaf.name)] += _size(piece) * item
        return _size(piece) * item
    if not lo:  # a 0-d array: its one chunk, key "0", read whole
        files[layouts.file_of(leaf.name, "0")] += item
        return item
    total = 0
    for s in streaming.slabs(piece, raw.chunks):
        n = s.elements * item
        files[layouts.file_of(leaf.name, raw.separator.join(map(str, s.chunk)))] += n
        total += n
    return total


def memory_profile(tasks: Iterable[_Task], shards: Sequence[_Held], memory_bytes: int) -> int:
    """The predicted peak of a host's memory over ``streaming.read`` with verification on
    (the default), replaying its loop. Reads run ahead while the pieces in flight stay
    under a quarter of the budget (at most ``streaming.MAX_WINDOW`` of them), each holding
    the bytes its reads return; a piece read in place (from a local file into its shard's
    memory, see ``_Task.in_place``) holds nothing beyond its shard, allocated when its
    first piece is read. A piece being landed adds its host block unless read in place;
    when its shard takes several pieces, also its device copy and a second buffer of the
    shard (the shard's buffer is allocated at its first piece); a piece of more than
    ``digest.SMALL_ELEMENTS`` elements is digested by an XLA kernel whose temporaries are
    taken as three uint32 arrays of its shape, and the previous such kernel may still be
    running (``streaming.KERNELS_IN_FLIGHT``). At the end every further device holding a
    shard gets its copy and carrier buffers are reinterpreted into new ones, all at once
    in the worst case. Python objects, TensorStore's caches and the NumPy digest of small
    pieces (a few MiB) are not modelled: the tolerance covers them
    (docs/plan-restore.md)."""
    window: collections.deque[_Task] = collections.deque()
    pending = iter(tasks)
    in_flight = held = allocated = peak = 0
    running: collections.deque[int] = collections.deque()  # kernels' temporaries
    started: set[int] = set()
    done = False

    def start(task: _Task) -> None:
        nonlocal allocated
        if task.shard not in started:
            started.add(task.shard)
            allocated += shards[task.shard].nbytes

    while True:
        while not done and (not window or (in_flight < memory_bytes // 4
                                           and len(window) < streaming.MAX_WINDOW)):
            nxt = next(pending, None)
            if nxt is None:
                done = True
                break
            window.append(nxt)
            if nxt.in_place:
                start(nxt)
            else:
                in_flight += nxt.nbytes
                held += nxt.read
        if not window:
            break
        task = window.popleft()
        shard = shards[task.shard]
        start(task)
        landing = 0
        if not task.in_place:
            in_flight -= task.nbytes
            landing = task.nbytes
            if shard.pieces > 1:
                landing += task.nbytes + shard.nbytes
        if task.elements > digest.SMALL_ELEMENTS:
            running.append(3 * 4 * task.elements)
        peak = max(peak, allocated + held + landing + sum(running))
        while len(running) > streaming.KERNELS_IN_FLIGHT:
            running.popleft()
        if not task.in_place:
            held -= task.read
    end = sum(s.nbytes * (s.copies - 1) + (s.nbytes if s.carrier else 0) for s in shards)
    return max(peak, allocated + end)
