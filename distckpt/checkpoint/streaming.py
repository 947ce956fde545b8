"""Bounded-memory restore: stream each saved array into its device buffers, digesting as
it goes.

A restore's peak extra host memory is the restored shards plus a fixed budget
(``CheckpointOptions.restore_memory_mb``), whatever the array sizes and whatever topology
saved the step:

* For every array, every shard index this process needs (its addressable devices' part
  of the target sharding) is read once; devices of this process holding the same index
  get a device-to-device copy.
* A shard that fits in a *piece* (an eighth of the budget) is read whole and put on its
  device. A bigger one gets its device buffer allocated once (zeros, on the device),
  then pieces of at most an eighth of the budget (slabs along the leading dimension, or
  deeper when one row is larger) are read and written into the buffer in place (a
  jitted ``dynamic_update_slice`` with the buffer donated: no second copy). On a CPU
  device, whose memory is host memory, the shard is assembled in an aligned NumPy array
  instead (a memcpy per piece, no kernel per piece), which the device then takes
  without a copy: a 256 MiB restore on one process took 0.40-0.49 s at 1.03-1.05x the
  shard bytes with the default budget (16 MiB there, 4 MiB pieces), against 0.43-0.51 s
  and 1.9-2.3x with a fixed 256 MiB.
* Reads run ahead while the bytes in flight stay under a quarter of the budget; the
  rest is for the piece on the host, its copy on the device and the digest kernel's
  temporaries (a few piece-sized uint32 arrays; at most :data:`KERNELS_IN_FLIGHT` kernel
  besides the newest runs at a time). Measured: 64 MiB restored with an 8 MiB budget
  grew the peak RSS by 73 MiB through the kvstore, 66 MiB read into place
  (tests/test_streaming.py).
* Verification folds in as pieces arrive: each piece's digest lanes are computed on its
  device with its global start (:func:`distckpt.state.digest.block_lanes`: small pieces
  in NumPy on the host, without a kernel compiled per shape); partial
  digests add, so the shard's partial is the sum. As in :func:`digest.dispatch`, only
  the shards with replica id 0 count.

How the bytes are read: Orbax writes zarr v2 by default, with one storage chunk per saved
shard, and TensorStore's zarr v2 driver decodes whole chunks (reading a 4 MiB slice of a
64 MiB chunk reads and decodes all 64 MiB; measured). For uncompressed, C-ordered,
little-endian zarr v2 chunks (distckpt's default) the piece is read directly as byte
ranges of the chunk values from the step's kvstore (OCDBT or plain files), the same
kvstore TensorStore opened, or, where the step is on a local filesystem, from the chunk's
byte range in its file by a few threads (:mod:`distckpt.checkpoint.direct_read`): into
the shard's own memory when the piece is one contiguous range of one chunk (a CPU device
then adopts that memory; the bytes are copied nowhere), through a buffer of the piece's
size otherwise. Reads into place hold none of the budget, so up to
:data:`MAX_WINDOW` pieces are read ahead. zarr v3 (``use_zarr3``) supports partial chunk reads in
TensorStore itself, so it reads through TensorStore. Compressed zarr v2 chunks
(``compression=True``) cannot be partially decoded: TensorStore reads them, and the bound
becomes the largest saved chunk (one saved shard) instead of the budget.

Read once per replica group (``CheckpointOptions.restore_read_once``, off by default):
:mod:`distckpt.checkpoint.read_once`.

Everything is opened through Orbax's public API (``PyTreeCheckpointHandler.metadata`` for
each array's name and the zarr version, ``ocp.type_handlers.get_json_tspec_read`` and
``get_ts_context`` for the TensorStore spec Orbax itself reads with, including the
``s3://`` adapter); the on-disk format is Orbax's, unchanged.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from distckpt.checkpoint import direct_read
from distckpt.state import digest

if TYPE_CHECKING:
    from distckpt.checkpoint.read_once import Once

__all__ = ["DEFAULT_MEMORY_MB", "Request", "read"]

DEFAULT_MEMORY_MB = 256
"""Default restore memory budget (MiB) beyond the restored shards: its cap (see budget)."""
BUDGET_SHARE = 16
"""A restore's budget is at most 1/BUDGET_SHARE of the bytes the process restores..."""
PIECE_KERNEL_ELEMENTS = 1 << 16
"""Pieces of a multi-piece shard larger than this are digested by the XLA kernel."""
BUDGET_FLOOR = 8 << 20
"""...and at least this (all three: when restore_memory_mb is not given)."""
PIECE_FLOOR = 4 << 20
"""The smallest piece of a default budget."""


def budget(memory_bytes: int | None, held_bytes: int) -> tuple[int, int]:
    """(budget, piece size) of a restore of `held_bytes` (the shards one process restores):
    `memory_bytes` (``restore_memory_mb``) and an eighth of it when given; by default
    256 MiB for a large restore, a sixteenth of `held_bytes` for a smaller one, never
    below 8 MiB, with pieces of an eighth of that but at least 4 MiB.

    A fixed 256 MiB doubled the peak memory of a 256 MiB restore, for no speed
    (measured: 1.6-2.0x the shard bytes against 1.1x with 8-16 MiB; docs/benchmarks.md).
    Pieces under 4 MiB made a fresh process's restore from a cold page cache slower
    (``benchmarks/tier_recovery.py``, 4 MiB shards: 1.06-1.27 s in 1-2 MiB pieces
    against 0.66-0.74 s whole)."""
    if memory_bytes is not None:
        return memory_bytes, max(1, memory_bytes // 8)
    total = min(DEFAULT_MEMORY_MB << 20, max(BUDGET_FLOOR, held_bytes // BUDGET_SHARE))
    return total, max(PIECE_FLOOR, total // 8)


def held_bytes(requests: Sequence[Request]) -> int:
    """The bytes of the distinct shard indices this process holds of `requests`."""
    total = 0
    for r in requests:
        t = r.target
        boxes = {_box(index, tuple(t.shape)) for index in
                 t.sharding.addressable_devices_indices_map(tuple(t.shape)).values()}
        total += sum(math.prod(h - a for a, h in zip(*b, strict=True)) for b in boxes
                     ) * np.dtype(t.dtype).itemsize
    return total

Box = tuple[tuple[int, ...], tuple[int, ...]]
"""A block of an array: (inclusive lower corner, exclusive upper corner), global coords."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One array to restore: its saved key path and the target (shape, dtype, sharding)."""

    name: str
    path: tuple[str, ...]
    target: jax.ShapeDtypeStruct


@functools.partial(jax.jit, donate_argnums=0)
def _write(buf: jax.Array, piece: jax.Array, starts: jax.Array) -> jax.Array:
    """`piece` written into `buf` at `starts`, in place (`buf` is donated). A piece of
    another dtype of the same width is written as its bits (see :func:`_carrier`)."""
    if piece.dtype != buf.dtype:
        piece = jax.lax.bitcast_convert_type(piece, buf.dtype)
    return jax.lax.dynamic_update_slice(buf, piece, [starts[d] for d in range(buf.ndim)])


def _carrier(dtype: np.dtype) -> np.dtype:
    """The dtype a multi-piece shard's buffer is assembled in. XLA on CPU computes
    dynamic_update_slice of bfloat16 and float8 through float32, which turns a
    signalling NaN's bits into the canonical NaN (measured: 0x7fbf became 0x7fc0); the
    bits of floats of at most 2 bytes are therefore written as unsigned integers of the
    same width, and the buffer is reinterpreted at the end (a bitcast, no conversion)."""
    if dtype.kind not in "iub" and dtype.itemsize in (1, 2):
        return np.dtype(f"uint{8 * dtype.itemsize}")
    return dtype


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _reinterpret(buf: jax.Array, dtype: np.dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(buf, dtype)


@dataclasses.dataclass
class _Raw:
    """A zarr v2 array whose chunks are raw C-order bytes: read byte ranges directly."""

    kvstore: Any
    chunks: tuple[int, ...]
    separator: str


@dataclasses.dataclass
class _Shard:
    """One shard index of one array on this process."""

    leaf: _Leaf
    box: Box
    devices: list[Any]
    counts: bool
    """Whether this process holds the index's replica 0 (its lanes count in the digest)."""
    pieces: list[Box] = dataclasses.field(default_factory=list)
    buffer: jax.Array | None = None
    host: np.ndarray | None = None
    """The shard assembled in host memory, piece by piece (CPU devices; see _land)."""
    lanes: list[jax.Array | np.ndarray | concurrent.futures.Future] = dataclasses.field(
        default_factory=list)


@dataclasses.dataclass
class _Leaf:
    request: Request
    store: Any
    raw: _Raw | None
    shards: list[_Shard] = dataclasses.field(default_factory=list)
    direct: direct_read._Resolver | None = None
    """Where its raw chunks lie in local files (:mod:`distckpt.checkpoint.direct_read`)."""
    read_bytes: int = 0
    """Bytes of this array this process has read from storage so far (see _Read)."""

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.request.target.dtype)


def _replica_zero(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> set[Any]:
    """Devices holding replica 0 of their index: the first device of each index in the
    sharding's device order (the rule behind ``jax.Array``'s ``Shard.replica_id``;
    :func:`read` checks it against the built array)."""
    seen: set[tuple] = set()
    first = set()
    for device, index in sharding.devices_indices_map(shape).items():
        key = _box(index, shape)
        if key not in seen:
            seen.add(key)
            first.add(device)
    return first


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    lo, hi = [], []
    for s, n in zip(index, shape, strict=True):
        start, stop, _ = s.indices(n)
        lo.append(start)
        hi.append(stop)
    return tuple(lo), tuple(hi)


def _pieces(box: Box, extent: Sequence[int], itemsize: int, piece_bytes: int) -> list[Box]:
    """Split `box` into blocks whose bytes (and the bytes of a slab of the rows they
    cover in a storage chunk of shape up to `extent`) are at most `piece_bytes`: single
    indices in the dims before some d, up to k rows in d, everything after d."""
    lo, hi = box
    shape = [h - a_ for a_, h in zip(lo, hi, strict=True)]
    ndim = len(shape)
    if ndim == 0 or math.prod(shape) * itemsize <= piece_bytes:
        return [box]
    trailing = [math.prod(extent[i + 1:]) * itemsize for i in range(ndim)]
    d = next(i for i in range(ndim) if trailing[i] <= piece_bytes or i == ndim - 1)
    k = max(1, piece_bytes // trailing[d])
    out = []
    for prefix in itertools.product(*(range(lo[i], hi[i]) for i in range(d))):
        for r in range(lo[d], hi[d], k):
            p_lo = (*prefix, r, *lo[d + 1:])
            p_hi = (*(p + 1 for p in prefix), min(r + k, hi[d]), *hi[d + 1:])
            out.append((p_lo, p_hi))
    return out


def _raw_layout(spec: Mapping[str, Any], dtype: np.dtype) -> tuple[tuple[int, ...], str] | None:
    """(chunk shape, key separator) if the zarr v2 metadata says raw C-order chunks."""
    meta = spec.get("metadata", {})
    if spec.get("driver") != "zarr" or meta.get("zarr_format") != 2:
        return None
    if meta.get("compressor") is not None or meta.get("filters") or meta.get("order") != "C":
        return None
    stored = meta.get("dtype")
    if not isinstance(stored, str) or stored.startswith(">") and dtype.itemsize > 1:
        return None
    return tuple(meta["chunks"]), meta.get("dimension_separator") or "."


class Slab(NamedTuple):
    """The byte range of one raw storage chunk that a block's read fetches."""

    chunk: tuple[int, ...]
    """The chunk's grid index (its zarr key, joined by the separator)."""
    first: int
    """First element of the range, in the chunk's C order."""
    elements: int
    """Elements in the range (times the itemsize: the bytes read)."""
    shape: tuple[int, ...]
    """The range as an array: (rows in dim d, the chunk's extent in every later dim)."""
    a: tuple[int, ...]
    """The block's lower corner inside the chunk."""
    b: tuple[int, ...]
    """The block's upper corner inside the chunk (exclusive)."""
    origin: tuple[int, ...]
    """The chunk's lower corner in the array."""


def slabs(box: Box, chunks: Sequence[int]) -> list[Slab]:
    """The ranges of raw C-order chunks of shape `chunks` that reading `box` fetches: per
    chunk the block touches, the full rows of the chunk between the block's corners at
    the first dim where the block spans more than one index (earlier dims are single
    indices), so that one range holds the block. :mod:`distckpt.checkpoint.plan` counts
    the same ranges."""
    lo, hi = box
    c = tuple(chunks)
    out = []
    ranges = [range(a_ // n, -(-h // n)) for a_, h, n in zip(lo, hi, c, strict=True)]
    for idx in itertools.product(*ranges):
        origin = tuple(i * n for i, n in zip(idx, c, strict=True))
        a = tuple(max(a_, o) - o for a_, o in zip(lo, origin, strict=True))
        b = tuple(min(h, o + n) - o for h, o, n in zip(hi, origin, c, strict=True))
        d = next((i for i in range(len(c)) if b[i] - a[i] > 1), len(c) - 1)
        row = math.prod(c[d + 1:])
        first = int(np.ravel_multi_index(a[:d + 1], c[:d + 1])) * row
        out.append(Slab(tuple(idx), first, (b[d] - a[d]) * row, (b[d] - a[d], *c[d + 1:]),
                        a, b, origin))
    return out


class _Read:
    """The pending read of one piece: byte ranges of raw chunks, or a TensorStore read.
    Its result adds the bytes storage returned to the leaf's ``read_bytes``.

    Given a `reader` and a leaf whose chunks lie in local files (``leaf.direct``), the
    ranges are read by the reader's threads straight into `dest` when the piece is one
    contiguous range of one chunk (`in_place`: the result is `dest`), else into arrays of
    their own; otherwise through the step's kvstore."""

    def __init__(self, leaf: _Leaf, box: Box, dest: np.ndarray | None = None,
                 reader: direct_read.Reader | None = None):
        self.leaf, self.box = leaf, box
        lo, hi = box
        self.shape = tuple(h - a_ for a_, h in zip(lo, hi, strict=True))
        self.nbytes = max(1, math.prod(self.shape)) * leaf.dtype.itemsize
        raw = leaf.raw
        self.parts: list[tuple[Any, tuple[int, ...], tuple[int, ...], tuple[int, ...],
                               tuple[int, ...]]] = []
        self.ts_future = None
        self.direct: list[tuple[Any, np.ndarray]] = []
        self.in_place = False
        if raw is None or not lo or not math.prod(self.shape):
            self.ts_future = leaf.store[tuple(slice(a_, h) for a_, h in zip(lo, hi, strict=True))
                                        ].read()
            return
        item = leaf.dtype.itemsize
        ranges = slabs(box, raw.chunks)
        keys = [raw.separator.join(str(i) for i in s.chunk) for s in ranges]
        where = ([leaf.direct(k) for k in keys] if reader is not None and leaf.direct
                 else [None])
        if all(w is not None for w in where):
            assert reader is not None
            for s, w in zip(ranges, where, strict=True):
                assert w is not None
                whole = len(ranges) == 1 and math.prod(s.shape) == math.prod(self.shape)
                if whole and dest is not None and dest.flags.c_contiguous:
                    out, self.in_place = dest, True
                else:
                    out = np.empty(s.shape, leaf.dtype)
                self.direct.append((reader.read(w, s.first * item, out), out))
                self.parts.append((None, s.shape, s.a, s.b, s.origin))
            return
        for s, key in zip(ranges, keys, strict=True):
            fut = raw.kvstore.read(key, byte_range=slice(s.first * item,
                                                         (s.first + s.elements) * item))
            self.parts.append((fut, s.shape, s.a, s.b, s.origin))

    def result(self) -> np.ndarray:
        if self.ts_future is not None:
            return self._counted(np.asarray(self.ts_future.result()))
        if self.direct:
            return self._direct_result()
        lo, _ = self.box
        raw = self.leaf.raw
        assert raw is not None
        out: np.ndarray | None = None
        for fut, slab_shape, a, b, origin in self.parts:
            got = fut.result()
            want = math.prod(slab_shape) * self.leaf.dtype.itemsize
            if got.state == "missing":
                # No such chunk: read it as Orbax would (TensorStore with Orbax's spec
                # reports it missing, an unreadable step; a spec that allows missing chunks
                # would fill them in).
                box = tuple(slice(a_, h) for a_, h in zip(*self.box, strict=True))
                return self._counted(np.asarray(self.leaf.store[box].read().result()))
            if got.state != "value" or len(got.value) != want:
                raise ValueError(
                    f"array {self.leaf.request.name!r}: a chunk is missing or short "
                    f"({got.state}, {len(got.value)} of {want} bytes)")
            self.leaf.read_bytes += len(got.value)
            slab = np.frombuffer(got.value, dtype=self.leaf.dtype).reshape(slab_shape)
            d = len(a) - len(slab_shape)
            block = slab[(slice(None), *(slice(x, y) for x, y in zip(a[d + 1:], b[d + 1:],
                                                                      strict=True)))]
            block = block.reshape(tuple(y - x for x, y in zip(a, b, strict=True)))
            if len(self.parts) == 1:
                return block
            if out is None:
                out = np.empty(self.shape, self.leaf.dtype)
            at = [o - x for o, x in zip(origin, lo, strict=True)]
            out[tuple(slice(o + x, o + y) for o, x, y in zip(at, a, b, strict=True))] = block
        assert out is not None
        return out

    def _direct_result(self) -> np.ndarray:
        lo, _ = self.box
        blocks = []
        for (fut, out), (_, slab_shape, a, b, origin) in zip(self.direct, self.parts,
                                                             strict=True):
            self.leaf.read_bytes += fut.result()
            if self.in_place:
                return out.reshape(self.shape)
            d = len(a) - len(slab_shape)
            block = out[(slice(None), *(slice(x, y) for x, y in zip(a[d + 1:], b[d + 1:],
                                                                     strict=True)))]
            blocks.append((block.reshape(tuple(y - x for x, y in zip(a, b, strict=True))),
                           a, b, origin))
        if len(blocks) == 1:
            return blocks[0][0]
        whole = np.empty(self.shape, self.leaf.dtype)
        for block, a, b, origin in blocks:
            at = [o - x for o, x in zip(origin, lo, strict=True)]
            whole[tuple(slice(o + x, o + y) for o, x, y in zip(at, a, b, strict=True))] = block
        return whole

    def _counted(self, value: np.ndarray) -> np.ndarray:
        """A value TensorStore read and decoded: its bytes count as read (the stored
        chunks behind it are not visible from here; for raw chunks they are the same)."""
        self.leaf.read_bytes += value.nbytes
        return value


def _open(state_dir: epath.Path, requests: Sequence[Request], *,
          direct: bool = True) -> list[_Leaf]:
    """The arrays of `requests` opened in the step's array item; with `direct`, each
    raw leaf also learns where its chunks lie in local files, where they do."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(state_dir)
    finally:
        handler.close()
    by_path = {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): m
               for p, m in jax.tree_util.tree_flatten_with_path(meta.tree)[0]}
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(state_dir)
    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    opening = []
    for r in requests:
        if r.path not in by_path:
            raise KeyError(f"array {r.name!r} is not in the step's array metadata")
        info = ocp.type_handlers.ParamInfo(
            name=by_path[r.path].name, parent_dir=state_dir, use_zarr3=meta.use_zarr3,
            is_ocdbt_checkpoint=use_ocdbt, ts_context=context)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        opening.append(ts.open(spec, open=True, read=True, context=context))
    leaves = []
    index = direct_read.chunk_locations() if direct and direct_read.enabled() else None
    for r, fut in zip(requests, opening, strict=True):
        store = fut.result()
        if tuple(store.shape) != tuple(r.target.shape):
            raise ValueError(f"array {r.name!r} is stored with shape {tuple(store.shape)}, "
                             f"not {tuple(r.target.shape)}")
        dtype = np.dtype(r.target.dtype)
        layout = _raw_layout(store.spec().to_json(), dtype)
        raw = None if layout is None else _Raw(store.kvstore, *layout)
        leaf = _Leaf(r, store, raw)
        if raw is not None and index is not None:
            leaf.direct = index.resolver(raw.kvstore, math.prod(raw.chunks) * dtype.itemsize)
        leaves.append(leaf)
    return leaves


def _plan(leaves: list[_Leaf], piece_bytes: int,
          once: Once | None = None) -> list[tuple[_Shard, Box]]:
    """This process's shards, and the pieces it reads itself and lands in them (with
    `once`, a shard index several processes hold is left to :class:`distckpt.checkpoint.read_once.Once`)."""
    me = jax.process_index()
    tasks = []
    for leaf in leaves:
        target = leaf.request.target
        shape = tuple(target.shape)
        sharding = target.sharding
        counted = _replica_zero(sharding, shape)
        by_box: dict[Box, _Shard] = {}
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            box = _box(index, shape)
            shard = by_box.get(box)
            if shard is None:
                shard = by_box[box] = _Shard(leaf, box, [], counts=False)
                leaf.shards.append(shard)
            shard.devices.append(device)
            shard.counts |= device in counted
        for shard in leaf.shards:
            reader = None if once is None else once.reader(leaf, shard.box)
            if reader is not None:
                assert once is not None
                shard.counts = reader == me  # the reader's lanes count, nobody else's
                shard.pieces = once.pieces(leaf, shard.box)
                once.shards[(id(leaf), shard.box)] = shard
                continue
            lo, hi = shard.box
            extent = [h - a_ for a_, h in zip(lo, hi, strict=True)]
            if leaf.raw is not None:
                extent = [max(e, c) for e, c in zip(extent, leaf.raw.chunks, strict=True)]
            shard.pieces = _pieces(shard.box, extent, leaf.dtype.itemsize, piece_bytes)
        for shard in leaf.shards:
            if once is not None and once.reader(leaf, shard.box) is not None:
                continue
            tasks += [(shard, piece) for piece in shard.pieces]
    return tasks


def read(state_dir: epath.Path, requests: Sequence[Request], *, memory_bytes: int | None,
         verify: bool, read_once: bool = False,
         agree: Callable[[Any], list[Any]] | None = None,
         read_bytes: dict[str, int] | None = None,
         ) -> tuple[dict[str, jax.Array], dict[str, digest.Partial] | None]:
    """Restore `requests` from the step's array item at `state_dir`, in the targets'
    shardings; with `verify`, also this process's partial digest of each array. Given
    `read_bytes`, it is filled with the bytes of each array (by name) this process read
    from storage: the byte ranges of raw chunks storage returned (:func:`slabs`), or the
    values TensorStore decoded where it reads itself.

    With `read_once` (and more than one process), each shard index that several
    processes hold is read from storage by one of them and sent to the others
    (:class:`distckpt.checkpoint.read_once.Once`); `agree(value)` all-gathers a small JSON value over the processes
    (default: a JAX collective) to check first that every process opened the step alike.
    """
    memory_bytes, piece_bytes = budget(memory_bytes, held_bytes(requests))
    nproc = jax.process_count()
    once = None
    if read_once and nproc > 1:
        from distckpt.checkpoint import read_once as once_lib  # it builds on this module

        if any(once_lib.shared_boxes(r.target) for r in requests):
            leaves, once = once_lib.open_agreed(state_dir, requests, memory_bytes, agree)
    if once is None:
        leaves = _open(state_dir, requests)
    tasks = iter(_plan(leaves, piece_bytes, once))
    if once is not None:
        once.run(verify)
    window: collections.deque[tuple[_Shard, _Read, int]] = collections.deque()
    in_flight = 0  # bytes the reads in the window hold beyond the restored shards
    kernels: collections.deque[jax.Array] = collections.deque()  # digests running
    hashing: collections.deque[concurrent.futures.Future] = collections.deque()
    done = False
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(direct_read.Reader())
        pool = (stack.enter_context(concurrent.futures.ThreadPoolExecutor(
            DIGEST_THREADS, thread_name_prefix="distckpt-digest"))
            if verify and DIGEST_THREADS > 1 else None)
        while True:
            while not done and (not window or (in_flight < memory_bytes // 4
                                               and len(window) < MAX_WINDOW)):
                nxt = next(tasks, None)
                if nxt is None:
                    done = True
                    break
                shard, box = nxt
                dest = _destination(shard, box) if shard.leaf.direct else None
                pending = _Read(shard.leaf, box, dest, reader)
                extra = 0 if pending.in_place and _final(shard) else pending.nbytes
                window.append((shard, pending, extra))
                in_flight += extra
            if not window:
                break
            shard, pending, extra = window.popleft()
            in_flight -= extra
            final = pending.in_place and _final(shard)
            _land(shard, pending.box, pending.result(), verify, in_place=pending.in_place,
                  pool=pool if final else None)
            last = shard.lanes[-1] if shard.lanes else None
            if isinstance(last, jax.Array):
                kernels.append(last)
                while len(kernels) > KERNELS_IN_FLIGHT:  # their temporaries are pieces' size
                    kernels.popleft().block_until_ready()
            elif isinstance(last, concurrent.futures.Future) and (not hashing
                                                                  or hashing[-1] is not last):
                hashing.append(last)
                while len(hashing) > 2 * DIGEST_THREADS:
                    hashing.popleft().result()
    values: dict[str, jax.Array] = {}
    partials: dict[str, digest.Partial] = {}
    for leaf in leaves:
        values[leaf.request.name], partial = _assemble(leaf, verify, by_reader=once is not None)
        if partial is not None:
            partials[leaf.request.name] = partial
        if read_bytes is not None:
            read_bytes[leaf.request.name] = leaf.read_bytes
    return values, (partials if verify else None)


DIGEST_THREADS = digest.HOST_THREADS
"""Threads digesting pieces in NumPy while the restore goes on: only pieces read into
their shard's final memory (:func:`_final`), which hold nothing extra while they wait."""

MAX_WINDOW = 2 * direct_read.THREADS
"""At most this many pieces are read ahead (reads into the shards' own memory hold no
budget)."""


KERNELS_IN_FLIGHT = 1
"""Digest kernels (pieces of over ``digest.SMALL_ELEMENTS`` elements) left running while
the next piece lands: each holds temporaries of its piece's size."""


def _final(shard: _Shard) -> bool:
    """Whether the host memory :func:`_destination` gives `shard` is what the shard's
    device keeps (a CPU device adopts an aligned host array), not a staging copy."""
    return shard.devices[0].platform == "cpu"


def _destination(shard: _Shard, box: Box) -> np.ndarray | None:
    """Host memory to read `box` of `shard` into: the whole shard for a one-piece shard;
    on a CPU device the piece's place in the shard's host array when contiguous."""
    shape = tuple(h - a_ for a_, h in zip(*box, strict=True))
    if len(shard.pieces) == 1:
        return aligned_empty(shape, shard.leaf.dtype)
    if not _final(shard):
        return None
    if shard.host is None:
        shard.host = aligned_empty(tuple(h - a_ for a_, h in zip(*shard.box, strict=True)),
                                   shard.leaf.dtype)
    at = tuple(slice(a - b, a - b + n) for a, b, n in zip(box[0], shard.box[0], shape,
                                                          strict=True))
    view = shard.host[at]
    return view if view.flags.c_contiguous else None


def _land(shard: _Shard, box: Box, host: np.ndarray, verify: bool, *,
          in_place: bool = False,
          pool: concurrent.futures.ThreadPoolExecutor | None = None) -> None:
    """Put one piece (`box`, its values `host`) into the shard's device buffer and
    digest it if the shard counts. `in_place`: `host` was read into its place in the
    shard's host array already (:func:`_destination`). `pool`: digest it there if it
    is digested in NumPy (`host` must stay as it is: the shard's final memory)."""
    device = shard.devices[0]
    lo, _ = box
    starts = np.array(lo or [0], dtype=np.uint32)
    if len(shard.pieces) == 1:
        shard.buffer = jax.device_put(host, device)
        piece = shard.buffer
    elif device.platform == "cpu":
        # Device memory is host memory: assemble the shard in an aligned host array that
        # the device then adopts without a copy (_assemble); no kernel per piece.
        if shard.host is None:
            shard.host = aligned_empty(tuple(h - a_ for a_, h in zip(*shard.box, strict=True)),
                                       shard.leaf.dtype)
        at = tuple(slice(a - b, a - b + n) for a, b, n in
                   zip(lo, shard.box[0], host.shape, strict=True))
        if not in_place:
            shard.host[at] = host
        piece = jax.device_put(shard.host[at], device)  # no copy where aligned
    else:
        piece = jax.device_put(host, device)
        if shard.buffer is None:
            shape = tuple(h - a_ for a_, h in zip(*shard.box, strict=True))
            shard.buffer = jnp.zeros(shape, _carrier(shard.leaf.dtype), device=device)
        rel = np.array([a - b for a, b in zip(lo, shard.box[0], strict=True)], np.int32)
        shard.buffer = _write(shard.buffer, piece, rel)
    if verify and shard.counts and host.size:
        # A shard's pieces have one shape (and a tail): the kernel compiles once for them.
        small = digest.SMALL_ELEMENTS if len(shard.pieces) == 1 else PIECE_KERNEL_ELEMENTS
        if pool is not None and host.size <= small:
            shard.lanes.append(pool.submit(digest.block_lanes, host, None, starts))
        else:
            shard.lanes.append(digest.block_lanes(host, piece, starts, small=small))
    if len(shard.pieces) > 1:
        if shard.host is None and shard.buffer is not None:
            shard.buffer.block_until_ready()  # the piece's host and device copies go now
        elif shard.lanes and isinstance(shard.lanes[-1], jax.Array):
            shard.lanes[-1].block_until_ready()  # the piece's copy, if any, goes now


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialized C-order array whose data starts on an `align`-byte boundary (what
    a CPU device needs to take a NumPy array without copying it)."""
    n = max(1, math.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype)[:math.prod(shape)].reshape(shape)


def _assemble(leaf: _Leaf, verify: bool, *, by_reader: bool = False
              ) -> tuple[jax.Array, digest.Partial | None]:
    """The leaf's array from its shards' buffers, and this process's partial digest.
    `by_reader`: the counting shards were chosen by :class:`~distckpt.checkpoint.read_once.Once` (each index counted
    by exactly one process, its reader), not by replica id."""
    target = leaf.request.target
    buffers = []
    for shard in leaf.shards:
        if shard.host is not None:  # assembled on the host (a CPU device): adopted as is
            shard.buffer, shard.host = jax.device_put(shard.host, shard.devices[0]), None
        assert shard.buffer is not None
        if shard.buffer.dtype != leaf.dtype:  # assembled in its carrier dtype
            shard.buffer = _reinterpret(shard.buffer, leaf.dtype)
        buffers.append(shard.buffer)
        buffers += [jax.device_put(shard.buffer, d) for d in shard.devices[1:]]
    array = jax.make_array_from_single_device_arrays(target.shape, target.sharding, buffers)
    if not verify:
        return array, None
    counted = {s.box for s in leaf.shards if s.counts}
    replica0 = {_box(s.index, array.shape) for s in array.addressable_shards
                if s.replica_id == 0}
    # JAX counts replicas otherwise than _replica_zero: digest anew.
    if not by_reader and counted != replica0:
        return array, digest.dispatch([array]).result()[0]
    total = digest.ZERO
    for shard in leaf.shards:
        for lanes in shard.lanes:
            if isinstance(lanes, concurrent.futures.Future):
                lanes = lanes.result()
            a, b = (int(v) for v in np.asarray(lanes))
            total = digest.add(total, (a, b))
    return array, total
