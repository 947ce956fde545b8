"""CheckpointService: sharded, asynchronous save and strict restore of NNX state.

A step is an Orbax composite checkpoint with four items:

``state``          every process writes the shards it owns (TensorStore/OCDBT);
``metadata``       user metadata, JSON, written by the primary host only;
``provenance``     what the step holds and where it came from (primary only);
``process_state``  one JSON record per process (e.g. a data iterator position).

Metrics go to Orbax's step metadata (primary only) and drive best-N retention.

Saving is asynchronous: :meth:`CheckpointService.save` returns once the arrays
are staged, training continues and the commit happens in the background. A
failure in that background commit is gathered from every process at the next
``save()``, ``wait()`` or ``close()`` and raised on all of them, so no host
proceeds alone to a barrier its peers will never reach. Orbax writes into a
temporary directory and renames it on commit, so a step whose commit failed is
never listed.

Decisions that read the filesystem (does this step exist? which step is the
newest?) are taken by the primary host and handed to the others
(:func:`distckpt.coordinator.primary_decides`): hosts of a shared filesystem do
not see its changes at the same moment.

Restore is strict: the target's leaves must match the step's leaves in path,
shape and dtype, or one error lists every difference; nothing is cast. A
partial restore is opt-in and reports the target paths it left untouched.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint._src.checkpoint_managers import save_decision_policy as sdp

from distckpt import coordinator, jsonio, nnx_state, provenance
from distckpt import process_state as per_process

logger = logging.getLogger(__name__)

_ITEMS = ("state", "metadata", "provenance", "process_state")
_KEEP_FILE = "distckpt_keep_forever.json"


class CheckpointError(RuntimeError):
    """Base class of distckpt's checkpoint errors."""


class StepExistsError(CheckpointError):
    """The step is already committed and overwrite=False."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """No committed step to restore."""


class TargetMismatchError(CheckpointError, ValueError):
    """The restore target does not match the saved leaves (paths, shapes, dtypes)."""


class SaveFailedError(CheckpointError):
    """A background save failed on at least one process."""


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """How a CheckpointService saves, keeps and restores steps."""

    max_to_keep: int | None = 3
    """Keep the newest N steps (None keeps all)."""
    keep_period: int | None = None
    """Also keep every step that is a multiple of this."""
    best_metric: str | None = None
    """Metric name (a key of save(metrics=...)) that ranks steps for best-N retention."""
    best_fn: Callable[[Mapping[str, Any]], float] | None = None
    """Alternative to best_metric: metrics dict -> score."""
    best_mode: Literal["min", "max"] = "min"
    """Whether a lower ('min', e.g. loss) or higher ('max', e.g. accuracy) score is better."""
    best_n: int | None = 1
    """With best_metric/best_fn: also keep the best N steps."""
    save_interval_steps: int | None = 1
    """save() writes steps that are multiples of this (None: only save_on_steps/force)."""
    save_on_steps: tuple[int, ...] = ()
    """save() also writes these steps."""
    async_save: bool = True
    """Commit in the background; save() returns once arrays are staged."""
    timeout_s: float = 600.0
    """Limit for barriers, decisions and a background commit."""
    primary_host: int = 0
    """The process that writes shared metadata and takes filesystem decisions."""
    read_only: bool = False
    """Never write or delete anything (evaluation, inspection, a drill's restore side)."""
    fault_hook: per_process.FaultHook | None = None
    """Tests and drills: fault_hook(point, step) runs at named save points; raising there
    injects a failure. Point today: 'process_state:write' (in the background commit)."""

    def __post_init__(self):
        if self.max_to_keep is not None and self.max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {self.max_to_keep}")
        if self.keep_period is not None and self.keep_period < 1:
            raise ValueError(f"keep_period must be None or >= 1, got {self.keep_period}")
        if self.best_metric is not None and self.best_fn is not None:
            raise ValueError("give best_metric or best_fn, not both")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.best_n is not None and self.best_n < 1:
            raise ValueError(f"best_n must be None or >= 1, got {self.best_n}")
        if self.save_interval_steps is not None and self.save_interval_steps < 1:
            raise ValueError(
                f"save_interval_steps must be None or >= 1, got {self.save_interval_steps}")
        if any(s < 0 for s in self.save_on_steps):
            raise ValueError(f"save_on_steps must be non-negative, got {self.save_on_steps}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")

    def score_fn(self) -> Callable[[Mapping[str, Any]], float] | None:
        if self.best_fn is not None:
            return self.best_fn
        if self.best_metric is not None:
            metric = self.best_metric

            def score(metrics: Mapping[str, Any]) -> float:
                if metric not in metrics:
                    raise KeyError(f"best_metric {metric!r} missing from metrics {sorted(metrics)}")
                return float(metrics[metric])

            return score
        return None


@dataclasses.dataclass
class SaveStats:
    """Timings of one save, in seconds."""

    step: int
    stall_s: float
    """How long save() blocked the caller."""
    commit_s: float | None = None
    """From the start of save() until the step was committed (None while in flight)."""


@dataclasses.dataclass
class Restored:
    """What restore() returns."""

    step: int
    items: dict[str, Any]
    """The target items holding the restored values (NNX objects are updated in place)."""
    metadata: dict[str, Any]
    metrics: dict[str, Any] | None
    process_state: Any
    provenance: dict[str, Any]
    untouched: tuple[str, ...] = ()
    """Target leaves a partial restore did not find in the step (left as they were)."""
    seconds: float = 0.0


@dataclasses.dataclass
class _KeepMarked(pp.PreservationPolicy):
    """Preserve the steps a user marked with keep_forever()."""

    steps: set[int]

    def should_preserve(self, checkpoints, *, context):
        return [c.step in self.steps for c in checkpoints]


class CheckpointService:
    """Sharded async checkpoints of NNX state in `directory`, shared by all processes.

    Every process constructs the service with the same arguments and calls save() and
    restore() with the same steps in the same order.
    """

    def __init__(self, directory: str | epath.PathLike, options: CheckpointOptions | None = None):
        self.options = options or CheckpointOptions()
        self.directory = epath.Path(directory)
        coordinator.set_primary_host(self.options.primary_host)
        if self.options.read_only and not self._exists_agreed("init:exists", self.directory):
            raise NoCheckpointError(
                f"checkpoint directory {self.directory} does not exist (opened read-only)")
        self._keep_forever: set[int] = set(self._load_keep_forever())
        self._stats: list[SaveStats] = []
        self._verified_steps: set[int] = set()
        self._inflight: SaveStats | None = None
        self._inflight_t0 = 0.0
        self._closed = False
        self._save_policy = self._save_decision_policy()
        mp = ocp.options.MultiprocessingOptions(primary_host=self.options.primary_host)
        self._process_handler = per_process.ProcessStateHandler(
            self.options.fault_hook, on_failure=self._on_background_failure)
        self._last_save_step: int | None = None
        self._background_failure: tuple[int, BaseException] | None = None
        retention = self._preservation_policy()
        manager_options = ocp.CheckpointManagerOptions(
            save_decision_policy=self._save_policy,
            save_interval_steps=0 if self.options.read_only else 1,
            preservation_policy=None if self.options.read_only else retention,
            best_fn=self.options.score_fn(),
            best_mode=self.options.best_mode,
            enable_async_checkpointing=self.options.async_save,
            async_options=ocp.AsyncOptions(
                timeout_secs=int(self.options.timeout_s),
                post_finalization_callback=self._on_commit,
            ),
            multiprocessing_options=mp,
            read_only=self.options.read_only,
            create=not self.options.read_only,
            cleanup_tmp_directories=False,
        )
        handlers = {
            "state": ocp.PyTreeCheckpointHandler(multiprocessing_options=mp),
            "metadata": ocp.JsonCheckpointHandler("metadata.json", multiprocessing_options=mp),
            "provenance": ocp.JsonCheckpointHandler("provenance.json", multiprocessing_options=mp),
            "process_state": self._process_handler,
        }
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=_ITEMS, item_handlers=handlers, options=manager_options)

    # ------------------------------------------------------------------ policies
    def _save_decision_policy(self) -> sdp.SaveDecisionPolicy:
        policies: list[sdp.SaveDecisionPolicy] = []
        if self.options.save_interval_steps is not None:
            policies.append(sdp.FixedIntervalPolicy(self.options.save_interval_steps))
        if self.options.save_on_steps:
            policies.append(sdp.SpecificStepsPolicy(self.options.save_on_steps))
        return sdp.AnySavePolicy(policies)

    def _preservation_policy(self) -> pp.PreservationPolicy:
        o = self.options
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=o.max_to_keep),
                                                 _KeepMarked(self._keep_forever)]
        if o.keep_period is not None:
            policies.append(pp.EveryNSteps(o.keep_period))
        score = o.score_fn()
        if score is not None:
            policies.append(pp.BestN(get_metric_fn=score, reverse=(o.best_mode == "min"),
                                     n=o.best_n, keep_checkpoints_without_metrics=False))
        return pp.AnyPreservationPolicy(policies)

    def should_save(self, step: int) -> bool:
        """Whether save(step) would write this step (interval / explicit steps)."""
        info = ocp.checkpoint_manager.CheckpointInfo(
            step=step, time=datetime.datetime.now(tz=datetime.UTC), metrics=None)
        context = sdp.DecisionContext(
            is_saving_in_progress=False, reached_preemption=False,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=self.options.primary_host))
        return bool(self._save_policy.should_save(info, previous_steps=[], context=context))

    # ------------------------------------------------------------------ helpers
    def _exists_agreed(self, name: str, path: epath.Path) -> bool:
        return coordinator.primary_decides(name, lambda: path.exists(), self.options.timeout_s)

    def _load_keep_forever(self) -> list[int]:
        def read() -> list[int]:
            path = self.directory / _KEEP_FILE
            if not path.exists():
                return []
            return sorted(int(s) for s in jsonio.read_limited(path)["steps"])

        return coordinator.primary_decides("init:keep_forever", read, self.options.timeout_s)

    def _failure_note(self, step: int | None) -> str:
        return f"save-failed:{self.directory}:step={step}"

    def _on_background_failure(self, step: int, error: BaseException) -> None:
        """Called from the commit thread: remember the failure and tell the peers now."""
        self._background_failure = (step, error)
        coordinator.publish(self._failure_note(step), f"{type(error).__name__}: {error}")

    def _on_commit(self) -> None:
        if self._inflight is not None:
            self._inflight.commit_s = time.perf_counter() - self._inflight_t0
            logger.info("[process=%d] step %d committed in %.3fs", jax.process_index(),
                        self._inflight.step, self._inflight.commit_s)
            self._inflight = None

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
            "error": f"{type(local).__name__}: {local}"}
        reports = coordinator.all_gather(f"errors:{where}", report, self.options.timeout_s)
        failed = {i: r for i, r in enumerate(reports) if r is not None}
        if not failed:
            return
        if background is None and rejected is not None and \
                all(r["kind"] == "input" for r in failed.values()):
            raise rejected  # this process's own bad input, as the caller passed it
        lines = "; ".join(f"process {i}: {r['error']}" for i, r in failed.items())
        what = ("a background save failed" if any(r["kind"] == "background"
                                                  for r in failed.values())
                else "the save was rejected")
        raise SaveFailedError(
            f"[process={jax.process_index()}] {what} ({lines}); nothing new is committed. "
            f"Committed steps are intact: {self.all_steps()}"
        ) from local

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """Committed steps known to this process, oldest first.

        Orbax lists any directory named like a step; distckpt also requires a real
        directory (not a symlink) whose provenance record names that step, so a junk
        ``7/`` or a ``9 -> 0`` link is never restored. (A durable commit record of
        distckpt's own, with fsync, comes with the crash-consistency work.)
        """
        return sorted(s for s in self._manager.all_steps() if self._looks_committed(s))

    def _looks_committed(self, step: int) -> bool:
        if step in self._verified_steps:
            return True
        path = self.directory / str(step)
        record = path / "provenance" / "provenance.json"
        try:
            ok = (not os.path.islink(os.fspath(path)) and record.exists()
                  and jsonio.read_limited(record).get("step") == step)
        except (OSError, ValueError):
            ok = False
        if ok:
            self._verified_steps.add(step)
        else:
            logger.warning("[process=%d] ignoring %s: not a committed distckpt step",
                           jax.process_index(), path)
        return ok

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The best committed step by best_metric/best_fn (None if no step has metrics)."""
        score = self.options.score_fn()
        if score is None:
            raise ValueError("best_step() needs CheckpointOptions(best_metric=...) or best_fn=")
        scored = [(score(m), s) for s in self.all_steps()
                  if (m := self._manager.metrics(s)) is not None]
        if not scored:
            return None
        pick = min if self.options.best_mode == "min" else max
        return pick(scored, key=lambda t: (t[0], -t[1] if self.options.best_mode == "min"
                                           else t[1]))[1]

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The metrics saved with `step` (None if it was saved without any)."""
        return self._read_json_item(step).get("metrics") or None

    def metadata(self, step: int) -> dict[str, Any]:
        """The user metadata saved with `step`."""
        return dict(self._read_json_item(step).get("user") or {})

    def _read_json_item(self, step: int) -> dict[str, Any]:
        out = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return dict(out["metadata"] or {})

    def reload(self) -> None:
        """Re-read the list of committed steps from storage."""
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
        policy skipped the step. Raises StepExistsError on every process, before writing
        anything, if `step` is committed and `overwrite` is False.
        """
        self._ensure_open()
        if self.options.read_only:
            raise CheckpointError(f"{self.directory} was opened read_only; it cannot be saved to")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not (force or self.should_save(step)):
            return False
        leaves, metadata_json, metrics_json, rejected = [], {}, {}, None
        try:  # validate everything before anything touches disk
            leaves = nnx_state.flatten_items(items)
            metadata_json = dict(metadata or {})
            metrics_json = {k: float(v) for k, v in (metrics or {}).items()}
            coordinator.encode_json(metadata_json, "metadata")
            coordinator.encode_json(process_state, "process_state")
        except (TypeError, ValueError) as e:
            rejected = e

        t0 = time.perf_counter()
        # The previous save must be committed (or have failed) and every process's input
        # must be valid, on all processes, before this one starts.
        self._agree_on_errors(f"save:step={step}:start", self._finish_local(), rejected)
        t_agreed = time.perf_counter()
        where = coordinator.primary_decides(
            f"save:step={step}:exists", lambda: self._step_on_disk(step), self.options.timeout_s)
        if where == "junk":
            raise CheckpointError(
                f"{self.directory / str(step)} exists but is not a committed distckpt step "
                "(no provenance record, or a symlink); move it away, then save again. "
                "Nothing was written.")
        if where == "committed":
            if not overwrite:
                raise StepExistsError(
                    f"step {step} already exists in {self.directory}; pass overwrite=True to "
                    "replace it, or save under a new step"
                )
            logger.info("[process=%d] overwriting step %d", jax.process_index(), step)
            self._manager.reload()
            self._manager.delete(step)
            self._verified_steps.discard(step)
        record = provenance.build(step, leaves, has_process_state=process_state is not None)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(nnx_state.to_saveable(leaves)),
            metadata=ocp.args.JsonSave({"user": metadata_json, "metrics": metrics_json}),
            provenance=ocp.args.JsonSave(record),
            process_state=per_process.ProcessStateSave(process_state),
        )
        t_decided = time.perf_counter()
        stats = SaveStats(step=step, stall_s=0.0)
        self._inflight, self._inflight_t0 = stats, t0
        self._process_handler.step = step
        self._last_save_step = step
        try:
            self._manager.save(step, args=args, metrics=metrics_json or None, force=True)
        except Exception as e:
            self._inflight = None
            raise CheckpointError(f"saving step {step} to {self.directory} failed: {e}") from e
        stats.stall_s = time.perf_counter() - t0
        logger.info("[process=%d] save step %d blocked %.3fs: previous commit + agreement "
                    "%.3fs, step decision %.3fs, staging (orbax) %.3fs", jax.process_index(),
                    step, stats.stall_s, t_agreed - t0, t_decided - t_agreed,
                    time.perf_counter() - t_decided)
        if not self.options.async_save and stats.commit_s is None:
            stats.commit_s = stats.stall_s
        self._stats.append(stats)
        return True

    def _step_on_disk(self, step: int) -> str:
        """'committed', 'junk' (a directory Orbax would list, but not a step) or 'free'."""
        self._manager.reload()
        if step in self.all_steps():
            return "committed"
        return "junk" if step in self._manager.all_steps() else "free"

    def keep_forever(self, step: int) -> None:
        """Exempt a committed step from retention (every process calls it)."""
        if step not in self.all_steps():
            raise ValueError(f"step {step} is not committed; committed: {self.all_steps()}")
        self._keep_forever.add(step)
        if coordinator.is_primary():
            jsonio.write_atomic(self.directory / _KEEP_FILE, {"steps": sorted(self._keep_forever)})
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
        step = self._last_save_step
        note = self._failure_note(step)
        while True:
            if self._background_failure is not None and self._background_failure[0] == step:
                return self._background_failure[1]
            peer = coordinator.read_note(note)
            if peer is not None:
                return SaveFailedError(f"a peer's background save of step {step} failed: {peer}")
            try:
                self._manager.check_for_errors()
            except Exception as e:  # surfaced from Orbax's background commit thread
                coordinator.publish(note, f"{type(e).__name__}: {e}")
                return e
            if not self._manager.is_saving_in_progress():
                break
            time.sleep(0.02)
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:
            coordinator.publish(note, f"{type(e).__name__}: {e}")
            return e
        return None

    def close(self) -> None:
        """Finish the in-flight save and release resources. Never swallows an error."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._manager.close()

    def __enter__(self) -> CheckpointService:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the original error; still release the manager
            self._closed = True
            try:
                self._manager.close()
            except Exception:
                logger.exception("closing the checkpoint manager after an error failed")

    def _ensure_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointService is closed")

    # ------------------------------------------------------------------ restore
    def resolve_step(self, step: int | Literal["latest", "best"] | None = None) -> int:
        """The step to restore, decided by the primary host from a fresh listing."""
        if isinstance(step, int) and not isinstance(step, bool):
            want = step
        elif step in (None, "latest", "best"):
            want = None
        else:
            raise ValueError(f"step must be an int, 'latest', 'best' or None; got {step!r}")

        def decide() -> int | None:
            self._manager.reload()
            if want is not None:
                return want if want in self.all_steps() else -1
            if step == "best":
                return self.best_step()
            return self.latest_step()

        chosen = coordinator.primary_decides(f"restore:resolve:{step}", decide,
                                             self.options.timeout_s)
        self._manager.reload()
        if chosen is None:
            raise NoCheckpointError(
                f"no committed checkpoint in {self.directory}"
                + (" with metrics to rank by" if step == "best" else "")
                + "; start from scratch or point at another directory")
        if chosen == -1:
            raise NoCheckpointError(
                f"step {want} is not a committed checkpoint in {self.directory}; committed "
                f"steps: {self.all_steps()}")
        return chosen

    def read_provenance(self, step: int) -> dict[str, Any]:
        record = self._manager.restore(
            step, args=ocp.args.Composite(provenance=ocp.args.JsonRestore()))["provenance"]
        if record.get("format") != "distckpt":
            raise CheckpointError(f"step {step} in {self.directory} has no distckpt provenance")
        if int(record.get("format_version", 0)) > provenance.FORMAT_VERSION:
            raise CheckpointError(
                f"step {step} was written by a newer distckpt (format "
                f"{record['format_version']} > {provenance.FORMAT_VERSION}); upgrade distckpt")
        return record

    def restore(
        self,
        target: Mapping[str, Any],
        step: int | Literal["latest", "best"] | None = None,
        *,
        partial: bool = False,
        process_state_remap: per_process.ProcessStateRemap | None = None,
    ) -> Restored:
        """Restore a step (newest by default) into `target`, on this job's mesh.

        `target` has the same item names as the save; its leaves carry the shardings to
        restore into (see distckpt.abstract_target). Strict unless `partial=True`.
        """
        self._ensure_open()
        t0 = time.perf_counter()
        step = self.resolve_step(step)
        record = self.read_provenance(step)
        leaves = nnx_state.flatten_items(target)
        wanted, untouched = check_target(record["leaves"], leaves, step, partial=partial)
        tree = nnx_state.restore_target(wanted)
        restore_args = ocp.checkpoint_utils.construct_restore_args(tree)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args,
                                             partial_restore=partial),
                metadata=ocp.args.JsonRestore(),
                process_state=per_process.ProcessStateRestore(),
            ))
        except Exception as e:
            raise CheckpointError(
                f"[process={jax.process_index()}] reading step {step} from {self.directory} "
                f"failed: {type(e).__name__}: {e}") from e
        values = {leaf.name: nnx_state.rebuild_value(
            leaf, nnx_state.lookup(out["state"], tuple(str(k) for k in leaf.path)))
            for leaf in wanted}
        items = nnx_state.write_back(target, values)
        mine = per_process.select(out["process_state"], record["process_count"],
                                    process_state_remap)
        saved_json = dict(out["metadata"] or {})
        return Restored(step=step, items=items, metadata=dict(saved_json.get("user") or {}),
                        metrics=saved_json.get("metrics") or None, process_state=mine,
                        provenance=record,
                        untouched=tuple(untouched), seconds=time.perf_counter() - t0)


def check_target(saved: Mapping[str, Any], leaves: Sequence[nnx_state.Leaf], step: int, *,
                 partial: bool) -> tuple[list[nnx_state.Leaf], list[str]]:
    """Compare the target's leaves with the saved ones; return (to restore, untouched).

    Strict mode raises one TargetMismatchError listing every missing, extra, reshaped
    or re-typed path. Partial mode still refuses shape/dtype changes of shared paths.
    """
    by_name = {leaf.name: leaf for leaf in leaves}
    missing = sorted(set(by_name) - set(saved))  # in target, not in step
    extra = sorted(set(saved) - set(by_name))  # in step, not in target
    problems = []
    for name in sorted(set(by_name) & set(saved)):
        leaf, rec = by_name[name], saved[name]
        if list(leaf.shape) != list(rec["shape"]):
            problems.append(f"  {name}: shape {tuple(rec['shape'])} saved, "
                            f"{leaf.shape} in target")
        if leaf.dtype != rec["dtype"]:
            problems.append(f"  {name}: dtype {rec['dtype']} saved, {leaf.dtype} in target "
                            "(distckpt never casts; convert after restoring if you mean to)")
    if not partial:
        problems += [f"  {n}: in the target but not in step {step}" for n in missing]
        problems += [f"  {n}: in step {step} but not in the target" for n in extra]
    if problems:
        hint = ("" if partial else
                "\nIf the model changed on purpose, restore with partial=True to load the "
                "paths both share and keep the rest as initialised.")
        raise TargetMismatchError(
            f"restore target does not match step {step} ({len(problems)} problem(s)):\n"
            + "\n".join(problems) + hint)
    wanted = [by_name[n] for n in by_name if n in saved]
    return wanted, missing
