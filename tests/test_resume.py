"""Acceptance 6: a run killed after step 7 (saves every 3) resumes from 6, bit for bit."""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.multiprocess

TRAIN = [sys.executable, "-m", "distckpt.tools.cli", "train", "--steps", "10", "--save-every", "3",
         "--mesh", "data=2,fsdp=2", "--max-to-keep", "5"]


def _result(output: str) -> dict:
    lines = [line.split("] ", 1)[1] for line in output.splitlines()
             if line.startswith("[host 0] {")]
    assert lines, output[-4000:]
    return json.loads(lines[-1])


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
    second = run_hosts(2, 2, command=cached + ["--steps", "4"]).check().output
    assert '"source": "loaded"' in second, second[-3000:]  # process 0 reports
    assert "could not load the compiled step" in second  # host 1 compiled again
    assert len(torn.read_bytes()) > 1000  # and replaced its file
    resumed = _result(second)
    assert resumed["start_step"] == 2
    first_losses = _result(first)["losses"]
    for step, loss in {**first_losses, **resumed["losses"]}.items():
        assert loss == full["losses"][step], (step, loss, full["losses"][step])  # bit for bit
