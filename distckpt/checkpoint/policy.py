"""When to save: save-decision policies from the cost of a save and how often the job fails.

Beside Orbax's fixed-interval and specific-step policies (which :class:`CheckpointOptions`
already exposes) this module has two policies that decide *how often* to save:

* :class:`YoungDalyPolicy` saves every ``tau`` seconds with ``tau = sqrt(2 * C * M)``
  (Young 1974), optionally with Daly's higher-order correction (Daly 2006). ``C`` is the
  cost of one save, measured (blocking stall + time until committed, from
  ``CheckpointService.save_stats``) or given; ``M`` is the mean time between failures,
  given or observed from the restarts recorded in the checkpoint directory
  (:class:`RestartLog`).
* :class:`LossAdaptivePolicy` is the adaptive schedule of the Flax/Artifex guides this
  project grew from: save more often while the loss is unstable (halve the interval, down
  to a floor) and less often while it is stable (double it, up to a ceiling).

:func:`expected_loss_fraction` gives the fraction of wall time a run loses to saving plus
re-doing the work lost at each failure, for an interval, a cost and an MTBF.

**Every host takes the same decision.** :meth:`AgreedPolicy.should_save` evaluates the
policy on the primary host only (its clock, its metrics) and hands the boolean to every
process (:func:`distckpt.multihost.coordinator.primary_decides`): hosts' clocks are skewed and their
local metrics may differ, and a save that only some hosts enter would leave the others
waiting at its barriers. Every process must call ``should_save`` with the same steps.
One decision costs one coordination-service round trip; ``decide_every=K`` takes it on
every K-th step only (other steps never save) when steps are shorter than that.

Clocks are injected (``clock=``, a callable returning seconds), so tests never sleep.

Using a policy in a training loop (every process runs the same loop)::

    policy = YoungDalyPolicy(mtbf_s=4 * 3600)
    with CheckpointService(directory, CheckpointOptions(save_interval_steps=None)) as ckpt:
        for step in range(start + 1, steps + 1):
            loss = train_step(...)
            policy.observe(ckpt.save_stats)          # feeds measured stall + commit
            if policy.should_save(step, metrics={"loss": float(loss)}):
                ckpt.save(step, state, force=True)

>>> round(young_daly_interval(cost_s=10.0, mtbf_s=3600.0), 1)
268.3
>>> round(expected_loss_fraction(interval_s=268.3, cost_s=10.0, mtbf_s=3600.0), 3)
0.073
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from etils import epath

from distckpt.checkpoint import committed
from distckpt.multihost import coordinator
from distckpt.state import jsonio

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
"""A clock: returns seconds (monotonic for intervals, wall-clock time for the restart log)."""

RESTART_LOG_FILE = "distckpt_restarts.json"
_RESTART_FORMAT = "distckpt-restarts"
_RESTART_VERSION = 1
_MAX_RUNS = 1000


# --------------------------------------------------------------------------- formulas
def young_daly_interval(cost_s: float, mtbf_s: float, *, higher_order: bool = False) -> float:
    """The checkpoint interval (seconds of work between saves) that minimises lost time.

    Young's first-order rule ``sqrt(2 * cost * mtbf)``; with ``higher_order=True`` Daly's
    correction ``sqrt(2CM) * (1 + sqrt(C/2M)/3 + (C/2M)/9) - C`` (equal to ``M`` once
    ``C >= 2M``), which matters only when the cost is not small against the MTBF.

    >>> young_daly_interval(2.0, 100.0)
    20.0
    >>> round(young_daly_interval(2.0, 100.0, higher_order=True), 3)
    18.689
    """
    if cost_s < 0 or mtbf_s <= 0:
        raise ValueError(f"need cost_s >= 0 and mtbf_s > 0, got {cost_s}, {mtbf_s}")
    first = math.sqrt(2.0 * cost_s * mtbf_s)
    if not higher_order:
        return first
    if cost_s >= 2.0 * mtbf_s:
        return mtbf_s
    r = cost_s / (2.0 * mtbf_s)
    return first * (1.0 + math.sqrt(r) / 3.0 + r / 9.0) - cost_s


def expected_loss_fraction(interval_s: float, cost_s: float, mtbf_s: float,
                           restart_s: float = 0.0) -> float:
    """Expected fraction of wall time lost to saving plus re-done work and restarts.

    Failures arrive at random (exponentially distributed, mean `mtbf_s`), also during a
    save or a restart. With `interval_s` seconds of work between saves that cost `cost_s`
    each and `restart_s` to come back after a failure, the expected wall time per unit of
    work is ``M * e^(R/M) * (e^((tau + C)/M) - 1) / tau`` (Daly 2006, eq. 13); the
    fraction lost is one minus its inverse. Without failures it is ``C / (tau + C)``.

    >>> round(expected_loss_fraction(100.0, 1.0, 1e12), 4)  # no failures: C / (tau + C)
    0.0099
    """
    if interval_s <= 0 or cost_s < 0 or mtbf_s <= 0 or restart_s < 0:
        raise ValueError("need interval_s > 0, cost_s >= 0, mtbf_s > 0, restart_s >= 0; got "
                         f"{interval_s}, {cost_s}, {mtbf_s}, {restart_s}")
    exponent = (interval_s + cost_s) / mtbf_s
    if exponent > 700 or restart_s / mtbf_s > 700:  # e^700 ~ 1e304: nothing gets done
        return 1.0
    growth = math.expm1(exponent)  # e^x - 1, exact for small x
    wall_per_work = mtbf_s * math.exp(restart_s / mtbf_s) * growth / interval_s
    return max(0.0, 1.0 - 1.0 / wall_per_work)


# --------------------------------------------------------------------------- restart log
class RestartLog:
    """Starts and clean stops of a job, kept as JSON in its checkpoint directory.

    Every run of the job calls :meth:`record_start` once (after restoring) and, when it
    ends normally, :meth:`record_stop`. A run that started and never recorded a stop
    before the next run started ended in a failure (crash, kill, preemption without a
    clean stop). The observed MTBF is the runs' total up time over the failures.

    The file (``distckpt_restarts.json``)::

        {"format": "distckpt-restarts", "version": 1,
         "runs": [{"start": 1717000000.0, "stop": null, "resumed_step": null,
                   "processes": 4}, ...]}

    ``start``/``stop`` are the primary host's wall-clock seconds. Only the primary host
    reads and writes the file; every process calls the methods and gets the primary's
    answer (shared filesystems are not instantly consistent between hosts).
    """

    def __init__(self, directory: str | epath.PathLike, *, wall_clock: Clock = time.time,
                 timeout_s: float = coordinator.DEFAULT_TIMEOUT_S):
        self.path = epath.Path(directory) / RESTART_LOG_FILE
        self.wall_clock = wall_clock
        self.timeout_s = timeout_s
        self._calls = 0

    def _decide(self, op: str, fn: Callable[[], Any]) -> Any:
        # Every process calls the same methods in the same order, so this count agrees
        # across processes; it keeps each decision's name unique, because a name reused
        # at once can be answered by the previous value (coordinator.primary_decides
        # deletes it only after its final barrier).
        self._calls += 1
        return coordinator.primary_decides(f"restart-log:{op}:{self._calls}", fn,
                                           self.timeout_s)

    # -- primary-only file access
    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = jsonio.read_limited(self.path)
        if not isinstance(data, dict) or data.get("format") != _RESTART_FORMAT:
            raise ValueError(f"{self.path} is not a distckpt restart log; move it away")
        if int(data.get("version", 0)) > _RESTART_VERSION:
            raise ValueError(f"{self.path} was written by a newer distckpt (version "
                             f"{data['version']}); upgrade distckpt")
        return list(data.get("runs", []))

    def _write(self, runs: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        value = {"format": _RESTART_FORMAT, "version": _RESTART_VERSION,
                 "runs": runs[-_MAX_RUNS:]}
        committed.write_durable(self.path, value)  # temp file, fsync, overwriting rename

    # -- collective API
    def record_start(self, resumed_step: int | None = None) -> int:
        """Record that a run starts now; returns how many failures the log has seen."""
        import jax

        def write() -> int:
            runs = self._read()
            runs.append({"start": self.wall_clock(), "stop": None,
                         "resumed_step": resumed_step, "processes": jax.process_count()})
            self._write(runs)
            return failures_of(runs)

        return self._decide("start", write)

    def record_stop(self) -> None:
        """Record that the current run ends normally (it was not a failure)."""

        def write() -> bool:
            runs = self._read()
            if runs and runs[-1]["stop"] is None:
                runs[-1]["stop"] = self.wall_clock()
                self._write(runs)
            return True

        self._decide("stop", write)

    def runs(self) -> list[dict[str, Any]]:
        """The recorded runs, oldest first (the primary host's reading)."""
        return self._decide("read", self._read)

    def observed_mtbf_s(self) -> float | None:
        """Up time over failures, as of now; None while no failure was recorded."""

        def decide() -> float | None:
            return mtbf_of(self._read(), self.wall_clock())

        return self._decide("mtbf", decide)


def failures_of(runs: Sequence[Mapping[str, Any]]) -> int:
    """Runs that ended without a clean stop and were followed by another run."""
    return sum(1 for run in runs[:-1] if run.get("stop") is None)


def mtbf_of(runs: Sequence[Mapping[str, Any]], now: float) -> float | None:
    """Mean up time between failures of the recorded runs (None without failures).

    A run is up from its start until its stop, or else until the next run's start (the
    failure went unnoticed until then, so that time counts as up time: a conservative,
    i.e. shorter, MTBF would need the failure's moment, which nobody recorded), or
    until `now` for the last run.

    >>> mtbf_of([{"start": 0, "stop": None}, {"start": 100, "stop": None}], now=300)
    300.0
    """
    failures = failures_of(runs)
    if failures == 0:
        return None
    up = 0.0
    for i, run in enumerate(runs):
        end = run.get("stop")
        if end is None:
            end = runs[i + 1]["start"] if i + 1 < len(runs) else now
        up += max(0.0, float(end) - float(run["start"]))
    return up / failures


# --------------------------------------------------------------------------- policies
class SaveCost(Protocol):
    """What a policy reads of one save (``CheckpointService.save_stats`` items)."""

    step: int
    stall_s: float
    """How long save() blocked the caller."""
    commit_s: float | None
    """From the start of save() until committed (None while in flight)."""


@runtime_checkable
class SavePolicy(Protocol):
    """What ``CheckpointOptions(save_policy=...)`` needs: CheckpointService calls
    ``observe(self.save_stats)`` then ``should_save(step, metrics=...)`` once per step.
    :class:`AgreedPolicy` (YoungDalyPolicy, LossAdaptivePolicy) implements it."""

    def should_save(self, step: int, *, metrics: Mapping[str, float] | None = None) -> bool:
        """Whether to save `step`; the same answer on every process (and every process
        calls it with the same steps)."""
        ...

    def observe(self, stats: Iterable[SaveCost]) -> None:
        """The saves so far (each step may be seen again; count it once)."""
        ...


class AgreedPolicy(abc.ABC):
    """Base of the policies here: a local :meth:`decide`, agreed on by all processes.

    Subclasses are dataclasses with the fields ``clock``, ``decide_every``, ``timeout_s``
    and ``name`` (see :class:`YoungDalyPolicy`) and implement :meth:`decide`.
    """

    clock: Clock
    decide_every: int
    timeout_s: float
    name: str

    @abc.abstractmethod
    def decide(self, step: int, now: float, metrics: Mapping[str, float] | None) -> bool:
        """This process's decision (called on the primary host only by should_save)."""

    def should_save(self, step: int, now: float | None = None,
                    metrics: Mapping[str, float] | None = None) -> bool:
        """Whether to save `step`, decided by the primary host and the same on all hosts.

        `now` defaults to ``clock()``; only the primary host's `now` and `metrics` are used.
        """
        if step % self.decide_every:
            return False

        def decide() -> bool:
            t = self.clock() if now is None else now
            return bool(self.decide(step, t, metrics))

        return bool(coordinator.primary_decides(f"save-policy:{self.name}:step={step}", decide,
                                                self.timeout_s))

    def observe_save(self, step: int, stall_s: float, commit_s: float | None) -> None:  # noqa: B027
        """Default: the policy does not use save costs."""

    def observe(self, stats: Iterable[SaveCost]) -> None:
        """Feed ``CheckpointService.save_stats`` (objects with step, stall_s, commit_s).

        Saves still in flight (``commit_s is None``) are taken when a later call sees them
        committed; each step is taken once.
        """
        seen = self.__dict__.setdefault("_observed_steps", set())
        for s in stats:
            if s.commit_s is not None and s.step not in seen:
                seen.add(s.step)
                self.observe_save(s.step, s.stall_s, s.commit_s)

    def _validate_common(self) -> None:
        if self.decide_every < 1:
            raise ValueError(f"decide_every must be >= 1, got {self.decide_every}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty string without '/', got {self.name!r}")


@dataclasses.dataclass
class YoungDalyPolicy(AgreedPolicy):
    """Save every ``sqrt(2 * cost * MTBF)`` seconds (Young/Daly).

    The cost is the median stall + commit time of the last `cost_window` observed saves
    (:meth:`observe` / :meth:`observe_save`), else `cost_s`. With no cost known the first
    decision saves (to measure one) and later ones do not save until a cost is observed.
    The interval counts from the first decision (the start of the run) and from each save.
    """

    mtbf_s: float
    """Mean time between failures of the whole job, in seconds (see from_restart_log)."""
    cost_s: float | None = None
    """Cost of one save if known in advance (e.g. from `distckpt bench`); observed saves
    replace it."""
    min_interval_s: float = 0.0
    """Never save more often than this."""
    max_interval_s: float = math.inf
    """Never go longer than this without saving."""
    higher_order: bool = False
    """Use Daly's higher-order interval instead of Young's first-order one."""
    cost_window: int = 5
    """Observed saves the cost estimate is the median of."""
    clock: Clock = time.monotonic
    """Seconds; only differences matter. Injected by tests."""
    decide_every: int = 1
    """Take the (agreed) decision on every K-th step only; other steps never save."""
    timeout_s: float = coordinator.DEFAULT_TIMEOUT_S
    """Limit for the agreement on each decision."""
    name: str = "young-daly"
    """Names the agreement keys; two policies used in one job need different names."""

    def __post_init__(self):
        self._validate_common()
        if self.mtbf_s <= 0:
            raise ValueError(f"mtbf_s must be positive, got {self.mtbf_s}")
        if self.cost_s is not None and self.cost_s < 0:
            raise ValueError(f"cost_s must be >= 0, got {self.cost_s}")
        if not 0 <= self.min_interval_s <= self.max_interval_s:
            raise ValueError("need 0 <= min_interval_s <= max_interval_s, got "
                             f"{self.min_interval_s}, {self.max_interval_s}")
        if self.cost_window < 1:
            raise ValueError(f"cost_window must be >= 1, got {self.cost_window}")
        self._costs: collections.deque[float] = collections.deque(maxlen=self.cost_window)
        self._last: float | None = None
        self._probed = False
        self._warned = False

    @classmethod
    def from_restart_log(cls, log: RestartLog, *, fallback_mtbf_s: float,
                         **kwargs: Any) -> YoungDalyPolicy:
        """A policy whose MTBF is the one `log` observed, or `fallback_mtbf_s` without
        recorded failures (every process calls this; the primary reads the log)."""
        observed = log.observed_mtbf_s()
        return cls(mtbf_s=observed if observed is not None else fallback_mtbf_s, **kwargs)

    def observe_save(self, step: int, stall_s: float, commit_s: float | None) -> None:
        # SaveStats.commit_s counts from the start of save() until the step is committed,
        # so it already holds the stall: the save's cost (stall + background commit) is
        # commit_s. An asynchronous save costs the run only its stall, but the step is not
        # safe until committed, so the commit counts too (Young/Daly's conservative cost).
        cost = stall_s if commit_s is None else max(stall_s, commit_s)
        self._costs.append(max(0.0, cost))

    @property
    def cost_estimate_s(self) -> float | None:
        """The cost the interval is computed from (None while unknown)."""
        if self._costs:
            return statistics.median(self._costs)
        return self.cost_s

    def interval_s(self) -> float | None:
        """The current interval in seconds (None while the cost is unknown)."""
        cost = self.cost_estimate_s
        if cost is None:
            return None
        tau = young_daly_interval(cost, self.mtbf_s, higher_order=self.higher_order)
        return min(self.max_interval_s, max(self.min_interval_s, tau))

    def decide(self, step: int, now: float, metrics: Mapping[str, float] | None) -> bool:
        interval = self.interval_s()
        if interval is None:
            if not self._probed:
                self._probed, self._last = True, now
                return True  # save once to measure what a save costs
            if not self._warned:
                self._warned = True
                logger.warning("YoungDalyPolicy %r: no save cost observed yet, so no save is "
                               "scheduled; call policy.observe(service.save_stats) each step",
                               self.name)
            return False
        if self._last is None:
            self._last = now
            return False
        if now - self._last >= interval:
            self._last = now
            return True
        return False


@dataclasses.dataclass
class LossAdaptivePolicy(AgreedPolicy):
    """Save more often while the loss is unstable, less often while it is stable.

    The seeds' schedule, made deterministic: the loss's standard deviation over the last
    `window` steps above `threshold` means unstable. A save is due when `interval` steps
    have passed since the last one, or, while unstable, `min_interval` steps. At each save
    the interval halves (unstable, floor `min_interval`) or doubles (stable, ceiling
    `max_interval`). A non-finite loss never triggers a save (that state is not worth
    keeping) and counts as unstable. Steps only: no clock.
    """

    base_interval: int = 1000
    """Interval (steps) to start with."""
    min_interval: int = 500
    """Floor of the interval while the loss is unstable."""
    max_interval: int = 5000
    """Ceiling of the interval while the loss is stable."""
    window: int = 10
    """Losses the stability test looks at (no verdict until that many were seen)."""
    threshold: float = 0.1
    """Standard deviation of the loss above which it is unstable (absolute, as the seeds;
    relative to the window's mean |loss| with relative=True)."""
    relative: bool = False
    """Compare std / mean(|loss|) with the threshold instead of std."""
    metric: str = "loss"
    """Key of the metrics passed to should_save."""
    clock: Clock = time.monotonic
    """Unused by the decision; kept for the common interface."""
    decide_every: int = 1
    """Take the (agreed) decision on every K-th step only; other steps never save."""
    timeout_s: float = coordinator.DEFAULT_TIMEOUT_S
    """Limit for the agreement on each decision."""
    name: str = "loss-adaptive"
    """Names the agreement keys; two policies used in one job need different names."""

    def __post_init__(self):
        self._validate_common()
        if not 1 <= self.min_interval <= self.base_interval <= self.max_interval:
            raise ValueError("need 1 <= min_interval <= base_interval <= max_interval, got "
                             f"{self.min_interval}, {self.base_interval}, {self.max_interval}")
        if self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        self.interval = self.base_interval
        self._losses: collections.deque[float] = collections.deque(maxlen=self.window)
        self._last_step: int | None = None

    def unstable(self) -> bool:
        """Whether the last `window` losses vary by more than the threshold."""
        if any(not math.isfinite(x) for x in self._losses):
            return True
        if len(self._losses) < self.window:
            return False
        spread = statistics.pstdev(self._losses)
        if self.relative:
            scale = statistics.fmean(abs(x) for x in self._losses)
            spread = spread / scale if scale > 0 else math.inf
        return spread > self.threshold

    def decide(self, step: int, now: float, metrics: Mapping[str, float] | None) -> bool:
        if metrics is None or self.metric not in metrics:
            raise KeyError(f"LossAdaptivePolicy needs metrics[{self.metric!r}] at every step; "
                           f"got {sorted(metrics or {})}")
        loss = float(metrics[self.metric])
        self._losses.append(loss)
        if self._last_step is None:
            self._last_step = step  # the run (or resumed run) starts counting here
        if not math.isfinite(loss):
            return False
        unstable = self.unstable()
        since = step - self._last_step
        if since >= self.interval or (unstable and since >= self.min_interval):
            self.interval = (max(self.min_interval, self.interval // 2) if unstable
                             else min(self.max_interval, self.interval * 2))
            self._last_step = step
            return True
        return False


# --------------------------------------------------------------------------- Orbax adapter
@dataclasses.dataclass
class OrbaxSaveDecision:
    """Use a distckpt policy where Orbax expects a ``SaveDecisionPolicy``.

    ``CheckpointManagerOptions(save_decision_policy=AnySavePolicy([..., OrbaxSaveDecision(p)]))``.
    The policy's own clock is used (Orbax's step time is a per-host wall clock). Orbax
    0.12.8's ``CheckpointManager.should_save`` passes no metrics for the current step, so
    only policies that need none (:class:`YoungDalyPolicy`) work this way; drive
    :class:`LossAdaptivePolicy` from the loop (``save(..., force=True)``).
    """

    policy: SavePolicy

    def should_save(self, step, previous_steps, *, context) -> bool:
        del previous_steps, context
        return self.policy.should_save(int(step.step), metrics=step.metrics)
