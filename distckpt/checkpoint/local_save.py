"""Saving to the local tier: every host keeps its own shards, and a peer keeps a copy.

:meth:`LocalTier.save` runs on the training thread: it waits for the previous local save's
background work, then stages this host's distinct shards to host memory (one copy each,
started together) and returns. No barrier, no filesystem decision: a local save costs
the caller a device-to-host copy of its own shards.

In the background, on every host:

1. the shards' content digests (:mod:`distckpt.state.digest`, the partial digest of each
   box at its global position: the same digest a persistent step records);
2. the staged shards are *offered* to this host's ring successor (process ``p + 1 mod N``)
   over JAX's transfer server (:mod:`distckpt.checkpoint.peers`);
3. the own copy is written (:class:`distckpt.checkpoint.local_tier.LocalDir`, record last,
   renamed into place);
4. the predecessor's shards are pulled, checked against the digests its record carries,
   and written as ``peer-<its uid>``;
5. retention keeps the newest ``local_max_to_keep`` copies of each kind.

Losing any one machine (its process and its local directory) therefore loses no local
step whose background work finished: its successor holds its shards. A local save that
fails (a peer died mid-exchange, a full RAM disk) is logged and counted in
:attr:`LocalTier.failures`, and never stops training: the persistent tier is the
safety net, and a restore only ever uses copies whose records and digests check out.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from distckpt.checkpoint import peers
from distckpt.checkpoint.local_tier import Copy, LocalDir, Shard, box_of, check_shard, expand, seal
from distckpt.checkpoint.options import CheckpointOptions
from distckpt.checkpoint.saving import on_cpu
from distckpt.multihost import coordinator
from distckpt.state import nnx_state
from distckpt.state.process_state import FaultPoint

logger = logging.getLogger(__name__)

__all__ = ["LocalTier", "stage"]


def stage(leaves: Sequence[nnx_state.Leaf], private: bool = False) -> dict[str, dict[str, Any]]:
    """This host's distinct shards of every leaf, copied to host memory (typed keys as
    their key data). All copies start before the first is awaited. `private`: the arrays
    are already a host copy nobody else writes to; their shards are used in place."""
    local = {d: i for i, d in enumerate(jax.local_devices())}
    pending: list[tuple[Shard, jax.Array]] = []
    out: dict[str, dict[str, Any]] = {}
    for leaf in leaves:
        value = leaf.value
        if leaf.is_key:
            value = jax.random.key_data(value)
        if not isinstance(value, jax.Array):
            raise TypeError(f"leaf {leaf.name!r} is not a jax.Array; the local tier saves arrays")
        shape = tuple(value.shape)
        by_box: dict[tuple[tuple[int, int], ...], Shard] = {}
        for shard in value.addressable_shards:
            box = box_of(shard.index, shape)
            if box in by_box:
                by_box[box].devices += (local[shard.device],)
                continue
            s = Shard(box, (local[shard.device],))
            by_box[box] = s
            shard.data.copy_to_host_async()
            pending.append((s, shard.data))
        out[leaf.name] = {"shape": shape, "dtype": str(value.dtype),
                          "shards": sorted(by_box.values(), key=lambda s: s.box),
                          "sharding": sharding_record(value.sharding)}
    for s, data in pending:
        # A copy (training may overwrite or donate the device buffer), unless private or
        # on CPU: there a NumPy view is the buffer itself, and a buffer with a view cannot
        # be donated (a step that donates it computes into a new one).
        s.data = np.asarray(data) if private or on_cpu(data) else np.array(data)
    return out


@functools.cache
def _local_indices() -> dict[jax.Device, list[int]]:
    """[process index, index among that process's devices] of every device (by id)."""
    seen: dict[int, int] = {}
    out: dict[jax.Device, list[int]] = {}
    for d in sorted(jax.devices(), key=lambda d: d.id):
        out[d] = [d.process_index, seen.get(d.process_index, 0)]
        seen[d.process_index] = out[d][1] + 1
    return out


def sharding_record(sharding: jax.sharding.Sharding) -> dict[str, Any] | None:
    """A NamedSharding as JSON: the mesh as (process index, local device index) per
    position, its axis names and the spec (None for other shardings)."""
    if not isinstance(sharding, NamedSharding):
        return None
    local = _local_indices()
    return {"mesh": [local[d] for d in sharding.mesh.devices.ravel()],
            "mesh_shape": list(sharding.mesh.devices.shape),
            "axes": [str(a) for a in sharding.mesh.axis_names],
            "spec": [list(a) if isinstance(a, tuple) else a for a in sharding.spec]}


class LocalTier:
    """The local tier of one service on this host (see the module docstring)."""

    def __init__(self, options: CheckpointOptions, job: str, nonce: str, *,
                 read_only: bool = False):
        assert options.local_directory is not None
        self.options = options
        self.dir = LocalDir(expand(options.local_directory), read_only=read_only)
        self.timeout_s = min(options.timeout_s, options.local_timeout_s)
        self.link = peers.PeerLink(options.peer_bind_address, self.timeout_s)
        self.nonce = nonce
        self.job = {"process_count": jax.process_count(),
                    "devices_per_process": jax.local_device_count(),
                    "job": job}
        self.failures: list[tuple[int, str]] = []
        """(step, why) of local saves that did not complete on this host."""
        self.saved: list[tuple[int, float]] = []
        """(step, seconds from save() to the own copy and the peer copy written)."""
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._check_distinct()

    def _check_distinct(self) -> None:
        import socket

        me = [socket.gethostname(), str(self.dir.root)]
        seen = coordinator.all_gather("local-tier:directories", me, self.options.timeout_s)
        for i, other in enumerate(seen):
            if i != jax.process_index() and other == me:
                raise ValueError(
                    f"processes {i} and {jax.process_index()} would share the local tier "
                    f"directory {self.dir.root} on machine {me[0]}; give each host its own "
                    "(put {host} in local_directory: it becomes DISTCKPT_HOST or the hostname)")

    def due(self, step: int) -> bool:
        return step % self.options.local_interval_steps == 0

    @property
    def peer_copies(self) -> bool:
        return self.options.peer_copies and jax.process_count() > 1

    def save(self, step: int, leaves: Sequence[nnx_state.Leaf], *, extra: Mapping[str, Any],
             private: bool = False) -> None:
        """Stage this host's shards of `step` and write them in the background (`private`:
        the leaves are already a host copy, see :func:`stage`)."""
        self.wait()
        t0 = time.perf_counter()
        shards = stage(leaves, private=private)
        copy = Copy(step, jax.process_index(), self.dir.uid, self.job, shards, dict(extra))
        self._seq += 1
        self._thread = threading.Thread(target=self._background, args=(copy, self._seq, t0),
                                        name=f"distckpt-local-{step}", daemon=True)
        self._thread.start()

    def _background(self, copy: Copy, seq: int, t0: float) -> None:
        n, me, step = jax.process_count(), jax.process_index(), copy.step
        after_file = lambda: self._fault(FaultPoint.LOCAL_FILE, step)  # noqa: E731
        errors: list[Exception] = []
        try:
            for leaf in copy.leaves.values():
                for s in leaf["shards"]:
                    seal(s)
            self._fault(FaultPoint.LOCAL_STAGED, step)
            offer_error: Exception | None = None
            if self.peer_copies:
                arrays = [s.data for leaf in copy.leaves.values() for s in leaf["shards"]]
                try:  # the own copy is written whatever happens to the peer's
                    self.link.offer(self._key(seq, me), arrays,
                                    meta=copy.offer_record())
                except Exception as e:
                    offer_error = e
            self._fault(FaultPoint.LOCAL_OFFERED, step)
            self.dir.write(copy, after_file=after_file)
            self._fault(FaultPoint.LOCAL_WRITTEN, step)
            if offer_error is not None:
                raise RuntimeError(f"offering this host's shards to its peer failed: "
                                   f"{offer_error}") from offer_error
        except Exception as e:
            errors.append(e)
        if self.peer_copies:
            # Whatever happened to this host's own copy, the predecessor's offer is pulled:
            # an offer nobody pulls stays in the predecessor's memory.
            try:
                key = self._key(seq, (me - 1) % n)
                note = self.link.note(key)
                peer = pull_copy(self.link, note)
                coordinator.clear_note(key)
                self.link.confirm(key)
                self._fault(FaultPoint.LOCAL_PULLED, step)
                self.dir.write(peer, f"peer-{peer.owner}", after_file=after_file)
                self._fault(FaultPoint.LOCAL_PEER_WRITTEN, step)
            except Exception as e:
                errors.append(e)
        try:
            self.dir.retain(self.options.local_max_to_keep)
        except Exception as e:
            errors.append(e)
        if not errors:
            self.saved.append((copy.step, time.perf_counter() - t0))
            return
        # Never stops training: the persistent tier is the safety net.
        why = "; ".join(f"{type(e).__name__}: {e}" for e in errors)
        logger.warning("[process=%d] local save of step %d did not complete: %s",
                       jax.process_index(), copy.step, why)
        self.failures.append((copy.step, why))

    def _fault(self, point: FaultPoint, step: int) -> None:
        if self.options.fault_hook is not None:
            self.options.fault_hook(point, step)

    def _key(self, seq: int, role: int) -> str:
        return peers.exchange_key(self.nonce, "save", seq, role)

    def wait(self) -> None:
        """Block until the background work of the last local save ended (either way)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def pull_copy(link: peers.PeerLink, note: Mapping[str, Any]) -> Copy:
    """Pull the copy an offer's note describes, every shard checked (each group of
    shards while the next one travels)."""
    copy = Copy.from_record(note["meta"])
    shards = []
    for name, leaf in copy.leaves.items():
        leaf.pop("files", None)
        shards += [(name, s) for s in leaf["shards"]]

    def arrived(indices: Sequence[int], arrays: Sequence[np.ndarray]) -> None:
        for i, data in zip(indices, arrays, strict=True):
            name, s = shards[i]
            s.data = data
            check_shard(name, s)

    got = link.pull(dict(note), arrived)
    if len(got) != len(shards):
        raise ValueError(f"the offer holds {len(got)} arrays, its record {len(shards)}")
    for (name, s), data in zip(shards, got, strict=True):
        if s.data is None:  # zero-size: not pulled
            s.data = data
            check_shard(name, s)
    return copy
