"""What ``distckpt goodput`` predicts: checkpoint intervals and ETTR from measured costs.

Everything here is arithmetic on :class:`Costs` (measured by short warm-up jobs to
:func:`plan` a run's intervals, and in the run itself to :func:`predict` its ETTR) and the
MTBF; the formulas are :mod:`distckpt.checkpoint.policy`'s, not new ones.

**Interval.** Saves are asynchronous: a save blocks training for its *stall* ``C`` and
its step becomes usable (committed) ``L`` seconds after the save began. Between saves
``tau`` seconds of training, a failure at a uniformly random moment of an interval loses
on average ``tau/2 + L`` seconds of work (with probability ``L/tau`` the newest save was
not committed yet and the one before it is restored) plus the restart ``R``. The waste
per second is then ``C/tau + (tau/2 + L + R)/M``, minimal at Young's
``tau = sqrt(2 C M)`` (:func:`~distckpt.checkpoint.policy.young_daly_interval`, with the
stall as the cost: :class:`~distckpt.checkpoint.policy.YoungDalyPolicy` counts the commit
too, which is conservative, not optimal, for asynchronous saves). The interval is never
shorter than ``L`` (a save cannot start before the previous one committed without
stalling on it), then rounded to whole steps.

**Multi-tier.** The local tier is saved every ``tau_local`` (Young/Daly of the local save's
stall). The persistent tier only matters for failures that lose a host *and* its peer's
copy, which the benchmark never injects; its interval is Young/Daly of the persistent
save's extra stall with an MTBF :data:`PERSISTENT_MTBF_FACTOR` times the given one (a
modelling choice, stated in the report), rounded to a multiple of the local interval. Its
saves are pure overhead here and are charged to the local interval: the cost per local
interval is ``C_local + (C_both - C_local) * K/P`` (``K``, ``P``: the intervals in steps).

**Predicted ETTR.** Daly's model (Daly 2006, eq. 13, the same as
:func:`~distckpt.checkpoint.policy.expected_loss_fraction`) with the interval ``tau``, the
stall ``C``, the MTBF and the restart ``R + L`` (the commit latency is lost work at every
failure, like the restart), times the fraction of the run left after the job's first
start ``S``, which the steady-state model does not include::

    ETTR = (1 - S/T) * (1 - expected_loss_fraction(tau, C, M, R + L))

To first order this is ``1 - S/T - C/tau - (tau/2 + L + R)/M``. The run's report gives it
twice: *planned*, from the calibration's costs (what the plan expected), and *predicted*,
from the costs measured in the run itself (the same intervals): on a shared machine
steps, saves and restarts can be slower during the run than during the calibration, and
the model is checked against the costs the run actually had.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any

from distckpt.checkpoint.policy import expected_loss_fraction, young_daly_interval

PERSISTENT_MTBF_FACTOR = 10.0
"""In the multi-tier run, the persistent tier is saved as if one failure in this many lost
the local tier too (host and peer copy); see the module docstring."""


@dataclasses.dataclass(frozen=True)
class Costs:
    """What a job's steps, saves and restarts cost, in seconds: measured by the warm-up
    jobs (to plan a run) or in the run itself (to predict its ETTR)."""

    step_s: float
    """Failure-free, save-free time of one training step (median)."""
    start_s: float
    """A job start with the compile cache warm: launch until training begins, less the
    restore and one step."""
    restart_s: float
    """From the kill of a host until training resumes: the job torn down, the host's local
    tier wiped, the job relaunched, restored, the first step compiled (less one step)."""
    stall_s: float
    """Median stall of a save to the persistent tier (with the local tier: of a save that
    writes both)."""
    commit_s: float
    """Median time from the start of such a save until it is committed."""
    local_stall_s: float | None = None
    """Median stall of a save to the local tier only (multi-tier)."""
    local_commit_s: float | None = None
    """Median time from such a save's start until its own and its peer copy are written
    (the primary host's; its stall where none was reported)."""
    cost_s: float | None = None
    """Median time a save that writes the persistent tier costs training: its stall plus
    what the steps until the next save took beyond `step_s` (its background work shares
    the host with training). None: not measured, the stall is used."""
    local_cost_s: float | None = None
    """The same for a save to the local tier only."""

    def save_cost(self) -> float:
        """What the model charges per persistent save: `cost_s`, else the stall."""
        return self.stall_s if self.cost_s is None else self.cost_s

    def local_save_cost(self) -> float | None:
        """What the model charges per local-only save: `local_cost_s`, else its stall."""
        return self.local_stall_s if self.local_cost_s is None else self.local_cost_s

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's checkpoint intervals, chosen from its calibration before it starts."""

    save_every: int
    """Persistent save interval, in steps."""
    local_every: int | None
    """Local-tier save interval, in steps (None: persistent only)."""
    mtbf_s: float
    duration_s: float

    @property
    def restart_every(self) -> int:
        """Steps between the saves a restart comes back from (the local ones, if any)."""
        return self.local_every or self.save_every

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def median(values: Sequence[float], default: float | None = None) -> float:
    """The median of `values`; `default` when empty (ValueError if no default)."""
    if values:
        return float(statistics.median(values))
    if default is None:
        raise ValueError("nothing measured")
    return default


def steps_for(seconds: float, step_s: float) -> int:
    """Whole steps nearest `seconds` of training, at least 1.

    >>> steps_for(2.6, 0.5), steps_for(0.1, 0.5)
    (5, 1)
    """
    return max(1, round(seconds / step_s))


def interval_s(cost_s: float, latency_s: float, mtbf_s: float) -> float:
    """Young's interval for a save that stalls `cost_s`, never below its commit latency.

    >>> interval_s(2.0, 1.0, 100.0), interval_s(0.01, 3.0, 100.0)
    (20.0, 3.0)
    """
    return max(young_daly_interval(cost_s, mtbf_s), latency_s)


def predict_ettr(tau_s: float, cost_s: float, latency_s: float, restart_s: float,
                 mtbf_s: float, start_s: float = 0.0, duration_s: float = math.inf) -> float:
    """Expected ETTR (see the module docstring).

    >>> round(predict_ettr(20.0, 0.5, 1.0, 10.0, 300.0), 3)  # first order: 0.905
    0.909
    >>> round(predict_ettr(20.0, 0.5, 1.0, 10.0, 300.0, start_s=15, duration_s=300), 3)
    0.863
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    lost = expected_loss_fraction(tau_s, cost_s, mtbf_s, restart_s + latency_s)
    return max(0.0, 1.0 - start_s / duration_s) * (1.0 - lost)


def plan(costs: Costs, mtbf_s: float, duration_s: float, *, local: bool) -> Plan:
    """The intervals of a run from its calibration's costs (see the module docstring)."""
    if not local:
        every = steps_for(interval_s(costs.save_cost(), costs.commit_s, mtbf_s), costs.step_s)
        return Plan(save_every=every, local_every=None, mtbf_s=mtbf_s, duration_s=duration_s)
    local_cost = costs.local_save_cost()
    if local_cost is None or costs.local_commit_s is None:
        raise ValueError("a multi-tier plan needs the local tier's measured costs")
    local_every = steps_for(interval_s(local_cost, costs.local_commit_s, mtbf_s),
                            costs.step_s)
    extra = max(0.0, costs.save_cost() - local_cost)
    rare = interval_s(extra, costs.commit_s, mtbf_s * PERSISTENT_MTBF_FACTOR)
    save_every = local_every * max(1, math.ceil(steps_for(rare, costs.step_s) / local_every))
    return Plan(save_every=save_every, local_every=local_every, mtbf_s=mtbf_s,
                duration_s=duration_s)


def predict(costs: Costs, plan: Plan) -> float:
    """The ETTR Daly's model expects of `plan`'s intervals at these costs: the interval
    ``tau`` is the restart interval in steps times the step time; with the local tier the
    stall per interval is the local one plus the persistent saves' extra, spread."""
    tau = plan.restart_every * costs.step_s
    if plan.local_every is None:
        cost, latency = costs.save_cost(), costs.commit_s
    else:
        local_cost = costs.local_save_cost()
        if local_cost is None or costs.local_commit_s is None:
            raise ValueError("a multi-tier prediction needs the local tier's measured costs")
        extra = max(0.0, costs.save_cost() - local_cost)
        cost = local_cost + extra * plan.local_every / plan.save_every
        latency = costs.local_commit_s
    return predict_ettr(tau, cost, latency, costs.restart_s, plan.mtbf_s, costs.start_s,
                        plan.duration_s)
