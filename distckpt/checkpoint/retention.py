"""Retention: which committed steps a service keeps.

One rule, ranked by step number and never by save order: the ``max_to_keep`` highest
steps, every step marked with ``keep_forever()``, every multiple of ``keep_period``, and
the ``best_n`` best steps by the metrics saved with them. Orbax's CheckpointManager
applies the policy after each commit; the step directory's commit protocol
(:mod:`distckpt.checkpoint.commit`) does the deleting.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from distckpt.checkpoint import committed
from distckpt.checkpoint.options import CheckpointOptions
from distckpt.checkpoint.reader import StepReader
from distckpt.errors import CheckpointError, StepUnusableError
from distckpt.state import jsonio

logger = logging.getLogger(__name__)

KEEP_FILE = "distckpt_keep_forever.json"

__all__ = ["KEEP_FILE", "StepMetrics", "best_step", "check_rankable", "preservation_policy",
           "read_keep_forever", "score_of", "write_keep_forever"]


@dataclasses.dataclass
class _HighestSteps(pp.PreservationPolicy):
    """Preserve the n highest step numbers. (Orbax's LatestN keeps the last n in its
    list, which is save order: a lower step saved into a used directory pushed a higher
    committed one out.)"""

    n: int | None

    def should_preserve(self, checkpoints, *, context):
        if self.n is None:
            return [True] * len(checkpoints)
        keep = set(sorted((c.step for c in checkpoints), reverse=True)[:self.n])
        return [c.step in keep for c in checkpoints]


@dataclasses.dataclass
class _BestSteps(pp.PreservationPolicy):
    """Preserve the n best steps by score among the steps saved with metrics (ties: the
    higher step), as best_step() ranks them, from the metrics distckpt saved with each
    step. (Orbax's BestN keeps every step, with metrics or not, while there are at most
    n, and knows the metrics of earlier steps only if their service ranked by them.)"""

    score: Callable[[Mapping[str, Any]], float]
    mode: Literal["min", "max"]
    n: int | None
    metrics_of: Callable[[int, Mapping[str, Any] | None], Mapping[str, Any] | None]

    def should_preserve(self, checkpoints, *, context):
        sign = 1.0 if self.mode == "min" else -1.0
        found = [(c.step, score_of(self.score, self.metrics_of(c.step, c.metrics)))
                 for c in checkpoints]
        ranked = sorted((sign * v, -step) for step, v in found if v is not None)
        best = {-neg_step for _, neg_step in ranked[:self.n]}
        return [c.step in best for c in checkpoints]


@dataclasses.dataclass
class _KeepMarked(pp.PreservationPolicy):
    """Preserve the steps a user marked with keep_forever()."""

    steps: set[int]

    def should_preserve(self, checkpoints, *, context):
        return [c.step in self.steps for c in checkpoints]


def score_of(score: Callable[[Mapping[str, Any]], float],
             metrics: Mapping[str, Any] | None) -> float | None:
    """A step's score, or None when it has no metrics or not the ranking one (a step
    saved by a service that ranked by another metric, or by none): such a step is never
    among the best."""
    if metrics is None:
        return None
    try:
        return score(metrics)
    except KeyError:
        return None


def preservation_policy(options: CheckpointOptions, keep_forever: set[int],
                        metrics_of: Callable[[int, Mapping[str, Any] | None],
                                             Mapping[str, Any] | None]
                        ) -> pp.PreservationPolicy:
    """The retention rule of `options` as one Orbax preservation policy. `keep_forever` is
    the service's live set (marks added later count); `metrics_of(step, known)` gives the
    metrics saved with a step."""
    policies: list[pp.PreservationPolicy] = [_HighestSteps(n=options.max_to_keep),
                                             _KeepMarked(keep_forever)]
    if options.keep_period is not None:
        policies.append(pp.EveryNSteps(options.keep_period))
    score = options.score_fn()
    if score is not None:
        policies.append(_BestSteps(score=score, mode=options.best_mode, n=options.best_n,
                                   metrics_of=metrics_of))
    return pp.AnyPreservationPolicy(policies)


class StepMetrics:
    """Metrics of steps for retention: Orbax's (the step being saved), else the ones saved
    with the step (read once; a committed step's metrics change only by an overwrite,
    whose save() records them here)."""

    def __init__(self, directory: epath.Path):
        self.directory = directory
        self._seen: dict[int, Mapping[str, Any] | None] = {}

    def of(self, step: int, known: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        if known is not None:
            return known
        if step not in self._seen:
            try:
                self._seen[step] = StepReader(self.directory, step).metrics()
            except CheckpointError:  # not committed (yet) or unreadable: no metrics
                return None
        return self._seen[step]

    def saving(self, step: int, metrics: Mapping[str, Any] | None) -> None:
        """`step` is being saved with `metrics` (None: none). For an overwrite these are
        its metrics from now on: retention runs while the replaced step may still be on
        disk, whose metrics must not be read back (a replaced best step would be kept)."""
        self._seen[step] = dict(metrics) if metrics else None

    def clear(self) -> None:
        """After a failed save: read every step's metrics from disk again."""
        self._seen.clear()


def check_rankable(options: CheckpointOptions, step: int,
                   metrics: Mapping[str, float] | None) -> None:
    """Metrics given with best-N retention must rank the step (checked before anything
    is written: Orbax would fail the save in the background instead)."""
    score = options.score_fn()
    if score is None or metrics is None:
        return
    try:
        score(metrics)
    except KeyError as e:
        raise ValueError(
            f"metrics {sorted(metrics)} of step {step} lack best_metric "
            f"{options.best_metric!r}, which ranks steps for best-N retention; "
            "include it in metrics=, or pass no metrics to save the step unranked. "
            "Nothing was written.") from e


def best_step(directory: epath.Path, options: CheckpointOptions) -> int | None:
    """The best committed step by best_metric/best_fn (None if no step has metrics);
    ties go to the higher step."""
    score = options.score_fn()
    if score is None:
        raise ValueError("best_step() needs CheckpointOptions(best_metric=...) or best_fn=")
    scored = []
    for s in committed.committed_steps(directory):
        try:
            m = StepReader(directory, s).metrics()
        except StepUnusableError as e:
            logger.warning("[process=%d] best_step: skipping %s", jax.process_index(), e)
            continue
        value = score_of(score, m)
        if value is not None:
            scored.append((value, s))
    if not scored:
        return None
    pick = min if options.best_mode == "min" else max
    return pick(scored, key=lambda t: (t[0], -t[1] if options.best_mode == "min" else t[1]))[1]


def read_keep_forever(directory: epath.Path) -> list[int]:
    """The steps marked with keep_forever() in `directory` (primary host)."""
    path = directory / KEEP_FILE
    if not path.exists():
        return []
    try:
        return sorted(int(s) for s in jsonio.read_limited(path)["steps"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); fix or remove it") from e


def write_keep_forever(directory: epath.Path, steps: set[int]) -> None:
    """Record the keep_forever() marks durably (primary host)."""
    committed.write_durable(directory / KEEP_FILE, {"steps": sorted(steps)})
