"""CheckpointService: sharded, asynchronous, verified save and restore of NNX state.

A step is a directory ``<dir>/<step>/`` with four items and a commit record:

``state``          every process writes the shards it owns (TensorStore/OCDBT);
``metadata``       user metadata and metrics, JSON, written by the primary host only;
``provenance``     what the step holds and where it came from (primary only);
``process_state``  one JSON record per process (e.g. a data iterator position), which
                   also carries that process's partial content digests;
``distckpt_commit.json``  written last, by the primary, after every file is fsynced:
                   the step's manifest (content digest of every array, size of every
                   file). A step is committed iff this record is present and
                   consistent (:mod:`distckpt.checkpoint.commit`).

Saving is asynchronous: :meth:`CheckpointService.save` returns once the arrays are
staged and their digests are enqueued on the devices; training continues and the
commit happens in the background. A failure in that background commit is gathered
from every process at the next ``save()``, ``wait()`` or ``close()`` and raised on
all of them, once, as :class:`SaveFailedError`, so no host proceeds alone to a
barrier its peers will never reach. Orbax's commit barriers stop waiting as soon as
a failure is reported (:class:`distckpt.multihost.coordinator.ScopedBarriers`), so the raise
is prompt and the service is usable again afterwards (the failed step is not saved).

Decisions that read the filesystem (does this step exist? which step is the
newest? is this step usable?) are taken by the primary host and handed to the
others (:func:`distckpt.multihost.coordinator.primary_decides`): hosts of a shared
filesystem do not see its changes at the same moment.

Restore is strict: the target's leaves must match the step's leaves in path,
shape and dtype, or one error lists every difference; nothing is cast. A partial
restore is opt-in and reports the target paths it left untouched. Restore
verifies every array it read against the commit record (opt out with
``verify=False``). With no step given it falls back from newest to oldest over
steps that are incomplete, unreadable or corrupt, logs why, and (when writable)
quarantines them; every process ends on the same step.
"""

from __future__ import annotations

import datetime
import enum
import errno
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

from distckpt import compat, storage
from distckpt.checkpoint import commit, restoring
from distckpt.checkpoint.options import CheckpointOptions, Restored, SaveStats
from distckpt.checkpoint.reader import StepReader
from distckpt.checkpoint.retention import preservation_policy, score_of
from distckpt.checkpoint.target import check_target
from distckpt.errors import (
    CheckpointError,
    FormatVersionError,
    NoCheckpointError,
    SaveFailedError,
    StepExistsError,
    StepOrderError,
    StepUnusableError,
    StorageNotSharedError,
    TargetMismatchError,
)
from distckpt.multihost import coordinator
from distckpt.state import digest, jsonio, nnx_state, provenance
from distckpt.state import process_state as per_process

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

_ITEMS = ("state", "metadata", "provenance", "process_state")
_KEEP_FILE = "distckpt_keep_forever.json"


def _out_of_space(error: BaseException) -> bool:
    """Whether `error`, or an exception it was raised from, is ENOSPC (filesystem full)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        # TensorStore (Orbax's array writes) raises ValueError with the OS error only in
        # its text, no errno: the one place the message is read.
        if not isinstance(e, OSError) and "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _StepSlot(enum.StrEnum):
    """What the primary found where save() wants to write a step (crosses hosts as JSON)."""

    OLDER = "older"
    """Below the newest committed step and allow_older_steps=False: refuse."""
    FREE = "free"
    """Nothing there (or an uncommitted leftover, now moved aside): write."""
    COMMITTED = "committed"
    """A committed step and overwrite=False: refuse."""
    OVERWRITE = "overwrite"
    """A committed step to replace (overwrite=True)."""


__all__ = ["CheckpointError", "CheckpointOptions", "CheckpointService", "FormatVersionError",
           "NoCheckpointError", "Restored", "SaveFailedError", "SaveStats", "StepExistsError",
           "StepOrderError", "StepUnusableError", "StorageNotSharedError",
           "TargetMismatchError", "check_target"]


class CheckpointService:
    """Sharded async checkpoints of NNX state in `directory`, shared by all processes.

    `directory` is a local path, ``s3://bucket/prefix`` or ``gs://bucket/prefix`` (or a
    :class:`distckpt.storage.Location` with explicit endpoint and credentials); object
    stores take their endpoint, region and credentials from the environment
    (:mod:`distckpt.storage`) and commit without renames (:mod:`distckpt.checkpoint.commit`).

    Every process constructs the service with the same arguments and calls save() and
    restore() with the same steps in the same order. A relative local path is resolved
    against each process's working directory.

    Reusing a directory: steps only go up. save(step) below the newest step committed
    in the directory (by this or any earlier service) raises StepOrderError on every
    process before anything is written; restore() and continue from the newest step + 1,
    use a new directory, or pass CheckpointOptions(allow_older_steps=True). Saving a
    committed step again raises StepExistsError unless overwrite=True (the old step is
    kept until the new one commits). Retention ranks steps by step number, never by save
    order: max_to_keep keeps the N highest steps (plus keep_forever, keep_period
    multiples and best-N), so with allow_older_steps a step below the N highest is
    removed by retention right after it commits.

    A failed background save is raised once, as SaveFailedError, by the next save(),
    wait() or close() on every process (that save() does not save its own step); after
    it the service saves new steps again.
    """

    def __init__(self, directory: str | epath.PathLike | storage.Location,
                 options: CheckpointOptions | None = None):
        self.options = options or CheckpointOptions()
        # Every process prepares object storage (s3fs, the Orbax adapter) before Orbax runs.
        self.location, self.directory = storage.open_directory(directory)
        # The service itself asks with its own setting (_is_primary, _decide); the
        # process-wide one is still set for code without a service: the save policies,
        # RestartLog and callers of distckpt.is_primary().
        coordinator.set_primary_host(self.options.primary_host)
        self._check_directory()
        self._keep_forever: set[int] = set(self._load_keep_forever())
        self._metrics_seen: dict[int, Mapping[str, Any] | None] = {}  # for best-N retention
        self._stats: list[SaveStats] = []
        self._closed = False
        self._save_policy = self._save_decision_policy()
        self._policy_decision: tuple[int, bool] | None = None  # (step, save?) last asked
        self._last_save_step: int | None = None  # the save whose outcome is not reported yet
        self._background_failure: tuple[str, BaseException] | None = None  # (scope, error)
        # Each save is a scope of Orbax's commit barriers, named alike on every process.
        self._barriers = coordinator.ScopedBarriers(self._abort_reason)
        self._save_seq = 0
        self._open_scopes: list[str] = []  # scopes whose coordination keys are not cleared
        self._name_format = commit.CommittedNameFormat()
        self._manager: ocp.CheckpointManager | None = None
        self._process_handler: per_process.ProcessStateHandler | None = None
        if not self.options.read_only:
            self._open_writer()

    def _check_directory(self) -> None:
        """Refuse a directory that is not usable, before anything is created."""
        def state() -> str:
            if not self.directory.exists():
                return "missing"
            return "dir" if self.directory.is_dir() else "file"

        decided = self._decide(
            "init:directory", lambda: {"where": state(), "key": self._own_key(),
                                       "shown": str(self.directory),
                                       "nonce": f"{os.getpid()}-{time.time_ns()}"})
        where = decided["where"]
        self._nonce = decided["nonce"]  # names this service's save scopes on every host
        # Coordination names below use the primary's path, never this process's own: a
        # host given another path (a per-host or unshared directory) must still meet its
        # peers at the same barriers, so the storage probe can fail fast and name it.
        self._key = decided["key"]
        self._primary_directory = decided["shown"]  # for messages (the key mangles URLs)
        if where == "file":
            raise CheckpointError(f"{self.directory} is a file, not a checkpoint directory; "
                                  "pass a directory path")
        if where == "missing" and self.options.read_only:
            raise NoCheckpointError(
                f"checkpoint directory {self.directory} does not exist (opened read-only); "
                "check the path")

    def _own_key(self) -> str:
        """This process's directory as a coordination name. The coordination service's
        key-value store splits names at '/', so a URL's '//' would not survive it."""
        if self.location.is_local:
            return os.fspath(self.directory)
        return self.location.url.replace("://", ":", 1)

    def _open_writer(self) -> None:
        o = self.options

        def create() -> list[str]:
            self.directory.mkdir(parents=True, exist_ok=True)
            commit.wait_for_purge(self.directory)  # an earlier service's, in this process
            recovered = commit.recover_replaced(self.directory)  # a crash mid-overwrite
            commit.purge_trash(self.directory)  # left by a crash during retention
            return recovered

        for line in self._primary_writes(f"init:{self._key}:created", create):
            logger.warning("[process=%d] %s: %s", jax.process_index(), self.directory, line)
        if o.require_shared_storage:
            self._probe_shared_storage()
        mp = ocp.options.MultiprocessingOptions(primary_host=o.primary_host)
        self._process_handler = per_process.ProcessStateHandler(
            o.fault_hook, on_failure=self._on_background_failure)
        manager_options = ocp.CheckpointManagerOptions(
            save_decision_policy=self._save_policy,
            save_interval_steps=1,
            preservation_policy=preservation_policy(self.options, self._keep_forever,
                                                     self._step_metrics),
            best_fn=o.score_fn(),
            best_mode=o.best_mode,
            enable_async_checkpointing=o.async_save,
            async_options=ocp.AsyncOptions(timeout_secs=int(o.timeout_s),
                                           barrier_sync_fn=self._barriers),
            multiprocessing_options=mp,
            create=False,
            cleanup_tmp_directories=False,
            step_name_format=self._name_format,
            # Orbax's async save would delete an existing step directory as it starts (a
            # "force" save). The service decides what may be there instead: an uncommitted
            # leftover is moved aside, and a step being overwritten stays until its
            # replacement commits (commit.py). (Sync saves cannot skip it: there the old
            # step is held aside for the whole save instead.)
            file_options=ocp.options.FileOptions(skip_sync_file_validations=o.async_save),
            temporary_path_class=commit.commit_path_class(
                self.directory, self._finalize_commit,
                lambda step: self._fault(per_process.FaultPoint.COMMIT_RECORDED, step)),
            # Object storage has no rename: retention there is commit.ObjectStoreDeleter.
            todelete_subdir=commit.TRASH_DIR if self.location.is_local else None,
        )
        handlers = {
            "state": per_process.ReportingPyTreeHandler(
                on_failure=lambda e: self._on_background_failure(self._last_save_step, e),
                multiprocessing_options=mp, **o.handler_kwargs()),
            "metadata": ocp.JsonCheckpointHandler("metadata.json", multiprocessing_options=mp),
            "provenance": ocp.JsonCheckpointHandler("provenance.json", multiprocessing_options=mp),
            "process_state": self._process_handler,
        }
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=_ITEMS, item_handlers=handlers, options=manager_options)
        if not self.location.is_local:
            # Orbax 0.12.8 takes no deleter argument; its own would delete the step's
            # objects in listing order, the commit record among them, while readers may
            # still list the step. Ours deletes the record first (commit.delete_step).
            compat.set_checkpoint_deleter(
                self._manager, commit.ObjectStoreDeleter(self.directory, self._is_primary))

    def _probe_shared_storage(self) -> None:
        """Every host must see a file the primary just wrote (flax#3364, orbax#999)."""
        if jax.process_count() == 1:
            return

        def write_probe() -> str:
            nonce = f"{os.getpid()}-{time.time_ns()}"
            (self.directory / f".distckpt-probe-{nonce}").write_text(nonce)
            return nonce

        # Peers receive the name only after the primary wrote the file, or its error.
        nonce = self._primary_writes(f"init:{self._key}:probe", write_probe)
        probe = self.directory / f".distckpt-probe-{nonce}"

        def look() -> tuple[bool, str | None]:
            try:
                return probe.exists(), None
            except Exception as e:  # e.g. an S3 endpoint this host cannot reach: blind too,
                return False, f"{type(e).__name__}: {e}"[:300]  # and its peers must hear it

        deadline = time.monotonic() + self.options.probe_timeout_s
        seen, error = look()
        while not seen and error is None and time.monotonic() < deadline:
            time.sleep(0.2)
            seen, error = look()
        views = coordinator.all_gather(f"init:{self._key}:probe-seen", [seen, error],
                                       self.options.timeout_s + self.options.probe_timeout_s)
        if self._is_primary():
            probe.unlink(missing_ok=True)
        blind = [i for i, (v, _) in enumerate(views) if not v]
        if blind:
            raise StorageNotSharedError(
                f"[process={jax.process_index()}] checkpoint directory {self.directory} is not "
                f"shared: process(es) {blind} did not see the probe file the primary host "
                "wrote there"
                + ("" if self._key == self._own_key() else
                   f" (the primary host's directory is {self._primary_directory}; every host "
                   "must be given the same path)")
                + f" within {self.options.probe_timeout_s:g}s"
                + "".join(f"; process {i} could not look: {e}" for i, (_, e) in enumerate(views)
                          if e)
                + ". Point every host at the same shared filesystem or object store path"
                + ("" if self.location.is_local else
                   f" (same bucket, prefix and endpoint; this host uses {self.location!r})")
                + ", raise probe_timeout_s for "
                "a slow network filesystem, or pass require_shared_storage=False for per-host "
                "local directories that you merge yourself. Nothing was written.")

    def _is_primary(self) -> bool:
        """Whether this process is this service's primary host (options.primary_host)."""
        return coordinator.is_primary(self.options.primary_host)

    def _decide(self, name: str, decide: Callable[[], _T]) -> _T:
        """coordinator.primary_decides with this service's primary host and timeout."""
        return coordinator.primary_decides(name, decide, self.options.timeout_s,
                                           primary_host=self.options.primary_host)

    def _primary_writes(self, name: str, write: Callable[[], Any]) -> Any:
        """The primary writes to the directory; a failure there fails every host at once
        (not at the next barrier, after the timeout) with a message naming the cause."""
        try:
            return self._decide(name, write)
        # OSError: a single process gets `write`'s own error (primary_decides has no peer).
        except (OSError, coordinator.DecisionFailedError) as e:
            cause = e.error if isinstance(e, coordinator.DecisionFailedError) \
                else f"{type(e).__name__}: {e}"
            raise CheckpointError(
                f"[process={jax.process_index()}] the primary host (process "
                f"{self.options.primary_host}) cannot write to the checkpoint directory "
                f"{self._primary_directory}: {cause}. Give every host write access there "
                "(file permissions, or object-store credentials allowed to write), point "
                "at a writable directory, or pass CheckpointOptions(read_only=True) to only "
                "restore. Nothing was saved.") from e

    # ------------------------------------------------------------------ policies
    def _save_decision_policy(self) -> sdp.SaveDecisionPolicy:
        policies: list[sdp.SaveDecisionPolicy] = []
        if self.options.save_interval_steps is not None:
            policies.append(sdp.FixedIntervalPolicy(self.options.save_interval_steps))
        if self.options.save_on_steps:
            policies.append(sdp.SpecificStepsPolicy(self.options.save_on_steps))
        return sdp.AnySavePolicy(policies)

    def should_save(self, step: int, metrics: Mapping[str, float] | None = None) -> bool:
        """Whether save(step) would write this step: the interval or save_policy, or an
        explicit step. With a save_policy every process must call it (or save()) with
        the same steps; the decision is taken once per step and remembered."""
        policy = self.options.save_policy
        if policy is not None:
            if step in self.options.save_on_steps:
                return True
            if self._policy_decision is None or self._policy_decision[0] != step:
                policy.observe(self._stats)  # costs of the saves committed so far
                self._policy_decision = (step, bool(policy.should_save(step, metrics=metrics)))
            return self._policy_decision[1]
        info = ocp.checkpoint_manager.CheckpointInfo(
            step=step, time=datetime.datetime.now(tz=datetime.UTC), metrics=None)
        context = sdp.DecisionContext(
            is_saving_in_progress=False, reached_preemption=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=self.options.primary_host))
        return bool(self._save_policy.should_save(info, previous_steps=[], context=context))

    def _check_rankable(self, step: int, metrics: Mapping[str, float] | None) -> None:
        """Metrics given with best-N retention must rank the step (checked before anything
        is written: Orbax would fail the save in the background instead)."""
        score = self.options.score_fn()
        if score is None or metrics is None:
            return
        try:
            score(metrics)
        except KeyError as e:
            raise ValueError(
                f"metrics {sorted(metrics)} of step {step} lack best_metric "
                f"{self.options.best_metric!r}, which ranks steps for best-N retention; "
                "include it in metrics=, or pass no metrics to save the step unranked. "
                "Nothing was written.") from e

    def _step_metrics(self, step: int, known: Mapping[str, Any] | None
                      ) -> Mapping[str, Any] | None:
        """Metrics of a step for retention: Orbax's (the step being saved), else the ones
        saved with it (read once; a committed step's metrics never change)."""
        if known is not None:
            return known
        if step not in self._metrics_seen:
            try:
                self._metrics_seen[step] = StepReader(self.directory, step).metrics()
            except CheckpointError:  # not committed (yet) or unreadable: no metrics
                return None
        return self._metrics_seen[step]

    # ------------------------------------------------------------------ helpers
    def _load_keep_forever(self) -> list[int]:
        def read() -> list[int]:
            path = self.directory / _KEEP_FILE
            if not path.exists():
                return []
            try:
                return sorted(int(s) for s in jsonio.read_limited(path)["steps"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path} is unreadable ({e}); fix or remove it") from e

        try:
            return self._decide("init:keep_forever", read)
        except coordinator.DecisionFailedError as e:  # the same error type on every host
            raise CheckpointError(f"[process={jax.process_index()}] the primary host "
                                  f"(process {self.options.primary_host}) could not read "
                                  f"{_KEEP_FILE}: {e.error}") from e

    def _failure_note(self, scope: str) -> str:
        return f"save-failed:{scope}"

    def _on_background_failure(self, step: int | None, error: BaseException) -> None:
        """Called from the commit thread: remember the failure and tell the peers now."""
        scope = self._barriers.scope
        self._background_failure = (scope, error)
        coordinator.publish(self._failure_note(scope),
                            f"step {step}: {type(error).__name__}: {error}")

    def _abort_reason(self, scope: str) -> str | None:
        """Why the commit barriers of `scope` should stop waiting (None: keep waiting)."""
        failure = self._background_failure
        if failure is not None and failure[0] == scope:
            return f"this process's save failed: {type(failure[1]).__name__}: {failure[1]}"
        note = coordinator.read_note(self._failure_note(scope))
        return None if note is None else f"a peer's save failed ({note})"

    def _fault(self, point: per_process.FaultPoint, step: int) -> None:
        if self.options.fault_hook is not None:
            self.options.fault_hook(point, step)

    def _finalize_commit(self, path: epath.Path, step: int) -> dict[str, Any]:
        """Primary, commit thread, after the rename and fsync: build the commit record."""
        try:
            self._fault(per_process.FaultPoint.COMMIT_RENAMED, step)
            checksums = per_process.read_checksums(path / "process_state", jax.process_count())
            stats = self._stats[-1] if self._stats and self._stats[-1].step == step else None
            commit_s = None if stats is None else time.perf_counter() - stats.started
            record = commit.build_record(step, path, checksums, {
                "process_count": jax.process_count(), "commit_s": commit_s})
        except BaseException as e:
            self._on_background_failure(step, e)
            raise
        if stats is not None:
            stats.commit_s = commit_s
            logger.info("[process=%d] step %d committed in %.3fs", jax.process_index(), step,
                        commit_s)
        return record

    def _agree_on_errors(self, where: str, background: BaseException | None,
                         rejected: BaseException | None = None) -> None:
        """Gather failures from every process; raise on all of them if any process failed.

        `background` is this process's failed background commit, `rejected` its invalid
        save input (which may differ per process, e.g. process_state). A process that
        raised alone would leave its peers waiting at the save's barriers.
        """
        local = background or rejected
        report = None if local is None else {
            "kind": "background" if background is not None else "input",
            "error": f"{type(local).__name__}: {local}"[:2000],
            "out_of_space": _out_of_space(local)}
        reports = coordinator.all_gather(f"errors:{where}", report, self.options.timeout_s)
        failed = {i: r for i, r in enumerate(reports) if r is not None}
        save_failed = any(r["kind"] == "background" for r in failed.values())
        if not save_failed:
            # Every process has finished the last save (its Orbax threads are joined).
            self._clear_scopes()
        if not failed:
            return
        if background is None and rejected is not None and not save_failed:
            raise rejected  # this process's own bad input, as the caller passed it
        lines = "; ".join(f"process {i}: {r['error']}" for i, r in failed.items())
        what = (f"the background save of step {self._last_save_step} to {self.directory} "
                "failed" if save_failed else "the save was rejected")
        hint = (" The filesystem is full: free space there or save to another directory."
                if any(r.get("out_of_space") for r in failed.values()) else "")
        recovered = self._recover_failed_save(where) if save_failed else []
        raise SaveFailedError(
            f"[process={jax.process_index()}] {what} ({lines}); nothing new is committed. "
            f"Committed steps are intact: {self.all_steps()}."
            + "".join(f" {line}." for line in recovered)
            + (" This error is raised once: the service saves new steps again from the "
               "next save() (the step that raised here was not saved; save it again)."
               if save_failed else "")
            + hint
        ) from local

    def _recover_failed_save(self, where: str) -> list[str]:
        """After a failed save, on every process: let Orbax's threads end (their barriers
        stop at the failure note), clear their errors, put back a step an overwrite held,
        and forget the failure, so the next save() starts clean."""
        assert self._manager is not None  # a background save ran, so the manager exists
        for call in (self._manager.wait_until_finished, self._manager.check_for_errors):
            try:
                call()
            except Exception as e:  # the failure just gathered, raised by Orbax once more
                logger.info("[process=%d] after the failed save: %s: %s",
                            jax.process_index(), type(e).__name__, e)

        def recover() -> list[str]:
            try:
                return commit.recover_replaced(self.directory)
            except Exception as e:  # reported, not raised: the save's failure matters more
                return [f"putting back a step the failed overwrite held failed "
                        f"({type(e).__name__}: {e}); the next writable service retries"]

        recovered = self._decide(f"errors:{where}:recover", recover)
        self._clear_scopes()  # the decision's barrier: every process has drained
        self._background_failure = None
        self._last_save_step = None
        return recovered

    def _put_back_held(self) -> None:
        """Primary, after a failed overwrite: put back the step it held aside (if any)."""
        try:
            for line in commit.recover_replaced(self.directory):
                logger.warning("[process=%d] %s", jax.process_index(), line)
        except Exception:  # the save's own error is the one to raise
            logger.exception("[process=%d] putting back the step a failed overwrite held "
                             "failed; the next writable service retries", jax.process_index())

    def _clear_scopes(self) -> None:
        """Delete the coordination keys of finished saves (their barriers and notes)."""
        if self._is_primary():
            for scope in self._open_scopes:
                self._barriers.clear(scope)
                coordinator.clear_note(self._failure_note(scope))
        self._open_scopes = []

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Committed steps as this process sees them, oldest first.

        A step counts only with a consistent commit record (:mod:`distckpt.checkpoint.commit`): a
        junk ``7/``, a symlinked step, a step whose record is missing and temporary
        directories are never listed.
        """
        return commit.committed_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best committed step by best_metric/best_fn (None if no step has metrics)."""
        score = self.options.score_fn()
        if score is None:
            raise ValueError("best_step() needs CheckpointOptions(best_metric=...) or best_fn=")
        scored = []
        for s in self.all_steps():
            try:
                m = StepReader(self.directory, s).metrics()
            except StepUnusableError as e:
                logger.warning("[process=%d] best_step: skipping %s", jax.process_index(), e)
                continue
            value = score_of(score, m)
            if value is not None:
                scored.append((value, s))
        if not scored:
            return None
        pick = min if self.options.best_mode == "min" else max
        return pick(scored, key=lambda t: (t[0], -t[1] if self.options.best_mode == "min"
                                           else t[1]))[1]

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics saved with `step` (None if it was saved without any)."""
        return StepReader(self.directory, step).metrics()

    def metadata(self, step: int) -> dict[str, Any]:
        """The user metadata saved with `step`."""
        return dict(StepReader(self.directory, step).user_json().get("user") or {})

    def reload(self) -> None:
        """Re-read the list of committed steps from storage (writers' Orbax manager)."""
        if self._manager is not None:
            self._manager.reload()

    @property
    def save_stats(self) -> list[SaveStats]:
        """Stall and commit times of the saves this service made."""
        return list(self._stats)

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        items: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
        process_state: Any = None,
        force: bool = False,
        overwrite: bool = False,
    ) -> bool:
        """Save `items` as `step` if the save policy (or `force`) says so.

        Returns once the arrays are staged (async) or committed (sync); False if the
        policy skipped the step. On every process, before writing anything, raises
        StepOrderError if `step` is below the newest committed step in the directory
        (unless CheckpointOptions.allow_older_steps), and StepExistsError if `step` is
        committed and `overwrite` is False. With `overwrite` the old step stays until the
        new one is committed. Raises SaveFailedError (once) if the previous save failed.
        """
        self._ensure_open()
        if self.options.read_only or self._manager is None:
            raise CheckpointError(f"{self.directory} was opened read_only; it cannot be saved to")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not (force or self.should_save(step, metrics)):
            return False
        leaves, metadata_json, metrics_json, rejected = [], {}, {}, None
        try:  # validate everything before anything touches disk
            leaves = nnx_state.flatten_items(items)
            metadata_json = dict(metadata or {})
            metrics_json = {k: float(v) for k, v in (metrics or {}).items()}
            self._check_rankable(step, metrics_json if metrics is not None else None)
            coordinator.encode_json(metadata_json, "metadata")
            coordinator.encode_json(process_state, "process_state")
        except (TypeError, ValueError) as e:
            rejected = e

        t0 = time.perf_counter()
        # The previous save must be committed (or have failed) and every process's input
        # must be valid, on all processes, before this one starts.
        self._agree_on_errors(f"save:step={step}:start", self._finish_local(), rejected)
        t_agreed = time.perf_counter()
        decided = self._decide(
            f"save:step={step}:exists", lambda: self._prepare_step_dir(step, overwrite))
        where, newest = _StepSlot(decided["where"]), decided["newest"]
        if where is _StepSlot.OLDER:
            raise StepOrderError(
                f"step {step} is below step {newest}, the newest committed step in "
                f"{self.directory}, and steps only go up there: a lower step would not "
                "continue that run, and retention (which keeps the highest step numbers) "
                "could delete it right after it commits. To continue that run, restore() "
                f"and save from step {newest + 1}; to start a new run, use a new directory; "
                "to save below the newest step anyway, pass "
                "CheckpointOptions(allow_older_steps=True). Nothing was written.")
        if where is _StepSlot.COMMITTED:
            raise StepExistsError(
                f"step {step} already exists in {self.directory} (the newest committed step "
                f"is {newest}). To continue that run, restore() and save from step "
                f"{newest + 1}; to replace step {step}, pass overwrite=True (the old step is "
                "kept until the new one commits); or use a new directory. Nothing was "
                "written.")
        if where is _StepSlot.OVERWRITE:
            logger.info("[process=%d] overwriting step %d", jax.process_index(), step)
        # A step being replaced stays on disk until its replacement commits; Orbax must
        # not count it as taken (it refuses to save a step it lists).
        self._name_format.hidden = frozenset({step}) if where is _StepSlot.OVERWRITE else frozenset()
        self._manager.reload()
        record = provenance.build(step, leaves, has_process_state=process_state is not None)
        saveable = nnx_state.to_saveable(leaves)
        names = tuple(leaf.name for leaf in leaves)
        t_digest = time.perf_counter()
        pending = digest.dispatch([nnx_state.lookup(saveable, tuple(str(k) for k in leaf.path))
                                   for leaf in leaves], defer=True)
        digest_s = time.perf_counter() - t_digest
        args = ocp.args.Composite(
            state=per_process.ReportingPyTreeSave(saveable),
            metadata=ocp.args.JsonSave({"user": metadata_json, "metrics": metrics_json}),
            provenance=ocp.args.JsonSave(record),
            process_state=per_process.ProcessStateSave(process_state, pending, names),
        )
        t_decided = time.perf_counter()
        stats = SaveStats(step=step, stall_s=0.0, started=t0, digest_s=digest_s)
        self._stats.append(stats)
        assert self._process_handler is not None  # created with the manager in __init__
        self._process_handler.step = step
        self._last_save_step = step
        self._metrics_seen.pop(step, None)  # an overwritten step's metrics change
        self._save_seq += 1
        scope = f"save:{self._nonce}:{self._save_seq}"
        self._barriers.begin(scope)
        self._open_scopes.append(scope)
        try:
            self._manager.save(step, args=args, metrics=metrics_json or None, force=True)
        except Exception as e:
            # The peers' next wait() stops at this note instead of the commit's barrier.
            coordinator.publish(self._failure_note(scope), f"{type(e).__name__}: {e}")
            if where is _StepSlot.OVERWRITE and self._is_primary():
                self._put_back_held()
            if not self.options.async_save:  # raised here; not again by the next call
                self._background_failure = None
                self._last_save_step = None
            raise CheckpointError(f"saving step {step} to {self.directory} failed: {e}; "
                                  "committed steps are intact") from e
        finally:
            self._name_format.hidden = frozenset()
        self._fault(per_process.FaultPoint.SAVE_STAGED, step)
        stats.stall_s = time.perf_counter() - t0
        logger.info("[process=%d] save step %d blocked %.3fs: previous commit + agreement "
                    "%.3fs, step decision + digests %.3fs, staging (orbax) %.3fs",
                    jax.process_index(), step, stats.stall_s, t_agreed - t0,
                    t_decided - t_agreed, time.perf_counter() - t_decided)
        if not self.options.async_save and stats.commit_s is None:
            stats.commit_s = stats.stall_s
        return True

    def _prepare_step_dir(self, step: int, overwrite: bool) -> dict[str, Any]:
        """Primary: {'where': a _StepSlot, 'newest': the newest committed step}; moves an uncommitted leftover aside. Decides the order
        first: nothing is touched for a step that will be refused."""
        newest = commit.newest_committed(self.directory)
        if newest is not None and step < newest and not self.options.allow_older_steps:
            return {"where": _StepSlot.OLDER, "newest": newest}
        path = commit.step_dir(self.directory, step)
        if not (path.exists() or (self.location.is_local and os.path.islink(os.fspath(path)))):
            return {"where": _StepSlot.FREE, "newest": newest}
        try:
            commit.read_record(path, step)
        except commit.CommitRecordError as e:
            moved = commit.quarantine(self.directory, step, "uncommitted")
            if moved is not None:  # None: an object store's empty "folder", nothing to move
                logger.warning("[process=%d] %s was not a committed step (%s); moved it to "
                               "%s before saving step %d", jax.process_index(), path, e,
                               moved, step)
            return {"where": _StepSlot.FREE, "newest": newest}
        if not overwrite:
            return {"where": _StepSlot.COMMITTED, "newest": newest}
        if not (self.location.is_local and self.options.async_save):
            # Object stores write in place and Orbax's sync save deletes the step first:
            # hold the old step aside until the new one commits. (A local async commit
            # swaps them itself at the last moment; commit.py.)
            commit.hold_for_replace(self.directory, step)
        return {"where": _StepSlot.OVERWRITE, "newest": newest}

    def keep_forever(self, step: int) -> None:
        """Exempt a committed step from retention (every process calls it)."""
        if step not in self.all_steps():
            raise ValueError(f"step {step} is not committed; committed: {self.all_steps()}")
        self._keep_forever.add(step)
        if self._is_primary():
            commit.write_durable(self.directory / _KEEP_FILE,
                                 {"steps": sorted(self._keep_forever)})
        coordinator.barrier(f"keep_forever:step={step}", self.options.timeout_s)

    def wait(self) -> None:
        """Block until the in-flight save is committed; raise on every process if any failed."""
        self._ensure_open()
        self._agree_on_errors(f"wait:after={self._stats[-1].step if self._stats else -1}",
                              self._finish_local())

    def _finish_local(self) -> BaseException | None:
        """Wait for this process's background commit; return its error instead of raising.

        A peer whose commit failed never reaches the commit's final barrier, so waiting
        for our own commit would last until the async timeout. Instead, while waiting,
        a process whose commit failed posts that on the coordination service and the
        others stop waiting as soon as they read it.
        """
        if self._manager is None or self._last_save_step is None:
            return None
        step = self._last_save_step
        scope = self._barriers.scope  # the in-flight save's
        note = self._failure_note(scope)
        while True:
            if self._background_failure is not None and self._background_failure[0] == scope:
                return self._background_failure[1]
            peer = coordinator.read_note(note)
            if peer is not None:
                return SaveFailedError(f"a peer's background save of step {step} failed: {peer}")
            try:
                self._manager.check_for_errors()
            except Exception as e:  # surfaced from Orbax's background commit thread
                coordinator.publish(note, f"{type(e).__name__}: {e}")
                return e
            if not self._manager.is_saving_in_progress() or self._orbax_gave_up():
                break
            time.sleep(0.02)
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:
            coordinator.publish(note, f"{type(e).__name__}: {e}")
            return e
        if step is not None and self._background_failure is None:
            self._fill_commit_time(step)
        return None

    def _orbax_gave_up(self) -> bool:
        """Orbax's finalize thread ended while its save still counts as in progress.

        After a failed write Orbax's closing barrier (which resets is_saving_in_progress)
        can time out on a process, leaving the flag set for good; the error is then only
        in the ended thread, and wait_until_finished() raises it.
        """
        return compat.finalize_thread_ended(self._manager)

    def _fill_commit_time(self, step: int) -> None:
        stats = self._stats[-1] if self._stats else None
        if stats is None or stats.step != step or stats.commit_s is not None:
            return
        try:  # non-primary processes learn the commit time from the record
            stats.commit_s = commit.read_record(commit.step_dir(self.directory, step),
                                                step).get("commit_s")
        except commit.CommitRecordError:
            pass

    def close(self) -> None:
        """Finish the in-flight save and release resources. Never swallows an error."""
        if self._closed:
            return
        try:
            self.wait()
        except BaseException:
            # wait() raised the failure after Orbax's threads ended (their barriers stop at
            # the failure note), so closing the manager is prompt; if it fails too, do not
            # let that mask the error that says why.
            self._closed = True
            if self._manager is not None:
                try:
                    self._manager.close()
                except Exception:
                    logger.exception("[process=%d] closing the checkpoint manager after a "
                                     "failed save also failed", jax.process_index())
            raise
        self._closed = True
        if self._manager is not None:
            self._manager.close()
            if self._is_primary():
                commit.wait_for_purge(self.directory)
                commit.purge_trash(self.directory)

    def __enter__(self) -> CheckpointService:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the original error; still release the manager
            self._closed = True
            if self._manager is not None:
                try:
                    self._manager.close()
                except Exception:
                    logger.exception("closing the checkpoint manager after an error failed")

    def _ensure_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointService is closed")

    # ------------------------------------------------------------------ restore
    def restore(
        self,
        target: Mapping[str, Any],
        step: int | Literal["latest", "best"] | None = None,
        *,
        partial: bool = False,
        process_state_remap: per_process.ProcessStateRemap | None = None,
        verify: bool | None = None,
    ) -> Restored:
        """Restore a step into `target`, on this job's mesh.

        `target` has the same item names as the save; its leaves carry the shardings to
        restore into (see distckpt.abstract_target). Strict unless `partial=True`.
        With `step` None (or 'latest') the newest usable step is restored: steps that
        are incomplete, unreadable or fail verification are skipped (and quarantined
        when the service is writable). An explicit step or 'best' never falls back.
        """
        self._ensure_open()
        return restoring.restore(self, target, step, partial=partial,
                                 remap=process_state_remap, verify=verify)
