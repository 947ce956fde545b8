"""Save-decision policies: Young/Daly, the loss-adaptive schedule, the restart log, agreement.

Clocks are injected; nothing sleeps. The agreement test runs real processes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from distckpt.checkpoint import policy
from distckpt.checkpoint.policy import (
    LossAdaptivePolicy,
    OrbaxSaveDecision,
    RestartLog,
    YoungDalyPolicy,
    expected_loss_fraction,
    young_daly_interval,
)

POLICY_WORKER = str(Path(__file__).parent / "policy_worker.py")


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------- formulas
@pytest.mark.fast
def test_young_interval_minimises_the_expected_loss():
    cost, mtbf = 30.0, 6 * 3600.0
    tau = young_daly_interval(cost, mtbf)
    assert tau == pytest.approx(math.sqrt(2 * cost * mtbf))
    best = expected_loss_fraction(tau, cost, mtbf)
    for other in (tau / 4, tau / 2, tau * 2, tau * 4):
        assert expected_loss_fraction(other, cost, mtbf) > best
    # Daly's refinement is the exact optimum to higher order: no worse than Young's.
    daly = young_daly_interval(cost, mtbf, higher_order=True)
    assert expected_loss_fraction(daly, cost, mtbf) <= best + 1e-12


@pytest.mark.fast
def test_expected_loss_limits():
    # No failures: only the saves cost, C / (tau + C).
    assert expected_loss_fraction(99.0, 1.0, 1e15) == pytest.approx(0.01, rel=1e-6)
    # First order: C/tau + tau/(2M) for small C/tau and tau/M.
    tau, cost, mtbf = 100.0, 0.1, 1e6
    assert expected_loss_fraction(tau, cost, mtbf) == pytest.approx(
        cost / tau + tau / (2 * mtbf), rel=0.02)
    # Restarts cost time too; an absurd interval loses (nearly) everything.
    assert expected_loss_fraction(tau, cost, 1e4, restart_s=600) > \
        expected_loss_fraction(tau, cost, 1e4)
    assert expected_loss_fraction(1e7, 1.0, 10.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        expected_loss_fraction(0.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        young_daly_interval(1.0, 0.0)


# --------------------------------------------------------------------------- Young/Daly
@pytest.mark.fast
def test_young_daly_policy_with_an_injected_clock():
    clock = FakeClock(1000.0)
    p = YoungDalyPolicy(mtbf_s=3600.0, clock=clock)
    # No cost known: the first decision saves, to measure one; then none until observed.
    assert p.should_save(1) is True
    clock.t += 10_000
    assert p.should_save(2) is False
    # A committed save of 2 s (commit_s counts from the start of save(): stall included).
    p.observe([SimpleNamespace(step=1, stall_s=0.5, commit_s=2.0),
               SimpleNamespace(step=2, stall_s=0.4, commit_s=None)])  # in flight: ignored
    assert p.cost_estimate_s == 2.0
    assert p.interval_s() == pytest.approx(120.0)  # sqrt(2 * 2 * 3600)
    saved = []
    for step in range(3, 40):
        clock.t += 10.0
        if p.should_save(step):
            saved.append(step)
    # The last save (step 1) is long past: save now, then every 120 s = 12 steps.
    assert saved == [3, 15, 27, 39]
    # The same step observed again is not counted twice; a later commit of step 2 is.
    p.observe([SimpleNamespace(step=1, stall_s=0.5, commit_s=2.0),
               SimpleNamespace(step=2, stall_s=0.4, commit_s=8.0)])
    assert p.cost_estimate_s == 5.0  # median of 2 and 8


@pytest.mark.fast
def test_young_daly_bounds_and_given_cost():
    clock = FakeClock()
    p = YoungDalyPolicy(mtbf_s=1e9, cost_s=1.0, max_interval_s=50.0, clock=clock)
    assert p.interval_s() == 50.0
    assert p.should_save(1) is False  # the run starts now
    clock.t = 49.0
    assert p.should_save(2) is False
    clock.t = 50.0
    assert p.should_save(3) is True
    q = YoungDalyPolicy(mtbf_s=1.0, cost_s=1.0, min_interval_s=30.0, clock=clock)
    assert q.interval_s() == 30.0
    # decide_every: other steps never save and need no agreement.
    r = YoungDalyPolicy(mtbf_s=1.0, cost_s=0.0, decide_every=5, clock=clock)
    assert [r.should_save(s, now=float(s)) for s in range(1, 11)] == \
        [False] * 4 + [False] + [False] * 4 + [True]
    for bad in (dict(mtbf_s=0), dict(mtbf_s=1, cost_s=-1), dict(mtbf_s=1, decide_every=0),
                dict(mtbf_s=1, min_interval_s=5, max_interval_s=1), dict(mtbf_s=1, name="a/b")):
        with pytest.raises(ValueError):
            YoungDalyPolicy(**bad)


# --------------------------------------------------------------------------- adaptive
@pytest.mark.fast
def test_loss_adaptive_doubles_while_stable_and_halves_while_unstable():
    p = LossAdaptivePolicy(base_interval=4, min_interval=2, max_interval=16, window=3,
                           threshold=0.1)
    saved = [s for s in range(1, 40) if p.should_save(s, metrics={"loss": 1.0})]
    # Stable: 4 steps after the start, then 8, then 16, 16 (ceiling).
    assert saved == [5, 13, 29]
    assert p.interval == 16
    q = LossAdaptivePolicy(base_interval=8, min_interval=2, max_interval=16, window=3,
                           threshold=0.1)
    losses = [1.0, 1.0, 1.0, 1.0, 3.0, 0.5, 2.5, 0.7, 2.0, 0.4, 1.9, 0.3]
    saved = [s for s, loss in enumerate(losses, start=1)
             if q.should_save(s, metrics={"loss": loss})]
    # The spike at step 5 makes the loss unstable: a save is due once min_interval steps
    # have passed (4 since step 1), and each save halves the interval down to the floor.
    assert saved == [5, 7, 9, 11]
    assert q.interval == 2
    assert q.unstable()


@pytest.mark.fast
def test_loss_adaptive_never_saves_a_nan_and_needs_the_metric():
    p = LossAdaptivePolicy(base_interval=1, min_interval=1, max_interval=4, window=2)
    assert p.should_save(1, metrics={"loss": 1.0}) is False  # counting starts here
    assert p.should_save(2, metrics={"loss": float("nan")}) is False
    assert p.unstable()
    with pytest.raises(KeyError, match="metrics\\['loss'\\]"):
        p.should_save(3, metrics={"acc": 1.0})
    with pytest.raises(ValueError):
        LossAdaptivePolicy(base_interval=1, min_interval=2, max_interval=4)


# --------------------------------------------------------------------------- restart log
@pytest.mark.fast
def test_restart_log_counts_unclean_restarts(tmp_path):
    wall = FakeClock(1_000.0)
    log = RestartLog(tmp_path, wall_clock=wall)
    assert log.observed_mtbf_s() is None
    assert log.record_start() == 0
    wall.t = 1_500.0
    assert log.record_start(resumed_step=40) == 1  # the first run died: one failure
    wall.t = 2_000.0
    log.record_stop()                               # this one ends cleanly
    wall.t = 2_100.0
    assert log.record_start(resumed_step=90) == 1   # a clean restart is no failure
    wall.t = 2_400.0
    # Up time 500 + 500 + 300 over one failure.
    assert log.observed_mtbf_s() == pytest.approx(1_300.0)
    data = json.loads((tmp_path / policy.RESTART_LOG_FILE).read_text())
    assert data["format"] == "distckpt-restarts" and data["version"] == 1
    assert [r["resumed_step"] for r in data["runs"]] == [None, 40, 90]
    assert [r["stop"] for r in data["runs"]] == [None, 2000.0, None]
    p = YoungDalyPolicy.from_restart_log(log, fallback_mtbf_s=99.0, cost_s=1.0)
    assert p.mtbf_s == pytest.approx(1_300.0)
    fresh = YoungDalyPolicy.from_restart_log(RestartLog(tmp_path / "new"),
                                             fallback_mtbf_s=99.0, cost_s=1.0)
    assert fresh.mtbf_s == 99.0


@pytest.mark.fast
def test_restart_log_refuses_a_foreign_file(tmp_path):
    (tmp_path / policy.RESTART_LOG_FILE).write_text('{"runs": []}')
    with pytest.raises(ValueError, match="not a distckpt restart log"):
        RestartLog(tmp_path).record_start()


# --------------------------------------------------------------------------- Orbax
@pytest.mark.fast
def test_orbax_adapter_drives_a_real_checkpoint_manager(tmp_path):
    import numpy as np
    import orbax.checkpoint as ocp

    clock = FakeClock()
    p = YoungDalyPolicy(mtbf_s=100.0, cost_s=0.5, clock=clock)  # every 10 s
    assert isinstance(OrbaxSaveDecision(p), ocp.checkpoint_managers.SaveDecisionPolicy)
    options = ocp.CheckpointManagerOptions(save_decision_policy=OrbaxSaveDecision(p),
                                           enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        for step in range(1, 8):
            clock.t += 4.0
            manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"x": np.arange(3)})))
        # Counting from step 1 (t=4): t=16 (step 4) and t=28 (step 7).
        assert manager.all_steps() == [4, 7]


# --------------------------------------------------------------------------- agreement
@pytest.mark.slow  # the policies' agreement; single-process policy tests stay
@pytest.mark.multiprocess
def test_processes_with_skewed_clocks_take_the_primarys_decisions(tmp_path, run_hosts):
    out = tmp_path / "decisions"
    run_hosts(3, 1, "x", command=[sys.executable, POLICY_WORKER, str(out),
                                  str(tmp_path / "ckpt")]).check()
    got = [json.loads((tmp_path / f"decisions.{i}").read_text()) for i in range(3)]
    # Every process took the same decisions, whatever its own clock and loss said...
    for name in ("young_daly", "adaptive"):
        assert got[1][name] == got[0][name] and got[2][name] == got[0][name], name
    # ...and they are the primary's: what its policy decides alone on its own inputs.
    assert got[0]["young_daly"] == got[0]["young_daly_local"]
    assert got[0]["adaptive"] == got[0]["adaptive_local"]
    # Had each process decided alone, they would have disagreed (the test means something).
    assert got[1]["young_daly_local"] != got[0]["young_daly_local"]
    assert got[1]["adaptive_local"] != got[0]["adaptive_local"]
    assert any(got[0]["young_daly"]) and any(got[0]["adaptive"])
    # The restart log: one run per start (only the primary wrote), seen by everyone.
    assert all(g["failures"] == [0, 1] for g in got), [g["failures"] for g in got]
    assert all(g["runs"] == 2 for g in got)
    # CheckpointService(save_policy=...): every process saved the same steps, the
    # primary's; the policy learned the cost from the service's own saves.
    assert got[0]["svc_cost_s"] is not None and got[0]["svc_cost_s"] > 0
    assert got[0]["svc_saved"] == got[0]["svc_steps"]
    assert all(g["svc_saved"] == got[0]["svc_saved"] for g in got), [g["svc_saved"] for g in got]
    assert got[0]["svc_saved"][0] == 1  # no cost known yet: the first decision measures one
    assert 29 in got[0]["svc_saved"]  # save_on_steps still saves
    assert 2 < len(got[0]["svc_saved"]) < 30  # the policy skipped steps (interval > 1 step)
