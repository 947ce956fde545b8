"""A relative checkpoint directory works everywhere: the service, verify/inspect, and a
multi-host job whose hosts each resolve it against their own working directory."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

import distckpt
from distckpt.tools import cli
from distckpt.tools.launcher import launch
from tests.mp_worker import factory


@pytest.mark.fast
def test_service_saves_and_restores_a_relative_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mesh = distckpt.make_mesh("fsdp=8")
    items = distckpt.init_sharded(factory(), mesh)
    with distckpt.CheckpointService("ckpt", distckpt.CheckpointOptions(max_to_keep=None)) \
            as ckpt:
        ckpt.save(1, items, metadata={"run": "relative"})
        ckpt.save(2, items)
        ckpt.wait()  # the background commit used to fail: "path should be absolute"
        assert ckpt.all_steps() == [1, 2]
        restored = ckpt.restore(distckpt.abstract_target(factory(), mesh), step=1)
    assert restored.verified and restored.metadata == {"run": "relative"}
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]  # no temporary left behind
    # "." from inside it names the same directory.
    monkeypatch.chdir(tmp_path / "ckpt")
    with distckpt.CheckpointService(".", distckpt.CheckpointOptions(read_only=True)) as ro:
        assert ro.all_steps() == [1, 2]
        assert str(ro.directory) == str(tmp_path / "ckpt")


@pytest.fixture
def relative_checkpoint(tmp_path, monkeypatch):
    mesh = distckpt.make_mesh("fsdp=8")
    with distckpt.CheckpointService(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, distckpt.init_sharded(factory(), mesh), metrics={"loss": 1.0})
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.fast
@pytest.mark.parametrize("where, arg", [("", "ckpt"), ("", "./ckpt/"), ("ckpt", ".")])
def test_verify_and_inspect_accept_relative_paths(relative_checkpoint, monkeypatch, capsys,
                                                  where, arg):
    monkeypatch.chdir(relative_checkpoint / where)
    assert cli.main(["verify", arg, "--json"]) == 0, capsys.readouterr()
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [s["step"] for s in report["steps"]] == [3]
    assert all(s["ok"] and s["arrays"] > 0 for s in report["steps"]), report
    assert cli.main(["inspect", arg, "--json"]) == 0, capsys.readouterr()
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["problems"] == [] and inspected["detail"]["step"] == 3


@pytest.mark.multiprocess
def test_two_hosts_with_a_relative_directory_from_different_working_dirs(tmp_path, run_hosts):
    """Host 0 runs in host0/, host 1 in host1/; both are told 'ckpt' (host1/ckpt is a
    symlink to host0/ckpt), so their absolute paths differ but name one directory."""
    (tmp_path / "host0" / "ckpt").mkdir(parents=True)
    (tmp_path / "host1").mkdir()
    (tmp_path / "host1" / "ckpt").symlink_to(tmp_path / "host0" / "ckpt")
    out = tmp_path / "out"
    run_hosts(2, 1, "relative", str(out), "--dir", str(tmp_path), "--mesh", "fsdp=2").check()
    for pid in (0, 1):
        got = json.loads(Path(f"{out}.{pid}").read_text())
        assert got["cwd"] == str(tmp_path / f"host{pid}")
        assert got["steps"] == [1, 2] and got["restored"] == 1 and got["verified"]
        assert got["metadata"] == {"cwd": str(tmp_path / "host0")}  # the primary's
    assert sorted(os.listdir(tmp_path / "host0" / "ckpt")) == ["1", "2"]


@pytest.mark.slow  # two hosts, relative, different cwds stays
@pytest.mark.multiprocess
def test_train_command_with_a_relative_directory_on_two_hosts(tmp_path):
    buf = io.StringIO()
    command = [sys.executable, "-m", "distckpt.tools.cli", "train", "--dir", "ckpt", "--steps", "4",
               "--save-every", "2", "--mesh", "fsdp=2", "--d-model", "16", "--layers", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    result = launch(command, 2, 1, out=buf, timeout_s=300, forward_signals=False, env=env,
                    cwd=str(tmp_path))
    assert result.returncode == 0, buf.getvalue()[-4000:]
    line = [x for x in buf.getvalue().splitlines() if x.startswith("[host 0] {")][-1]
    assert json.loads(line.split("] ", 1)[1])["saved_steps"] == [2, 4]
    assert {"2", "4"} <= set(os.listdir(tmp_path / "ckpt"))
