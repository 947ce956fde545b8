"""Read raw chunk bytes straight from local files into their final buffers.

distckpt saves arrays as raw zarr v2 chunks (uncompressed, C order) in an OCDBT database
on the step's filesystem. TensorStore's OCDBT kvstore stores a value larger than 1 KiB
as a byte range of one of its data files, verbatim ("out-of-line raw values", the
OCDBT format's documentation). Reading a range of a chunk through the kvstore returns a
Python ``bytes`` (one copy), which the CPU device copies again because its data is not
64-byte aligned, and it reads one range at a time per pending future.

For a step on a local filesystem this module finds, once per restore, where each chunk
lies (``tensorstore.ocdbt.dump`` of the database's root B+tree node: data file, offset,
length) and reads the ranges with ``os.preadv`` from a few threads directly into the
memory the restored shard will occupy (an aligned array a CPU device adopts without a
copy). Nothing is decoded or interpreted beyond that: the bytes are the chunk's bytes,
and the restore digests them as before (a wrong range would fail verification).

It applies only where everything is as expected, otherwise the kvstore read is used:
an ``ocdbt`` kvstore on a ``file`` base (or a plain ``file`` kvstore, one file per
chunk); a database whose newest version's root is a leaf node (every key in one node:
what Orbax's per-process databases merge into, 2304 keys from 4 processes here; the
dump of deeper trees prints paths relative to their parents, which this does not
follow); a chunk stored out of line with exactly the chunk's raw size. ``s3://`` and
zarr v3 steps read as before, and so does every step with ``DISTCKPT_DIRECT_READ=0`` in
the environment.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import tensorstore as ts

log = logging.getLogger(__name__)

__all__ = ["ENV", "Location", "Reader", "Stored", "chunk_locations", "enabled", "ocdbt_files"]

THREADS = 4
"""Threads reading chunk ranges concurrently in one restore."""

ENV = "DISTCKPT_DIRECT_READ"
"""Set to 0 to read every chunk through TensorStore's kvstore instead."""


def enabled() -> bool:
    """Whether restores read local chunks directly (``DISTCKPT_DIRECT_READ``, default 1)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Location:
    """Where one chunk's raw bytes lie: `length` bytes of file `path` from `offset`."""

    path: str
    offset: int
    length: int


class Stored(NamedTuple):
    """Where OCDBT stores one value."""

    file: str
    """The file, relative to the database's root (the step's state item)."""
    offset: int | None
    """The value's first byte in it; None for a value stored inline in a b-tree node."""
    length: int | None
    """The value's bytes in it; None for a value stored inline."""


def ocdbt_files(base: Any) -> dict[str, Stored]:
    """Key -> where the newest version of the OCDBT database on kvstore `base` stores its
    value: an indirect value's data file and byte range, or for a value stored inline the
    b-tree leaf node's file. Reads the manifest and the b-tree nodes only
    (``tensorstore.ocdbt.dump``)."""
    manifest = ts.ocdbt.dump(base).result()
    versions = manifest.get("versions") or []
    if not versions or "location" not in versions[-1]["root"]:
        return {}
    out: dict[str, Stored] = {}
    stack: list[tuple[str, bytes]] = [(versions[-1]["root"]["location"], b"")]
    while stack:
        location, prefix = stack.pop()
        node = ts.ocdbt.dump(base, location).result()
        for entry in node["entries"]:
            if node["height"] > 0:  # keys below are relative to the subtree's prefix
                stack.append((entry["location"],
                              prefix + entry.get("subtree_common_prefix", b"")))
                continue
            key = (prefix + entry["key"]).decode("utf-8", "replace")
            if "indirect_value" in entry:
                file, offset, length = _parse_location(entry["indirect_value"])
                out[key] = Stored(file, offset, length)
            else:
                out[key] = Stored(_parse_location(location)[0], None, None)
    return out


def _parse_location(location: str) -> tuple[str, int, int]:
    """``value:<base path>:<file>:<offset>:<length>`` (or ``btreenode:...``) -> (the file
    relative to the database's root, offset, length)."""
    _kind, rest = location.split(":", 1)
    rest, offset, length = rest.rsplit(":", 2)
    base, file_id = rest.rsplit(":", 1)
    return base + file_id, int(offset), int(length)


def _locations(root: str) -> dict[str, Location] | None:
    """Every out-of-line value of the OCDBT database at local directory `root`, by key;
    None where the newest version's root node is not a leaf (see the module docstring)."""
    base = ts.KvStore.open({"driver": "file", "path": root.rstrip("/") + "/"}).result()
    versions = ts.ocdbt.dump(base).result().get("versions") or []
    if not versions or versions[-1].get("root_height") != 0:
        return None
    return {key: Location(os.path.join(root, where.file), where.offset, where.length)
            for key, where in ocdbt_files(base).items()
            if where.offset is not None and where.length is not None}


class Index:
    """Chunk locations of one step's array item, built on first use per database."""

    def __init__(self) -> None:
        self._databases: dict[str, dict[str, Location] | None] = {}

    def resolver(self, kvstore: Any, chunk_bytes: int) -> _Resolver | None:
        """A key -> Location lookup for the array whose chunks `kvstore` holds (each
        `chunk_bytes` raw bytes), or None where this module does not apply."""
        try:
            spec = kvstore.spec().to_json()
        except Exception:  # noqa: BLE001 - anything unexpected: the kvstore path
            return None
        driver = spec.get("driver")
        if driver == "file" and isinstance(spec.get("path"), str):
            return _Resolver(None, spec["path"], chunk_bytes)
        base = spec.get("base")
        if driver != "ocdbt" or not isinstance(base, Mapping) or base.get("driver") != "file":
            return None
        root = base.get("path")
        if not isinstance(root, str) or not os.path.isdir(root):
            return None
        if root not in self._databases:
            try:
                self._databases[root] = _locations(root)
            except Exception as e:  # noqa: BLE001 - the kvstore path reads it anyway
                log.debug("no direct reads from %s: %s", root, e)
                self._databases[root] = None
        table = self._databases[root]
        return None if table is None else _Resolver(table, spec.get("path", ""), chunk_bytes)


@dataclasses.dataclass
class _Resolver:
    table: Mapping[str, Location] | None
    """Out-of-line values by key (OCDBT); None: one file per key under `prefix`."""
    prefix: str
    chunk_bytes: int

    def __call__(self, key: str) -> Location | None:
        where: Location | None
        if self.table is None:
            path = self.prefix + key
            try:
                size = os.stat(path).st_size
            except OSError:
                return None
            where = Location(path, 0, size)
        else:
            where = self.table.get(self.prefix + key)
        if where is None or where.length != self.chunk_bytes:
            return None
        return where


def chunk_locations() -> Index:
    """A new index for one restore (see :class:`Index`)."""
    return Index()


def _pread(path: str, offset: int, out: np.ndarray) -> int:
    view = out.reshape(-1).view(np.uint8).data  # `out` itself: it is C-contiguous
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise ValueError(f"{path}: {len(view) - done} bytes short at offset "
                                 f"{offset + done} (a truncated data file)")
            done += n
        return done
    finally:
        os.close(fd)


class Reader:
    """A few threads reading ranges of local files into NumPy arrays (``with`` block)."""

    def __init__(self, threads: int = THREADS):
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="distckpt-pread")

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def read(self, where: Location, first_byte: int, out: np.ndarray) -> Future[int]:
        """Fill C-contiguous `out` with the bytes of `where` from `first_byte` on."""
        if first_byte + out.nbytes > where.length:
            raise ValueError(f"{where.path}: a range past the end of its chunk")
        return self._pool.submit(_pread, where.path, where.offset + first_byte, out)
