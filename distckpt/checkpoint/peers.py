"""Host-to-host copies of checkpoint shards over JAX's transfer server.

The local tier keeps each host's shards on a second host, and a replaced host gets its
shards back from that peer. The bytes travel over ``jax.experimental.transfer`` (the
engine JAX uses between slices), never over a shared filesystem or a socket protocol of
our own: the sending process *offers* a list of arrays under a numeric id
(``await_pull``) and posts its server's address, that id and the arrays' shapes in the
coordination service's key-value store; the receiving process reads that note, connects
and *pulls*. Both sides time out (``timeout_s``) instead of waiting for a host that died.

Security: a transfer server serves the offered arrays to whoever connects and names an
offered id. It binds to the address this host uses to reach the job's coordinator
(:func:`bind_address`; ``CheckpointOptions.peer_bind_address`` overrides it), never to
all interfaces; ids are random per exchange and an offer is served once. A host on that
network that can reach the port, and learns a live id from the coordination service,
could read the shards offered at that moment (one host's shards of one step). Run
the job on a network only its hosts can reach, as for the coordinator itself.

Arrays are offered from, and pulled into, a CPU device of a client of their own
(:func:`distckpt.compat.private_cpu_device`): the staged host copy, not the accelerators,
and never a device training uses. On a job that trains on CPU devices an offer or a pull
on one of them waited behind the computations queued there; a training step whose
collective needed the pulling host, itself waiting for that pull, deadlocked the job.

A pull that has not arrived within ``timeout_s`` raises (the local save records the
failure; training goes on) and its connection is dropped; JAX's own pull timeout did not
end a pull whose offer never came, so the wait is ours.

An offered array stays in the server's memory until it is pulled; the server has no way
to withdraw an offer. The receiver *confirms* each pull (:meth:`PeerLink.confirm`, a note
in the key-value store); before each new offer the sender forgets the confirmed ones, and
if one has gone unconfirmed for longer than ``timeout_s`` (its receiver gave up on it or
died) it replaces its transfer server, which frees every array the old one held. Without
that, a host whose peer stopped pulling (its RAM disk full, say) kept one more copy of its
shards in memory at every local save.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from distckpt import compat
from distckpt.checkpoint.local_tier import aligned, dtype_of, raw_bytes, view_at
from distckpt.multihost import coordinator

logger = logging.getLogger(__name__)

__all__ = ["PeerLink", "bind_address"]

TRANSPORTS = 8
"""Parallel streams of a transfer server (each a bulk-transport socket): one pull's
arrays travel over all of them at once, in chunks of TRANSFER_BYTES."""
TRANSFER_BYTES = 1 << 20
GROUP_BYTES = 16 << 20
"""An offer is pulled in groups of about this many bytes: the receiver checks a group
while the next one travels."""
PACK_BELOW = 1 << 20
"""Arrays smaller than this travel packed together (one uint8 array per pack, each at an
offset aligned to local_tier.ALIGN bytes); larger ones travel as they are. A state of many small
leaves costs one transfer per pack, not one per leaf."""
PACK_BYTES = 8 << 20


def bind_address() -> str:
    """The local address this host reaches the job's coordinator from (the interface
    the job's hosts talk on), or 127.0.0.1 for a single machine."""
    coord = compat.jax_coordinator_address()
    if not coord:
        return "127.0.0.1"
    host = coord.rsplit(":", 1)[0].strip("[]")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # no packet is sent: this only picks the route
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class PeerLink:
    """This process's transfer server (started on first use) and its connections."""

    def __init__(self, bind: str | None, timeout_s: float):
        self._bind = bind
        self.timeout_s = timeout_s
        self._server: Any = None
        self._connections: dict[str, Any] = {}
        self._device: jax.Device | None = None
        self._offers: dict[str, float] = {}
        """Offers not yet confirmed: note key -> time.monotonic() when offered."""
        self.replaced = 0
        """How many times the server was replaced to free offers nobody pulled."""

    def _start(self) -> Any:
        if self._server is None:
            from jax.experimental import transfer

            self._device = compat.private_cpu_device()
            host = self._bind or bind_address()
            self._server = transfer.start_transfer_server(
                self._device.client, f"{host}:0", [f"{host}:0"] * TRANSPORTS,
                transfer_size=TRANSFER_BYTES)
            logger.info("[process=%d] transfer server on %s", jax.process_index(),
                        self._server.address())
        return self._server

    def offer(self, key: str, arrays: Sequence[np.ndarray], meta: Any = None) -> None:
        """Offer `arrays` (host copies) for one pull by whoever reads note `key`; `meta`
        (JSON) travels with the note. The arrays are offered in groups of about
        GROUP_BYTES, each under its own id, so the receiver can check one group while the
        next one travels."""
        if self.pending(replace_stale=True):
            logger.debug("[process=%d] %d earlier offers not pulled yet",
                         jax.process_index(), len(self._offers))
        server = self._start()
        groups: list[list[tuple[np.ndarray, dict[str, Any]]]] = []
        size = GROUP_BYTES
        for unit in _units(arrays):
            if size + unit[0].nbytes > GROUP_BYTES and (not groups or groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(unit)
            size += unit[0].nbytes
        uids = [secrets.randbits(62) for _ in groups]
        for uid, group in zip(uids, groups, strict=True):
            server.await_pull(uid, [jax.device_put(a, self._device) for a, _ in group])
        coordinator.publish(key, json.dumps({
            "address": server.address(), "uuids": uids, "groups": [len(g) for g in groups],
            "units": [u for g in groups for _, u in g], "meta": meta,
            "arrays": [[list(a.shape), str(a.dtype)] for a in arrays]}))
        self._offers[key] = time.monotonic()

    def confirm(self, key: str) -> None:
        """Tell the sender of offer `key` that it was pulled (the receiver calls this)."""
        coordinator.publish(f"{key}:taken", "1")

    def pending(self, replace_stale: bool = False) -> int:
        """How many of this process's offers are not confirmed yet. `replace_stale`: if
        one has waited longer than timeout_s, replace the server (freeing every offer it
        held) and return 0."""
        for key in list(self._offers):
            if coordinator.read_note(f"{key}:taken") is not None:
                coordinator.clear_note(f"{key}:taken")
                del self._offers[key]
        now = time.monotonic()
        stale = [k for k, t in self._offers.items() if now - t > self.timeout_s]
        if replace_stale and stale and self._server is not None:
            logger.warning("[process=%d] %d offers of peer copies were not pulled within "
                           "%gs; replacing the transfer server to free them",
                           jax.process_index(), len(stale), self.timeout_s)
            self._server = None
            self._connections.clear()
            self._offers.clear()
            self.replaced += 1
        return len(self._offers)

    def note(self, key: str) -> dict[str, Any]:
        """The note of an offer (blocks up to timeout_s)."""
        return json.loads(coordinator.wait_note(key, self.timeout_s))

    def pull(self, note: dict[str, Any],
             arrived: Callable[[list[int], list[np.ndarray]], None] | None = None
             ) -> list[np.ndarray]:
        """Pull the arrays an offer's note describes; returns host copies (views of the
        pulled buffers). `arrived(indices, arrays)`, when given, is called in a worker
        thread with each group as it arrives (`indices`: the arrays' indices in the
        note's list) while the next group is pulled; its exception is raised here.
        Zero-size arrays do not travel and are not passed to `arrived`."""
        self._start()
        shapes = [(tuple(s), dtype_of(d)) for s, d in note["arrays"]]
        units: list[dict[str, Any]] = note["units"]
        out: list[np.ndarray] = [np.zeros(s, d) for s, d in shapes]  # zero-size: not sent
        address = note["address"]
        if units and address not in self._connections:
            self._connections[address] = self._server.connect(address)
        sharding = jax.sharding.SingleDeviceSharding(self._device)
        done = 0
        deadline = time.monotonic() + self.timeout_s
        with concurrent.futures.ThreadPoolExecutor(1) as checker:
            checks = []
            for uid, count in zip(note["uuids"], note["groups"], strict=True):
                which = units[done:done + count]
                done += count
                specs = [jax.ShapeDtypeStruct(*shapes[u["array"]], sharding=sharding)
                         if "array" in u else
                         jax.ShapeDtypeStruct((u["nbytes"],), np.uint8, sharding=sharding)
                         for u in which]
                got = self._connections[address].pull(uid, specs)
                self._wait_ready(got, address, deadline)
                # Views of the pulled buffers, not copies: on CPU they are aligned memory
                # that jax.device_put takes without copying again.
                indices = []
                for u, a in zip(which, got, strict=True):
                    for i, data in _unpack(u, np.asarray(a), shapes):
                        out[i] = data
                        indices.append(i)
                if arrived is not None:
                    checks.append(checker.submit(arrived, indices, [out[i] for i in indices]))
            if done != len(units):
                raise ValueError(f"offer {note['uuids']} holds {done} transfers, its note "
                                 f"lists {len(units)}")
            for c in checks:
                c.result()
        return out

    def _wait_ready(self, arrays: Sequence[Any], address: str, deadline: float) -> None:
        """Until the pulled `arrays` have arrived (a pull returns at once), or raise
        TimeoutError at `deadline` and drop the connection (its pull stays pending)."""
        pause = 0.0005
        while not all(a.is_ready() for a in arrays):
            if time.monotonic() > deadline:
                self._connections.pop(address, None)
                raise TimeoutError(f"a peer copy from {address} did not arrive within "
                                   f"{self.timeout_s:g}s")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _units(arrays: Sequence[np.ndarray]) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """What travels for `arrays`: (array to send, its description in the note): an array
    of PACK_BELOW bytes or more as itself (``{"array": i}``), smaller ones copied into
    packs of about PACK_BYTES (``{"pack": [[i, offset], ...], "nbytes": n}``). Zero-size
    arrays do not travel."""
    units: list[tuple[np.ndarray, dict[str, Any]]] = []
    members: list[tuple[int, int]] = []
    size = 0

    def flush() -> None:
        nonlocal members, size
        if members:
            pack = np.empty(size, np.uint8)
            for i, offset in members:
                flat = raw_bytes(arrays[i])
                pack[offset:offset + flat.size] = flat
            units.append((pack, {"pack": [list(m) for m in members], "nbytes": size}))
        members, size = [], 0

    for i, a in enumerate(arrays):
        if not a.size:
            continue
        if a.nbytes >= PACK_BELOW:
            units.append((a, {"array": i}))
            continue
        offset = aligned(size)
        members.append((i, offset))
        size = offset + a.nbytes
        if size >= PACK_BYTES:
            flush()
    flush()
    return units


def _unpack(unit: dict[str, Any], data: np.ndarray,
            shapes: Sequence[tuple[tuple[int, ...], np.dtype]]) -> list[tuple[int, np.ndarray]]:
    """(index, array) of what one unit carried: `data` itself, or views of a pack."""
    if "array" in unit:
        return [(unit["array"], data)]
    return [(i, view_at(data, offset, *shapes[i])) for i, offset in unit["pack"]]


def exchange_key(nonce: str, *parts: Any) -> str:
    """A note name for one exchange, the same on every process."""
    digest = hashlib.sha1(":".join(str(p) for p in (nonce, *parts)).encode()).hexdigest()
    return f"peer/{digest[:20]}"
