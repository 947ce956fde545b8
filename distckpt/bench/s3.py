"""`distckpt bench --dir s3://bucket/prefix`: what differs from benchmarking a local disk.

Everything here talks to the object store through TensorStore's ``s3`` kvstore, the driver
Orbax and distckpt write array data with, configured by
:meth:`distckpt.storage.Location.kvstore_spec` (the ``AWS_*`` environment: endpoint,
region, credentials). TensorStore is imported only when first needed.

* :func:`distckpt.storage.check_empty` (not here: goodput and the drill use it too)
  refuses a prefix that holds objects before anything is written (the benchmark writes
  and deletes below it, so it must never touch existing checkpoints).
* :func:`distckpt.storage.remove_objects` (not here either) deletes everything below a
  prefix (the local case's ``rmtree``).
* :func:`read_objects` is the "raw read of its files" figure's object-store form: plain
  GETs of a step's objects, several in flight.
* :func:`pack` / :func:`unpack` cut a process's shard bytes into objects and put them back
  (the ``raw`` contender on S3, :class:`distckpt.bench.contenders.RawObjects`).
* ``--s3-server local`` runs :func:`distckpt.tools.s3server.private_server` (a SeaweedFS
  S3 server on 127.0.0.1 for one run), for users without an S3 endpoint at hand.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Iterator
from typing import Any

OBJECT_BYTES = 4 << 20
"""Size of the raw contender's objects (see RawObjects for why)."""
IN_FLIGHT = 32
"""GETs :func:`read_objects` keeps in flight: enough for parallel connections, and a bound
on the bytes held at once."""
LOCAL_BUCKET = "distckpt-bench"
"""Bucket of the private server when ``--dir`` is not given."""


def is_url(directory: Any) -> bool:
    """True for ``scheme://...`` (an object store), False for a local path."""
    return directory is not None and "://" in os.fspath(directory) \
        and not os.fspath(directory).startswith("file://")


def location(url: str):
    """The parsed ``s3://`` location; ValueError for other schemes (only S3 is tested)."""
    from distckpt import storage

    loc = storage.Location.parse(url)
    if loc.scheme != "s3":
        raise ValueError(f"distckpt bench takes a local directory or s3://bucket/prefix, got "
                         f"{loc.url} ({loc.scheme}:// is not benchmarked)")
    return loc


def kvstore(url: str):
    """An open TensorStore kvstore rooted at `url` (keys are relative to it)."""
    import tensorstore as ts

    return ts.KvStore.open(location(url).kvstore_spec()).result()


def read_objects(url: str, keys: list[str], in_flight: int = IN_FLIGHT) -> int:
    """GET `keys` below `url`, `in_flight` at a time, dropping the bytes; returns bytes read."""
    kv = kvstore(url)
    pending: collections.deque = collections.deque()
    total = 0
    for key in keys:
        pending.append(kv.read(key))
        if len(pending) >= in_flight:
            total += len(pending.popleft().result().value)
    while pending:
        total += len(pending.popleft().result().value)
    return total


def pack(views: Iterable[memoryview], size: int = OBJECT_BYTES) -> Iterator[bytearray]:
    """The concatenation of `views` (byte views) cut into objects of `size` bytes (the last
    may be shorter). One copy: TensorStore takes bytes, not views.

    >>> [bytes(b) for b in pack([memoryview(b"abc"), memoryview(b"de")], 2)]
    [b'ab', b'cd', b'e']
    """
    buf, used = bytearray(size), 0
    for view in views:
        pos = 0
        while pos < len(view):
            n = min(size - used, len(view) - pos)
            buf[used:used + n] = view[pos:pos + n]
            used, pos = used + n, pos + n
            if used == size:
                yield buf
                buf, used = bytearray(size), 0
    if used:
        yield buf[:used]


def unpack(objects: Iterable[bytes], views: list[memoryview]) -> None:
    """Copy the concatenation of `objects` into the writable byte `views`, in order;
    OSError if the sizes differ (a short or missing object).

    >>> out = [bytearray(3), bytearray(2)]
    >>> unpack([b"ab", b"cd", b"e"], [memoryview(b) for b in out]); out
    [bytearray(b'abc'), bytearray(b'de')]
    """
    targets = (v for v in views if len(v))
    view, pos = next(targets, None), 0
    for obj in objects:
        data, src = memoryview(obj), 0
        while src < len(data):
            if view is None:
                raise OSError("the objects hold more bytes than the shards")
            n = min(len(view) - pos, len(data) - src)
            view[pos:pos + n] = data[src:src + n]
            pos, src = pos + n, src + n
            if pos == len(view):
                view, pos = next(targets, None), 0
    if view is not None:
        raise OSError("the objects hold fewer bytes than the shards")


def object_count(nbytes: int, size: int = OBJECT_BYTES) -> int:
    """Objects :func:`pack` makes of `nbytes` bytes."""
    return -(-nbytes // size)
