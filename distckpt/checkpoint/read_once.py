"""Read once per replica group, for :func:`distckpt.checkpoint.streaming.read`.

Read once per replica group (``CheckpointOptions.restore_read_once``, off by default): a
shard index that several processes hold is read from storage by one of them, chosen by a
plan every process computes alike from the target shardings (:class:`Once`), and sent to
the others in slabs of its bits through a JAX all-gather; the reader digests it, the
copies received are replicas and are not counted. Storage then serves the step's unique
bytes once. Off by default because on the one machine measured (2 simulated hosts on 2
cores sharing one page cache, ``distckpt bench --hosts 2 --data-parallel 2``) it was
slower than every host reading: 0.31 s against 0.26 s at 64 MiB, 0.92 s against 0.49 s
at 256 MiB, with a higher peak RSS (2.1-2.7x the shard bytes against 1.8-1.9x). There a
byte range read from the page cache costs ~0.05 s per 64 MiB (profiled), while the
all-gather (gloo over loopback TCP, its dispatch blocking on CPU) and the slab copies
cost about as much as the whole restore of that process. It can pay only where a
host's read from storage is slower than the interconnect (hosts fetching from shared
or remote storage; NCCL or ICI between accelerators), which was not measured.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from distckpt.checkpoint.streaming import (
    Box,
    Request,
    _box,
    _land,
    _Leaf,
    _open,
    _pieces,
    _Read,
    _Shard,
)

__all__ = ["Once", "open_agreed", "shared_boxes"]


def _gather_json(value: Any) -> list[Any]:
    """`value` (small, JSON) from every process, by a JAX collective over the processes."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = _Gather(1)(np.array([data.size], np.uint32))[:, 0]
    words = -(-int(sizes.max()) // 4)
    padded = np.zeros(words * 4, np.uint8)
    padded[:data.size] = data
    out = _Gather(words)(padded.view(np.uint32))
    return [json.loads(out[p].view(np.uint8)[:int(sizes[p])].tobytes())
            for p in range(out.shape[0])]


class _Gather:
    """All-gather of `words` uint32 words per process: one device of each process in a
    mesh, an identity jitted onto a replicated output (XLA's all-gather; on CPU over
    gloo). Bits travel as unsigned integers: nothing is computed on them."""

    def __init__(self, words: int):
        nproc = jax.process_count()
        devices = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
                   for p in range(nproc)]
        mesh = jax.sharding.Mesh(np.array(devices), ("p",))
        self.shape = (nproc, words)
        self.device = devices[jax.process_index()]
        self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("p"))
        self.fn = _gather_fn(mesh)

    def start(self, slab: np.ndarray) -> jax.Array:
        """Dispatch the all-gather of `slab` (asynchronous); np.asarray(.result) waits."""
        local = jax.device_put(slab.reshape(1, -1), self.device)
        x = jax.make_array_from_single_device_arrays(self.shape, self.sharding, [local])
        return self.fn(x)

    def __call__(self, slab: np.ndarray) -> np.ndarray:
        return np.asarray(self.start(slab).addressable_shards[0].data)


@functools.lru_cache(maxsize=8)
def _gather_fn(mesh: jax.sharding.Mesh) -> Any:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(lambda x: x, out_shardings=replicated)


def shared_boxes(target: jax.ShapeDtypeStruct) -> dict[Box, list[int]]:
    """The shard indices of `target` that more than one process holds: box -> the
    holding processes (ascending). From the sharding alone: every process computes
    the same."""
    shape = tuple(target.shape)
    holders: dict[Box, set[int]] = {}
    for device, index in target.sharding.devices_indices_map(shape).items():
        holders.setdefault(_box(index, shape), set()).add(device.process_index)
    return {box: sorted(ps) for box, ps in sorted(holders.items()) if len(ps) > 1}


_ALIGN = 16


class Once:
    """Read once per replica group: the plan and its rounds.

    Every shard index held by several processes gets one reader among its holders: the
    holder with the fewest bytes assigned so far (ties: the lowest process index), boxes
    in sorted order, arrays in request order, so the reading is spread and every process
    computes the same plan from the target shardings and the saved layouts alone. The
    reader splits its boxes into pieces of at most one slab and packs them into rounds;
    in each round every process contributes a slab (its pieces, or zeros) to one
    all-gather (:class:`_Gather`) and every holder of a piece lands it. The reader digests
    its pieces as they land (its lanes count); the others' copies are replicas and do
    not count. A read error is kept and raised after the rounds, so that no process
    leaves the others waiting in a collective.
    """

    def __init__(self, leaves: list[_Leaf], memory_bytes: int):
        self.nproc = jax.process_count()
        self.me = jax.process_index()
        # Host bytes held at once: this round's reads and slab, the next round's reads,
        # and the gathered slabs of every process: about (nproc + 3) slabs, kept under
        # the quarter of the budget that reads in flight get on the other path.
        slab_max = max(1 << 16, memory_bytes // (4 * (self.nproc + 3)))
        slab_max -= slab_max % _ALIGN
        assigned = [0] * self.nproc
        queues: list[list[tuple[_Leaf, Box, Box]]] = [[] for _ in range(self.nproc)]
        self.boxes: dict[int, dict[Box, int]] = {}  # id(leaf) -> box -> reader
        for leaf in leaves:
            itemsize = leaf.dtype.itemsize
            readers = self.boxes[id(leaf)] = {}
            for box, holders in shared_boxes(leaf.request.target).items():
                reader = min(holders, key=lambda p: (assigned[p], p))
                readers[box] = reader
                lo, hi = box
                extent = [h - a_ for a_, h in zip(lo, hi, strict=True)]
                assigned[reader] += max(1, math.prod(extent)) * itemsize
                if leaf.raw is not None:
                    extent = [max(e, c) for e, c in zip(extent, leaf.raw.chunks, strict=True)]
                for piece in _pieces(box, extent, itemsize, slab_max):
                    queues[reader].append((leaf, box, piece))
        # Pack each queue into rounds of at most one slab.
        self.rounds: list[list[list[tuple[_Leaf, Box, Box, int, int]]]] = []
        self._pieces: dict[tuple[int, Box], list[Box]] = {}
        need = 0
        for queue in queues:
            rounds: list[list[tuple[_Leaf, Box, Box, int, int]]] = []
            used = slab_max
            for leaf, box, piece in queue:
                n = math.prod(h - a_ for a_, h in zip(*piece, strict=True)) * leaf.dtype.itemsize
                if used + n > slab_max:
                    rounds.append([])
                    used = 0
                rounds[-1].append((leaf, box, piece, used, n))
                self._pieces.setdefault((id(leaf), box), []).append(piece)
                used += -(-n // _ALIGN) * _ALIGN
                need = max(need, used)
            self.rounds.append(rounds)
        self.words = max(1, -(-need // 4))
        self.count = max((len(r) for r in self.rounds), default=0)
        self.shards: dict[tuple[int, Box], _Shard] = {}

    def reader(self, leaf: _Leaf, box: Box) -> int | None:
        return self.boxes[id(leaf)].get(box)

    def pieces(self, leaf: _Leaf, box: Box) -> list[Box]:
        return self._pieces[(id(leaf), box)]

    def _issue(self, r: int) -> list[tuple[tuple[_Leaf, Box, Box, int, int], _Read]]:
        mine = self.rounds[self.me]
        if r >= len(mine):
            return []
        return [(entry, _Read(entry[0], entry[2])) for entry in mine[r]]

    def run(self, verify: bool) -> None:
        """Every round on every process, even after an error here (kept, raised after the
        rounds): a process that left would leave the others waiting in the all-gather."""
        if not self.count:
            return
        gather = _Gather(self.words)
        error: Exception | None = None
        upcoming = self._issue(0)
        for r in range(self.count):
            slab = np.zeros(self.words, np.uint32)
            own: list[tuple[_Shard, Box, np.ndarray]] = []
            try:
                if error is None:
                    own = self._pack(upcoming, slab)
            except Exception as e:  # noqa: BLE001 - raised after the rounds
                error, own = e, []
            upcoming = []
            travelling = gather.start(slab)  # the collective: every process, every round
            try:
                if error is None and r + 1 < self.count:
                    upcoming = self._issue(r + 1)  # read ahead while the slabs travel
                for shard, piece, host in own:  # land (and digest) this process's reads
                    _land(shard, piece, host, verify)
            except Exception as e:  # noqa: BLE001
                error = error or e
            del own
            got = np.asarray(travelling.addressable_shards[0].data)
            del travelling
            try:
                if error is None:
                    self._receive(r, got, verify)
            except Exception as e:  # noqa: BLE001
                error = e
        if error is not None:
            raise error

    def _pack(self, current: list[tuple[tuple[_Leaf, Box, Box, int, int], _Read]],
              slab: np.ndarray) -> list[tuple[_Shard, Box, np.ndarray]]:
        """This process's pieces of a round, waited for and copied into `slab`."""
        view = slab.view(np.uint8)
        own = []
        for (leaf, box, piece, at, n), pending in current:
            host = pending.result()
            view[at:at + n] = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
            own.append((self.shards[(id(leaf), box)], piece, host))
        return own

    def _receive(self, r: int, got: np.ndarray, verify: bool) -> None:
        """Land the pieces of round `r` that other processes read and this one holds."""
        for p, rounds in enumerate(self.rounds):
            if p == self.me or r >= len(rounds):
                continue
            row = got[p].view(np.uint8)
            for leaf, box, piece, at, n in rounds[r]:
                holder = self.shards.get((id(leaf), box))
                if holder is None:
                    continue
                shape = tuple(h - a_ for a_, h in zip(*piece, strict=True))
                host = np.frombuffer(row[at:at + n].tobytes(), leaf.dtype).reshape(shape)
                _land(holder, piece, host, verify)


def open_agreed(state_dir: epath.Path, requests: Sequence[Request], memory_bytes: int,
                agree: Callable[[Any], list[Any]] | None) -> tuple[list[_Leaf], Once]:
    """Open the step's arrays on every process and check, with one all-gather, that every
    process opened them alike (else every process raises, and nobody waits in a
    collective); then the read-once plan."""
    error: Exception | None = None
    leaves = []
    try:
        leaves = _open(state_dir, requests)
    except Exception as e:  # noqa: BLE001 - reported to every process, raised below
        error = e
    layouts = None if error is not None else [
        None if leaf.raw is None else [list(leaf.raw.chunks), leaf.raw.separator]
        for leaf in leaves]
    gathered = (agree or _gather_json)({"ok": error is None, "layouts": layouts})
    if error is not None:
        raise error
    failed = [i for i, g in enumerate(gathered) if not g["ok"]]
    if failed:
        raise RuntimeError(f"process(es) {failed} could not open the step's arrays")
    if any(g["layouts"] != layouts for g in gathered):
        raise RuntimeError("processes see different array layouts for this step")
    return leaves, Once(leaves, memory_bytes)
