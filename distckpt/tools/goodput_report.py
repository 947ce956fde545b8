"""What a ``distckpt goodput`` run adds up to, from its attempts' progress lines.

An *attempt* is one launch of the job, from the launch until the supervisor killed a host,
stopped it at the deadline, or it exited. Its events are the primary host's
``TRAIN {json}`` lines (``distckpt train --progress``). Times are ``time.time()`` on this
one machine, shared by every process; events after the deadline are left out.

**Definitions**

* *Step time*: the run's own failure-free, save-free step: the median time between two
  consecutive steps of one attempt where the second did not save.
* *Productive steps*: the step the job had reached at the deadline (the last step of the
  last attempt; if that attempt had not resumed yet, the newest step known restorable:
  reported committed, written to the local tier, or restored; a lower bound) less the
  step the run started from. Work re-done after a failure counts
  once.
* *ETTR* (effective training time ratio): productive steps x the step time, over the
  duration. Save stalls, restarts, restores, loading programs and re-done work lower it;
  a machine that trains slower throughout does not.
* *Steps lost* (per failure): the last step the killed attempt reached less the step the
  next attempt that trained resumed from (0 for an attempt killed before it resumed: it
  had not trained past the checkpoint it would have restored).
* *Recovery time* (per failure): from the relaunch to the first training step after the
  restore; a failure whose next attempt was killed before that has none.
* *Failures*: the kills the supervisor issued that the job died of (the report also
  counts the kills issued; they must be equal).
* *Measured costs* (:func:`measured_costs`, for the predicted ETTR): the step time; the
  median stall of each kind of save and its latency (until committed; a local save's
  until its own and peer copies were written), the first save of each kind in an attempt
  left out (it compiles the checksums); the restart, the median over failures of the kill
  until the next attempt's first step, less one step; the start, the first attempt's
  launch until its first step, less one step. What the run did not measure is taken from
  the calibration.
* *Save cost* (what the model charges per save): the median, over the same saves, of
  the save's stall plus how much longer than that many step times the steps after it,
  up to the next save, took together (never less than the stall); the step time here is
  the median of the interval's second half when it has :data:`BASELINE_STEPS` steps or
  more, else the overall one. A save's background work (writing, digests, the peer
  copy) shares the host with training; on the 2-core development machine it slowed the
  next steps by several times the stall. Only saves followed by another save in their
  attempt count (the last one's steps-after were cut short by a kill or the end),
  unless there is no other.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from distckpt.tools import goodput_model as model


@dataclasses.dataclass
class Attempt:
    """One launch of the job: from its launch until it was killed, stopped or exited."""

    launched: float
    ended: float = 0.0
    returncode: int | None = None
    killed: tuple[float, int] | None = None
    """(time, host) of the kill the supervisor issued in this attempt."""
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def steps(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "step"]

    def resumed(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == "resumed"), None)

    def start_step(self) -> int | None:
        """The step this attempt started training from: the one it restored, 0 for a
        fresh start; None if it was stopped before either."""
        resumed = self.resumed()
        if resumed is not None:
            return int(resumed["step"])
        return 0 if self.steps() else None

    def last_step(self) -> int | None:
        """The newest step this attempt reached (or resumed from); None before either."""
        steps = self.steps()
        if steps:
            return int(steps[-1]["step"])
        resumed = self.resumed()
        return None if resumed is None else int(resumed["step"])


BASELINE_STEPS = 3
"""Fewest steps in the second half of a save's interval for their median to be the
baseline its cost is measured against (see :func:`step_costs`)."""


def step_costs(attempts: Sequence[Attempt], save_every: int, local_every: int | None
               ) -> dict[str, float | None]:
    """step_s, stall_s, commit_s, local_stall_s, local_commit_s, cost_s, local_cost_s
    measured in `attempts` (None where nothing was measured; see the definitions)."""
    intervals, both, only_local = [], [], []
    after: dict[int, list[float]] = {}  # id of a save event -> the steps' times up to the next
    whole: set[int] = set()  # saves followed by another save in their attempt
    commits: dict[int, float] = {}
    written: dict[int, float] = {}
    for a in attempts:
        steps = a.steps()
        since_save: list[float] | None = None  # the steps after the last save, if any
        for p, b in itertools.pairwise(steps):
            if p["saved"]:
                since_save = after.setdefault(id(p), [])
            if b["saved"]:
                since_save = None
                continue
            intervals.append(b["t"] - p["t"] - b["save_s"])
            if since_save is not None:
                since_save.append(intervals[-1])
        saves = [e for e in steps if e["saved"]]
        whole.update(id(e) for e in saves[:-1])  # the last one's steps-after are cut short
        persistent = [e for e in saves if e["step"] % save_every == 0]
        both += persistent[1:]  # the first save of a process compiles its checksums
        only_local += [e for e in saves if e["step"] % save_every][1:]
        for e in steps:
            commits.update((int(s), c) for s, c in e["committed"])
            written.update((int(s), w) for s, w in e.get("local_written", []))

    def med(values: list[float]) -> float | None:
        return model.median(values) if values else None

    step_s = med(intervals)

    def cost(e: dict[str, Any]) -> float:
        assert step_s is not None
        # Signed: a step's jitter below the step time offsets one above it, as it does in
        # the wall time. Counting only the excesses charged every save for the noise of
        # each step after it, the more the longer the interval.
        steps_after = after.get(id(e), [])
        base = baseline(steps_after)
        return e["save_s"] + max(0.0, sum(t - base for t in steps_after))

    def baseline(steps_after: list[float]) -> float:
        # What these steps take without the save: the median of the interval's second
        # half (the save's background work is over by then), or the overall step time
        # if that half is shorter than BASELINE_STEPS. The overall median drifts: in a
        # calibration job the early steps run slower (warm-up), so later steps came out
        # "faster than usual" and every save there was charged too little (0.15 s for a
        # save the run then measured at 0.42 s).
        tail = steps_after[len(steps_after) // 2:]
        assert step_s is not None
        return model.median(tail) if len(tail) >= BASELINE_STEPS else step_s

    def costs(saves: list[dict[str, Any]]) -> float | None:
        # A save the end of its attempt (a kill, the last step) cut short would be charged
        # its stall alone; it counts only when no whole interval was measured.
        if step_s is None:
            return None
        return med([cost(e) for e in ([e for e in saves if id(e) in whole] or saves)])

    out = {"step_s": step_s, "stall_s": med([e["save_s"] for e in both]),
           "commit_s": med([commits[e["step"]] for e in both if e["step"] in commits]),
           "local_stall_s": None, "local_commit_s": None,
           "cost_s": costs(both), "local_cost_s": None}
    if local_every is not None:
        out["local_stall_s"] = med([e["save_s"] for e in only_local])
        out["local_commit_s"] = med([written[e["step"]] for e in only_local
                                     if e["step"] in written])
        out["local_cost_s"] = costs(only_local)
    return out


def measured_costs(attempts: Sequence[Attempt], plan: model.Plan, calibrated: model.Costs
                   ) -> model.Costs:
    """What the run's steps, saves and restarts cost (see the definitions)."""
    got = step_costs(attempts, plan.save_every, plan.local_every)
    step_s = got["step_s"] or calibrated.step_s
    restarts = []
    for a, b in itertools.pairwise(attempts):
        if a.killed is not None and b.steps():
            restarts.append(b.steps()[0]["t"] - a.killed[0] - step_s)
    first = attempts[0].steps()[:1] if attempts else []
    return model.Costs(
        step_s=step_s,
        start_s=(max(0.0, first[0]["t"] - attempts[0].launched - step_s) if first
                 else calibrated.start_s),
        restart_s=max(0.0, model.median(restarts)) if restarts else calibrated.restart_s,
        stall_s=_or(got["stall_s"], calibrated.stall_s),
        commit_s=_or(got["commit_s"], calibrated.commit_s),
        local_stall_s=_or(got["local_stall_s"], calibrated.local_stall_s),
        local_commit_s=_or(got["local_commit_s"], calibrated.local_commit_s),
        cost_s=_or(got["cost_s"], calibrated.cost_s),
        local_cost_s=_or(got["local_cost_s"], calibrated.local_cost_s))


def _or(value: float | None, default: float | None) -> Any:
    return default if value is None else value


@dataclasses.dataclass
class RunReport:
    """One configuration's run; the first six fields are the JSON report's schema."""

    tiers: list[str]
    ettr: float
    ettr_predicted: float
    """Daly's model with the plan's intervals and the costs measured in the run."""
    failures: int
    steps_lost: int
    recovery_seconds_median: float | None
    name: str = ""
    ettr_planned: float = 0.0
    """Daly's model with the plan's intervals and the calibration's costs."""
    kills_issued: int = 0
    start_step: int = 0
    """The step the run started from (the calibration's checkpoint)."""
    final_step: int = 0
    wall_seconds: float = 0.0
    failure_log: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Per failure: at (s from start), host, step, steps_lost, recovery_s, restored_tier."""
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The costs the calibration measured (goodput_model.Costs)."""
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The costs measured in the run."""
    plan: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: list[list[float]] = dataclasses.field(default_factory=list)
    """[seconds from start, step] of every step and restore event, in order."""
    restored_tiers: dict[str, int] = dataclasses.field(default_factory=dict)
    """How many restores each tier served (the run's first start included)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(name: str, tiers: Sequence[str], attempts: Sequence[Attempt], t0: float,
              duration_s: float, calibrated: model.Costs, plan: model.Plan) -> RunReport:
    """The report of one run from its attempts (see the definitions)."""
    deadline = t0 + duration_s
    for a in attempts:  # a line printed after the deadline was not training time
        a.events = [e for e in a.events if e["t"] <= deadline]
    # Attempts killed before they resumed would have resumed from the same step.
    first = next((a.start_step() for a in attempts if a.start_step() is not None), None)
    final = _final_step(attempts, first or 0)
    begin = final if first is None else first
    failures, lost, recoveries = [], 0, []
    for i, a in enumerate(attempts):
        if a.killed is None:
            continue
        after = attempts[i + 1] if i + 1 < len(attempts) else None
        # The next attempt that got going: the drop from here to its start is this
        # failure's (attempts in between were killed before they started training).
        going = next((b for b in attempts[i + 1:] if b.start_step() is not None), None)
        start = final if going is None else going.start_step()
        reached = a.last_step()
        this_lost = 0 if reached is None or start is None else max(0, reached - start)
        trained = after.steps()[0] if after is not None and after.steps() else None
        recovery = None if trained is None or after is None else trained["t"] - after.launched
        lost += this_lost
        if recovery is not None:
            recoveries.append(recovery)
        resumed = None if after is None else after.resumed()
        failures.append({"at": a.killed[0] - t0, "host": a.killed[1], "step": reached,
                         "steps_lost": this_lost, "recovery_s": recovery,
                         "restored_tier": None if resumed is None else resumed.get("tier")})
    restored: dict[str, int] = {}
    progress: list[list[float]] = []
    for a in attempts:
        for e in a.events:
            if e.get("event") == "resumed":
                restored[e.get("tier", "?")] = restored.get(e.get("tier", "?"), 0) + 1
            if e.get("event") in ("step", "resumed"):
                progress.append([round(e["t"] - t0, 3), int(e["step"])])
    costs = measured_costs(attempts, plan, calibrated)
    return RunReport(
        tiers=list(tiers), ettr=(final - begin) * costs.step_s / duration_s,
        ettr_predicted=model.predict(costs, plan), failures=len(failures), steps_lost=lost,
        recovery_seconds_median=model.median(recoveries) if recoveries else None, name=name,
        ettr_planned=model.predict(calibrated, plan),
        kills_issued=sum(a.killed is not None for a in attempts), start_step=begin,
        final_step=final, wall_seconds=(attempts[-1].ended - t0) if attempts else 0.0,
        failure_log=failures, calibration=calibrated.to_json(), measured=costs.to_json(),
        plan=plan.to_json(), progress=progress, restored_tiers=restored)


def _final_step(attempts: Sequence[Attempt], begin: int) -> int:
    """The step the job had reached at the deadline (see the definitions)."""
    last = attempts[-1].last_step() if attempts else None
    if last is not None:
        return last
    # Steps known to be restorable: committed, written to the local tier, or restored.
    durable = [int(s) for a in attempts for e in a.steps()
               for s, _ in [*e["committed"], *e.get("local_written", [])]]
    durable += [s for a in attempts if (s := a.start_step()) is not None]
    return max([begin, *durable])
