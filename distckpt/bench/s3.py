"""`distckpt bench --dir s3://bucket/prefix`: what differs from benchmarking a local disk.

Everything here talks to the object store through TensorStore's ``s3`` kvstore, the driver
Orbax and distckpt write array data with, configured by
:meth:`distckpt.storage.Location.kvstore_spec` (the ``AWS_*`` environment: endpoint,
region, credentials). TensorStore is imported only when first needed.

* :func:`check_empty` refuses a prefix that holds objects before anything is written (the
  benchmark writes and deletes below it, so it must never touch existing checkpoints).
* :func:`remove` deletes everything below a prefix (the local case's ``rmtree``).
* :func:`read_objects` is the "raw read of its files" figure's object-store form: plain
  GETs of a step's objects, several in flight.
* :func:`pack` / :func:`unpack` cut a process's shard bytes into objects and put them back
  (the ``raw`` contender on S3, :class:`distckpt.bench.contenders.RawObjects`).
* :func:`private_server` starts a SeaweedFS S3 server on 127.0.0.1 for one run
  (``--s3-server local``), for users without an S3 endpoint at hand.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

OBJECT_BYTES = 4 << 20
"""Size of the raw contender's objects (see RawObjects for why)."""
IN_FLIGHT = 32
"""GETs :func:`read_objects` keeps in flight: enough for parallel connections, and a bound
on the bytes held at once."""
LOCAL_BUCKET = "distckpt-bench"
"""Bucket of the private server when ``--dir`` is not given."""
_AWS_OVERRIDES = ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN",
                  "AWS_PROFILE")


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


def _objects(keys: Iterable[bytes]) -> list[str]:
    # SeaweedFS lists emptied "directories" as keys ending in '/'; they hold no data.
    return sorted(k.decode() for k in keys if not k.endswith(b"/"))


def list_objects(url: str, timeout_s: float | None = None) -> list[str]:
    """The keys of every object below `url`, relative to it, sorted. With `timeout_s`,
    TimeoutError once that many seconds have passed (an endpoint that never answers,
    or AWS looked up where it cannot be reached, otherwise waits for ever)."""
    import tensorstore as ts

    deadline = None if timeout_s is None else time.time() + timeout_s
    store = ts.KvStore.open(location(url).kvstore_spec()).result(deadline=deadline)
    return _objects(store.list().result(deadline=deadline))


LIST_TIMEOUT_S = 30.0
"""How long a check that a prefix is empty waits for the object store's listing."""


def check_empty(url: str, timeout_s: float = LIST_TIMEOUT_S, label: str | None = None) -> None:
    """Raise ValueError (nothing written) if any object exists below `url`, if the store
    does not answer a listing within `timeout_s`, or if the listing fails (endpoint,
    credentials, an unreachable network): one line each, led by `label` (the flag the user
    gave; default ``bench prefix URL``)."""
    label = label or f"bench prefix {location(url).url}"  # location(): s3:// only
    try:
        found = list_objects(url, timeout_s=timeout_s)
    except TimeoutError as e:
        raise ValueError(f"{label}: no answer to a listing in {timeout_s:g} s; check the "
                         "AWS_* endpoint and that it is reachable, or use --s3-server "
                         "local") from e
    except Exception as e:  # noqa: BLE001 - any failure to list is the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{label}: cannot list it ({first}); check the AWS_* endpoint "
                         "and credentials, or use --s3-server local") from e
    if found:
        raise ValueError(f"{label} is not empty ({len(found)} object(s), e.g. {found[0]}); "
                         "give a new or empty prefix (distckpt never touches objects it "
                         "did not write)")


def remove(url: str) -> None:
    """Delete every object below `url`."""
    import tensorstore as ts

    kvstore(url).delete_range(ts.KvStore.KeyRange()).result()


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


@contextlib.contextmanager
def private_server(bucket: str = LOCAL_BUCKET) -> Iterator[Any]:
    """A SeaweedFS S3 server on 127.0.0.1 (:mod:`distckpt.tools.s3server`; its data on
    local disk in a temporary directory) with the ``AWS_*`` environment pointing at it for
    the block (the benchmark's processes inherit it); the environment is restored and the
    server stopped afterwards. Needs the ``weed`` binary (the ``test`` extra)."""
    from distckpt.tools import s3server

    saved = {name: os.environ.get(name) for name in (*_AWS_OVERRIDES, "AWS_ENDPOINT_URL",
                                                      "AWS_REGION", "AWS_ACCESS_KEY_ID",
                                                      "AWS_SECRET_ACCESS_KEY")}
    with s3server.seaweedfs(bucket=bucket) as server:
        try:
            for name in _AWS_OVERRIDES:
                os.environ.pop(name, None)
            os.environ.update(server.env())
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
