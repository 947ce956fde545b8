"""Small files at a storage location through a TensorStore kvstore, for tests.

Tests read and write objects with exactly the endpoint and credentials the array data
uses (TensorStore's kvstore of :meth:`distckpt.storage.Location.kvstore_spec`), without
going through the code under test (etils/s3fs).
"""

from __future__ import annotations

import json
from typing import Any

from distckpt.storage import Location

DEFAULT_LIMIT = 16 * 1024 * 1024

__all__ = ["SmallFiles", "small_files"]


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid key {key!r}: a relative path without '.', '..' or '//'")
    return key


def _prefix_range(ts, prefix: str):
    """The KeyRange of every key that starts with `prefix`."""
    raw = prefix.encode()
    return ts.KvStore.KeyRange(inclusive_min=raw,
                               exclusive_max=raw[:-1] + bytes([raw[-1] + 1]))


class SmallFiles:
    """Small files under one location (commit records, markers), via a TensorStore kvstore.

    A write replaces the whole object (one PUT on object stores; a temporary file renamed
    into place on local disk), so readers see the old or the new contents, never a mix.
    Keys are relative paths below the location, e.g. ``"12/distckpt_commit.json"``.
    """

    def __init__(self, location: Location, *, limit: int = DEFAULT_LIMIT):
        import tensorstore as ts

        self.location = location
        self.limit = limit
        self._ts = ts
        self._kv = ts.KvStore.open(location.kvstore_spec()).result()

    def __repr__(self) -> str:
        return f"SmallFiles({self.location!r})"

    def _run(self, what: str, key: str, future) -> Any:
        try:
            return future.result()
        except (ValueError, OSError, RuntimeError) as e:  # TensorStore's I/O errors
            raise OSError(f"{what} {self.location.url}/{key} failed: {e}") from e

    def read_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None if it does not exist; refuses objects over limit.

        The size is checked first by asking for the byte just past the limit (TensorStore
        reports OUT_OF_RANGE when the object is shorter), so a huge object is never read.
        """
        _check_key(key)
        try:
            past = self._kv.read(key, byte_range=slice(self.limit, self.limit + 1)).result()
        except ValueError as e:
            if "OUT_OF_RANGE" not in str(e):
                raise OSError(f"reading {self.location.url}/{key} failed: {e}") from e
        else:
            if past.state == "missing":
                return None
            raise ValueError(f"{self.location.url}/{key} is larger than {self.limit} bytes; "
                             "refusing to read it")
        got = self._run("reading", key, self._kv.read(key))
        return None if got.state == "missing" else bytes(got.value)

    def read_json(self, key: str) -> Any:
        """Parse a JSON object; FileNotFoundError if it does not exist."""
        data = self.read_bytes(key)
        if data is None:
            raise FileNotFoundError(f"{self.location.url}/{key} does not exist")
        return json.loads(data)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Create or replace one object."""
        self._run("writing", key, self._kv.write(_check_key(key), data))

    def write_json(self, key: str, value: Any) -> None:
        """Create or replace one object with `value` as JSON."""
        self.write_bytes(key, json.dumps(value, sort_keys=True).encode())

    def exists(self, key: str) -> bool:
        got = self._run("reading", key, self._kv.read(_check_key(key), byte_range=slice(0, 0)))
        return got.state != "missing"

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (recursively, as plain string prefixes), sorted."""
        future = (self._kv.list(_prefix_range(self._ts, prefix)) if prefix
                  else self._kv.list())
        return sorted(k.decode() for k in self._run("listing", prefix, future))

    def delete(self, key: str) -> None:
        """Delete one object (no error if it does not exist)."""
        self._run("deleting", key, self._kv.write(_check_key(key), None))

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix`, a directory-like key ending in '/'."""
        if not prefix.endswith("/"):
            raise ValueError(f"delete_prefix takes a prefix ending in '/', got {prefix!r}")
        _check_key(prefix[:-1])
        self._run("deleting", prefix, self._kv.delete_range(_prefix_range(self._ts, prefix)))


def small_files(location: Location | str) -> SmallFiles:
    """SmallFiles at `location` (parsed with the environment if a string)."""
    loc = location if isinstance(location, Location) else Location.parse(location)
    return SmallFiles(loc)
