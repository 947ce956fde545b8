"""Every CLI input mistake gets one line, a non-zero exit, no traceback
and no change on disk; drills clean up after themselves; launches are quiet.

Each case runs the real ``distckpt`` command in a subprocess from an empty working directory,
with ``TMPDIR`` pointing at another empty directory, and checks both stay as they were.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "distckpt.tools.cli"]


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def place(tmp_path):
    """(cwd, tmpdir): two empty directories a command runs in and may make temp files in."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    return cwd, tmp


def run(place, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    cwd, tmp = place
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), **(env or {})}
    return subprocess.run(CLI + list(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(res, *needles: str) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_untouched(place, before=((), ())):
    assert (snapshot(place[0]), snapshot(place[1])) == tuple(list(b) for b in before)


# --------------------------------------------------------------------------- launch
def test_launch_of_a_missing_program_says_so(place):
    res = run(place, "launch", "--hosts", "2", "--", "no-such-program", "--flag")
    line = assert_one_line_error(res, "'no-such-program'", "no such program", "full path")
    assert res.returncode == 127, line
    assert_untouched(place)


# --------------------------------------------------------------------------- train
@pytest.mark.parametrize("args, needle", [
    (["--mesh", "bogus"], "bad mesh spec 'bogus'"),
    (["--mesh", "data=3"], "mesh data=3 needs 3 devices but 2 are available"),
    (["--mesh", "fsdp=2", "--d-model", "7"], "does not fit mesh fsdp=2"),
    (["--dir", "afile"], "--dir afile is a file"),
    (["--dir", "afile/sub"], "--dir afile/sub is inside afile, which is a file"),
    (["--executable-cache", "afile"], "--executable-cache afile is a file; give a directory"),
    (["--executable-cache", "afile/x"], "--executable-cache afile/x is inside afile, which is "
     "a file; give a directory"),
    (["--executable-cache", ""], "--executable-cache: an empty path; give a directory"),
])
def test_train_rejects_bad_input_before_touching_disk(place, args, needle):
    (place[0] / "afile").write_text("mine")
    res = run(place, "train", "--dir", "ckpt", "--steps", "1", *args,
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert_one_line_error(res, needle)
    assert_untouched(place, (["afile"], []))
    assert (place[0] / "afile").read_text() == "mine"


# --------------------------------------------------------------------------- drill
@pytest.mark.parametrize("args, needle", [
    # Does not divide the default --from mesh's fsdp=4 (nor --to's fsdp=2).
    (["--d-model", "7"], "--from 4x2:data=2,fsdp=4: the model does not fit mesh data=2,fsdp=4"),
    # Fits the saving slice (fsdp=2), not the restoring one (fsdp=4).
    (["--from", "2x1", "--to", "1x4", "--d-model", "6"], "--to 1x4:fsdp=4: the model does not "
     "fit mesh fsdp=4: model/"),
    (["--from", "2x1", "--to", "1x4", "--batch", "6"], "--to 1x4:fsdp=4: the model does not fit"),
    (["--from", "0x1"], "--from 0x1: hosts and devices per host must be >= 1"),
    (["--to", "2x0:fsdp=0"], "--to 2x0:fsdp=0: hosts and devices per host must be >= 1"),
    (["--from", "4x2:data=3"], "--from 4x2:data=3: slice 4x2 has 8 devices but mesh data=3"),
])
def test_drill_rejects_bad_input_before_anything_starts(place, args, needle):
    res = run(place, "drill", *args, timeout=120)
    line = assert_one_line_error(res, needle)
    assert res.returncode == 2 and "fsdp=0" not in line.replace("2x0:fsdp=0", "")
    assert res.stdout == ""  # no report of Nones
    assert_untouched(place)


@pytest.mark.slow  # runs failing drills
def test_failed_drill_removes_its_temp_dir_unless_kept(place):
    # A real worker failure: the workers reject the log level at start-up (exit 1).
    res = run(place, "drill", "--from", "1x1", "--to", "1x1", "--steps", "1", "--save-every",
              "1", env={"DISTCKPT_LOG": "BOGUS"})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "save phase exited 1" in res.stdout and "--keep" in res.stdout
    assert_untouched(place)

    res = run(place, "drill", "--from", "1x1", "--to", "1x1", "--steps", "1", "--save-every",
              "1", "--keep", env={"DISTCKPT_LOG": "BOGUS"})
    assert res.returncode == 1, res.stdout + res.stderr
    kept = [p for p in place[1].iterdir() if p.name.startswith("distckpt-drill-")]
    assert len(kept) == 1 and (kept[0] / "save.log").exists()
    assert f"kept the drill's directory (logs, specs, results): {kept[0]}" in res.stdout


@pytest.mark.slow  # a whole drill (~30 s on 2 cores); the failed drill above is the fast check
@pytest.mark.multiprocess
def test_drill_removes_its_temp_dir(place):
    # The report's parent directories do not exist yet: --json makes them (a traceback
    # after the whole drill, once).
    report = place[0].parent / "reports" / "today" / "report.json"
    res = run(place, "drill", "--from", "1x1", "--to", "1x1", "--steps", "1", "--save-every",
              "1", "--json", str(report))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    got = json.loads(report.read_text())
    assert got["verified"] and got["removed"]
    assert not Path(got["directory"]).exists()
    assert_untouched(place)


@pytest.mark.parametrize("command", [
    ["drill"], ["bench"], ["goodput"], ["plan-restore", "ckpt", "--to", "1x1"]])
@pytest.mark.parametrize("flag, path, needle", [
    ("--json", "adir", "--json: adir is a directory; give a file name"),
    ("--json", "afile/r.json", "--json: afile/r.json is inside afile, which is a file"),
    ("--json", "", "--json: an empty path"),
])
def test_a_report_path_that_cannot_be_written_is_refused_before_any_work(place, command,
                                                                          flag, path, needle):
    """Checked when the arguments are parsed: a drill or a bench never runs for minutes
    and then fails writing its report."""
    (place[0] / "adir").mkdir()
    (place[0] / "afile").write_text("mine")
    res = run(place, *command, flag, path, timeout=120)
    assert res.returncode == 2
    assert_one_line_error(res, needle, f"see distckpt {command[0]} --help")
    assert res.stdout == ""
    assert_untouched(place, (["adir", "afile"], []))


@pytest.mark.parametrize("command, flag", [(["bench"], "--chart"), (["bench"], "--markdown"),
                                           (["goodput"], "--png")])
def test_every_output_flag_is_checked(place, command, flag):
    (place[0] / "adir").mkdir()
    res = run(place, *command, flag, "adir", timeout=120)
    assert_one_line_error(res, f"{flag}: adir is a directory")
    assert_untouched(place, (["adir"], []))


def test_report_paths_unit(tmp_path, monkeypatch):
    from distckpt.tools import outputs

    monkeypatch.chdir(tmp_path)
    assert outputs.unwritable("new/deeper/r.json") is None  # parents are made on write
    outputs.write_text("new/deeper/r.json", "{}")
    assert (tmp_path / "new/deeper/r.json").read_text() == "{}"
    assert outputs.unwritable("new/deeper/r.json") is None  # overwriting a report is fine
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere
            pytest.skip("running as root: permissions are not enforced")
        assert "ro is not writable" in outputs.unwritable("ro/sub/r.json")
    finally:
        (tmp_path / "ro").chmod(0o700)


# --------------------------------------------------------------------------- inspect/verify
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real one-step checkpoint of the reference transformer, saved in-process."""
    from distckpt.checkpoint.service import CheckpointOptions, CheckpointService
    from distckpt.state.mesh import make_mesh
    from distckpt.tools import train

    directory = tmp_path_factory.mktemp("cli-input") / "ckpt"
    cfg = train.TrainConfig()
    mesh = make_mesh("fsdp=8")
    with CheckpointService(str(directory), CheckpointOptions()) as ckpt:
        ckpt.save(1, train.new_state(cfg, mesh), force=True)
        ckpt.wait()
    return directory


@pytest.mark.parametrize("mib", ["0", "-1", "nan"])
def test_verify_rejects_a_non_positive_batch(place, checkpoint, mib):
    before = snapshot(checkpoint)
    res = run(place, "verify", str(checkpoint), f"--batch-mib={mib}")
    assert_one_line_error(res, f"--batch-mib {mib}", "positive")
    assert res.returncode == 2 and res.stdout == ""
    assert snapshot(checkpoint) == before
    assert_untouched(place)


@pytest.mark.slow  # output layout
def test_inspect_never_cuts_a_leaf_path(place, checkpoint):
    leaves = json.loads(run(place, "inspect", str(checkpoint), "--json").stdout)[
        "detail"]["leaves"]
    assert max(len(name) for name in leaves) > 40
    # Piped (not a terminal): each path whole on its row, however wide that makes the table.
    res = run(place, "inspect", str(checkpoint), env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout
    rows = res.stdout.splitlines()
    for name in leaves:
        assert any(name in row for row in rows), name
    # A narrow terminal wraps a path rather than cutting it.
    res = run(place, "inspect", str(checkpoint), env={"TTY_COMPATIBLE": "1", "COLUMNS": "60"})
    text = re.sub(r"\x1b\[[0-9;]*m", "", res.stdout)  # the terminal's colours
    assert res.returncode == 0 and "…" not in text, text
    table = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert table and max(len(line) for line in table) <= 60  # wrapped to fit
    assert_untouched(place)


# --------------------------------------------------------------------------- remat-plan
@pytest.mark.parametrize("args, needle", [
    (["--budget", "0"], "--budget 0: the activation budget must be at least 1 byte"),
    (["--budget", "0.5"], "--budget 0.5: the activation budget must be at least 1 byte"),
    (["--device-memory", "0"], "--device-memory 0: device memory must be at least 1 byte"),
])
def test_remat_plan_rejects_a_non_positive_budget(place, args, needle):
    res = run(place, "remat-plan", *args)
    line = assert_one_line_error(res, needle)
    assert "parameters" not in line
    assert_untouched(place)


# --------------------------------------------------------------------------- bench
def _has_gpu() -> bool:
    import shutil

    return shutil.which("nvidia-smi") is not None


@pytest.mark.parametrize("args, needle", [
    (["--platform", "bogus"], "--platform must be one of cpu, gpu, tpu, got 'bogus'"),
    pytest.param(["--platform", "gpu"], "no gpu devices found: ",
                 marks=pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")),
    (["--data-parallel", "3"], "data_parallel=3 does not divide the 8 devices of 4 hosts"),
    (["--single-process", "--data-parallel", "3"],
     "data_parallel=3 does not divide the 2 devices of 1 hosts"),
    (["--single-process", "--hosts", "2"], "leave --hosts out"),
    (["--shapes", "-1"], "--shapes must be >= 0"),
])
def test_bench_rejects_bad_input_before_writing_anything(place, args, needle):
    res = run(place, "bench", "--dir", "out", *args)
    assert res.returncode == 2
    assert_one_line_error(res, "distckpt bench: error: ", needle)
    assert_untouched(place)


# --------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", ["drill", "launch", "train", "inspect", "verify",
                                     "remat-plan", "bench", "goodput"])
def test_help_still_works(place, command):
    res = run(place, command, "--help")
    assert res.returncode == 0 and "usage: distckpt" in res.stdout, res.stderr
    assert_untouched(place)


def test_paths_with_brackets_are_printed_as_given(place):
    """Rich reads '[...]' as markup: a path like 'runs/[exp]/[/x]' once raised MarkupError
    (a traceback) in `inspect`; now it is printed as given."""
    res = run(place, "inspect", "runs[exp]/[/x]")
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert res.returncode != 0
    assert "runs[exp]/[/x] does not exist" in res.stdout + res.stderr, res.stdout + res.stderr
    assert_untouched(place)


@pytest.mark.parametrize("args, needles", [
    (["drill", "--bogus"], ["unrecognized arguments: --bogus", "see distckpt --help"]),
    (["drill", "--steps", "x"], ["invalid int value: 'x'", "see distckpt drill --help"]),
    (["nosuch"], ["invalid choice: 'nosuch'"]),
    (["verify"], ["required: dir", "see distckpt verify --help"]),
])
def test_argument_errors_are_one_line(place, args, needles):
    """argparse prints the usage before its error; distckpt's parsers print one line."""
    res = run(place, *args)
    assert res.returncode == 2
    assert_one_line_error(res, *needles)
    assert_untouched(place)


def test_a_drill_directory_is_read_where_its_checkpoints_are(place, checkpoint):
    """`distckpt drill --dir DIR` keeps its logs in DIR and the checkpoints in
    DIR/checkpoints; inspect, verify and plan-restore of DIR once said 'not a distckpt
    checkpoint directory; point at the directory you gave ... distckpt drill --dir'."""
    import shutil

    drill = place[0] / "drill"
    drill.mkdir()
    shutil.copytree(checkpoint, drill / "checkpoints")
    (drill / "save-spec.json").write_text("{}")
    before = snapshot(place[0])
    note = "drill is a drill's directory; reading its checkpoints in drill/checkpoints"
    for args in (["inspect", "drill"], ["verify", "drill"],
                 ["plan-restore", "drill", "--to", "1x1"]):
        res = run(place, *args)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stderr.strip().splitlines()[0] == f"distckpt {args[0]}: {note}", res.stderr
    res = run(place, "inspect", "drill", "--json")
    assert json.loads(res.stdout)["steps"][0]["committed"]  # stdout stays JSON
    assert snapshot(place[0]) == before
    # Without its checkpoints it is read as it is (no steps: a problem, exit 1).
    (drill / "checkpoints").rename(place[0] / "moved")
    res = run(place, "inspect", "drill")
    assert res.returncode == 1 and "drill's directory" not in res.stderr
    assert "no step directories" in res.stdout
