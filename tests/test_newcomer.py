"""What a newcomer runs first, as the README shows it, from another working directory.

The quickstart (``examples/quickstart.py DIR``) and ``distckpt drill`` run as
subprocesses with ``cwd`` a fresh directory and every path argument relative to it, the
way a user types them. The quickstart runs twice into the same directory: the second
run must resume after the newest step saved there (README, "Reusing a directory"),
leaving the steps of the first run as they were, not crash on them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
QUICKSTART = str(REPO / "examples" / "quickstart.py")


def distckpt_command() -> list[str]:
    """The `distckpt` console script next to this interpreter (README: .venv/bin/distckpt)."""
    script = Path(sys.executable).parent / "distckpt"
    return [str(script)] if script.exists() else [sys.executable, "-m", "distckpt.tools.cli"]


def run(args: list[str], cwd: Path, *, devices: int | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env["XLA_FLAGS"] = " ".join(
        [f for f in env.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
        + ([f"--xla_force_host_platform_device_count={devices}"] if devices else []))
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    output = res.stdout + res.stderr
    assert res.returncode == 0, f"{args} in {cwd} exited {res.returncode}:\n{output[-6000:]}"
    assert "Traceback" not in output, output[-6000:]
    return res


def committed(cwd: Path, directory: str) -> dict[int, bytes]:
    """Committed steps of `directory` (relative to cwd) by `distckpt inspect`, each with
    its commit record's bytes (a step written again has a new record)."""
    res = run([*distckpt_command(), "inspect", directory, "--json"], cwd)
    report = json.loads(res.stdout)
    assert report["found"] and report["problems"] == [], report
    steps = [s["step"] for s in report["steps"] if s["committed"]]
    return {s: (cwd / directory / str(s) / "distckpt_commit.json").read_bytes() for s in steps}


def restored_step(output: str) -> int:
    found = re.findall(r"restored step (\d+)", output)
    assert found, output[-4000:]
    return int(found[-1])


def check_resumed(first: dict[int, bytes], second: dict[int, bytes], output: str) -> None:
    newest = max(first)
    assert re.search(rf"resum\w*\D+{newest}\b", output), \
        f"the second run did not say it resumed after step {newest}:\n{output[-4000:]}"
    assert max(second) > newest, f"the second run saved nothing new: {sorted(second)}"
    rewritten = [s for s in second if s <= newest and second[s] != first.get(s)]
    assert not rewritten, f"the second run wrote steps {rewritten} at or below {newest}"
    assert restored_step(output) == max(second)


@pytest.mark.slow  # two-host relative runs: test_relative_paths, reuse: test_reuse
def test_quickstart_twice_from_a_relative_directory(tmp_path):
    """README: `XLA_FLAGS=... python examples/quickstart.py /tmp/qs`, here with `qs`."""
    first_run = run([sys.executable, QUICKSTART, "qs"], tmp_path, devices=8)
    assert sorted(os.listdir(tmp_path)) == ["qs"]  # the path is the user's, from their cwd
    first = committed(tmp_path, "qs")
    assert sorted(first) == [20, 30], first_run.stdout
    assert "committed steps: [20, 30] best: 30" in first_run.stdout
    assert restored_step(first_run.stdout) == 30

    second_run = run([sys.executable, QUICKSTART, "qs"], tmp_path, devices=8)
    check_resumed(first, committed(tmp_path, "qs"), second_run.stdout)
    assert sorted(os.listdir(tmp_path)) == ["qs"]


@pytest.mark.slow  # two-host relative runs: test_relative_paths, reuse: test_reuse
@pytest.mark.multiprocess
def test_quickstart_twice_on_two_hosts_from_a_relative_directory(tmp_path):
    """README: `distckpt launch --hosts 2 --devices-per-host 4 -- python
    examples/quickstart.py /tmp/qs`, here with `qs`, run twice."""
    launch = [*distckpt_command(), "launch", "--hosts", "2", "--devices-per-host", "4", "--",
              sys.executable, QUICKSTART, "qs"]
    first_run = run(launch, tmp_path)
    for host in (0, 1):
        assert f"[host {host}] committed steps: [20, 30] best: 30" in first_run.stdout
    first = committed(tmp_path, "qs")
    assert sorted(first) == [20, 30]
    second_run = run(launch, tmp_path)
    second = committed(tmp_path, "qs")
    for host in (0, 1):
        lines = "\n".join(line for line in second_run.stdout.splitlines()
                          if line.startswith(f"[host {host}]"))
        check_resumed(first, second, lines)


@pytest.mark.slow  # CI's main job runs the drill; drill directories: test_cli_input
@pytest.mark.multiprocess
def test_drill_into_a_relative_directory(tmp_path):
    """README: `distckpt drill --dir DIR --json report.json` (the default slices, as the
    README shows them), with relative paths; then `distckpt verify` and `inspect` on the
    drill's checkpoints."""
    res = run([*distckpt_command(), "drill", "--dir", "drill-run", "--json", "report.json"],
              tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["drill-run", "report.json"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verified"] is True, res.stdout[-4000:]
    assert "verified" in res.stdout
    assert report["source"] == "4x2:data=2,fsdp=4"
    assert report["target"] == "2x2:fsdp=2,tensor=2"
    # 6 steps, save every 4: step 4 is the newest save, 2 steps of work lost.
    assert report["restored_step"] == 4 and report["steps_lost"] == 2
    assert report["leaves"] > 0 and report["bytes"] > 0
    assert report["content_mismatch"] == [] and report["sharding_mismatch"] == []
    assert len(report["save_stall_seconds"]) == len(report["commit_seconds"]) == 1
    assert all(c is not None for c in report["commit_seconds"])
    assert report["loss_abs_diff"] <= report["loss_rel_tol"] * max(1, report["loss_before"])
    steps = committed(tmp_path, "drill-run/checkpoints")
    assert report["restored_step"] == max(steps)
    verify = run([*distckpt_command(), "verify", "drill-run/checkpoints", "--json"], tmp_path)
    verdict = json.loads(verify.stdout)
    assert verdict["ok"] is True and [v["step"] for v in verdict["steps"]] == sorted(steps)
