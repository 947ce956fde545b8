"""Saving a step, for :meth:`CheckpointService.save`: the writer side of a service.

A save, in order (every process, the same steps in the same order):

1. :meth:`Saver.agree`: the previous save's background commit has ended (or failed) and
   every process's input is valid, on all processes, or all of them raise.
2. The primary decides what is at the step's path (:class:`StepSlot`): refuse a step
   below the newest committed one or an existing one; move an uncommitted leftover
   aside; hold a step being overwritten until its replacement commits.
3. The arrays' content digests are enqueued on the devices
   (:mod:`distckpt.state.digest`), the four items are handed to Orbax's
   CheckpointManager, and save() returns once the arrays are staged.
4. In the background every process writes its shards and its per-process record
   (:mod:`distckpt.state.process_state`, with its partial digests); the step directory is
   fsynced and renamed, and the primary writes the commit record last
   (:meth:`Saver.finalize_commit`, called by :func:`distckpt.checkpoint.commit.commit_path_class`).
5. Retention (:mod:`distckpt.checkpoint.retention`) runs after the commit.

A background failure travels one way (:mod:`distckpt.checkpoint.failures`).
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from distckpt import compat
from distckpt.checkpoint import commit, committed
from distckpt.checkpoint.failures import SaveFailures, out_of_space
from distckpt.checkpoint.opening import Opened
from distckpt.checkpoint.options import CheckpointOptions, SaveStats
from distckpt.checkpoint.primary import Primary
from distckpt.checkpoint.retention import StepMetrics, check_rankable, preservation_policy
from distckpt.checkpoint.schedule import SaveSchedule
from distckpt.errors import CheckpointError, SaveFailedError, StepExistsError, StepOrderError
from distckpt.multihost import coordinator
from distckpt.state import digest, nnx_state, provenance
from distckpt.state import process_state as per_process

logger = logging.getLogger(__name__)

ITEMS = ("state", "metadata", "provenance", "process_state")

__all__ = ["ITEMS", "Saver", "StepSlot", "stage_to_host"]


def stage_to_host(tree: dict[str, Any]) -> dict[str, Any]:
    """A host copy of every array that training cannot change, with the same sharding
    (the copies start together and run asynchronously).

    On an accelerator: a copy in ``pinned_host`` memory. On CPU, where device memory is
    host memory: new arrays over the same buffers, through NumPy views of them (no bytes
    copied). A buffer with such a view cannot be donated: a jitted step that donates it
    computes into a new buffer instead, as it does for the views plain Orbax takes on CPU.
    The arrays stay "device" memory, which Orbax splits between data-parallel replicas (it
    does not split small pinned_host arrays)."""

    def copy(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        sharding = x.sharding
        if on_cpu(x) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
            shards = [jax.device_put(np.asarray(s.data), s.device)
                      for s in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)
        if not on_cpu(x):
            sharding = sharding.with_memory_kind("pinned_host")
        return jax.device_put(x, sharding, may_alias=False)

    return jax.tree.map(copy, tree)


def _platform(device: Any) -> str:
    return str(device.platform)


def on_cpu(array: jax.Array) -> bool:
    """Whether every device of `array` is a CPU device (device memory is host memory)."""
    return all(_platform(d) == "cpu" for d in array.sharding.device_set)


@functools.cache
def _has_host_memory(device: Any) -> bool:
    """A CPU device, or an accelerator with ``pinned_host`` memory (asked once per
    device, not at every save)."""
    return _platform(device) == "cpu" or "pinned_host" in {
        m.kind for m in device.addressable_memories()}


def _can_stage(tree: dict[str, Any]) -> bool:
    """Whether every array's devices have host memory to stage into."""
    return all(_has_host_memory(d) for x in jax.tree.leaves(tree)
               if isinstance(x, jax.Array) for d in x.sharding.addressable_devices)


class StepSlot(enum.StrEnum):
    """What the primary found where save() wants to write a step (crosses hosts as JSON)."""

    OLDER = "older"
    """Below the newest committed step and allow_older_steps=False: refuse."""
    FREE = "free"
    """Nothing there (or an uncommitted leftover, now moved aside): write."""
    COMMITTED = "committed"
    """A committed step and overwrite=False: refuse."""
    OVERWRITE = "overwrite"
    """A committed step to replace (overwrite=True)."""


class Saver:
    """The writer of one service: its Orbax CheckpointManager and the saves in flight."""

    def __init__(self, opened: Opened, options: CheckpointOptions, primary: Primary,
                 schedule: SaveSchedule, all_steps: Callable[[], list[int]]):
        self.options, self.primary = options, primary
        self.directory, self._shown = opened.directory, opened.shown
        self._is_local = opened.location.is_local
        self._all_steps = all_steps  # for messages: the steps a failure left intact
        self.stats: list[SaveStats] = []
        self.failures = SaveFailures(opened.nonce, primary)
        self._last_step: int | None = None  # the save whose outcome is not reported yet
        self._writer: threading.Thread | None = None  # Orbax's save() call, in background
        self._name_format = commit.CommittedNameFormat()
        self._metrics = StepMetrics(self.directory)
        o = options
        mp = ocp.options.MultiprocessingOptions(primary_host=o.primary_host)
        self._process_handler = per_process.ProcessStateHandler(
            o.fault_hook, on_failure=lambda step, e: self.failures.report(e, step))
        manager_options = ocp.CheckpointManagerOptions(
            save_decision_policy=schedule.orbax_policy,
            save_interval_steps=1,
            preservation_policy=preservation_policy(o, opened.keep_forever,
                                                    self._metrics.of),
            best_fn=o.score_fn(),
            best_mode=o.best_mode,
            enable_async_checkpointing=o.async_save,
            async_options=ocp.AsyncOptions(timeout_secs=int(o.timeout_s),
                                           barrier_sync_fn=self.failures.barriers),
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
                self.directory, self.finalize_commit,
                lambda step: self._fault(per_process.FaultPoint.COMMIT_RECORDED, step)),
            # Object storage has no rename: retention there is commit.ObjectStoreDeleter.
            todelete_subdir=commit.TRASH_DIR if self._is_local else None,
        )
        handlers = {
            "state": per_process.ReportingPyTreeHandler(
                on_failure=lambda e: self.failures.report(e, self._last_step),
                multiprocessing_options=mp, **o.handler_kwargs()),
            "metadata": ocp.JsonCheckpointHandler("metadata.json", multiprocessing_options=mp),
            "provenance": ocp.JsonCheckpointHandler("provenance.json", multiprocessing_options=mp),
            "process_state": self._process_handler,
        }
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS, item_handlers=handlers, options=manager_options)
        if not self._is_local:
            # Orbax 0.12.8 takes no deleter argument; its own would delete the step's
            # objects in listing order, the commit record among them, while readers may
            # still list the step. Ours deletes the record first (commit.delete_step).
            compat.set_checkpoint_deleter(
                self.manager, commit.ObjectStoreDeleter(self.directory, primary.is_me))

    def _fault(self, point: per_process.FaultPoint, step: int) -> None:
        if self.options.fault_hook is not None:
            self.options.fault_hook(point, step)

    # ------------------------------------------------------------------ one save
    def save(self, step: int, items: Mapping[str, Any], *, metrics: Mapping[str, float] | None,
             metadata: Mapping[str, Any] | None, process_state: Any, overwrite: bool,
             origin: Mapping[str, Any] | None = None,
             stage: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        """Start saving `step` (see CheckpointService.save). `stage`, when given, turns the
        tree of arrays to write into the one Orbax writes (after the digests are enqueued on
        the originals): the service's single host copy shared with the local tier."""
        leaves, metadata_json, metrics_json, rejected = [], {}, {}, None
        try:  # validate everything before anything touches disk
            leaves = nnx_state.flatten_items(items)
            metadata_json = dict(metadata or {})
            metrics_json = {k: float(v) for k, v in (metrics or {}).items()}
            check_rankable(self.options, step, metrics_json if metrics is not None else None)
            coordinator.encode_json(metadata_json, "metadata")
            coordinator.encode_json(process_state, "process_state")
            coordinator.encode_json(origin, "origin")
        except (TypeError, ValueError) as e:
            rejected = e

        t0 = time.perf_counter()
        # The previous save must be committed (or have failed) and every process's input
        # must be valid, on all processes, before this one starts.
        self.agree(f"save:step={step}:start", self.finish_local(), rejected)
        t_agreed = time.perf_counter()
        decided = self.primary.decide(
            f"save:step={step}:exists", lambda: self._prepare_step_dir(step, overwrite))
        where, newest = StepSlot(decided["where"]), decided["newest"]
        if where is StepSlot.OLDER:
            raise StepOrderError(
                f"step {step} is below step {newest}, the newest committed step in "
                f"{self.directory}, and steps only go up there: a lower step would not "
                "continue that run, and retention (which keeps the highest step numbers) "
                "could delete it right after it commits. To continue that run, restore() "
                f"and save from step {newest + 1}; to start a new run, use a new directory; "
                "to save below the newest step anyway, pass "
                "CheckpointOptions(allow_older_steps=True). Nothing was written.")
        if where is StepSlot.COMMITTED:
            raise StepExistsError(
                f"step {step} already exists in {self.directory} (the newest committed step "
                f"is {newest}). To continue that run, restore() and save from step "
                f"{newest + 1}; to replace step {step}, pass overwrite=True (the old step is "
                "kept until the new one commits); or use a new directory. Nothing was "
                "written.")
        if where is StepSlot.OVERWRITE:
            logger.info("[process=%d] overwriting step %d", jax.process_index(), step)
        # A step being replaced stays on disk until its replacement commits; Orbax must
        # not count it as taken (it refuses to save a step it lists).
        self._name_format.hidden = frozenset({step}) if where is StepSlot.OVERWRITE else frozenset()
        self._fault(per_process.FaultPoint.SAVE_DECIDED, step)
        t_slot = time.perf_counter()
        self.manager.reload()
        t_reload = time.perf_counter()
        record = provenance.build(step, leaves, has_process_state=process_state is not None,
                                  origin=origin)
        saveable = nnx_state.to_saveable(leaves)
        names = tuple(leaf.name for leaf in leaves)
        t_digest = time.perf_counter()
        pending = digest.dispatch([nnx_state.lookup(saveable, tuple(str(k) for k in leaf.path))
                                   for leaf in leaves], defer=True)
        digest_s = time.perf_counter() - t_digest
        background = (self.options.async_save and self.options.save_in_background
                      and _can_stage(saveable))
        if stage is not None:
            saveable = stage(saveable)
        elif background:
            saveable = stage_to_host(saveable)
        t_staged = time.perf_counter()
        if background:
            # Training may overwrite or donate the device buffers once save() returns.
            jax.block_until_ready(saveable)
        args = ocp.args.Composite(
            state=per_process.ReportingPyTreeSave(saveable),
            metadata=ocp.args.JsonSave({"user": metadata_json, "metrics": metrics_json}),
            provenance=ocp.args.JsonSave(record),
            process_state=per_process.ProcessStateSave(process_state, pending, names),
        )
        t_decided = time.perf_counter()
        stats = SaveStats(step=step, stall_s=0.0, started=t0, digest_s=digest_s)
        self.stats.append(stats)
        self._process_handler.step = step
        self._last_step = step
        self._metrics.saving(step, metrics_json or None)  # an overwrite's change them
        self.failures.begin()
        if background:
            self._writer = threading.Thread(
                target=self._hand_to_orbax, args=(step, args, metrics_json, where),
                name=f"distckpt-save-{step}", daemon=True)
            self._writer.start()
            what = "staging to host"
        else:
            try:
                self._orbax_save(step, args, metrics_json, where)
            except Exception as e:
                # Raised here, and not again by the next call when no peer can be waiting
                # on this save (a synchronous save, or a single process). Peers of an async
                # save learn it at the next save(), wait() or close(), where every process
                # raises.
                if not self.options.async_save or jax.process_count() == 1:
                    self.failures.forget()
                    self._last_step = None
                raise CheckpointError(f"saving step {step} to {self.directory} failed: {e}; "
                                      "committed steps are intact") from e
            self._fault(per_process.FaultPoint.SAVE_STAGED, step)
            what = "staging (orbax)"
        stats.stall_s = time.perf_counter() - t0
        logger.info("[process=%d] save step %d blocked %.3fs: previous commit + agreement "
                    "%.3fs, step decision %.3fs, manager reload %.3fs, provenance + digests "
                    "%.3fs, staging started %.3fs, staged %.3fs, %s %.3fs",
                    jax.process_index(), step, stats.stall_s, t_agreed - t0,
                    t_slot - t_agreed, t_reload - t_slot, t_digest + digest_s - t_reload,
                    t_staged - t_digest - digest_s, t_decided - t_staged, what,
                    time.perf_counter() - t_decided)
        if not self.options.async_save and stats.commit_s is None:
            stats.commit_s = stats.stall_s

    def _orbax_save(self, step: int, args: ocp.args.Composite, metrics: dict[str, float],
                    where: StepSlot) -> None:
        """Hand the step to Orbax's CheckpointManager; on failure report it (the peers'
        next wait() stops at it instead of the commit's barrier), put back a step an
        overwrite held, and raise."""
        try:
            self.manager.save(step, args=args, metrics=metrics or None, force=True)
        except Exception as e:
            self.failures.report(e)
            self._metrics.clear()
            if where is StepSlot.OVERWRITE and self.primary.is_me():
                self._put_back_held()
            raise
        finally:
            self._name_format.hidden = frozenset()

    def _hand_to_orbax(self, step: int, args: ocp.args.Composite, metrics: dict[str, float],
                       where: StepSlot) -> None:
        """The background thread of a save: Orbax's save() call from the host copy. Its
        failure is reported (the next save(), wait() or close() raises it everywhere)."""
        try:
            try:
                # Orbax raises a failed save's error once per thread that waits on it; this
                # thread is new, and that failure was already raised on every process.
                self.manager.wait_until_finished()
            except Exception as e:
                logger.info("[process=%d] the previous save's failure (already reported): "
                            "%s: %s", jax.process_index(), type(e).__name__, e)
            try:
                self._orbax_save(step, args, metrics, where)
            except Exception as e:  # reported by _orbax_save
                logger.warning("[process=%d] handing step %d to Orbax failed: %s: %s",
                               jax.process_index(), step, type(e).__name__, e)
                return
            self._fault(per_process.FaultPoint.SAVE_STAGED, step)
        except BaseException as e:  # this thread has no caller to raise to
            self.failures.report(e, step)

    def join_writer(self) -> None:
        """Wait until the background Orbax save() call (if any) has returned. (A failure
        on any process ends that call's barriers: it cannot wait on a failed peer.)"""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()

    def _prepare_step_dir(self, step: int, overwrite: bool) -> dict[str, Any]:
        """Primary: {'where': a StepSlot, 'newest': the newest committed step}; moves an
        uncommitted leftover aside. Decides the order first: nothing is touched for a
        step that will be refused."""
        newest = committed.newest_committed(self.directory)
        if newest is not None and step < newest and not self.options.allow_older_steps:
            return {"where": StepSlot.OLDER, "newest": newest}
        path = committed.step_dir(self.directory, step)
        if not (path.exists() or (self._is_local and os.path.islink(os.fspath(path)))):
            return {"where": StepSlot.FREE, "newest": newest}
        try:
            committed.read_record(path, step)
        except committed.CommitRecordError as e:
            moved = commit.quarantine(self.directory, step, "uncommitted")
            if moved is not None:  # None: an object store's empty "folder", nothing to move
                logger.warning("[process=%d] %s was not a committed step (%s); moved it to "
                               "%s before saving step %d", jax.process_index(), path, e,
                               moved, step)
            return {"where": StepSlot.FREE, "newest": newest}
        if not overwrite:
            return {"where": StepSlot.COMMITTED, "newest": newest}
        if not (self._is_local and self.options.async_save):
            # Object stores write in place and Orbax's sync save deletes the step first:
            # hold the old step aside until the new one commits. (A local async commit
            # swaps them itself at the last moment; commit.py.)
            commit.hold_for_replace(self.directory, step)
        return {"where": StepSlot.OVERWRITE, "newest": newest}

    def finalize_commit(self, path: epath.Path, step: int) -> dict[str, Any]:
        """Primary, commit thread, after the rename and fsync: build the commit record."""
        try:
            self._fault(per_process.FaultPoint.COMMIT_RENAMED, step)
            checksums = per_process.read_checksums(path / "process_state", jax.process_count())
            stats = self.stats[-1] if self.stats and self.stats[-1].step == step else None
            commit_s = None if stats is None else time.perf_counter() - stats.started
            record = committed.build_record(step, path, checksums, {
                "process_count": jax.process_count(), "commit_s": commit_s})
        except BaseException as e:
            self.failures.report(e, step)
            raise
        if stats is not None:
            stats.commit_s = commit_s
            logger.info("[process=%d] step %d committed in %.3fs", jax.process_index(), step,
                        commit_s)
        return record

    # ------------------------------------------------------------------ outcomes
    def finish_local(self) -> BaseException | None:
        """Wait for this process's background commit; return its error instead of raising.

        A peer whose commit failed never reaches the commit's final barrier, so waiting
        for our own commit would last until the async timeout. Instead, while waiting,
        a failure on any process (reported on the coordination service) ends the wait.
        """
        self.join_writer()
        step = self._last_step
        if step is None:
            return None
        while True:
            failure = self.failures.failure(step)
            if failure is not None:
                return failure
            try:
                self.manager.check_for_errors()
            except Exception as e:  # surfaced from Orbax's background commit thread
                self.failures.report(e)
                return e
            # Orbax's finalize thread can end while its save still counts as in progress:
            # after a failed write its closing barrier (which resets the flag) can time
            # out; the error is then only in the ended thread, and wait_until_finished()
            # raises it.
            if (not self.manager.is_saving_in_progress()
                    or compat.finalize_thread_ended(self.manager)):
                break
            time.sleep(0.02)
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            self.failures.report(e)
            return e
        if not self.failures.failed_here():
            self._fill_commit_time(step)
        return None

    def _fill_commit_time(self, step: int) -> None:
        stats = self.stats[-1] if self.stats else None
        if stats is None or stats.step != step or stats.commit_s is not None:
            return
        try:  # non-primary processes learn the commit time from the record
            stats.commit_s = committed.read_record(committed.step_dir(self.directory, step),
                                                step).get("commit_s")
        except committed.CommitRecordError:
            pass

    def agree(self, where: str, background: BaseException | None,
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
            "out_of_space": out_of_space(local)}
        reports = coordinator.all_gather(f"errors:{where}", report, self.options.timeout_s)
        failed = {i: r for i, r in enumerate(reports) if r is not None}
        save_failed = any(r["kind"] == "background" for r in failed.values())
        if not save_failed:
            # Every process has finished the last save (its Orbax threads are joined).
            self.failures.clear_finished()
        if not failed:
            return
        if background is None and rejected is not None and not save_failed:
            raise rejected  # this process's own bad input, as the caller passed it
        lines = "; ".join(f"process {i}: {r['error']}" for i, r in failed.items())
        what = (f"the background save of step {self._last_step} to {self.directory} "
                "failed" if save_failed else "the save was rejected")
        hint = (" The filesystem is full: free space there or save to another directory."
                if any(r.get("out_of_space") for r in failed.values()) else "")
        recovered = self._recover(where) if save_failed else []
        raise SaveFailedError(
            f"[process={jax.process_index()}] {what} ({lines}); nothing new is committed. "
            f"Committed steps are intact: {self._all_steps()}."
            + "".join(f" {line}." for line in recovered)
            + (" This error is raised once: the service saves new steps again from the "
               "next save() (the step that raised here was not saved; save it again)."
               if save_failed else "")
            + hint
        ) from local

    def _recover(self, where: str) -> list[str]:
        """After a failed save, on every process: let Orbax's threads end (their barriers
        stop at the failure note), clear their errors, put back a step an overwrite held,
        and forget the failure, so the next save() starts clean."""
        self.join_writer()
        for call in (self.manager.wait_until_finished, self.manager.check_for_errors):
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

        recovered = self.primary.decide(f"errors:{where}:recover", recover)
        self.failures.clear_finished()  # the decision's barrier: every process has drained
        self.failures.forget()
        self._metrics.clear()  # a held step put back has its own metrics again
        self._last_step = None
        return recovered

    def _put_back_held(self) -> None:
        """Primary, after a failed overwrite: put back the step it held aside (if any)."""
        try:
            for line in commit.recover_replaced(self.directory):
                logger.warning("[process=%d] %s", jax.process_index(), line)
        except Exception:  # the save's own error is the one to raise
            logger.exception("[process=%d] putting back the step a failed overwrite held "
                             "failed; the next writable service retries", jax.process_index())

    def wait(self) -> None:
        """Block until the in-flight save is committed; raise on every process if any failed."""
        self.agree(f"wait:after={self.stats[-1].step if self.stats else -1}", self.finish_local())

    def close(self, *, failed: bool = False) -> None:
        """Close the manager. After a failure, an error closing it is logged, not raised,
        so that it cannot mask the error that says why."""
        self.join_writer()
        if failed:
            try:
                self.manager.close()
            except Exception:
                logger.exception("[process=%d] closing the checkpoint manager after a "
                                 "failed save also failed", jax.process_index())
            return
        self.manager.close()
        if self.primary.is_me():
            commit.wait_for_purge(self.directory)
            commit.purge_trash(self.directory)
