"""What counts as a committed step, and how a commit is made durable.

A step directory ``<dir>/<step>/`` is committed if and only if it holds distckpt's
**commit record** ``distckpt_commit.json``, written last by the primary host, and
the record is consistent: it parses, names this step, and the step directory is a
real directory (not a symlink). Orbax's own listing (any directory named like a
step) is not used: a junk ``7/``, a symlink ``9 -> 0``, a step whose record was
deleted and a planted temporary directory are all ignored.

Durability (local and network filesystems): the primary finalizes a step in this
order, inside Orbax's commit thread:

1. Orbax writes its metadata and renames ``<step>.orbax-checkpoint-tmp`` to
   ``<step>`` (neither is fsynced by Orbax);
2. every file and directory in the step is fsynced, then the checkpoint directory
   (so the rename itself is durable);
3. the commit record is written to a temporary name, fsynced, renamed into place,
   and the step directory is fsynced.

A crash before 3 completes leaves a step without a record, which is never
listed; saving that step again moves the leftover aside (see :func:`quarantine`).

**Replacing a committed step** (``save(step, overwrite=True)``) never deletes the old
step before the new one is committed. The new step is written and fsynced under its
temporary name while the old one stays listed; only then is the old one renamed to
``<dir>/distckpt-replacing/<step>`` (held, not listed), the new one renamed into place
and its record written, and then the held step goes to the trash. A failure in between
puts the old step back at once; a crash in between leaves the held step, which the
next writer's start-up puts back (or discards, if the new step's record was written):
:func:`recover_replaced`. The window in which neither is listed is those two renames,
the metadata update and the record write (milliseconds); a reader listing steps in it
(or after a crash in it, until a writer starts) does not see the step. A synchronous
save (``async_save=False``) holds the old step aside for the whole save instead, as on
object storage below: Orbax's synchronous save deletes the step directory as it starts.

The record also carries the step's **manifest**: the content digest of every
array (:mod:`distckpt.state.digest`, combined from every process's partial sums), the
size of every file and a CRC-32 of every small file (JSON metadata, manifests), so
a reader can tell a truncated, missing or edited file before reading any array
data, and verify array contents after. (Measured: a flipped byte in OCDBT array
data restores silently with plain Orbax; only OCDBT's b-tree nodes carry CRCs.)

Steps that fail verification are *quarantined*, never deleted: moved to
``<dir>/distckpt-quarantine/<step>.<UTC time>.<reason>``. Only a writer does this;
readers (read-only services, ``inspect``, ``verify``) change nothing.

Object storage (``s3://``, ``gs://``; :mod:`distckpt.storage`) has no rename, so the
same rules are kept another way:

* **Commit**: Orbax writes the step in place (``CommitFileTemporaryPath``: no
  temporary name) and its own ``commit_success.txt`` at finalize; then the primary
  lists the step's objects (one listing), builds the record and writes it with a
  single PUT, last. A PUT is all-or-nothing, so a reader sees no record or the whole
  record. A crash before that PUT leaves objects without a record: never listed.
  There is nothing to fsync; object stores are durable once a PUT returns.
* **Replacing a committed step**: there is no rename, and the new step is written in
  place, so the old one is moved to ``<dir>/distckpt-replacing/<step>/`` first (a
  server-side copy, as quarantine does; not listed meanwhile) and deleted only after
  the new step's record is written. A failed save puts it back; after a crash the next
  writer does (:func:`recover_replaced`).
* **Saving over a leftover**: ``CommitFileTemporaryPath.create()`` deletes whatever
  is at ``<dir>/<step>/`` before writing. The service decides first (a committed step
  raises StepExistsError, an uncommitted leftover is moved aside), and the step-level
  path class refuses to create over a step that has a commit record, whatever the
  caller decided.
* **Retention** (:class:`ObjectStoreDeleter`, in place of Orbax's deleter, whose
  ``todelete_subdir`` "rename" would copy every object): write a tombstone
  ``<dir>/distckpt-trash/<step>.<UTC time>.deleting``, delete the commit record (the
  step stops being listed at once), delete the other objects, delete the tombstone.
  A reader that listed the step just before finds its files missing and gets a
  StepUnusableError, so a restore falls back to an older step. A crash midway leaves
  an unlisted leftover plus its tombstone; :func:`purge_trash` (run by a writer at
  start-up, after each commit and at close) finishes the deletion.
* **Quarantine and moving leftovers aside**: a server-side copy of every object to
  ``<dir>/distckpt-quarantine/<step>.<UTC time>.<reason>/`` (the record last), then
  the source's record is deleted first and its other objects after. Costly for big
  steps, but rare, and nothing is lost: a crash midway leaves the step listed (before
  the record is deleted) or unlisted with its copy already made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from etils import epath
from orbax.checkpoint.path import atomicity
from orbax.checkpoint.path import step as step_lib

from distckpt import storage
from distckpt.errors import StepProblem
from distckpt.state import jsonio

logger = logging.getLogger(__name__)

COMMIT_FILE = "distckpt_commit.json"
QUARANTINE_DIR = "distckpt-quarantine"
TRASH_DIR = "distckpt-trash"
REPLACING_DIR = "distckpt-replacing"
"""A committed step being replaced (``overwrite=True``) waits here, unlisted, until the new
one is committed; see the module docstring."""
"""Retention renames a step here first (atomic), then it is deleted: a crash mid-delete
never leaves a half-deleted step that is still listed. On object storage it holds only
tombstones of steps being deleted (see the module docstring)."""
FORMAT = "distckpt-commit"
FORMAT_VERSION = 1
_STEP_NAME = re.compile(r"^(0|[1-9][0-9]*)$")


class CommitRecordError(ValueError):
    """A step directory has no usable commit record (the reason is the message)."""


class NoSuchStepError(CommitRecordError):
    """Nothing is stored at the step's path: deleted (retention, quarantine) since it was
    listed, or an object store's emptied "folder" (SeaweedFS, and GCS buckets with a
    hierarchical namespace, keep listing a prefix whose objects were all deleted)."""


def is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def _normalized(path: epath.PathLike) -> str:
    """A path to compare directories by: absolute locally, the URL without a trailing
    slash on object storage (os.path.abspath would mangle ``s3://``)."""
    text = os.fspath(path)
    return text.rstrip("/") if "://" in text else os.path.abspath(text)


# ---------------------------------------------------------------------- fsync
def fsync_path(path: epath.Path) -> None:
    """fsync one file or directory (local filesystems; a no-op on object storage)."""
    if not is_local(path):
        return
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: epath.Path) -> int:
    """fsync every file and directory under `root`, then `root`; returns the count."""
    if not is_local(root):
        return 0
    count = 0
    for dirpath, _, filenames in os.walk(os.fspath(root)):
        for name in filenames:
            fsync_path(epath.Path(dirpath) / name)
            count += 1
        fsync_path(epath.Path(dirpath))
        count += 1
    return count


def write_durable(path: epath.Path, value: Any) -> None:
    """Write JSON to `path` atomically and durably (temp file, fsync, rename, fsync dir)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    data = json.dumps(value, indent=1, sort_keys=True)
    if is_local(path):
        fd = os.open(os.fspath(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(os.fspath(tmp), os.fspath(path))
        fsync_path(path.parent)
    else:  # object storage: a single PUT is atomic
        path.write_text(data)


# ---------------------------------------------------------------------- records
def step_dir(directory: epath.Path, step: int) -> epath.Path:
    return directory / str(step)


def read_record(path: epath.Path, step: int | None = None) -> dict[str, Any]:
    """The commit record of the step directory `path`, or CommitRecordError saying why not."""
    path = epath.Path(path)
    if step is None:
        if not _STEP_NAME.match(path.name):
            raise CommitRecordError(f"{path.name!r} is not a step number")
        step = int(path.name)
    if not is_local(path):
        return _check_record(_read_object_record(path), step)
    if os.path.islink(os.fspath(path)):
        raise CommitRecordError("the step directory is a symlink")
    if not path.exists():
        raise NoSuchStepError("no such step directory")
    if not path.is_dir():
        raise CommitRecordError("not a directory")
    record_path = path / COMMIT_FILE
    if not record_path.exists():
        raise CommitRecordError(f"no commit record ({COMMIT_FILE}): the save never "
                                "finished, or this is not a distckpt step")
    try:
        record = jsonio.read_limited(record_path)
    except (OSError, ValueError) as e:
        raise CommitRecordError(f"unreadable commit record: {type(e).__name__}: {e}") from e
    return _check_record(record, step)


def _read_object_record(path: epath.Path) -> Any:
    """The parsed record of an object-store step (no directories there: no symlink or
    is-a-directory checks, and two requests instead of five)."""
    try:
        return jsonio.read_limited(path / COMMIT_FILE)
    except FileNotFoundError:
        # Not path.exists(): an emptied "folder" may still exist on some stores.
        if not storage.list_files(path):
            raise NoSuchStepError("no such step directory (no object under it: deleted, "
                                  "or never written)") from None
        raise CommitRecordError(f"no commit record ({COMMIT_FILE}): the save never "
                                "finished, or this is not a distckpt step") from None
    except (OSError, ValueError) as e:
        raise CommitRecordError(f"unreadable commit record: {type(e).__name__}: {e}") from e


def _check_record(record: Any, step: int) -> dict[str, Any]:
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CommitRecordError("the commit record is not a distckpt commit record")
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CommitRecordError(
            f"written by a newer distckpt (commit format {version!r} > {FORMAT_VERSION}); "
            "upgrade distckpt to read it")
    if record.get("step") != step:
        raise CommitRecordError(f"the commit record names step {record.get('step')!r}, "
                                f"not {step} (a copied or renamed step?)")
    for key in ("checksums", "files"):
        if not isinstance(record.get(key), dict):
            raise CommitRecordError(f"the commit record has no {key!r} table")
    for rel in list(record["files"]) + list(record.get("crc32") or {}):
        if not _safe_relative(rel):
            raise CommitRecordError(f"the commit record names a file outside the step: {rel!r}")
    return record


def _safe_relative(rel: Any) -> bool:
    """A relative path inside the step: no absolute paths, no '..', no empty parts."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\x00" in rel:
        return False
    parts = rel.replace("\\", "/").split("/")
    return all(p not in ("", ".", "..") for p in parts)


def is_step_name(name: str) -> bool:
    return bool(_STEP_NAME.match(name))


def step_names(directory: epath.Path) -> Iterator[tuple[int, epath.Path]]:
    """(step, path) for every entry of `directory` named like a step (committed or not)."""
    directory = epath.Path(directory)
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
    for path in entries:
        if _STEP_NAME.match(path.name):
            yield int(path.name), path


def scan(directory: epath.Path) -> dict[int, dict[str, Any] | CommitRecordError]:
    """Every step-named entry: its commit record, or the error saying why it is not one.

    Entries with nothing stored under them (gone since the listing, or an object store's
    emptied "folder") are left out: they are not steps, committed or not."""
    out: dict[int, dict[str, Any] | CommitRecordError] = {}
    for step, path in step_names(directory):
        try:
            out[step] = read_record(path, step)
        except NoSuchStepError:
            continue  # deleted since the listing, or an emptied object-store "folder"
        except CommitRecordError as e:
            out[step] = e
    return dict(sorted(out.items()))


def committed_steps(directory: epath.Path) -> list[int]:
    return [s for s, r in scan(directory).items() if isinstance(r, dict)]


def newest_committed(directory: epath.Path) -> int | None:
    """The highest committed step (one listing, then records from the top down)."""
    for step, path in sorted(step_names(directory), reverse=True):
        try:
            read_record(path, step)
        except CommitRecordError:
            continue
        return step
    return None


@dataclasses.dataclass(frozen=True)
class FileProblem:
    """One file that differs from the commit record."""

    rel: str
    """The file's path relative to the step directory."""
    problem: StepProblem
    """INCOMPLETE (missing or resized) or CORRUPT (small file's CRC-32 changed)."""
    detail: str
    """What differs, for people: 'missing', '10 bytes, 12 when committed ...'."""

    def __str__(self) -> str:
        return f"{self.rel}: {self.detail}"


def check_files(path: epath.Path, record: Mapping[str, Any]) -> list[FileProblem]:
    """Problems with the files the record lists (missing, resized, small file changed)."""
    problems = []
    crcs = record.get("crc32") or {}
    # Object storage: one listing for every size instead of a request per file.
    listed = None if is_local(path) else storage.list_files(path)
    for rel, size in sorted(record["files"].items()):
        f = path / rel
        try:
            if listed is None:
                actual = f.stat().length
            elif rel in listed:
                actual = listed[rel]
            else:
                raise FileNotFoundError(rel)
            # Read inside the try: retention may delete the file after the listing.
            changed = actual == size and rel in crcs and _crc32(f) != crcs[rel]
        except FileNotFoundError:
            problems.append(FileProblem(rel, StepProblem.INCOMPLETE, "missing"))
            continue
        if actual != size:
            problems.append(FileProblem(
                rel, StepProblem.INCOMPLETE,
                f"{actual} bytes, {size} when committed (truncated or rewritten)"))
        elif changed:
            problems.append(FileProblem(
                rel, StepProblem.CORRUPT, "contents changed since the commit (CRC-32 mismatch)"))
    return problems


SMALL_FILE_BYTES = 1 << 20
"""Files up to this size (JSON, manifests) get a CRC-32 in the commit record; array data
is covered by the content digests instead."""


def _crc32(path: epath.Path) -> int:
    return zlib.crc32(path.read_bytes())


def file_sizes(path: epath.Path) -> dict[str, int]:
    """Relative path -> size of every file under `path` (the record itself excluded)."""
    out = {}
    if is_local(path):
        root = os.fspath(path)
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                if rel != COMMIT_FILE:
                    out[rel] = os.stat(full).st_size
        return out
    # Object storage: one listing (etils' rglob/walk do not work on s3fs).
    return {rel: size for rel, size in storage.list_files(path).items() if rel != COMMIT_FILE}


def build_record(step: int, path: epath.Path, checksums: Mapping[str, str],
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    files = file_sizes(path)
    crcs = {rel: _crc32(path / rel) for rel, size in files.items() if size <= SMALL_FILE_BYTES}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
            "committed_at": time.time(), "checksums": dict(checksums), "files": files,
            "crc32": crcs, **(extra or {})}


# ---------------------------------------------------------------------- quarantine
def _stamp() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def quarantine(directory: epath.Path, step: int, reason: str) -> epath.Path | None:
    """Move `<directory>/<step>` aside (never delete); returns where it went.

    On object storage: a server-side copy, then the source's commit record is deleted
    first and its other objects after (see the module docstring). None when there was
    nothing to move (an object store's step with no objects left, e.g. one that
    retention deleted while a reader was using it).
    """
    src = step_dir(directory, step)
    dest_root = directory / QUARANTINE_DIR
    slug = re.sub(r"[^A-Za-z0-9]+", "-", reason).strip("-")[:60] or "bad"
    dest = dest_root / f"{step}.{_stamp()}.{slug}"
    if is_local(src):
        dest_root.mkdir(parents=True, exist_ok=True)
        os.rename(os.fspath(src), os.fspath(dest))  # moves a symlink itself, not its target
        fsync_path(directory)
        fsync_path(dest_root)
        return dest
    names = storage.list_files(src)
    if not names:
        return None
    rest = sorted(n for n in names if n != COMMIT_FILE)
    storage.copy_files(src, dest, rest)
    if COMMIT_FILE in names:
        storage.copy_files(src, dest, [COMMIT_FILE])
        storage.remove_files(src, [COMMIT_FILE])  # the step stops being listed here
    storage.remove_files(src, rest)
    return dest


def delete_step(directory: epath.Path, step: int) -> None:
    """Object storage: delete a step so that no reader ever lists a partial one.

    Tombstone, commit record, the other objects, tombstone (see the module docstring).
    """
    path = step_dir(directory, step)
    tombstone = directory / TRASH_DIR / f"{step}.{_stamp()}.deleting"
    tombstone.write_text(json.dumps({"step": step}))
    _delete_objects(path)
    storage.remove_files(directory / TRASH_DIR, [tombstone.name])


def _delete_objects(path: epath.Path) -> None:
    storage.remove_files(path, [COMMIT_FILE])  # unlisted from here on
    storage.remove_files(path, sorted(storage.list_files(path)))


def hold_for_replace(directory: epath.Path, step: int) -> epath.Path:
    """Move the committed `step` to ``<directory>/distckpt-replacing/<step>`` (unlisted)
    while its replacement is committed; :func:`release_replaced` or
    :func:`recover_replaced` ends the hold."""
    src = step_dir(directory, step)
    held_root = directory / REPLACING_DIR
    held = held_root / str(step)
    if is_local(directory):
        held_root.mkdir(parents=True, exist_ok=True)
        if held.exists():
            raise FileExistsError(f"{held} already holds a step being replaced; open a "
                                  "writable CheckpointService on the directory to recover it")
        os.rename(os.fspath(src), os.fspath(held))
        fsync_path(directory)
        fsync_path(held_root)
        return held
    names = storage.list_files(src)
    rest = sorted(n for n in names if n != COMMIT_FILE)
    storage.copy_files(src, held, rest)
    storage.copy_files(src, held, [COMMIT_FILE])  # held is complete once its record is there
    _delete_objects(src)  # record first: the step stops being listed
    return held


def release_replaced(directory: epath.Path, step: int) -> bool:
    """The replacement of `step` is committed: discard the held old step (locally it goes
    to the trash, which purge_trash deletes). False if nothing was held."""
    held = directory / REPLACING_DIR / str(step)
    if is_local(directory):
        if not os.path.isdir(os.fspath(held)):
            return False
        trash = directory / TRASH_DIR
        trash.mkdir(parents=True, exist_ok=True)
        os.rename(os.fspath(held), os.fspath(trash / f"{step}.{_stamp()}.replaced"))
        _remove_if_empty(directory / REPLACING_DIR)
        return True
    names = storage.list_files(held)
    if not names:
        return False
    _delete_objects(held)
    return True


def _remove_if_empty(path: epath.Path) -> None:
    try:
        os.rmdir(os.fspath(path))
    except OSError:  # not empty (another step held) or already gone
        pass


def _held_steps(directory: epath.Path) -> list[int]:
    root = directory / REPLACING_DIR
    if is_local(directory):
        try:
            names = set(os.listdir(os.fspath(root)))
        except FileNotFoundError:
            return []
    else:
        names = {rel.split("/", 1)[0] for rel in storage.list_files(root)}
    return sorted(int(n) for n in names if _STEP_NAME.match(n))


def recover_replaced(directory: epath.Path) -> list[str]:
    """Finish every replacement a failure or crash interrupted (primary host, writers only).

    For each step held in ``distckpt-replacing``: if the step is committed again (the new
    record was written), the held old step is discarded; otherwise whatever uncommitted
    leftover is at the step's path is quarantined and the old step is put back. Returns
    what was done, one line per step.
    """
    done = []
    for step in _held_steps(directory):
        path = step_dir(directory, step)
        held = directory / REPLACING_DIR / str(step)
        try:
            read_record(path, step)
        except CommitRecordError:
            pass
        else:
            release_replaced(directory, step)  # a replacement, or the original never moved
            done.append(f"step {step} is committed; discarded the copy held aside")
            continue
        if is_local(directory):
            try:
                read_record(held, step)
            except CommitRecordError as e:  # never expected: only committed steps are held
                done.append(f"step {step}: the held step is not committed ({e}); left it at "
                            f"{held}")
                continue
            if os.path.lexists(os.fspath(path)):
                quarantine(directory, step, "uncommitted")
            os.rename(os.fspath(held), os.fspath(path))
            fsync_path(directory)
            _remove_if_empty(directory / REPLACING_DIR)
        else:
            names = storage.list_files(held)
            if COMMIT_FILE not in names:  # the copy was cut short: the original is intact
                _delete_objects(held)
                done.append(f"step {step}: discarded an incomplete copy of the old step")
                continue
            if storage.list_files(path):
                quarantine(directory, step, "uncommitted")
            storage.copy_files(held, path, sorted(n for n in names if n != COMMIT_FILE))
            storage.copy_files(held, path, [COMMIT_FILE])  # listed again from here on
            _delete_objects(held)
        done.append(f"step {step}: its replacement never committed; put the old step back")
    return done


class ObjectStoreDeleter:
    """Orbax's CheckpointDeleter protocol for object storage: :func:`delete_step` on the
    primary host, nothing elsewhere (Orbax calls it on every process)."""

    def __init__(self, directory: epath.Path, is_primary: Callable[[], bool]):
        self._directory = directory
        self._is_primary = is_primary

    def delete(self, step: int) -> None:
        if self._is_primary():
            delete_step(self._directory, step)

    def delete_steps(self, steps) -> None:
        for step in steps:
            self.delete(step)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------- orbax hooks
class CommittedNameFormat(step_lib.NameFormat[step_lib.Metadata]):
    """Orbax step naming that lists only steps with a valid distckpt commit record.

    Orbax uses it for its listing, hence for retention: junk never counts as one
    of the newest N steps, and is never deleted by retention either. Steps in `hidden`
    are left out too: a committed step that is being replaced stays on disk (and listed
    to everyone else) until its replacement commits, but Orbax must not see it as taken.
    """

    def __init__(self):
        self._standard = step_lib.standard_name_format()
        self.hidden: frozenset[int] = frozenset()

    def build_name(self, step: int) -> str:
        return self._standard.build_name(step)

    def find_all(self, base_path: epath.PathLike) -> Iterator[step_lib.Metadata]:
        base = epath.Path(base_path)
        return iter([step_lib.Metadata(step=s, path=step_dir(base, s))
                     for s in committed_steps(base) if s not in self.hidden])

    def find_step(self, base_path: epath.PathLike, step: int) -> step_lib.Metadata:
        path = step_dir(epath.Path(base_path), step)
        try:
            read_record(path, step)
        except CommitRecordError as e:
            raise ValueError(f"step {step} in {base_path} is not committed: {e}") from e
        return step_lib.Metadata(step=step, path=path)

    def __str__(self) -> str:
        return "distckpt.CommittedNameFormat"


Finalizer = Callable[[epath.Path, int], dict[str, Any]]
"""finalizer(step_path, step) -> commit record (runs on the primary, after the rename)."""


_purgers: dict[str, threading.Thread] = {}
_purgers_lock = threading.Lock()


def purge_trash_later(directory: epath.Path) -> None:
    """purge_trash on a background thread, so deleting old steps (an rmtree of gigabytes
    on a local disk) does not delay the commit that retention ran after. At most one
    purge per directory runs at a time; what it misses the next one deletes (the trash
    is never listed, and a crash mid-purge leaves only trash)."""
    key = os.fspath(directory)
    with _purgers_lock:
        running = _purgers.get(key)
        if running is not None and running.is_alive():
            return

        def run() -> None:
            try:
                purge_trash(directory)
            except Exception:  # the next purge retries; never fail a committed save
                logger.warning("deleting retention's trash in %s failed; it is retried "
                               "after the next save", directory, exc_info=True)

        thread = threading.Thread(target=run, name="distckpt-purge-trash", daemon=True)
        _purgers[key] = thread
        thread.start()


def wait_for_purge(directory: epath.Path) -> None:
    """Wait for purge_trash_later's thread on `directory`, if one runs."""
    with _purgers_lock:
        thread = _purgers.pop(os.fspath(directory), None)
    if thread is not None:
        thread.join()


def purge_trash(directory: epath.Path) -> int:
    """Delete the steps retention moved to the trash; returns how many.

    Object storage: finish the deletions whose tombstones a crash left behind.
    """
    trash = directory / TRASH_DIR
    if not is_local(directory):
        tombstones = sorted(storage.list_files(trash))
        for name in tombstones:
            step = name.split(".", 1)[0]
            if "/" not in name and _STEP_NAME.match(step):
                _delete_objects(step_dir(directory, int(step)))
            storage.remove_files(trash, [name])
        return len(tombstones)
    if not trash.exists():
        return 0
    count = 0
    for entry in list(trash.iterdir()):
        if is_local(entry) and os.path.islink(os.fspath(entry)):
            entry.unlink()
        elif entry.is_dir():
            entry.rmtree()
        else:
            entry.unlink()
        count += 1
    return count


def commit_path_class(directory: epath.Path, finalizer: Finalizer,
                      after_record: Callable[[int], None] | None = None) -> type:
    """The Orbax TemporaryPath class that commits steps of `directory`.

    Local and network filesystems: rename, fsync everything, then the commit record.
    Object storage: write in place, then the commit record with one PUT (see the module
    docstring). Orbax also uses the class for the items inside a step; those are only
    renamed (or written in place).
    """
    root = _normalized(directory)

    def is_step(final: epath.Path) -> bool:
        return _normalized(final.parent) == root and bool(_STEP_NAME.match(final.name))

    class DurableRenameTemporaryPath(atomicity.AtomicRenameTemporaryPath):
        async def finalize(self):
            final = self.get_final()
            replacing = is_step(final) and await asyncio.to_thread(
                (final / COMMIT_FILE).exists)
            if replacing:  # overwrite=True: hold the old step only for the last moment
                await asyncio.to_thread(fsync_tree, self.get())
                await asyncio.to_thread(hold_for_replace, final.parent, int(final.name))
            try:
                await super().finalize()
                if is_step(final):
                    await asyncio.to_thread(_commit, final, finalizer, after_record)
            except BaseException:
                if replacing:
                    await asyncio.to_thread(_put_back, final)
                raise

    if is_local(directory):
        return DurableRenameTemporaryPath

    in_place: Any = storage.temporary_path_base(storage.Location.parse(os.fspath(directory)))

    class InPlaceCommitPath(in_place):
        async def create(self):
            # Orbax deletes whatever is at the step's path before writing there: never a
            # committed step, whatever the caller decided (primary host only).
            final = self.get_final()
            if is_step(final) and await asyncio.to_thread((final / COMMIT_FILE).exists):
                raise FileExistsError(
                    f"refusing to write step {final.name} over the committed step at "
                    f"{final}; save it with overwrite=True or under a new step")
            return await super().create()

        async def finalize(self):
            await super().finalize()
            final = self.get_final()
            if is_step(final):
                await asyncio.to_thread(_commit, final, finalizer, after_record)

    return InPlaceCommitPath


def _put_back(final: epath.Path) -> None:
    """A replacement failed before its record: put the held old step back now."""
    try:
        for line in recover_replaced(final.parent):
            logger.warning("%s", line)
    except Exception:  # the original error matters more; the next writer's start retries
        logger.exception("putting the replaced step %s back failed; the next writable "
                         "CheckpointService on %s does it", final.name, final.parent)


def _commit(path: epath.Path, finalizer: Finalizer,
            after_record: Callable[[int], None] | None) -> None:
    step = int(path.name)
    fsync_tree(path)
    fsync_path(path.parent)
    record = finalizer(path, step)
    write_durable(path / COMMIT_FILE, record)
    release_replaced(path.parent, step)  # the old step, if this one replaced it
    if after_record is not None:
        after_record(step)
    _free_trash_names(path.parent)
    purge_trash_later(path.parent)  # steps an earlier retention pass set aside


def _free_trash_names(directory: epath.Path) -> None:
    """Retention (Orbax's deleter, after this commit) moves a removed step to
    ``distckpt-trash/<step>`` and cannot replace an entry still there: a step number
    removed twice before the trash was purged (allow_older_steps, overwrite) failed the
    save. Rename such leftovers aside first (they are trash: purge_trash deletes them)."""
    if not is_local(directory):
        return
    trash = os.fspath(directory / TRASH_DIR)
    try:
        bare = [n for n in os.listdir(trash) if _STEP_NAME.match(n)]
    except FileNotFoundError:
        return
    if not bare:
        return
    wait_for_purge(directory)  # it may be deleting them right now
    for name in bare:
        try:
            os.rename(os.path.join(trash, name), os.path.join(trash, f"{name}.{_stamp()}.removed"))
        except FileNotFoundError:  # purged meanwhile
            pass
