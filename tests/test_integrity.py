"""Content checksums, fallback with quarantine, bad input.

Damage is done to real files on disk (flipped bytes, truncation, garbage JSON);
nothing in Orbax, TensorStore or the filesystem is mocked.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from etils import epath
from flax import nnx

import distckpt
from distckpt.checkpoint import commit, committed
from distckpt.errors import FormatVersionError, StepProblem, StepUnusableError
from tests.mp_worker import factory

WIDTH = 600  # 600x600 float32 kernels: data files above committed.SMALL_FILE_BYTES (no CRC)


def snapshot(root) -> dict[str, str]:
    """Every file and link under root with a hash of its contents (to prove nothing changed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def biggest_data_file(step_dir) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
             for f in fs if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep]
    path = max(files, key=os.path.getsize)
    assert os.path.getsize(path) > committed.SMALL_FILE_BYTES, "test needs a big data file"
    return path


def flip(path: str, rng: random.Random, count: int = 1) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    for _ in range(count):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    with open(path, "wb") as f:
        f.write(data)


def save_steps(directory, steps, width=WIDTH, mesh_spec="data=2,fsdp=2,tensor=2"):
    mesh = distckpt.make_mesh(mesh_spec)
    items = distckpt.init_sharded(factory(width=width), mesh)
    with distckpt.CheckpointService(directory, distckpt.CheckpointOptions(max_to_keep=None)) \
            as ckpt:
        for s in steps:
            # A different state per step, so a wrong step cannot pass for the right one.
            params = nnx.state(items["model"], nnx.Param)
            nnx.update(items["model"], jax.tree.map(lambda x: x + 1.0, params))
            ckpt.save(s, items, metrics={"loss": 1.0 / s}, metadata={"step": s})
        ckpt.wait()
    return mesh


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    directory = tmp_path_factory.mktemp("four")
    save_steps(directory, [1, 2, 3, 4])
    return directory


def copy_of(src, dst):
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def target(mesh_spec="fsdp=8", width=WIDTH):
    return distckpt.abstract_target(factory(width=width), distckpt.make_mesh(mesh_spec))


def test_flipped_bytes_in_array_data_are_caught_and_named(four_steps, tmp_path):
    rng = random.Random(1234)
    for trial in range(3):
        d = copy_of(four_steps, tmp_path / f"t{trial}")
        flip(biggest_data_file(d / "4"), rng, count=4)
        before = snapshot(d)
        with distckpt.CheckpointService(d, distckpt.CheckpointOptions(read_only=True)) as ckpt:
            with pytest.raises(StepUnusableError) as err:
                ckpt.restore(target(), step=4)
            assert err.value.step == 4 and err.value.kind in ("corrupt", "unreadable")
            if err.value.kind == "corrupt":  # a checksum mismatch names the array
                assert "checksum" in err.value.reason and "kernel" in err.value.reason
            # The explicit step never falls back; with no step it does (read-only: no move).
            restored = ckpt.restore(target())
            assert restored.step == 3 and restored.verified
            assert [s for s, _ in restored.skipped] == [4]
        assert snapshot(d) == before  # a reader changes nothing
        cli = subprocess.run([sys.executable, "-m", "distckpt.tools.cli", "verify", str(d), "--json"],
                             capture_output=True, text=True, env={**os.environ,
                                                                  "XLA_FLAGS": ""})
        assert cli.returncode == 1, cli.stderr
        report = json.loads(cli.stdout)
        verdicts = {v["step"]: v for v in report["steps"]}
        assert [s for s, v in verdicts.items() if not v["ok"]] == [4]
        assert verdicts[3]["arrays"] > 0 and verdicts[3]["bytes"] > 4 * WIDTH * WIDTH
        assert snapshot(d) == before


def test_verify_cli_one_cpu_process_whatever_saved_it(four_steps):
    # Saved by a process with 8 devices on a 3-axis mesh; verified by one with 1 device.
    cli = subprocess.run([sys.executable, "-m", "distckpt.tools.cli", "verify", str(four_steps),
                          "--step", "2"], capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": ""})
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "step 2: ok" in cli.stdout


def test_small_file_edits_and_truncation_are_caught(four_steps, tmp_path):
    d = copy_of(four_steps, tmp_path / "d")
    meta = d / "3" / "metadata" / "metadata.json"
    meta.write_text(meta.read_text().replace('"step": 3', '"step": 7'))  # valid JSON, same size
    big = biggest_data_file(d / "2")
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)
    with distckpt.CheckpointService(d, distckpt.CheckpointOptions(read_only=True)) as ckpt:
        with pytest.raises(StepUnusableError, match="metadata.json: contents changed") as e3:
            ckpt.restore(target(), step=3)
        assert e3.value.kind == "corrupt"
        with pytest.raises(StepUnusableError, match="bytes, .* when committed") as e2:
            ckpt.restore(target(), step=2)
        assert e2.value.kind == "incomplete"
    # The file checks are typed results: no caller reads their text.
    steps = {s: epath.Path(d / str(s)) for s in (2, 3)}
    found = {p.rel: p.problem for s, path in steps.items()
             for p in committed.check_files(path, committed.read_record(path, s))}
    assert found["metadata/metadata.json"] is StepProblem.CORRUPT
    assert found[os.path.relpath(big, d / "2")] is StepProblem.INCOMPLETE
    assert e3.value.kind is StepProblem.CORRUPT and e2.value.kind is StepProblem.INCOMPLETE


def test_bad_inputs_get_clear_errors_and_change_nothing(four_steps, tmp_path):
    """Section 6: each bad input; `inspect` reports it, restore/verify say what to do."""
    cases = {}
    cases["missing"] = tmp_path / "does-not-exist"
    (tmp_path / "empty").mkdir()
    cases["empty"] = tmp_path / "empty"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    cases["not a checkpoint"] = tmp_path / "foreign"
    garbage = copy_of(four_steps, tmp_path / "garbage")
    (garbage / "4" / "provenance" / "provenance.json").write_text("{not json")
    cases["garbage metadata"] = garbage
    truncated = copy_of(four_steps, tmp_path / "truncated")
    prov = truncated / "4" / "provenance" / "provenance.json"
    prov.write_text(prov.read_text()[:100])
    cases["truncated metadata"] = truncated
    arr = copy_of(four_steps, tmp_path / "array-truncated")
    big = biggest_data_file(arr / "4")
    with open(big, "r+b") as f:
        f.truncate(100)
    cases["truncated array file"] = arr
    newer = copy_of(four_steps, tmp_path / "newer")
    p = newer / "4" / "provenance" / "provenance.json"
    record = json.loads(p.read_text())
    record["format_version"] = 99
    p.write_text(json.dumps(record))
    # A newer writer would write a consistent commit record: update sizes and CRCs.
    rec_path = newer / "4" / committed.COMMIT_FILE
    rec = json.loads(rec_path.read_text())
    rec["files"]["provenance/provenance.json"] = p.stat().st_size
    rec["crc32"]["provenance/provenance.json"] = committed._crc32(p)
    rec_path.write_text(json.dumps(rec))
    cases["newer format"] = newer

    expect = {
        "missing": "does not exist",
        "empty": "empty directory",
        "not a checkpoint": "not a distckpt checkpoint directory",
        "garbage metadata": "provenance/provenance.json",
        "truncated metadata": "provenance/provenance.json",
        "truncated array file": "when committed",
        "newer format": "newer distckpt",
    }
    def cli(command: str, d: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distckpt.tools.cli", command, str(d),
                               *(["--json"] if command == "inspect" else [])],
                              capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})

    before = {name: snapshot(d) if d.exists() else None for name, d in cases.items()}
    # Two CLI processes at a time (each is one Python process importing JAX: one core).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {(name, command): pool.submit(cli, command, d)
                for name, d in cases.items() for command in ("inspect", "verify")}
    for name, d in cases.items():
        icli, vcli = runs[name, "inspect"].result(), runs[name, "verify"].result()
        assert icli.returncode in (1, 2), (name, icli.stdout, icli.stderr)
        assert "Traceback" not in icli.stderr, (name, icli.stderr)
        report = json.loads(icli.stdout)
        assert any(expect[name] in p for p in report["problems"]), (name, report["problems"])
        assert vcli.returncode in (1, 2) and "Traceback" not in vcli.stderr, (name, vcli.stderr)
        assert (snapshot(d) if d.exists() else None) == before[name], name

    # The API says the same things, and a read-only restore changes nothing.
    with pytest.raises(distckpt.NoCheckpointError, match="does not exist"):
        distckpt.CheckpointService(cases["missing"], distckpt.CheckpointOptions(read_only=True))
    for name in ("empty", "not a checkpoint"):
        with distckpt.CheckpointService(cases[name], distckpt.CheckpointOptions(read_only=True)) \
                as ckpt, pytest.raises(distckpt.NoCheckpointError, match="no committed"):
            ckpt.restore(target())
    before = snapshot(cases["newer format"])
    with distckpt.CheckpointService(cases["newer format"],
                                    distckpt.CheckpointOptions(read_only=True)) as ckpt:
        with pytest.raises(FormatVersionError, match="upgrade distckpt"):
            ckpt.restore(target())  # never silently falls back past a newer step
    assert snapshot(cases["newer format"]) == before


def test_a_target_that_does_not_fit_is_not_blamed_on_the_step(four_steps, tmp_path):
    d = copy_of(four_steps, tmp_path / "d")
    before = snapshot(d)
    with distckpt.CheckpointService(d) as ckpt:  # writable: it could quarantine, must not
        with pytest.raises(distckpt.TargetMismatchError, match="shape"):
            ckpt.restore(target(width=WIDTH + 8))
        assert ckpt.all_steps() == [1, 2, 3, 4]
    assert snapshot(d) == before


def test_fallback_agrees_across_processes_and_quarantines(four_steps, tmp_path, run_hosts):
    d = copy_of(four_steps, tmp_path / "d")
    rng = random.Random(7)
    flip(biggest_data_file(d / "4"), rng, count=8)  # corrupt
    big = biggest_data_file(d / "3")
    with open(big, "r+b") as f:  # incomplete
        f.truncate(os.path.getsize(big) - 10)
    (d / "2" / "metadata" / "metadata.json").write_text('{"user": {}, "metrics": {"loss": 9}}')
    out = tmp_path / "out.json"
    run_hosts(2, 2, "fallback", str(out), "--dir", str(d), "--mesh", "fsdp=4",
              "--width", str(WIDTH), timeout=400).check()
    result = json.loads(out.read_text())
    assert result["steps_by_process"] == [[1, 1], [1, 1]]
    for mode in ("read_only", "writable"):
        r = result[mode]
        assert r["step"] == 1 and r["verified"]
        assert [s for s, _ in r["skipped"]] == [4, 3, 2], r["skipped"]
    assert result["read_only"]["listed"] == [1, 2, 3, 4]  # readers move nothing
    assert result["writable"]["listed"] == [1]
    moved = sorted(name.split(".")[0] for name in os.listdir(d / commit.QUARANTINE_DIR))
    assert moved == ["2", "3", "4"]
    # Quarantined, not deleted: the bad steps are still there to look at.
    assert all(os.listdir(d / commit.QUARANTINE_DIR / n) for n in
               os.listdir(d / commit.QUARANTINE_DIR))
    assert jax.device_count() == 8


def test_paths_in_a_commit_record_cannot_leave_the_step(four_steps, tmp_path):
    d = copy_of(four_steps, tmp_path / "d")
    (tmp_path / "secret").write_text("x")
    rec_path = d / "4" / committed.COMMIT_FILE
    rec = json.loads(rec_path.read_text())
    rec["files"]["../../secret"] = 1
    rec_path.write_text(json.dumps(rec))
    scanned = committed.scan(d)
    assert isinstance(scanned[4], committed.CommitRecordError)
    assert "outside the step" in str(scanned[4])
    assert committed.committed_steps(d) == [1, 2, 3]
