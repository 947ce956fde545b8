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

Arrays are offered from a CPU device: the staged host copy, not the accelerators.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import socket
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from distckpt import compat
from distckpt.multihost import coordinator

logger = logging.getLogger(__name__)

__all__ = ["PeerLink", "bind_address"]


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


def _cpu_device() -> jax.Device:
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # no CPU backend in this process: offer from the first device
        return jax.local_devices()[0]


class PeerLink:
    """This process's transfer server (started on first use) and its connections."""

    def __init__(self, bind: str | None, timeout_s: float):
        self._bind = bind
        self.timeout_s = timeout_s
        self._server: Any = None
        self._connections: dict[str, Any] = {}
        self._device: jax.Device | None = None

    def _start(self) -> Any:
        if self._server is None:
            from jax.experimental import transfer

            self._device = _cpu_device()
            host = self._bind or bind_address()
            self._server = transfer.start_transfer_server(
                self._device.client, f"{host}:0", [f"{host}:0"])
            logger.info("[process=%d] transfer server on %s", jax.process_index(),
                        self._server.address())
        return self._server

    def offer(self, key: str, arrays: Sequence[np.ndarray], meta: Any = None) -> None:
        """Offer `arrays` (host copies) for one pull by whoever reads note `key`; `meta`
        (JSON) travels with the note."""
        server = self._start()
        sendable = [a for a in arrays if a.size]
        uid = secrets.randbits(62)
        on_device = [jax.device_put(a, self._device) for a in sendable]
        if on_device:
            server.await_pull(uid, on_device)
        coordinator.publish(key, json.dumps({
            "address": server.address(), "uuid": uid, "meta": meta,
            "arrays": [[list(a.shape), str(a.dtype)] for a in arrays]}))

    def note(self, key: str) -> dict[str, Any]:
        """The note of an offer (blocks up to timeout_s)."""
        return json.loads(coordinator.wait_note(key, self.timeout_s))

    def pull(self, note: dict[str, Any]) -> list[np.ndarray]:
        """Pull the arrays an offer's note describes; returns host copies."""
        self._start()
        from distckpt.checkpoint.local_tier import dtype_of

        shapes = [(tuple(s), dtype_of(d)) for s, d in note["arrays"]]
        specs = [jax.ShapeDtypeStruct(s, d, sharding=jax.sharding.SingleDeviceSharding(
            self._device)) for s, d in shapes if int(np.prod(s, dtype=np.int64))]
        got: list[Any] = []
        if specs:
            address = note["address"]
            if address not in self._connections:
                self._connections[address] = self._server.connect(address)
            got = list(self._connections[address].pull(note["uuid"], specs))
        out, it = [], iter(got)
        for shape, dtype in shapes:
            out.append(np.array(next(it)) if int(np.prod(shape, dtype=np.int64))
                       else np.zeros(shape, dtype))
        return out


def exchange_key(nonce: str, *parts: Any) -> str:
    """A note name for one exchange, the same on every process."""
    digest = hashlib.sha1(":".join(str(p) for p in (nonce, *parts)).encode()).hexdigest()
    return f"peer/{digest[:20]}"
