"""Acceptance 9: the drill (the main job) passes with defaults and from 4x2 to 1x4."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiprocess

DRILL = [sys.executable, "-m", "distckpt.tools.cli", "drill"]


def _drill(tmp_path, *args):
    report = tmp_path / "report.json"
    res = subprocess.run(DRILL + ["--dir", str(tmp_path / "d"), "--json", str(report), *args],
                         capture_output=True, text=True, timeout=600)
    return res, (json.loads(report.read_text()) if report.exists() else None)


@pytest.mark.slow  # the default suite runs the default drill from a relative --dir
def test_default_drill_verifies(tmp_path):  # (test_newcomer.py); this is its absolute twin
    res, report = _drill(tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert report["verified"] is True
    assert report["source"] == "4x2:data=2,fsdp=4"
    assert report["target"] == "2x2:fsdp=2,tensor=2"
    # 6 steps, save every 4: step 4 is the newest save, 2 steps of work lost.
    assert report["restored_step"] == 4 and report["steps_lost"] == 2
    assert report["leaves"] > 0 and report["bytes"] > 0
    assert report["content_mismatch"] == [] and report["sharding_mismatch"] == []
    assert len(report["save_stall_seconds"]) == len(report["commit_seconds"]) == 1
    assert all(c is not None for c in report["commit_seconds"])
    assert report["loss_abs_diff"] <= report["loss_rel_tol"] * max(1, report["loss_before"])
    assert "verified" in res.stdout


@pytest.mark.slow  # the default suite stays under 15 minutes; CI runs it
def test_drill_onto_one_host(tmp_path):
    res, report = _drill(tmp_path, "--from", "4x2", "--to", "1x4", "--steps", "4",
                         "--save-every", "2")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert report["verified"] is True
    assert report["target"] == "1x4:fsdp=4" and report["source"] == "4x2:fsdp=8"
    assert report["restored_step"] == 4 and report["steps_lost"] == 0


def test_drill_bad_arguments_fail_fast_and_write_nothing(tmp_path):
    for args, match in [(["--from", "4x2:data=3"], "has 8 devices but mesh data=3 has 3"),
                        (["--to", "two"], "expected HOSTSxDEVICES"),
                        (["--save-every", "9"], "nothing would be saved")]:
        res, report = _drill(tmp_path, *args)
        assert res.returncode == 2, (args, res.stderr)
        assert match in res.stderr and report is None
        assert not (tmp_path / "d").exists()
    # A directory that is not empty is refused before anything starts, and left as it was.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    res, report = _drill(tmp_path)
    assert res.returncode == 2 and "is not empty" in res.stderr and "Traceback" not in res.stderr
    assert report is None and os.listdir(tmp_path / "d") == ["keep.txt"]


@pytest.mark.parametrize("fault", [
    # Covered in the default suite by tests/test_crash.py, tests/test_integrity.py and
    # tests/test_preemption.py; the drill versions run in CI's slow pass.
    pytest.param("kill-during-save", marks=pytest.mark.slow),
    pytest.param("corrupt", marks=pytest.mark.slow),
    pytest.param("preempt", marks=pytest.mark.slow)])
def test_drill_with_faults_recovers_verified(tmp_path, fault):
    """Each fault, injected for real; the report says what was lost."""
    res, report = _drill(tmp_path, "--fault", fault, "--from", "2x2", "--to", "1x2",
                         "--save-every", "2")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert report["verified"] is True and report["fault"] == fault
    if fault == "preempt":
        # SIGTERM to one host after step 2: every host saved one step and lost nothing.
        assert report["restored_step"] == report["trained_until"] >= 2
        assert report["steps_lost"] == 0 and report["skipped"] == []
    else:
        # 4 steps, saves at 2 and 4; the save of 4 is killed or corrupted: 2 steps lost.
        assert report["trained_until"] == 4 and report["restored_step"] == 2
        assert report["steps_lost"] == 2
        skipped = [step for step, _ in report["skipped"]]
        assert skipped == ([4] if fault == "corrupt" else [])
        if fault == "corrupt":
            assert "differ" in report["skipped"][0][1] or "checksum" in report["skipped"][0][1]


def test_drill_fault_needs_two_saves(tmp_path):
    res, report = _drill(tmp_path, "--fault", "corrupt", "--steps", "3", "--save-every", "2")
    assert res.returncode == 2 and "needs two saves" in res.stderr and report is None


@pytest.mark.slow  # the default suite stays under 15 minutes; CI runs it
def test_drill_lose_host_with_a_local_tier_loses_nothing(tmp_path):
    """A host is SIGKILLed after its last step and comes back with an empty local tier:
    it gets its shards from its peer's copy, the others read their own; bit-exact."""
    res, report = _drill(tmp_path, "--tiers", "local,persistent", "--fault", "lose-host",
                         "--from", "2x2:data=2,fsdp=2")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert report["verified"] is True and report["tiers"] == "local,persistent"
    assert report["target"] == report["source"]  # the replaced machine is the same kind
    # 7 steps (save every 4): only the local tier holds step 7.
    assert report["restored_step"] == 7 and report["steps_lost"] == 0
    assert report["lost_host"] == 1
    assert report["restored_from"] == ["local", "peer"]
    assert report["recovery_seconds"] > 0


@pytest.mark.slow
def test_drill_lose_host_persistent_only_loses_the_steps_since_the_last_save(tmp_path):
    res, report = _drill(tmp_path, "--fault", "lose-host", "--from", "2x2:data=2,fsdp=2")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert report["verified"] is True and report["restored_step"] == 4
    assert report["steps_lost"] == 3 and report["restored_from"] == ["persistent"] * 2
