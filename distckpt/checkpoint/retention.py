"""Retention: which committed steps a service keeps.

One rule, ranked by step number and never by save order: the ``max_to_keep`` highest
steps, every step marked with ``keep_forever()``, every multiple of ``keep_period``, and
the ``best_n`` best steps by the metrics saved with them. Orbax's CheckpointManager
applies the policy after each commit; the step directory's commit protocol
(:mod:`distckpt.checkpoint.commit`) does the deleting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from distckpt.checkpoint.options import CheckpointOptions

__all__ = ["preservation_policy", "score_of"]


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
