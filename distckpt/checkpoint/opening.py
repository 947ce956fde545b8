"""Opening a checkpoint directory on every process, before any step is read or written.

:func:`open_shared` resolves the directory (a relative local path against each process's
working directory; object storage prepared on every process), lets the primary host look
at it and hand every process the same view, creates it and repairs what a crash left
(a step an overwrite held aside, trash left by retention) when the service may write,
and proves with a probe file that every host sees the same storage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
from etils import epath

from distckpt import storage
from distckpt.checkpoint import commit
from distckpt.checkpoint.options import CheckpointOptions
from distckpt.checkpoint.primary import Primary
from distckpt.checkpoint.retention import KEEP_FILE, read_keep_forever
from distckpt.errors import CheckpointError, NoCheckpointError, StorageNotSharedError
from distckpt.multihost import coordinator

logger = logging.getLogger(__name__)

__all__ = ["Opened", "open_shared"]


@dataclasses.dataclass(frozen=True)
class Opened:
    """A checkpoint directory as every process of the job agreed to see it."""

    location: storage.Location
    directory: epath.Path  # this process's path to it
    key: str  # the primary's directory as a coordination name (the same on every host)
    shown: str  # the primary's directory, for messages
    nonce: str  # names this service's save scopes on every host
    keep_forever: set[int]  # steps exempt from retention (shared with the retention rule)


def open_shared(directory: str | epath.PathLike | storage.Location,
                options: CheckpointOptions, primary: Primary) -> Opened:
    """Open `directory` on every process: refuse an unusable one before anything is
    created; when writable, create it, repair it and probe that it is shared."""
    location, path = storage.open_directory(directory)

    def look() -> dict[str, str]:
        # is_dir first: one request for the usual case (an object store lists the prefix)
        if path.is_dir():
            where = "dir"
        else:
            where = "file" if path.exists() else "missing"
        return {"where": where, "key": _own_key(location, path), "shown": str(path),
                "nonce": f"{os.getpid()}-{time.time_ns()}"}

    decided = primary.decide("init:directory", look)
    # Coordination names use the primary's path, never this process's own: a host given
    # another path (a per-host or unshared directory) must still meet its peers at the
    # same barriers, so the storage probe can fail fast and name it.
    if decided["where"] == "file":
        raise CheckpointError(f"{path} is a file, not a checkpoint directory; "
                              "pass a directory path")
    if decided["where"] == "missing" and options.read_only:
        raise NoCheckpointError(f"checkpoint directory {path} does not exist (opened "
                                "read-only); check the path")
    opened = Opened(location, path, decided["key"], decided["shown"], decided["nonce"],
                    set(_load_keep_forever(path, primary)))
    if not options.read_only:
        _create(opened, primary)
        if options.require_shared_storage:
            _probe_shared_storage(opened, options, primary)
    return opened


def _own_key(location: storage.Location, path: epath.Path) -> str:
    """This process's directory as a coordination name. The coordination service's
    key-value store splits names at '/', so a URL's '//' would not survive it."""
    if location.is_local:
        return os.fspath(path)
    return location.url.replace("://", ":", 1)


def _load_keep_forever(path: epath.Path, primary: Primary) -> list[int]:
    try:
        return primary.decide("init:keep_forever", lambda: read_keep_forever(path))
    except coordinator.DecisionFailedError as e:  # the same error type on every host
        raise CheckpointError(f"[process={jax.process_index()}] the primary host (process "
                              f"{primary.host}) could not read {KEEP_FILE}: {e.error}") from e


def _create(opened: Opened, primary: Primary) -> None:
    """Primary: create the directory and repair what a crash left there."""
    path = opened.directory

    def create() -> list[str]:
        path.mkdir(parents=True, exist_ok=True)
        commit.wait_for_purge(path)  # an earlier service's, in this process
        recovered = commit.recover_replaced(path)  # a crash mid-overwrite
        commit.purge_trash(path)  # left by a crash during retention
        return recovered

    for line in primary.writes(f"init:{opened.key}:created", create, opened.shown):
        logger.warning("[process=%d] %s: %s", jax.process_index(), path, line)


def _probe_shared_storage(opened: Opened, options: CheckpointOptions,
                          primary: Primary) -> None:
    """Every host must see a file the primary just wrote (flax#3364, orbax#999)."""
    if jax.process_count() == 1:
        return
    path, key = opened.directory, opened.key

    def write_probe() -> str:
        nonce = f"{os.getpid()}-{time.time_ns()}"
        (path / f".distckpt-probe-{nonce}").write_text(nonce)
        return nonce

    # Peers receive the name only after the primary wrote the file, or its error.
    nonce = primary.writes(f"init:{key}:probe", write_probe, opened.shown)
    probe = path / f".distckpt-probe-{nonce}"

    def look() -> tuple[bool, str | None]:
        try:
            return probe.exists(), None
        except Exception as e:  # e.g. an S3 endpoint this host cannot reach: blind too,
            return False, f"{type(e).__name__}: {e}"[:300]  # and its peers must hear it

    deadline = time.monotonic() + options.probe_timeout_s
    seen, error = look()
    while not seen and error is None and time.monotonic() < deadline:
        time.sleep(0.2)
        seen, error = look()
    views = coordinator.all_gather(f"init:{key}:probe-seen", [seen, error],
                                   options.timeout_s + options.probe_timeout_s)
    if primary.is_me():
        probe.unlink(missing_ok=True)
    blind = [i for i, (v, _) in enumerate(views) if not v]
    if not blind:
        return
    raise StorageNotSharedError(
        f"[process={jax.process_index()}] checkpoint directory {path} is not shared: "
        f"process(es) {blind} did not see the probe file the primary host wrote there"
        + ("" if key == _own_key(opened.location, path) else
           f" (the primary host's directory is {opened.shown}; every host must be given "
           "the same path)")
        + f" within {options.probe_timeout_s:g}s"
        + "".join(f"; process {i} could not look: {e}" for i, (_, e) in enumerate(views) if e)
        + ". Point every host at the same shared filesystem or object store path"
        + ("" if opened.location.is_local else
           f" (same bucket, prefix and endpoint; this host uses {opened.location!r})")
        + ", raise probe_timeout_s for a slow network filesystem, or pass "
        "require_shared_storage=False for per-host local directories that you merge "
        "yourself. Nothing was written.")
