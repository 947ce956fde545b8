"""How a commit is made durable, how a step is replaced, quarantined and deleted.

What counts as a committed step (the commit record and its manifest):
:mod:`distckpt.checkpoint.committed`.

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
import datetime
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

from etils import epath
from orbax.checkpoint.path import atomicity
from orbax.checkpoint.path import step as step_lib

from distckpt import storage
from distckpt.checkpoint.committed import (
    COMMIT_FILE,
    CommitRecordError,
    committed_steps,
    fsync_path,
    fsync_tree,
    is_local,
    is_step_name,
    read_record,
    step_dir,
    write_durable,
)

logger = logging.getLogger(__name__)

QUARANTINE_DIR = "distckpt-quarantine"
TRASH_DIR = "distckpt-trash"
"""Retention renames a step here first (atomic), then it is deleted: a crash mid-delete
never leaves a half-deleted step that is still listed. On object storage it holds only
tombstones of steps being deleted (see the module docstring)."""
REPLACING_DIR = "distckpt-replacing"
"""A committed step being replaced (``overwrite=True``) waits here, unlisted, until the new
one is committed; see the module docstring."""


def _normalized(path: epath.PathLike) -> str:
    """A path to compare directories by: absolute locally, the URL without a trailing
    slash on object storage (os.path.abspath would mangle ``s3://``)."""
    text = os.fspath(path)
    return text.rstrip("/") if "://" in text else os.path.abspath(text)


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
    return sorted(int(n) for n in names if is_step_name(n))


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
            if "/" not in name and is_step_name(step):
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
        return _normalized(final.parent) == root and bool(is_step_name(final.name))

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
        bare = [n for n in os.listdir(trash) if is_step_name(n)]
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
