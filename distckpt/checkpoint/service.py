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
                   consistent (:mod:`distckpt.checkpoint.committed`).

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

import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

import jax
from etils import epath

from distckpt import compat, storage
from distckpt.checkpoint import committed, restoring, retention, saving
from distckpt.checkpoint.local_restore import restore_local
from distckpt.checkpoint.local_save import LocalTier
from distckpt.checkpoint.opening import open_shared
from distckpt.checkpoint.options import CheckpointOptions, Restored, SaveStats
from distckpt.checkpoint.primary import Primary
from distckpt.checkpoint.reader import StepReader
from distckpt.checkpoint.saving import Saver
from distckpt.checkpoint.schedule import SaveSchedule
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
from distckpt.state import nnx_state, provenance
from distckpt.state import process_state as per_process

logger = logging.getLogger(__name__)

JOB_FILE = ".distckpt-job"
"""Names the run a checkpoint directory holds, for matching local-tier copies to it."""

__all__ = ["CheckpointError", "CheckpointOptions", "CheckpointService", "FormatVersionError",
           "NoCheckpointError", "Restored", "SaveFailedError", "SaveStats", "StepExistsError",
           "StepOrderError", "StepUnusableError", "StorageNotSharedError",
           "TargetMismatchError", "check_target"]


def _keep(box: list[Any], value: Any) -> Any:
    box.append(value)
    return value


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
    it the service saves new steps again. A save() that fails before it returns raises
    CheckpointError there; when other processes may already be writing that step (an
    async save with several processes), the next call also raises SaveFailedError on
    every process, so that all of them stop at the same call.
    """

    def __init__(self, directory: str | epath.PathLike | storage.Location,
                 options: CheckpointOptions | None = None):
        self.options = options or CheckpointOptions()
        # The service asks its own primary host; the process-wide setting is still set for
        # code without a service: the save policies, RestartLog and distckpt.is_primary().
        coordinator.set_primary_host(self.options.primary_host)
        if jax.process_count() > 1:  # Orbax's barriers: coordination service, with timeouts
            compat.use_coordination_barriers()
        self.primary = Primary(self.options.primary_host, self.options.timeout_s)
        opened = open_shared(directory, self.options, self.primary)
        self.location, self.directory = opened.location, opened.directory
        self._keep_forever = opened.keep_forever  # the retention rule's live set
        self._schedule = SaveSchedule(self.options)
        self._closed = False
        self._saver: Saver | None = None
        if not self.options.read_only:
            self._saver = Saver(opened, self.options, self.primary, self._schedule,
                                self.all_steps)
        self.local: LocalTier | None = None
        """The local tier on this host (None unless CheckpointOptions.local_directory)."""
        if self.options.local_directory is not None:
            options = self.options
            if options.local_directory == "auto":
                job = hashlib.sha1(opened.key.encode()).hexdigest()[:12]
                options = dataclasses.replace(
                    options, local_directory=f"/dev/shm/distckpt-{job}/{{host}}")
            job = self.primary.decide("init:local-tier:job", self._job_id)
            self.local = LocalTier(options, job, opened.nonce, read_only=options.read_only)
        self._restores = 0

    def _job_id(self) -> str:
        """The checkpoint directory's job identity (made on first use of a local tier), so
        local copies are only ever matched with the directory they belong to, even moved."""
        path = self.directory / JOB_FILE
        if path.exists():
            return path.read_text().strip()
        if self.options.read_only:
            return str(self.directory)
        job = uuid.uuid4().hex
        path.write_text(job)
        return job

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Committed steps as this process sees them, oldest first.

        A step counts only with a consistent commit record (:mod:`distckpt.checkpoint.committed`):
        a junk ``7/``, a symlinked step, a step whose record is missing and temporary
        directories are never listed.
        """
        return committed.committed_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best committed step by best_metric/best_fn (None if no step has metrics)."""
        return retention.best_step(self.directory, self.options)

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics saved with `step` (None if it was saved without any)."""
        return StepReader(self.directory, step).metrics()

    def metadata(self, step: int) -> dict[str, Any]:
        """The user metadata saved with `step`."""
        return dict(StepReader(self.directory, step).user_json().get("user") or {})

    def reload(self) -> None:
        """Re-read the list of committed steps from storage (writers' Orbax manager)."""
        if self._saver is not None:
            self._saver.join_writer()  # the Orbax save() call of the last save() has returned
            self._saver.manager.reload()

    @property
    def save_stats(self) -> list[SaveStats]:
        """Stall and commit times of the saves this service made."""
        return [] if self._saver is None else list(self._saver.stats)

    # ------------------------------------------------------------------ save
    def should_save(self, step: int, metrics: Mapping[str, float] | None = None) -> bool:
        """Whether save(step) would write this step, in either tier: the interval or
        save_policy, or an explicit step, or the local tier's interval. With a save_policy
        every process must call it (or save()) with the same steps; the decision is taken
        once per step and remembered."""
        return self._persistent_due(step, metrics) or (
            self.local is not None and self.local.due(step))

    def _persistent_due(self, step: int, metrics: Mapping[str, float] | None) -> bool:
        return self._schedule.should_save(
            step, metrics, [] if self._saver is None else self._saver.stats)

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
        origin: Mapping[str, Any] | None = None,
    ) -> bool:
        """Save `items` as `step` if the save policy (or `force`) says so.

        Returns once the arrays are staged (async) or committed (sync); False if the
        policy skipped the step. On every process, before writing anything, raises
        StepOrderError if `step` is below the newest committed step in the directory
        (unless CheckpointOptions.allow_older_steps), and StepExistsError if `step` is
        committed and `overwrite` is False. With `overwrite` the old step stays until the
        new one is committed. Raises SaveFailedError (once) if the previous save failed.
        `origin` (JSON) is recorded in the step's provenance: where the state came from.
        """
        self._ensure_open()
        if self._saver is None:
            raise CheckpointError(f"{self.directory} was opened read_only; it cannot be saved to")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        persistent = force or self._persistent_due(step, metrics)
        local = self.local is not None and (persistent or self.local.due(step))
        staged: list[dict[str, Any]] = []
        if persistent:
            # Due in both tiers: the devices are staged once, to host memory with the same
            # sharding, and both tiers write from that copy.
            self._saver.save(step, items, metrics=metrics, metadata=metadata,
                             process_state=process_state, overwrite=overwrite, origin=origin,
                             stage=(lambda tree: _keep(staged, saving.stage_to_host(tree)))
                             if local else None)
        if local:
            assert self.local is not None
            self._save_local(step, items, metrics=metrics, metadata=metadata,
                             process_state=process_state, origin=origin,
                             staged=staged[0] if staged else None)
        return persistent or local

    def _save_local(self, step: int, items: Mapping[str, Any], *,
                    metrics: Mapping[str, float] | None, metadata: Mapping[str, Any] | None,
                    process_state: Any, origin: Mapping[str, Any] | None,
                    staged: dict[str, Any] | None = None) -> None:
        assert self.local is not None
        leaves = nnx_state.flatten_items(items)
        extra = {"metadata": dict(metadata or {}),
                 "metrics": None if metrics is None else {k: float(v) for k, v in metrics.items()},
                 "process_state": process_state,
                 "provenance": provenance.build(step, leaves,
                                                has_process_state=process_state is not None,
                                                origin=origin)}
        for name, value in extra.items():
            coordinator.encode_json(value, name)
        if staged is not None:  # the host copy the persistent save writes from: no new copy
            leaves = [nnx_state.Leaf(leaf.path, nnx_state.lookup(
                staged, tuple(str(k) for k in leaf.path))) for leaf in leaves]
        self.local.save(step, leaves, extra=extra, private=staged is not None)

    def keep_forever(self, step: int) -> None:
        """Exempt a committed step from retention (every process calls it)."""
        if step not in self.all_steps():
            raise ValueError(f"step {step} is not committed; committed: {self.all_steps()}")
        self._keep_forever.add(step)
        if self.primary.is_me():
            retention.write_keep_forever(self.directory, self._keep_forever)
        coordinator.barrier(f"keep_forever:step={step}", self.options.timeout_s)

    def wait(self) -> None:
        """Block until the in-flight save is committed; raise on every process if any failed."""
        self._ensure_open()
        if self.local is not None:
            self.local.wait()
        if self._saver is not None:
            self._saver.wait()

    def close(self) -> None:
        """Finish the in-flight save and release resources. Never swallows an error."""
        if self._closed:
            return
        if self.local is not None:
            self.local.wait()
        try:
            self.wait()
        except BaseException:
            # wait() raised the failure after Orbax's threads ended (their barriers stop at
            # the failure note), so closing the manager is prompt.
            self._closed = True
            if self._saver is not None:
                self._saver.close(failed=True)
            raise
        self._closed = True
        if self._saver is not None:
            self._saver.close()

    def __enter__(self) -> CheckpointService:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the original error; still release the manager
            self._closed = True
            if self._saver is not None:
                self._saver.close(failed=True)

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
        t0 = time.perf_counter()
        restored = None
        if self.local is not None and step != "best":
            restored = self._restore_local(target, step, partial=partial,
                                           remap=process_state_remap, t0=t0)
        if restored is None:
            restored = restoring.restore(self, target, step, partial=partial,
                                         remap=process_state_remap, verify=verify)
            restored.restored_from = ("persistent",) * jax.process_count()
        if self.local is not None and not self.options.read_only:
            self.local.dir.drop_newer(restored.step)  # copies of an abandoned future
        return restored

    def _restore_local(self, target: Mapping[str, Any], step: int | str | None, *,
                       partial: bool, remap: per_process.ProcessStateRemap | None,
                       t0: float) -> Restored | None:
        assert self.local is not None
        if step is not None and step != "latest" and (
                not isinstance(step, int) or isinstance(step, bool)):
            return None  # restoring.restore says what is wrong with it
        self.local.wait()  # a local save still in flight finishes first
        self._restores += 1
        newest = self.primary.decide(f"restore:{self._restores}:newest-persistent",
                                     self.latest_step)
        leaves = nnx_state.flatten_items(target)
        logger.info("[process=%d] local restore: newest persistent step agreed after %.3fs",
                    jax.process_index(), time.perf_counter() - t0)
        read, failed = restore_local(self.local, leaves, partial=partial,
                                     newest_persistent=newest,
                                     step=step if isinstance(step, int) else None,
                                     seq=self._restores)
        if read is None:
            return None
        try:
            mine = per_process.select(read.process_states, len(read.process_states), remap)
        except ValueError as e:
            raise CheckpointError(f"local step {read.step}: {e}") from e
        items = nnx_state.write_back(target, read.values)
        tier = "peer" if "peer" in read.tiers else "local"
        return Restored(step=read.step, items=items,
                        metadata=dict(read.extra.get("metadata") or {}),
                        metrics=read.extra.get("metrics"), process_state=mine,
                        provenance=dict(read.extra.get("provenance") or {}),
                        untouched=tuple(read.untouched), seconds=time.perf_counter() - t0,
                        verified=True, tier=tier, restored_from=tuple(read.tiers),
                        skipped=tuple(failed), read_bytes=read.read_bytes)
