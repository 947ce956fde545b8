"""`distckpt goodput`: the ETTR model, the failure schedule, the report's bookkeeping, bad
input, and short real runs under injected failures (never asserting on timings or ETTR
values: those depend on the machine; docs/goodput.md has measured figures)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from distckpt import storage
from distckpt.checkpoint.policy import young_daly_interval
from distckpt.tools import goodput_model as gm
from distckpt.tools.goodput import GoodputConfig, failure_schedule
from distckpt.tools.goodput_report import Attempt, step_costs, summarize
from tests.test_cli_input import ROOT, assert_one_line_error, assert_untouched, place, run

__all__ = ["place"]  # the fixture, imported for the CLI cases

CLI = [sys.executable, "-m", "distckpt.tools.cli", "goodput"]
SCHEMA = {"tiers": list, "ettr": float, "ettr_predicted": float, "failures": int,
          "steps_lost": int, "recovery_seconds_median": (float, type(None))}


# --------------------------------------------------------------------------- model
def cal(**kw) -> gm.Costs:
    base = {"step_s": 0.5, "start_s": 5.0, "restart_s": 10.0, "stall_s": 0.5,
            "commit_s": 1.0, "local_stall_s": 0.05, "local_commit_s": 0.05}
    return gm.Costs(**{**base, **kw})


@pytest.mark.fast
def test_persistent_interval_is_young_daly_of_the_stall_in_whole_steps():
    plan = gm.plan(cal(), mtbf_s=100.0, duration_s=300.0, local=False)
    assert young_daly_interval(0.5, 100.0) == 10.0
    assert plan.save_every == plan.restart_every == 20 and plan.local_every is None
    assert gm.predict(cal(), plan) == gm.predict_ettr(10.0, 0.5, 1.0, 10.0, 100.0, 5.0, 300.0)
    # Never shorter than the commit latency.
    assert gm.plan(cal(stall_s=0.001, commit_s=4.0), 100.0, 300.0, local=False).save_every == 8


@pytest.mark.fast
def test_multi_tier_plan_saves_locally_often_and_persistently_rarely():
    plan = gm.plan(cal(), mtbf_s=100.0, duration_s=300.0, local=True)
    assert plan.local_every == round(young_daly_interval(0.05, 100.0) / 0.5)
    assert plan.save_every % plan.local_every == 0 and plan.save_every > plan.local_every
    rare = young_daly_interval(0.45, 100.0 * gm.PERSISTENT_MTBF_FACTOR)
    assert plan.save_every >= rare / 0.5 - plan.local_every
    # The persistent saves' extra stall is spread over the local intervals.
    k, p = plan.local_every, plan.save_every
    assert gm.predict(cal(), plan) == pytest.approx(
        gm.predict_ettr(k * 0.5, 0.05 + 0.45 * k / p, 0.05, 10.0, 100.0, 5.0, 300.0))
    with pytest.raises(ValueError, match="local tier"):
        gm.plan(cal(local_stall_s=None), 100.0, 300.0, local=True)


@pytest.mark.fast
def test_predicted_ettr_matches_first_order_and_falls_with_failures():
    tau, c, lat, r, m = 10.0, 0.2, 0.5, 5.0, 1000.0
    first = 1 - c / tau - (tau / 2 + lat + r) / m
    assert gm.predict_ettr(tau, c, lat, r, m) == pytest.approx(first, abs=2e-3)
    assert gm.predict_ettr(tau, c, lat, r, 1e12) == pytest.approx(tau / (tau + c))
    values = [gm.predict_ettr(tau, c, lat, r, m) for m in (20.0, 60.0, 200.0, 1000.0)]
    assert values == sorted(values) and 0.0 <= values[0] < values[-1] < 1.0
    # The start-up is charged once against the run's duration.
    assert gm.predict_ettr(tau, c, lat, r, m, start_s=30.0, duration_s=300.0) == \
        pytest.approx(0.9 * gm.predict_ettr(tau, c, lat, r, m))


@pytest.mark.fast
def test_failure_schedule_is_seeded_and_exponential():
    assert failure_schedule(7, 10.0, 100.0, 4) == failure_schedule(7, 10.0, 100.0, 4)
    assert failure_schedule(7, 10.0, 100.0, 4) != failure_schedule(8, 10.0, 100.0, 4)
    times = [t for t, _ in failure_schedule(0, 1.0, 20000.0, 4)]
    gaps = [b - a for a, b in itertools.pairwise([0.0] + times)]
    assert statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)
    assert statistics.median(gaps) == pytest.approx(math.log(2), rel=0.05)
    hosts = {h for _, h in failure_schedule(0, 1.0, 200.0, 4)}
    assert hosts == {0, 1, 2, 3}


@pytest.mark.fast
@pytest.mark.parametrize("kw, needle", [
    ({"duration_s": 0.0}, "--duration must be a positive time"),
    ({"mtbf_s": -1.0}, "--mtbf must be a positive time"),
    ({"mtbf_s": math.inf}, "--mtbf must be a positive time"),
    ({"hosts": 0}, "--hosts and --devices-per-host must be >= 1"),
    ({"runs": ("persistent", "persistent")}, "give distinct names"),
    ({"runs": ("fast",)}, "give distinct names"),
])
def test_config_rejects(kw, needle):
    with pytest.raises(ValueError, match=needle):
        GoodputConfig(**{"duration_s": 10.0, "mtbf_s": 5.0, **kw})


# --------------------------------------------------------------------------- bookkeeping
def steps(first: int, last: int, t: float, dt: float = 1.0) -> list[dict]:
    return [{"event": "step", "t": t + i * dt, "step": s, "save_s": 0.0, "saved": False,
             "committed": []} for i, s in enumerate(range(first, last + 1))]


@pytest.mark.fast
def test_summary_counts_failures_steps_lost_and_recovery():
    t0 = 1000.0
    a1 = Attempt(launched=t0, ended=t0 + 20, returncode=-9, killed=(t0 + 19.5, 1),
                 events=steps(1, 10, t0 + 10))  # reached 10, last save 8
    a2 = Attempt(launched=t0 + 20, ended=t0 + 22, returncode=-9, killed=(t0 + 21.5, 0))
    a3 = Attempt(launched=t0 + 22, ended=t0 + 40, returncode=-9, killed=(t0 + 39.5, 2),
                 events=[{"event": "resumed", "t": t0 + 30, "step": 8, "tier": "persistent"},
                         *steps(9, 12, t0 + 32)])
    a4 = Attempt(launched=t0 + 40, ended=t0 + 60, returncode=124,
                 events=[{"event": "resumed", "t": t0 + 48, "step": 12, "tier": "persistent"},
                         *steps(13, 30, t0 + 50)])  # steps after t0 + 60 are left out
    plan = gm.plan(cal(step_s=1.0), mtbf_s=20.0, duration_s=60.0, local=False)
    report = summarize("persistent", ["persistent"], [a1, a2, a3, a4], t0, 60.0,
                       cal(step_s=3.0), plan)
    assert report.failures == report.kills_issued == 3
    assert [f["steps_lost"] for f in report.failure_log] == [2, 0, 0]
    assert report.steps_lost == 2
    assert [f["recovery_s"] for f in report.failure_log] == [None, 10.0, 10.0]
    assert report.recovery_seconds_median == 10.0
    assert report.final_step == 23  # step 23 at t0 + 60
    assert report.ettr == pytest.approx(23 * 1.0 / 60.0)
    assert report.restored_tiers == {"persistent": 2}
    assert report.progress[0] == [10.0, 1] and report.progress[-1] == [60.0, 23]
    # The run's own costs: 1 s steps (not the calibration's 3 s); kill -> training again
    # 32 - 21.5 and 50 - 39.5, less a step; the first start 10 s, less a step.
    m = report.measured
    assert (m["step_s"], m["restart_s"], m["start_s"]) == (1.0, 9.5, 9.0)
    assert m["stall_s"] == 0.5  # no save measured: the calibration's
    assert report.ettr_predicted == gm.predict(gm.Costs(**m), plan)
    assert report.ettr_planned == gm.predict(cal(step_s=3.0), plan)


@pytest.mark.fast
def test_step_costs_leave_out_each_attempts_first_save_of_each_kind():
    def attempt(saves: dict[int, float]) -> Attempt:
        events, shift = steps(1, 12, 0.0), 0.0
        for e in events:  # a save's stall delays its step and every later one
            if e["step"] in saves:
                e["saved"], e["save_s"] = True, saves[e["step"]]
                shift += saves[e["step"]]
            e["t"] += shift
        events[-1]["committed"] = [[8, 0.9], [12, 0.7]]
        events[-1]["local_written"] = [[6, 0.3], [10, 0.2]]
        return Attempt(launched=0.0, events=events)

    # Local every 2, persistent every 4: the first of each kind (2, 4) compiles.
    got = step_costs([attempt({2: 9.0, 4: 9.0, 6: 0.1, 8: 0.5, 10: 0.1, 12: 0.7})], 4, 2)
    # Save 12 ends the attempt: its stall counts, its cost (nothing seen after it) not.
    assert got == {"step_s": 1.0, "stall_s": 0.6, "commit_s": 0.8, "local_stall_s": 0.1,
                   "local_commit_s": 0.25, "cost_s": 0.5, "local_cost_s": 0.1}
    assert step_costs([Attempt(launched=0.0)], 4, None)["stall_s"] is None


@pytest.mark.fast
def test_a_save_cut_short_by_the_end_of_its_attempt_is_not_costed_at_its_stall():
    # Persistent every 6; each save stalls 0.1 s and slows the next two steps by 0.5 s.
    def attempt(last_step: int) -> Attempt:
        events, t = [], 0.0
        for step in range(1, last_step + 1):
            saved = step % 6 == 0
            slow = 0.5 if step > 6 and (step - 1) % 6 in (0, 1) else 0.0
            t += 1.0 + (0.1 if saved else 0.0) + slow
            events.append({"event": "step", "t": t, "step": step, "saved": saved,
                           "save_s": 0.1 if saved else 0.0, "train_s": 1.0,
                           "committed": [], "local_written": []})
        return Attempt(launched=0.0, events=events)

    # Killed one step after the save at 18: it saw half its cost (0.6 against 1.1), so it
    # is left out; the save at 6 compiles and is left out as before.
    got = step_costs([attempt(19)], 6, None)
    assert got["step_s"] == 1.0 and got["cost_s"] == pytest.approx(1.1)
    assert got["stall_s"] == pytest.approx(0.1)  # the stall of every save still counts
    # When the only save to cost is such a one, it is what there is.
    assert step_costs([attempt(13)], 6, None)["cost_s"] == pytest.approx(0.6)


@pytest.mark.fast
def test_step_jitter_is_not_charged_to_the_saves():
    # Steps take 1.0 s, but between two saves one step takes 1.2 s and another 0.8 s;
    # saves every 8 stall 0.05 s and slow nothing. Each save costs its stall: the slow
    # step is offset by the fast one, as in the wall time (counting only excesses charged
    # each save 0.05 + 0.2).
    events, t = [], 0.0
    for step in range(1, 42):
        saved = step % 8 == 0
        t += {2: 1.2, 5: 0.8}.get(step % 8, 1.0) + (0.05 if saved else 0.0)
        events.append({"event": "step", "t": t, "step": step, "saved": saved,
                       "save_s": 0.05 if saved else 0.0, "train_s": 1.0, "committed": [],
                       "local_written": []})
    got = step_costs([Attempt(launched=0.0, events=events)], 8, None)
    assert got["step_s"] == pytest.approx(1.0)
    assert got["cost_s"] == pytest.approx(0.05)


@pytest.mark.fast
def test_slow_early_steps_do_not_make_later_saves_look_free():
    # A calibration job: the first 16 steps run slow (0.7 s, warm-up), then 0.5 s; saves
    # every 8 stall 0.05 s and slow the next step by 0.4 s. The overall median is 0.7 s,
    # so against it the steps after the saves at 16 and 24 looked 1.0 s "faster than
    # usual" and each save cost its stall alone (0.05; the runs then measured 3x the
    # calibration). Against the steps late in its own interval, each costs 0.45.
    events, t = [], 0.0
    for step in range(1, 33):
        saved = step % 8 == 0
        took = 0.7 if step <= 16 else 0.9 if step % 8 == 1 else 0.5
        t += took + (0.05 if saved else 0.0)
        events.append({"event": "step", "t": t, "step": step, "saved": saved,
                       "save_s": 0.05 if saved else 0.0, "train_s": took, "committed": [],
                       "local_written": []})
    got = step_costs([Attempt(launched=0.0, events=events)], 8, None)
    assert got["step_s"] == pytest.approx(0.7)
    assert got["cost_s"] == pytest.approx(0.45)


@pytest.mark.fast
def test_a_save_costs_its_stall_plus_how_much_it_slowed_the_next_steps():
    """A save whose background work slows the following steps costs training more than
    its stall: the model charges the stall plus each later step's excess over the step
    time, up to the next save; a plan from those costs saves less often."""
    events, t = [], 0.0
    for step in range(1, 34):
        saved = step % 4 == 0  # local every 4, persistent every 16
        stall = 0.02 if saved else 0.0
        slow = 0.4 if (step - 1) % 4 == 0 and step > 4 else 0.0  # the step after a save
        t += 1.0 + stall + slow
        events.append({"event": "step", "t": t, "step": step, "saved": saved,
                       "save_s": stall, "train_s": 1.0, "committed": [],
                       "local_written": []})
    got = step_costs([Attempt(launched=0.0, events=events)], 16, 4)
    assert got["step_s"] == 1.0 and got["local_stall_s"] == 0.02
    assert got["local_cost_s"] == pytest.approx(0.42) and got["cost_s"] == pytest.approx(0.42)
    costs = cal(step_s=1.0, local_stall_s=0.02, local_commit_s=0.5)
    charged = dataclasses.replace(costs, local_cost_s=got["local_cost_s"])
    assert charged.local_save_cost() == pytest.approx(0.42) and costs.local_save_cost() == 0.02
    assert gm.plan(charged, 100.0, 300.0, local=True).local_every > \
        gm.plan(costs, 100.0, 300.0, local=True).local_every


@pytest.mark.fast
def test_a_run_counts_the_steps_gained_from_where_it_started():
    t0 = 1000.0
    a1 = Attempt(launched=t0, ended=t0 + 5, returncode=-9, killed=(t0 + 4.0, 3))
    a2 = Attempt(launched=t0 + 5, ended=t0 + 30, returncode=124,
                 events=[{"event": "resumed", "t": t0 + 15, "step": 16, "tier": "local"},
                         *steps(17, 20, t0 + 20, dt=2.0)])
    c = cal(step_s=2.0)
    plan = gm.plan(c, mtbf_s=20.0, duration_s=30.0, local=True)
    report = summarize("multi", ["local", "persistent"], [a1, a2], t0, 30.0, c, plan)
    assert (report.start_step, report.final_step, report.steps_lost) == (16, 20, 0)
    assert report.ettr == pytest.approx(4 * 2.0 / 30.0)
    assert report.failure_log[0]["restored_tier"] == "local"
    assert report.failure_log[0]["recovery_s"] == 15.0


# --------------------------------------------------------------------------- CLI input
@pytest.mark.parametrize("args, needle", [
    (["--duration", "soon"], "--duration bad duration 'soon'"),
    (["--duration", "0s"], "--duration must be a positive time"),
    (["--mtbf=-5s"], "--mtbf bad duration '-5s'"),
    (["--mtbf", "0"], "--mtbf must be a positive time"),
    (["--hosts", "0"], "--hosts and --devices-per-host must be >= 1"),
    (["--runs", "persistent,bogus"], "--runs persistent,bogus"),
    (["--d-model", "7"], "does not fit mesh fsdp=8"),
    (["--dir", "full"], "--dir full is not empty"),
    (["--dir", "afile"], "--dir afile is a file"),
    (["--persistent", "pdir"], "--persistent pdir: give an s3://bucket/prefix"),
    (["--s3-server", "local", "--persistent", "pdir"], "--persistent pdir: give an s3://bucket/prefix"),
    (["--s3-server", "local", "--persistent", "s3://gp/x"],
     "--persistent s3://gp/x: invalid s3 bucket name 'gp'"),
])
def test_goodput_rejects_bad_input_before_writing_anything(place, args, needle):
    (place[0] / "full").mkdir()
    (place[0] / "full" / "mine").write_text("mine")
    (place[0] / "afile").write_text("mine")
    res = run(place, "goodput", "--json", "out.json", *args)
    assert res.returncode == 2
    assert_one_line_error(res, "distckpt goodput: error: ", needle)
    assert res.stdout == ""
    assert_untouched(place, (["afile", "full", "full/mine"], []))


def test_goodput_refuses_a_persistent_prefix_that_holds_objects(place, s3_env, s3_url):
    from distckpt.bench import s3 as bench_s3

    kv = bench_s3.kvstore(s3_url)
    kv.write("theirs/step", b"not goodput's").result()
    res = run(place, "goodput", "--persistent", s3_url, "--json", "out.json")
    assert res.returncode == 2
    assert_one_line_error(res, f"--persistent {s3_url} is not empty (1 object(s), "
                          "e.g. theirs/step)")
    assert_untouched(place)
    assert storage.list_objects(s3_url) == ["theirs/step"]


def test_empty_prefix_check_gives_up_on_an_endpoint_that_never_answers(monkeypatch):
    # A real TCP listener that never reads: connections open, requests get no answer (as
    # an unreachable AWS or a wedged proxy). Without a deadline the check (bench, drill and goodput
    # share it) waited for ever.
    import socket
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "silent")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "silent-secret")
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"--persistent s3://silent-bucket/p: no answer "
                           r"to a listing in 2 s; check the AWS_\* endpoint"):
            storage.check_empty("s3://silent-bucket/p", timeout_s=2.0,
                                label="--persistent s3://silent-bucket/p")
        assert time.monotonic() - t0 < 60  # bounded (not a timing claim: 2 s asked)


# --------------------------------------------------------------------------- real runs
def _goodput(tmp_path: Path, *args: str, timeout: float = 400):
    out = tmp_path / "gp.json"
    res = subprocess.run(CLI + ["--hosts", "2", "--devices-per-host", "2", "--dir",
                                str(tmp_path / "work"), "--json", str(out), *args],
                         capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res, json.loads(out.read_text())


def _check_report(report: dict, tmp_path: Path, duration_s: float, mtbf_s: float,
                  seed: int) -> None:
    scheduled = len(failure_schedule(seed, mtbf_s, duration_s, 2))
    for r in report["runs"]:
        for key, kind in SCHEMA.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert 0.0 <= r["ettr"] <= 1.0 and 0.0 <= r["ettr_predicted"] <= 1.0
        # Every scheduled failure was injected, and each kill is one failure.
        assert r["failures"] == r["kills_issued"] == scheduled == len(r["failure_log"])
        assert r["steps_lost"] == sum(f["steps_lost"] for f in r["failure_log"]) >= 0
        assert r["final_step"] == (r["progress"][-1][1] if r["progress"] else r["final_step"])
        assert 0 <= r["start_step"] <= r["final_step"]
        # Steps only go up, except where a restart restored an older step.
        points = r["progress"]
        assert [p[0] for p in points] == sorted(p[0] for p in points)
        drops = sum(b[1] < a[1] for a, b in itertools.pairwise(points))
        assert drops <= r["failures"]
        assert all(0 <= p[0] <= duration_s for p in points)
    png = tmp_path / "gp.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Checkpoints are removed after each run; the logs stay.
    work = tmp_path / "work"
    assert sorted(p.name for p in work.iterdir()) == sorted(
        f"{r['name']}.log" for r in report["runs"])


@pytest.mark.slow  # ~60 s on 2 cores; the multi-tier run below covers the supervisor by default
@pytest.mark.multiprocess
def test_persistent_run_under_failures(tmp_path):
    res, report = _goodput(tmp_path, "--duration", "25s", "--mtbf", "10s", "--seed", "4",
                           "--runs", "persistent")
    assert [r["tiers"] for r in report["runs"]] == [["persistent"]]
    assert failure_schedule(4, 10.0, 25.0, 2)  # the seed gives this run failures
    _check_report(report, tmp_path, 25.0, 10.0, 4)
    assert "seed 4" in res.stdout and "persistent-only" in res.stdout


@pytest.mark.slow  # ~60 s on 2 cores; the default suite stays under 15 minutes
@pytest.mark.multiprocess
def test_multi_tier_run_restores_from_the_local_tier(tmp_path):
    _, report = _goodput(tmp_path, "--duration", "25s", "--mtbf", "10s", "--seed", "4",
                         "--runs", "multi")
    (run_,) = report["runs"]
    assert run_["tiers"] == ["local", "persistent"]
    _check_report(report, tmp_path, 25.0, 10.0, 4)
    assert set(run_["restored_tiers"]) <= {"local", "peer", "persistent"}
    assert run_["plan"]["local_every"] >= 1
    assert run_["calibration"]["local_commit_s"] > 0 and run_["calibration"]["local_stall_s"] > 0


@pytest.mark.slow  # ~70 s on 2 cores; the run above covers the supervisor, the S3 service tests S3
@pytest.mark.multiprocess
def test_multi_tier_run_with_the_persistent_tier_on_s3(tmp_path, s3_env, s3_url):
    res, report = _goodput(tmp_path, "--duration", "25s", "--mtbf", "10s", "--seed", "4",
                           "--runs", "multi", "--persistent", s3_url)
    (run_,) = report["runs"]
    _check_report(report, tmp_path, 25.0, 10.0, 4)
    assert report["persistent"] == s3_url
    assert f"persistent tier {s3_url}/<run>" in res.stdout
    # Job A's persistent saves went to the bucket (calibration B restored from a step there
    # or from the local tier), and the run's prefix is emptied afterwards.
    assert run_["calibration"]["commit_s"] > 0
    assert set(run_["restored_tiers"]) <= {"local", "peer", "persistent"}
    assert storage.list_objects(s3_url) == []
    log = (tmp_path / "work" / "multi.log").read_text()
    assert f"train --dir {s3_url}/multi " in log  # every launch's command is logged


def test_empty_prefix_check_turns_a_refused_listing_into_one_line(monkeypatch):
    # A real HTTP endpoint that answers every request 403 AccessDenied (wrong credentials):
    # TensorStore's multi-part error becomes one line that names the flag and the fix.
    import http.server
    import threading

    class Denied(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (b'<?xml version="1.0"?><Error><Code>AccessDenied</Code>'
                    b'<Message>Access Denied</Message></Error>')
            self.send_response(403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Denied)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        with pytest.raises(ValueError) as err:
            storage.check_empty("s3://denied-bucket/p", timeout_s=30.0,
                                label="--persistent s3://denied-bucket/p")
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith("--persistent s3://denied-bucket/p: cannot list it (")
        assert "AccessDenied" in message and "check the AWS_* endpoint and credentials" \
            in message
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.multiprocess
def test_sigterm_stops_goodput_with_one_line_and_cleans_up(tmp_path):
    # A scheduler's time limit: SIGTERM to the supervisor once its first job runs. The job
    # gets it too (saves, stops), the checkpoints go, the log stays, exit 128 + 15. Before,
    # it ended "the multi run's job exited 0 without an injected failure" (exit 1).
    import signal
    import time

    work = tmp_path / "work"
    proc = subprocess.Popen(CLI + ["--hosts", "2", "--devices-per-host", "1", "--duration",
                                   "60s", "--mtbf", "30s", "--runs", "multi", "--dir",
                                   str(work), "--json", str(tmp_path / "gp.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    log = work / "multi.log"
    try:
        deadline = time.monotonic() + 300
        while not (log.exists() and "[goodput] launch at" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert err.strip().splitlines()[-1].startswith("distckpt goodput: stopped by SIGTERM"), err
    assert "Traceback" not in err and not (tmp_path / "gp.json").exists()
    assert sorted(p.name for p in work.iterdir()) == ["multi.log"]
