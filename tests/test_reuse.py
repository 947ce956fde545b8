"""Reusing a directory never loses a committed step: steps only go up (StepOrderError),
retention ranks by step number, and a re-run of the quickstart resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import distckpt
from tests.mp_worker import factory

QUICKSTART = str(Path(__file__).parent.parent / "examples" / "quickstart.py")


@pytest.fixture
def items():
    return distckpt.init_sharded(factory(), distckpt.make_mesh("fsdp=8"))


def _used_directory(path, items, opts) -> None:
    with distckpt.CheckpointService(path, opts) as ckpt:
        ckpt.save(20, items, metadata={"step": 20})
        ckpt.save(30, items, metadata={"step": 30})


@pytest.mark.fast
def test_saving_below_the_newest_step_of_a_used_directory_is_refused(tmp_path, items):
    """The issue's case: steps 20 and 30, a new service, save(10) deleted step 20."""
    opts = distckpt.CheckpointOptions(max_to_keep=2)
    _used_directory(tmp_path, items, opts)
    with distckpt.CheckpointService(tmp_path, opts) as ckpt:
        with pytest.raises(distckpt.StepOrderError) as err:
            ckpt.save(10, items)
        assert sorted(os.listdir(tmp_path)) == ["20", "30"]  # nothing staged or written
        assert ckpt.all_steps() == [20, 30]
        ckpt.save(31, items)  # continuing from the newest step + 1 is fine
    msg = str(err.value)
    assert "step 10 is below step 30, the newest committed step in " + str(tmp_path) in msg
    assert "restore() and save from step 31" in msg and "new directory" in msg
    assert "CheckpointOptions(allow_older_steps=True)" in msg
    assert isinstance(err.value, distckpt.CheckpointError)
    with distckpt.CheckpointService(tmp_path, distckpt.CheckpointOptions(read_only=True)) as ro:
        assert ro.all_steps() == [30, 31]
        assert ro.metadata(30) == {"step": 30}


@pytest.mark.fast
def test_saving_a_committed_step_again_says_what_to_do(tmp_path, items):
    opts = distckpt.CheckpointOptions(max_to_keep=2)
    _used_directory(tmp_path, items, opts)
    with distckpt.CheckpointService(tmp_path, opts) as ckpt:
        with pytest.raises(distckpt.StepExistsError) as err:
            ckpt.save(30, items)
        # An older committed step is refused by the order rule first.
        with pytest.raises(distckpt.StepOrderError):
            ckpt.save(20, items, overwrite=True)
        ckpt.save(30, items, metadata={"step": "30 again"}, overwrite=True)
        ckpt.wait()
        assert ckpt.metadata(30) == {"step": "30 again"} and ckpt.all_steps() == [20, 30]
    msg = str(err.value)
    assert "step 30 already exists in " + str(tmp_path) in msg
    assert "restore() and save from step 31" in msg and "overwrite=True" in msg
    assert "new directory" in msg


@pytest.mark.fast
def test_allow_older_steps_and_retention_by_step_number(tmp_path, items):
    """With allow_older_steps a lower step is saved, then removed by retention as soon as
    it commits if it is not among the max_to_keep highest; a higher step never is."""
    opts = distckpt.CheckpointOptions(max_to_keep=2, allow_older_steps=True)
    _used_directory(tmp_path, items, opts)
    with distckpt.CheckpointService(tmp_path, opts) as ckpt:
        ckpt.save(10, items)
        ckpt.wait()
        assert ckpt.all_steps() == [20, 30]
    three = distckpt.CheckpointOptions(max_to_keep=3, allow_older_steps=True)
    with distckpt.CheckpointService(tmp_path, three) as ckpt:
        ckpt.save(10, items)
        ckpt.save(25, items)  # saved after 10, but 10 is the lowest: 10 goes
        ckpt.wait()
        assert ckpt.all_steps() == [20, 25, 30]  # save order would have dropped 20


@pytest.mark.multiprocess
def test_older_steps_are_refused_on_every_process(tmp_path, run_hosts):
    out = tmp_path / "out"
    run_hosts(2, 1, "reuse", str(out), "--dir", str(tmp_path / "ckpt"), "--mesh", "fsdp=2"
              ).check()
    got = [json.loads(Path(f"{out}.{pid}").read_text()) for pid in (0, 1)]
    for g in got:
        assert g["order"] is not None and "step 10 is below step 30" in g["order"]
        assert g["entries_after_refusal"] == ["20", "30"]
        assert g["exists"] is not None and "step 30 already exists" in g["exists"]
        assert g["metadata_30"] == {"run": "again"} and g["steps"] == [20, 30]
        assert g["steps_allowed"] == [20, 30]  # 10 saved, then removed by retention



def _quickstart(cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    res = subprocess.run([sys.executable, QUICKSTART, "ckpt"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_quickstart_run_again_into_its_directory_resumes(tmp_path):
    first = _quickstart(tmp_path)
    assert "committed steps: [20, 30]" in first and "resuming" not in first
    second = _quickstart(tmp_path)
    assert "resuming after step 30" in second
    assert "committed steps: [50, 60]" in second and "restored step 60" in second


@pytest.mark.fast
@pytest.mark.parametrize("async_save", [True, False])
def test_a_lower_step_removed_by_retention_can_be_saved_and_removed_again(tmp_path, items,
                                                                          async_save):
    """Retention moved the second removal of step 1 onto the first one, still in the
    trash, and failed the save."""
    opts = distckpt.CheckpointOptions(max_to_keep=1, allow_older_steps=True,
                                      async_save=async_save)
    with distckpt.CheckpointService(tmp_path, opts) as ckpt:
        for step in (2, 1, 1, 1):
            ckpt.save(step, items)
            ckpt.wait()
            assert ckpt.all_steps() == [2]


@pytest.mark.fast
def test_best_step_saved_by_an_earlier_service_is_kept(tmp_path, items):
    """best-N ranks the metrics saved with every step, also by a service that did not rank
    by them, and never keeps a step without metrics as one of the best."""
    with distckpt.CheckpointService(tmp_path, distckpt.CheckpointOptions(max_to_keep=None)) \
            as ckpt:
        ckpt.save(1, items, metrics={"loss": 0.25})
    best = distckpt.CheckpointOptions(max_to_keep=1, best_metric="loss", best_n=2)
    with distckpt.CheckpointService(tmp_path, best) as ckpt:
        for step in (2, 3, 4):
            ckpt.save(step, items)  # no metrics
        ckpt.wait()
        assert ckpt.all_steps() == [1, 4]  # the best (1) and the highest (4)
        assert ckpt.best_step() == 1
