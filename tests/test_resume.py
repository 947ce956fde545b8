"""Acceptance 6: a run killed after step 7 (saves every 3) resumes from 6, bit for bit."""

from __future__ import annotations

import json
import os
import sys

import pytest

TRAIN = [sys.executable, "-m", "distckpt.tools.cli", "train", "--steps", "10", "--save-every", "3",
         "--mesh", "data=2,fsdp=2", "--max-to-keep", "5"]


def _result(output: str) -> dict:
    lines = [line.split("] ", 1)[1] for line in output.splitlines()
             if line.startswith("[host 0] {")]
    assert lines, output[-4000:]
    return json.loads(lines[-1])


@pytest.mark.multiprocess
def test_killed_run_resumes_from_newest_committed_step_bit_exact(tmp_path, run_hosts):
    full = _result(run_hosts(2, 2, command=TRAIN + ["--dir", str(tmp_path / "a")]).check().output)
    assert full["start_step"] == 0 and full["saved_steps"] == [3, 6, 9]

    crashed = run_hosts(2, 2, command=TRAIN + ["--dir", str(tmp_path / "b"),
                                               "--crash-after", "7"])
    assert crashed.returncode != 0  # SIGKILLed on purpose after step 7
    assert "crashing on purpose after step 7" in crashed.output

    resumed = _result(run_hosts(2, 2, command=TRAIN + ["--dir", str(tmp_path / "b")])
                      .check().output)
    assert resumed["start_step"] == 6
    assert sorted(resumed["losses"], key=int) == ["7", "8", "9", "10"]
    for step, loss in resumed["losses"].items():
        assert loss == full["losses"][step], (step, loss, full["losses"][step])  # bit for bit


@pytest.mark.slow  # goodput's restart optimisation
@pytest.mark.multiprocess
def test_compiled_step_kept_per_process_and_loaded_on_restart(tmp_path, run_hosts):
    """`distckpt train --executable-cache`: every process writes its compiled step and the
    next start loads it (JAX's persistent cache serves process 0 only on CPU); a torn file
    is compiled again; the numbers are the nnx.jit step's, bit for bit."""
    full = _result(run_hosts(2, 2, command=TRAIN + ["--dir", str(tmp_path / "a"),
                                                    "--steps", "4"]).check().output)
    cache = tmp_path / "executables"
    cached = TRAIN + ["--dir", str(tmp_path / "b"), "--executable-cache", str(cache),
                      "--progress", "--save-every", "2"]
    first = run_hosts(2, 2, command=cached + ["--steps", "2"]).check().output
    assert '"event": "program"' in first and '"source": "compiled"' in first, first[-3000:]
    files = sorted(p.name for p in cache.iterdir())
    assert [f[-7:] for f in files] == ["-p0.bin", "-p1.bin"], files  # one per process
    torn = cache / files[1]
    torn.write_bytes(torn.read_bytes()[:1000])  # host 1's file, cut short
    # Steps of earlier configurations: five of host 1's, older than its torn file, one
    # of host 0's and a file not named like a step. Host 1 compiles again, then keeps its
    # KEEP_EXECUTABLES most recently used; host 0 loads and deletes nothing.
    stale = [cache / f"train-step-{i:032x}-p1.bin" for i in range(5)]
    others = [cache / f"train-step-{9:032x}-p0.bin", cache / "notes.txt"]
    for age, path in enumerate(stale + others):
        path.write_bytes(b"old")
        os.utime(path, ns=(10**18 - age * 10**9,) * 2)  # stale[0] newest, all before now
    second = run_hosts(2, 2, command=cached + ["--steps", "4"]).check().output
    assert '"source": "loaded"' in second, second[-3000:]  # process 0 reports
    assert "could not load the compiled step" in second  # host 1 compiled again
    assert len(torn.read_bytes()) > 1000  # and replaced its file
    assert [p.exists() for p in stale] == [True] * 3 + [False] * 2  # 4 newest kept
    assert all(p.exists() for p in others) and (cache / files[0]).exists()
    resumed = _result(second)
    assert resumed["start_step"] == 2
    first_losses = _result(first)["losses"]
    for step, loss in {**first_losses, **resumed["losses"]}.items():
        assert loss == full["losses"][step], (step, loss, full["losses"][step])  # bit for bit


@pytest.mark.fast
def test_prune_executables_keeps_the_most_recently_used_per_process(tmp_path):
    from distckpt.tools.train import prune_executables

    mine = [tmp_path / f"train-step-{i:032x}-p1.bin" for i in range(6)]
    other = [tmp_path / f"train-step-{i:032x}-p11.bin" for i in range(6)]
    for age, path in enumerate(mine + other):
        path.write_bytes(b"x")
        os.utime(path, ns=(10**18 - (age % 6) * 10**9,) * 2)
    assert prune_executables(tmp_path, 1, keep=2) == mine[2:]  # oldest first to go
    assert [p.exists() for p in mine] == [True, True] + [False] * 4
    assert all(p.exists() for p in other)  # process 11 is not process 1
    assert prune_executables(tmp_path, 1, keep=2) == []
