"""Restoring a step, for :meth:`CheckpointService.restore`.

1. The primary picks the candidate steps (:func:`candidates`: one explicit step, the
   best one, or every committed step newest first) and every process gets the same list.
2. Each candidate is read on every process (:func:`_read_step`): the step's files are
   checked, the target is matched strictly (:mod:`distckpt.checkpoint.target`), arrays
   are streamed into the target's shardings through a bounded host budget
   (:mod:`distckpt.checkpoint.streaming`), each host digesting the pieces it reads as
   they arrive. The processes all-gather their outcome, so every process raises the same
   :class:`StepUnusableError` or every process goes on; the digests are then compared
   with the commit record.
3. With no explicit step, an unusable step is set aside (quarantined when the service is
   writable) and the next older one is tried.
4. Only when a step was read and verified on every process are the caller's objects
   updated, and the :class:`Restored` is built, once, with everything it reports.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import jax

from distckpt.checkpoint import commit, streaming
from distckpt.checkpoint.options import Restored
from distckpt.checkpoint.reader import StepReader, compare
from distckpt.checkpoint.target import check_target
from distckpt.errors import NoCheckpointError, StepProblem, StepUnusableError
from distckpt.multihost import coordinator
from distckpt.state import digest, nnx_state
from distckpt.state import process_state as per_process

if TYPE_CHECKING:
    from distckpt.checkpoint.service import CheckpointService

logger = logging.getLogger(__name__)

__all__ = ["candidates", "restore"]


@dataclasses.dataclass(frozen=True)
class _StepRead:
    """One step read and verified on every process: everything Restored reports of it."""

    step: int
    values: dict[str, Any]
    untouched: tuple[str, ...]
    metadata: dict[str, Any]
    metrics: dict[str, Any] | None
    process_state: Any
    provenance: dict[str, Any]
    verified: bool
    verify_seconds: float
    read_bytes: int


def candidates(svc: CheckpointService, step: int | Literal["latest", "best"] | None
               ) -> list[int]:
    """Steps to try, in order (newest first for None/'latest'), agreed by all processes."""
    if isinstance(step, int) and not isinstance(step, bool):
        want: int | None = step
    elif step in (None, "latest", "best"):
        want = None
    else:
        raise ValueError(f"step must be an int, 'latest', 'best' or None; got {step!r}")
    if step == "best" and svc.options.score_fn() is None:  # on every process, like any input
        raise ValueError("restore(step='best') needs CheckpointOptions(best_metric=...) or "
                         "best_fn= to rank steps; pass a step number or 'latest' instead")

    def decide() -> dict[str, Any]:
        steps = svc.all_steps()
        if want is not None:
            return {"steps": [want] if want in steps else [], "all": steps}
        if step == "best":
            best = svc.best_step()
            return {"steps": [] if best is None else [best], "all": steps}
        return {"steps": sorted(steps, reverse=True), "all": steps}

    chosen = svc.primary.decide(f"restore:resolve:{step}", decide)
    if not chosen["steps"]:
        if want is not None:
            raise NoCheckpointError(
                f"step {want} is not a committed checkpoint in {svc.directory}; "
                f"committed steps: {chosen['all']}")
        raise NoCheckpointError(
            f"no committed checkpoint in {svc.directory}"
            + (" with metrics to rank by" if step == "best" else "")
            + "; start from scratch or point at another directory")
    return chosen["steps"]


def restore(svc: CheckpointService, target: Mapping[str, Any],
            step: int | Literal["latest", "best"] | None, *, partial: bool,
            remap: per_process.ProcessStateRemap | None, verify: bool | None) -> Restored:
    """See :meth:`CheckpointService.restore`."""
    t0 = time.perf_counter()
    verify = svc.options.verify if verify is None else verify
    fallback = step is None or step == "latest"
    leaves = nnx_state.flatten_items(target)
    skipped: list[tuple[int, str]] = []
    for s in candidates(svc, step):
        try:
            read = _read_step(svc, s, leaves, partial=partial, remap=remap, verify=verify)
        except StepUnusableError as e:
            if not fallback:
                raise
            skipped.append((s, e.reason))
            _set_aside(svc, s, e)
            continue
        # Only now, with every process's read verified, touch the caller's objects.
        items = nnx_state.write_back(target, read.values)
        return Restored(step=read.step, items=items, metadata=read.metadata,
                        metrics=read.metrics, process_state=read.process_state,
                        provenance=read.provenance, untouched=read.untouched,
                        seconds=time.perf_counter() - t0, verify_seconds=read.verify_seconds,
                        verified=read.verified, skipped=tuple(skipped),
                        read_bytes=read.read_bytes)
    raise NoCheckpointError(
        f"no usable checkpoint in {svc.directory}: every committed step failed "
        f"({'; '.join(f'step {s}: {r}' for s, r in skipped)}). The bad steps are "
        + ("kept as they were (read-only)." if svc.options.read_only else
           f"in {svc.directory / commit.QUARANTINE_DIR}.")
        + " Start from scratch, or restore one of them explicitly with partial=True.")


def _set_aside(svc: CheckpointService, step: int, error: StepUnusableError) -> None:
    logger.error("[process=%d] step %d is not usable, falling back to an older step: %s",
                 jax.process_index(), step, error.reason)
    if svc.options.read_only:
        return

    def move() -> str:
        moved = commit.quarantine(svc.directory, step, error.kind)
        return "nowhere (it was gone)" if moved is None else str(moved)

    moved = svc.primary.decide(f"restore:quarantine:{step}", move)
    logger.warning("[process=%d] quarantined step %d at %s", jax.process_index(), step, moved)
    svc.reload()


def _read_step(svc: CheckpointService, step: int, leaves: list[nnx_state.Leaf], *,
               partial: bool, remap: per_process.ProcessStateRemap | None,
               verify: bool) -> _StepRead:
    """Read one step on every process; raise StepUnusableError on all if any failed."""
    local: dict[str, Any] = {}
    read: dict[str, Any] | None = None
    try:
        reader = StepReader(svc.directory, step)
        reader.check_files()
        record = reader.provenance
    except StepUnusableError as e:
        local = {"error": e.reason, "kind": e.kind.value}
    else:
        # A target that does not fit is the caller's problem, not the step's: raise now
        # (every process reads the same provenance, so all raise alike).
        wanted, untouched = check_target(record["leaves"], leaves, step, partial=partial)
        try:
            read = _read_arrays(svc, reader, wanted, record, remap, verify=verify)
            read["untouched"] = tuple(untouched)
            partials = read.pop("partials")
            if verify:
                local = {"partials": {n: digest.to_hex(p) for n, p in partials.items()}}
        except StepUnusableError as e:
            local = {"error": e.reason, "kind": e.kind.value}
    gathered = coordinator.all_gather(f"restore:step={step}:outcome", local,
                                      svc.options.timeout_s)
    errors = [(i, g) for i, g in enumerate(gathered) if "error" in g]
    if errors:
        kinds = {StepProblem(g["kind"]) for _, g in errors}
        kind = StepProblem.CORRUPT if StepProblem.CORRUPT in kinds else sorted(kinds)[0]
        reason = "; ".join(f"process {i}: {g['error']}" for i, g in errors[:4])
        raise StepUnusableError(step, reason, kind=kind)
    assert read is not None
    verify_seconds = 0.0
    if verify:
        t_v = time.perf_counter()
        problems = compare(step, reader.checksums, [g["partials"] for g in gathered],
                           [leaf.name for leaf in wanted])
        verify_seconds += time.perf_counter() - t_v
        if problems:
            raise StepUnusableError(
                step, f"{len(problems)} array(s) differ from what was saved: "
                + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""),
                kind=StepProblem.CORRUPT)
    return _StepRead(step=step, verified=verify, verify_seconds=verify_seconds, **read)


def _read_arrays(svc: CheckpointService, reader: StepReader, wanted: list[nnx_state.Leaf],
                 record: dict[str, Any], remap: per_process.ProcessStateRemap | None, *,
                 verify: bool) -> dict[str, Any]:
    """This process's part of a step: values in the target's shardings, this process's
    partial digests (digested as the data streamed in; None without `verify`), the user
    metadata, metrics and this process's state."""
    requests = [streaming.Request(leaf.name, tuple(str(k) for k in leaf.path),
                                  nnx_state.target_of(leaf)) for leaf in wanted]
    timeout = svc.options.timeout_s

    def agree(value: Any) -> list[Any]:
        return coordinator.all_gather(f"restore:step={reader.step}:read-once", value, timeout)

    read_bytes: dict[str, int] = {}
    raw, partials = reader.read_arrays(
        requests, verify=verify, memory_bytes=(None if svc.options.restore_memory_mb is None
                      else svc.options.restore_memory_mb << 20),
        read_once=svc.options.restore_read_once, agree=agree, read_bytes=read_bytes)
    saved_json = reader.user_json()
    records = reader.process_records()
    try:
        mine = per_process.select(records, record["process_count"], remap)
    except ValueError as e:
        if len(records) != record["process_count"]:
            raise StepUnusableError(reader.step, str(e), kind=StepProblem.INCOMPLETE) from e
        raise
    values = {leaf.name: nnx_state.rebuild_value(leaf, raw[leaf.name]) for leaf in wanted}
    return {"values": values, "partials": partials,
            "metadata": dict(saved_json.get("user") or {}),
            "metrics": saved_json.get("metrics") or None, "process_state": mine,
            "provenance": record, "read_bytes": sum(read_bytes.values())}
