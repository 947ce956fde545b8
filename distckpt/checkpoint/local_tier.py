"""The local tier's files: one host's copies of recent steps, in host-local storage.

A host's local directory (``CheckpointOptions.local_directory``; a RAM-backed path such
as ``/dev/shm/...`` or a local SSD) holds, per step, this host's own shards and the
copy of a peer host's shards it keeps for that peer::

    <local>/HOST.json                 {"uid": ...}: this machine's identity, made once
    <local>/<step>/own/               the shards this host held when it saved <step>
    <local>/<step>/peer-<uid>/        a copy of host <uid>'s own shards of <step>
    <local>/<step>/.tmp-*/            a copy being written (never read; removed on open)

A copy directory holds ``shards.bin``, every distinct shard's raw bytes one after another
(C order, the array's dtype; typed keys as their key data; each shard at an offset
aligned to 64 bytes, so a mapped shard is aligned memory a device buffer can adopt), and
``record.json``, written last: the step, the saving job's shape (process count, devices per process, its persistent
directory), the *role* (the process index that saved the shards), every shard's box,
file, offset, size and content digest (:mod:`distckpt.state.digest`, the same topology-independent
digest as a persistent step's commit record: the partial digest of the box at its
global position), and the user metadata, metrics, provenance and that process's
per-process state.

Commit: the copy is written in ``.tmp-<nonce>``, its record last, then the directory is
renamed to ``own`` or ``peer-<uid>`` (an existing copy of the same step is renamed
aside first, then removed). A crash at any point leaves either the previous committed
copy, or no copy and a ``.tmp-*`` leftover: a copy is *committed* iff its directory has
its final name and a record whose files all exist with their recorded sizes. The
contents are checked when read (:func:`LocalDir.read_copy`: each shard's CRC-32, ten
times cheaper than recomputing the digest on this machine and still certain to catch any
changed byte), so a torn or flipped byte is never restored. Nothing is fsynced: the tier is meant for RAM-backed
storage, where a copy is lost with its machine anyway (the peer copy is what survives
that), and on an SSD a power loss at worst costs a copy that then fails its check.

Formats: ``distckpt-local/2`` (one ``shards.bin`` per copy; since 2026-12-01) is what is
written; ``distckpt-local/1`` copies (one ``<i>.<leaf>.<k>.bin`` file per shard) are still
read. One file instead of one per shard took most of the per-save file work off the
background thread (a local save of the reference trainer's state wrote 234 files).

The host identity (``HOST.json``'s uid) lives in the directory, so it moves with the
machine: a restarted job whose process ids were permuted still finds its shards by the
role recorded with them; a replaced machine comes back with an empty directory and a
new uid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import socket
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distckpt.state import digest

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "Copy", "LocalDir", "Shard", "box_of", "expand", "machine_name"]

FORMAT = "distckpt-local/2"
"""The format written (one shards.bin per copy)."""
FORMATS = ("distckpt-local/1", FORMAT)
"""The formats read (/1: one file per shard)."""
SHARDS = "shards.bin"
ALIGN = 64
"""Each shard's offset in shards.bin (and in a pack sent to a peer) is a multiple of this
(alignment a CPU device buffer can adopt without a copy)."""
RECORD = "record.json"
HOST_FILE = "HOST.json"
OWN = "own"
PEER_PREFIX = "peer-"
_TMP = ".tmp-"
_STEP = re.compile(r"^\d+$")


def machine_name() -> str:
    """This machine's name: ``DISTCKPT_HOST`` (set per simulated host by the launcher),
    else the hostname."""
    return os.environ.get("DISTCKPT_HOST") or socket.gethostname()


def expand(template: str, host: str | None = None) -> Path:
    """A local_directory template with ``{host}`` replaced by `host` (default
    :func:`machine_name`), resolved against the working directory."""
    try:
        text = template.format(host=machine_name() if host is None else host)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"local_directory {template!r} may use only the field {{host}}; "
                         f"got {e}") from e
    return Path(os.path.abspath(os.path.expanduser(text)))


@dataclasses.dataclass
class Shard:
    """One distinct box of one array as a host holds it."""

    box: tuple[tuple[int, int], ...]
    """[start, stop) per dimension, in the global array."""
    devices: tuple[int, ...]
    """Indices (into jax.local_devices()) of the saving host's devices that held it."""
    data: np.ndarray | None = None
    """The bytes, in memory (None when only the record was read)."""
    digest: str | None = None
    """Hex partial digest of the box at its global position."""
    crc32: int | None = None
    """CRC-32 of the shard's bytes: what a restore checks (any changed byte is caught, at
    ~2 GB/s here, 10x the digest's speed)."""

    @property
    def starts(self) -> list[int]:
        return [a for a, _ in self.box] or [0]


@dataclasses.dataclass
class Copy:
    """One host's shards of one step, with everything needed to restore them."""

    step: int
    role: int
    """The process index that saved these shards."""
    owner: str
    """The uid of the machine that saved them."""
    job: dict[str, Any]
    """process_count, devices_per_process and the job id of the persistent directory
    (its .distckpt-job file) of the saving job."""
    leaves: dict[str, dict[str, Any]]
    """name -> {"shape", "dtype", "shards": [Shard]} (shards in a stable order)."""
    extra: dict[str, Any]
    """metadata, metrics, provenance and process_state (JSON)."""

    def record(self, files: Mapping[tuple[str, int], tuple[str, int, int]]) -> dict[str, Any]:
        """The record, with each shard's (file, offset, nbytes) from `files`."""
        leaves = []
        for name, leaf in self.leaves.items():
            shards = []
            for k, s in enumerate(leaf["shards"]):
                file, offset, size = files[(name, k)]
                shards.append({"box": [list(b) for b in s.box], "devices": list(s.devices),
                               "file": file, "offset": offset, "nbytes": size,
                               "digest": s.digest, "crc32": s.crc32})
            leaves.append({"name": name, "shape": list(leaf["shape"]), "dtype": leaf["dtype"],
                           "sharding": leaf.get("sharding"), "shards": shards})
        return {"format": FORMAT, "step": self.step, "role": self.role, "owner": self.owner,
                "job": self.job, "leaves": leaves, **self.extra}

    def offer_record(self) -> dict[str, Any]:
        """The record of this copy's shards as they travel to a peer (files by index)."""
        return self.record({(name, k): (str(k), 0, s.data.nbytes if s.data is not None else 0)
                            for name, leaf in self.leaves.items()
                            for k, s in enumerate(leaf["shards"])})

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Copy:
        if rec.get("format") not in FORMATS:
            raise ValueError(f"not a {FORMAT} record (format {rec.get('format')!r})")
        leaves = {}
        for leaf in rec["leaves"]:
            shards = [Shard(tuple((int(a), int(b)) for a, b in s["box"]),
                            tuple(int(d) for d in s["devices"]), None, s["digest"],
                            s.get("crc32"))
                      for s in leaf["shards"]]
            leaves[leaf["name"]] = {"shape": tuple(leaf["shape"]), "dtype": leaf["dtype"],
                                    "sharding": leaf.get("sharding"), "shards": shards,
                                    "files": [(s["file"], int(s.get("offset", 0)))
                                              for s in leaf["shards"]]}
        extra = {k: rec.get(k) for k in ("metadata", "metrics", "provenance", "process_state")}
        return cls(int(rec["step"]), int(rec["role"]), str(rec["owner"]), dict(rec["job"]),
                   leaves, extra)

    @property
    def nbytes(self) -> int:
        return sum(s.data.nbytes for leaf in self.leaves.values() for s in leaf["shards"]
                   if s.data is not None)


def box_of(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """A shard's index (slices of the global array) as [start, stop) per dimension."""
    return tuple((s.start or 0, n if s.stop is None else s.stop)
                 for s, n in zip(index, shape, strict=True))


class LocalDir:
    """One host's local directory (see the module docstring)."""

    def __init__(self, root: Path, *, read_only: bool = False):
        """`read_only` (a read-only service): nothing is created or removed; a machine
        without a directory yet has an empty inventory and a uid of this process only."""
        self.root = root
        self.read_only = read_only
        if not read_only:
            self.root.mkdir(parents=True, exist_ok=True)
        self.uid = self._identity()
        if not read_only:
            for leftover in self.root.glob(f"*/{_TMP}*"):  # copies a crash left half-written
                shutil.rmtree(leftover, ignore_errors=True)

    def _identity(self) -> str:
        path = self.root / HOST_FILE
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return str(json.loads(path.read_text())["uid"])
        uid = uuid.uuid4().hex[:16]
        if self.read_only:
            return uid
        tmp = path.with_suffix(f".{uid}.tmp")
        tmp.write_text(json.dumps({"uid": uid, "machine": machine_name()}))
        os.replace(tmp, path)
        return uid

    # ------------------------------------------------------------------ write
    def write(self, copy: Copy, name: str = OWN,
              after_file: Callable[[], None] | None = None) -> Path:
        """Write `copy` (its shards' data and digests in memory) as ``<step>/<name>``;
        `after_file` runs after each shard file (tests: a crash mid-copy)."""
        step_dir = self.root / str(copy.step)
        step_dir.mkdir(exist_ok=True)
        tmp = step_dir / f"{_TMP}{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        files: dict[tuple[str, int], tuple[str, int, int]] = {}
        offset = 0
        with open(tmp / SHARDS, "wb") as f:
            for leaf_name, leaf in copy.leaves.items():
                for k, s in enumerate(leaf["shards"]):
                    assert s.data is not None and s.digest is not None
                    start = aligned(offset)
                    if start > offset:
                        f.write(bytes(start - offset))
                    data = raw_bytes(s.data)
                    f.write(data.data)
                    files[(leaf_name, k)] = (SHARDS, start, data.nbytes)
                    offset = start + data.nbytes
                    if after_file is not None:
                        f.flush()
                        after_file()
        (tmp / RECORD).write_text(json.dumps(copy.record(files)))
        final = step_dir / name
        if final.exists():  # the same step saved again: the new copy replaces it
            aside = step_dir / f"{_TMP}old-{uuid.uuid4().hex[:8]}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        return final

    # ------------------------------------------------------------------ read
    def copies(self) -> Iterator[tuple[int, str, Path]]:
        """(step, name, path) of every committed-looking copy (record present)."""
        if not self.root.is_dir():
            return
        for step_dir in self.root.iterdir():
            if not _STEP.match(step_dir.name) or not step_dir.is_dir():
                continue
            for d in step_dir.iterdir():
                if (d.name == OWN or d.name.startswith(PEER_PREFIX)) and (d / RECORD).is_file():
                    yield int(step_dir.name), d.name, d

    @classmethod
    def peek(cls, root: Path) -> dict[str, Any]:
        """The inventory of a local directory, read only (empty if there is none)."""
        if not root.is_dir():
            return {"uid": None, "own": {}, "peer": {}}
        view = cls.__new__(cls)
        view.root, view.read_only = root, True
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            view.uid = str(json.loads((root / HOST_FILE).read_text())["uid"])
            return view.inventory()
        view.uid = ""
        return view.inventory()

    def inventory(self) -> dict[str, Any]:
        """What this host holds, for the tier decision: own roles and peer copies by step
        (only copies whose record reads and whose files have their sizes)."""
        own: dict[str, Any] = {}
        peer: dict[str, list[Any]] = {}
        for step, name, path in self.copies():
            try:
                rec = self._record(path)
                self._check_files(path, rec)
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("local copy %s is not usable: %s", path, e)
                continue
            entry = {"role": rec["role"], "owner": rec["owner"], "job": rec["job"],
                     "name": name, "bytes": sum(s["nbytes"] for leaf in rec["leaves"]
                                                for s in leaf["shards"])}
            if name == OWN:
                own[str(step)] = entry
            else:
                peer.setdefault(str(step), []).append(entry)
        return {"uid": self.uid, "own": own, "peer": peer}

    @staticmethod
    def _record(path: Path) -> dict[str, Any]:
        rec = json.loads((path / RECORD).read_text())
        if not isinstance(rec, dict) or rec.get("format") not in FORMATS:
            raise ValueError(f"{path / RECORD} is not a {FORMAT} record")
        return rec

    @staticmethod
    def _check_files(path: Path, rec: Mapping[str, Any]) -> None:
        """Every file the record names ends where its last shard ends."""
        ends: dict[str, int] = {}
        for leaf in rec["leaves"]:
            for s in leaf["shards"]:
                end = int(s.get("offset", 0)) + int(s["nbytes"])
                ends[s["file"]] = max(ends.get(s["file"], 0), end)
        for file, end in ends.items():
            size = (path / file).stat().st_size
            if size != end:
                raise ValueError(f"{file} has {size} bytes, the record says {end}")

    def read_copy(self, step: int, name: str, wanted: Sequence[str] | None = None, *,
                  check: bool = True) -> Copy:
        """Map a copy's files and check every shard of the `wanted` leaves (default all)
        against its checksum; raises ValueError naming the first shard that differs.
        `check=False` for a copy sent to a peer, which checks what it receives."""
        path = self.root / str(step) / name
        rec = self._record(path)
        self._check_files(path, rec)
        copy = Copy.from_record(rec)
        maps: dict[str, np.ndarray] = {}
        keep = set(copy.leaves) if wanted is None else set(wanted)
        missing = keep - set(copy.leaves)
        if missing:
            raise ValueError(f"local step {step} has no leaves {sorted(missing)[:5]}")
        for leaf_name in list(copy.leaves):
            leaf = copy.leaves[leaf_name]
            if leaf_name not in keep:
                del copy.leaves[leaf_name]
                continue
            dtype = dtype_of(leaf["dtype"])
            for s, (file, offset) in zip(leaf["shards"], leaf.pop("files"), strict=True):
                shape = tuple(b - a for a, b in s.box)
                nbytes = math.prod(shape) * dtype.itemsize
                if not nbytes:
                    s.data = np.zeros(shape, dtype)
                else:
                    # Mapped, not read into a buffer: the restore copies each shard at most
                    # once, into its device buffer (on CPU the device adopts the mapped
                    # pages), so a restore's memory beyond the restored shards stays the
                    # page cache's (on a RAM disk, the copy already in RAM).
                    if file not in maps:
                        maps[file] = np.memmap(path / file, dtype=np.uint8, mode="r")
                    s.data = view_at(maps[file], offset, shape, dtype)
                if check:
                    check_shard(leaf_name, s)
        return copy

    # ------------------------------------------------------------------ delete
    def remove_step(self, step: int, name: str | None = None) -> None:
        """Remove one copy (or the whole step): renamed aside first, so a crash mid-way
        never leaves a record over missing files."""
        step_dir = self.root / str(step)
        targets = [step_dir / name] if name else [step_dir]
        for t in targets:
            if not t.exists():
                continue
            aside = t.with_name(f"{_TMP}gone-{uuid.uuid4().hex[:8]}") if name else \
                self.root / f"{_TMP}gone-{step}-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(OSError):
                os.replace(t, aside)
                shutil.rmtree(aside, ignore_errors=True)

    def retain(self, keep: int) -> None:
        """Keep the `keep` newest own copies and, per peer, the `keep` newest peer copies."""
        by_name: dict[str, list[int]] = {}
        for step, name, _ in self.copies():
            by_name.setdefault(name, []).append(step)
        for name, steps in by_name.items():
            for step in sorted(steps)[:-keep]:
                self.remove_step(step, name)
        for step_dir in self.root.iterdir():  # steps left with no copy at all
            if _STEP.match(step_dir.name) and step_dir.is_dir() and not any(
                    d for d in step_dir.iterdir() if not d.name.startswith(_TMP)):
                shutil.rmtree(step_dir, ignore_errors=True)

    def drop_newer(self, step: int) -> None:
        """Remove every copy of a step above `step` (the future of an abandoned run)."""
        for s, name, _ in list(self.copies()):
            if s > step:
                self.remove_step(s, name)


def dtype_of(name: str) -> np.dtype:
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(name))


def crc32(data: np.ndarray) -> int:
    return zlib.crc32(raw_bytes(data).data)


def aligned(offset: int) -> int:
    """The first offset at or after `offset` that is a multiple of ALIGN."""
    return offset + (-offset % ALIGN)


def raw_bytes(data: np.ndarray) -> np.ndarray:
    """`data`'s bytes in C order as a flat uint8 array (a view when it is contiguous)."""
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def view_at(buffer: np.ndarray, offset: int, shape: Sequence[int], dtype: np.dtype
            ) -> np.ndarray:
    """The array of `shape` and `dtype` whose bytes start at `offset` of the uint8
    `buffer` (a view, no copy)."""
    n = math.prod(shape) * dtype.itemsize
    return buffer[offset:offset + n].view(dtype).reshape(shape)


def seal(s: Shard) -> None:
    """Compute the shard's digest and CRC (at save, in the background)."""
    assert s.data is not None
    s.digest = digest.to_hex(digest.host_lanes(s.data, s.starts))
    s.crc32 = crc32(s.data)


def check_shard(leaf_name: str, s: Shard) -> None:
    """Raise ValueError unless the shard's bytes are the ones saved: their CRC-32 (or,
    for a record without one, their content digest)."""
    assert s.data is not None
    got: int | str | None
    want: int | str | None
    if s.crc32 is not None:
        got, want = crc32(s.data), s.crc32
    else:
        got, want = digest.to_hex(digest.host_lanes(s.data, s.starts)), s.digest
    if got != want:
        raise ValueError(f"{leaf_name} box {[list(b) for b in s.box]} differs from what was "
                         f"saved (checksum {got}, recorded {want})")
