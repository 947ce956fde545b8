"""Issue 6: CheckpointService, inspect, verify and the drill on ``s3://``, on a real S3 server.

Every test talks to the session's SeaweedFS server (tests/s3_fixture.py) with credentials
from the environment; nothing in Orbax, TensorStore, s3fs or the distributed layer is
mocked. Damage (a flipped byte, a crash in the middle of a retention delete) is done to
real objects with plain PUTs and DELETEs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distckpt
from distckpt import commit, nnx_state, storage
from distckpt.errors import StepUnusableError
from distckpt.inspection import inspect_directory
from distckpt.reader import StepReader
from tests.mp_worker import factory, fingerprint, train_step

S3_WORKER = str(Path(__file__).parent / "s3_worker.py")
REPO = str(Path(__file__).parent.parent)


# --------------------------------------------------------------------------- helpers
def arrays(items) -> dict[str, np.ndarray]:
    out = {}
    for leaf in nnx_state.flatten_items(items):
        value = jax.random.key_data(leaf.value) if leaf.is_key else leaf.value
        out[leaf.name] = np.asarray(value)
    return out


def assert_same(got, want) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def trained(mesh_spec: str = "data=2,fsdp=2,tensor=2", steps: int = 1):
    items = distckpt.init_sharded(factory(), distckpt.make_mesh(mesh_spec))
    x = jnp.linspace(-1, 1, 32, dtype=jnp.float32).reshape(4, 8)
    for _ in range(steps):
        train_step(items["model"], items["optimizer"], x)
    return items


def target(mesh_spec: str = "fsdp=8"):
    return distckpt.abstract_target(factory(), distckpt.make_mesh(mesh_spec))


def keys(url: str, prefix: str = "") -> list[str]:
    return storage.small_files(url).list(prefix)


def listed(url: str) -> list[int]:
    return commit.committed_steps(storage.open_directory(url)[1])


READ_ONLY = distckpt.CheckpointOptions(read_only=True)


def assert_no_secret(server, *texts: str) -> None:
    for text in texts:
        assert server.secret_access_key not in text


def assert_objects_hold_no_secret(server, url: str) -> None:
    files = storage.small_files(url)
    for key in files.list():
        assert server.secret_access_key.encode() not in files.read_bytes(key), key


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distckpt.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO})


def biggest_data_object(url: str, step: int) -> str:
    sizes = storage.list_files(storage.open_directory(url)[1] / str(step) / "state")
    data = {rel: size for rel, size in sizes.items() if rel.rsplit("/", 2)[-2:-1] == ["d"]}
    return f"{step}/state/{max(data, key=lambda r: data[r])}"


def flip_object(url: str, key: str) -> None:
    files = storage.small_files(url)
    data = bytearray(files.read_bytes(key))
    for i in range(0, len(data), max(1, len(data) // 8)):
        data[i] ^= 0x10
    files.write_bytes(key, bytes(data))


# --------------------------------------------------------------------------- in process
def test_save_restore_retention_and_overwrite_on_s3(s3_env, s3_url, s3_server):
    """Async saves with max_to_keep=2, bit-exact restore onto another mesh, StepExistsError
    and overwrite, all on s3:// in one process with 8 devices; a save can never delete a
    committed step."""
    items = trained()
    saved = {}
    with distckpt.CheckpointService(s3_url, distckpt.CheckpointOptions(max_to_keep=2)) as ckpt:
        assert isinstance(ckpt._manager._checkpoint_deleter, commit.ObjectStoreDeleter)
        for step in (1, 2, 3):
            assert ckpt.save(step, items, metrics={"loss": 1.0 / step},
                             metadata={"step": step})
            saved[step] = arrays(items)
            train_step(items["model"], items["optimizer"],
                       jnp.ones((4, 8), jnp.float32) * step)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        with pytest.raises(distckpt.StepExistsError, match="already exists"):
            ckpt.save(3, items, force=True)
        ckpt.save(3, items, force=True, overwrite=True, metadata={"run": "again"})
        saved[3] = arrays(items)
        ckpt.wait()
        assert ckpt.metadata(3) == {"run": "again"} and ckpt.all_steps() == [2, 3]
    everything = keys(s3_url)
    # Retention deleted every object of step 1; no trash, temporary or probe object is left.
    assert not [k for k in everything if not k.startswith(("2/", "3/"))], everything
    assert not [k for k in everything if ".orbax-checkpoint-tmp" in k]
    # The commit record lists every other object of the step, with its size.
    record = storage.small_files(s3_url).read_json(f"3/{commit.COMMIT_FILE}")
    sizes = storage.list_files(storage.open_directory(s3_url)[1] / "3")
    assert record["files"] == {k: v for k, v in sizes.items() if k != commit.COMMIT_FILE}
    assert "commit_success.txt" in record["files"]  # Orbax's marker, written before ours
    with distckpt.CheckpointService(s3_url, READ_ONLY) as ckpt:
        restored = ckpt.restore(target("fsdp=8"))
        assert ckpt.metrics(2) == {"loss": 0.5}
    assert restored.step == 3 and restored.verified
    assert_same(arrays(restored.items), saved[3])
    want = {leaf.name: leaf.value.sharding for leaf in nnx_state.flatten_items(target())}
    for leaf in nnx_state.flatten_items(restored.items):
        assert leaf.value.sharding.is_equivalent_to(want[leaf.name], leaf.value.ndim)
    assert_objects_hold_no_secret(s3_server, s3_url)
    # Orbax's CommitFileTemporaryPath.create() removes whatever is at the step's path
    # before writing; distckpt's path class refuses when that is a committed step.
    _, root = storage.open_directory(s3_url)
    step_path = commit.commit_path_class(root, lambda path, step: {}).from_final(root / "3")
    with pytest.raises(FileExistsError, match="committed step"):
        asyncio.run(step_path.create())
    assert keys(s3_url) == everything and listed(s3_url) == [2, 3]


@pytest.mark.slow  # CI runs it in its slow pass
def test_steps_copied_between_local_disk_and_s3_stay_valid(s3_env, s3_url, s3_server,
                                                           tmp_path):
    """A step copied object by object (plain PUTs) keeps its commit record valid, both ways;
    a copy without its record is never listed."""
    items = trained()
    want = arrays(items)
    local = tmp_path / "local"
    with distckpt.CheckpointService(local) as ckpt:
        ckpt.save(1, items)
    to_s3 = storage.small_files(f"{s3_url}/from-local")
    without_record = storage.small_files(f"{s3_url}/no-record")
    for rel in storage.list_files(local / "1"):
        data = (local / "1" / rel).read_bytes()
        to_s3.write_bytes(f"1/{rel}", data)
        if rel != commit.COMMIT_FILE:
            without_record.write_bytes(f"1/{rel}", data)
    assert listed(f"{s3_url}/no-record") == []
    with distckpt.CheckpointService(f"{s3_url}/from-local", READ_ONLY) as ckpt:
        restored = ckpt.restore(target())
    assert restored.step == 1 and restored.verified
    assert_same(arrays(restored.items), want)

    with distckpt.CheckpointService(f"{s3_url}/from-s3") as ckpt:
        ckpt.save(2, items)
    back = tmp_path / "back"
    from_s3 = storage.small_files(f"{s3_url}/from-s3")
    for key in from_s3.list():
        path = back / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(from_s3.read_bytes(key))
    with distckpt.CheckpointService(back, READ_ONLY) as ckpt:
        restored = ckpt.restore(target("fsdp=4,tensor=2"))
    assert restored.step == 2 and restored.verified
    assert_same(arrays(restored.items), want)


def test_retention_deletes_are_safe_for_readers(s3_env, s3_url):
    """Retention deletes the commit record first: a reader that listed the step gets a
    StepUnusableError (and a restore falls back); a crash in the middle of a delete
    leaves an unlisted leftover that the next writer finishes deleting."""
    items = trained()
    with distckpt.CheckpointService(s3_url, distckpt.CheckpointOptions(max_to_keep=None)) \
            as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, items)
    _, root = storage.open_directory(s3_url)
    reader = StepReader(root, 3)  # listed, record read: then retention deletes the step
    commit.delete_step(root, 3)
    assert keys(s3_url, "3/") == [] and keys(s3_url, commit.TRASH_DIR + "/") == []
    with pytest.raises(StepUnusableError, match="missing") as e:
        reader.check_files()
    assert e.value.kind == "incomplete"
    tree = nnx_state.restore_target(nnx_state.flatten_items(target()))
    with pytest.raises(StepUnusableError, match="array data is unreadable"):
        reader.restore_arrays(tree, partial=True)
    assert commit.quarantine(root, 3, "incomplete") is None  # a writer moves nothing then
    assert keys(s3_url, commit.QUARANTINE_DIR + "/") == []
    # A crash after the record of step 2 was deleted and before its other objects were.
    storage.small_files(s3_url).write_json(f"{commit.TRASH_DIR}/2.20260101T000000Z.deleting",
                                           {"step": 2})
    storage.small_files(s3_url).delete(f"2/{commit.COMMIT_FILE}")
    assert listed(s3_url) == [1] and keys(s3_url, "2/")
    with distckpt.CheckpointService(s3_url, READ_ONLY) as ckpt:
        restored = ckpt.restore(target())
        assert restored.step == 1 and restored.verified and restored.skipped == ()
    assert keys(s3_url, "2/")  # the reader changed nothing
    with distckpt.CheckpointService(s3_url) as ckpt:  # a writer finishes the delete
        assert ckpt.all_steps() == [1]
    assert keys(s3_url, "2/") == [] and keys(s3_url, commit.TRASH_DIR + "/") == []


def test_corrupt_step_on_s3_verify_inspect_fallback_quarantine(s3_env, s3_url, s3_server):
    """`distckpt verify` and `inspect` on s3://; a flipped byte is caught, a writable restore
    falls back and quarantines the step (copied aside, its record deleted first)."""
    items = trained()
    with distckpt.CheckpointService(s3_url, distckpt.CheckpointOptions(max_to_keep=None)) \
            as ckpt:
        ckpt.save(1, items)
        train_step(items["model"], items["optimizer"], jnp.ones((4, 8), jnp.float32))
        ckpt.save(2, items)
    bad = biggest_data_object(s3_url, 2)
    flip_object(s3_url, bad)
    verify = cli("verify", s3_url, "--json")
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert "Traceback" not in verify.stderr
    verdicts = {v["step"]: v for v in json.loads(verify.stdout)["steps"]}
    assert verdicts[1]["ok"] and verdicts[1]["arrays"] > 0 and not verdicts[2]["ok"]
    inspect = cli("inspect", s3_url, "--json")
    assert inspect.returncode == 1, inspect.stdout + inspect.stderr  # step 2 has a problem
    report = json.loads(inspect.stdout)
    assert [s["step"] for s in report["steps"] if s["committed"]] == [1, 2]
    assert report["problems"] and all("step 2: corrupt" in p and "CRC-32 mismatch" in p
                                      for p in report["problems"])
    assert report["detail"]["topology"]["device_count"] == 8
    assert "model/embed" in " ".join(report["detail"]["leaves"])
    assert_no_secret(s3_server, *(r.stdout + r.stderr for r in (verify, inspect)))
    missing = inspect_directory(f"{s3_url}/nothing-here")  # `inspect` exits 2 for this
    assert not missing["found"] and "does not exist" in missing["problems"][0]

    with distckpt.CheckpointService(s3_url) as ckpt:  # writable: quarantines
        restored = ckpt.restore(target())
        assert restored.step == 1 and restored.verified
        assert [s for s, _ in restored.skipped] == [2]
        assert ckpt.all_steps() == [1]
    assert keys(s3_url, "2/") == []
    moved = keys(s3_url, commit.QUARANTINE_DIR + "/")
    assert {k.split("/")[1].split(".")[0] for k in moved} == {"2"}
    assert any(k.endswith(bad.removeprefix("2/")) for k in moved)
    assert any(k.endswith("/" + commit.COMMIT_FILE) for k in moved)
    report = inspect_directory(s3_url)
    assert len(report["quarantined"]) == 1 and report["problems"] == []


@pytest.mark.multiprocess
def test_kill_during_save_leaves_no_listed_step_and_resave_works(s3_env, s3_url, s3_server,
                                                                 tmp_path, run_hosts):
    """SIGKILL after every object of step 2 is written, just before the commit record."""
    out = tmp_path / "kill.json"
    job = run_hosts(1, 4, timeout=400, command=[
        sys.executable, S3_WORKER, "kill", s3_url, "commit:renamed", "2", str(out)])
    assert job.returncode == -9, job.output[-4000:]
    assert json.loads(out.read_text())["steps"] == [1]
    assert listed(s3_url) == [1]
    left = keys(s3_url, "2/")
    assert "2/state/manifest.ocdbt" in left and f"2/{commit.COMMIT_FILE}" not in left
    with distckpt.CheckpointService(s3_url, READ_ONLY) as ckpt:
        assert ckpt.restore(target()).step == 1
    items = trained()
    with distckpt.CheckpointService(s3_url) as ckpt:  # re-save the interrupted step
        ckpt.save(2, items, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
        restored = ckpt.restore(target("fsdp=4,data=2"))
    assert restored.step == 2 and restored.verified
    assert_same(arrays(restored.items), arrays(items))
    moved = keys(s3_url, commit.QUARANTINE_DIR + "/")  # the leftover was moved, not deleted
    assert any(k.endswith("/state/manifest.ocdbt") for k in moved)
    assert_no_secret(s3_server, job.output)


# --------------------------------------------------------------------------- multi-process
@pytest.mark.multiprocess
def test_two_hosts_save_restore_on_one_host(s3_env, s3_url, s3_server, tmp_path, run_hosts):
    """2 hosts x 2 devices save asynchronously to one prefix (the storage probe runs on
    S3) and restore in the same job; then 1 host x 8 devices (this process) restores
    bit-exact (a separate 1 x 4 job: test_restore_from_s3_onto_another_job, slow)."""
    saved_out = tmp_path / "save.json"
    save = run_hosts(2, 2, "save", str(saved_out), "--dir", s3_url, "--mesh",
                     "data=2,fsdp=2", timeout=500).check()
    saved = json.loads(saved_out.read_text())
    assert saved["steps"] == [1, 2, 3] and saved["restored_step"] == 3
    assert saved["same_topology"] == saved["fingerprints"]["3"]
    assert saved["process_state"] == {"host": 0, "pos": 30}
    assert any(k.startswith("3/state/ocdbt.process_1/") for k in keys(s3_url, "3/"))
    assert not [k for k in keys(s3_url) if ".distckpt-probe" in k]
    with distckpt.CheckpointService(s3_url, READ_ONLY) as ckpt:
        restored = ckpt.restore(target(), process_state_remap=lambda recs, i, n: recs)
    assert restored.step == 3 and restored.verified
    assert restored.process_state == [{"host": 0, "pos": 30}, {"host": 1, "pos": 30}]
    assert fingerprint(restored.items) == saved["fingerprints"]["3"]
    assert_no_secret(s3_server, save.output)
    assert_objects_hold_no_secret(s3_server, s3_url)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_restore_from_s3_onto_another_job(s3_env, s3_url, s3_server, tmp_path, run_hosts):
    """Saved by 2 hosts x 2 devices, restored by a separate 1 host x 4 devices job."""
    saved_out, restored_out = tmp_path / "save.json", tmp_path / "restore.json"
    run_hosts(2, 2, "save", str(saved_out), "--dir", s3_url, "--mesh", "data=2,fsdp=2",
              timeout=500).check()
    restore = run_hosts(1, 4, "restore", str(restored_out), "--dir", s3_url, "--mesh",
                        "fsdp=4", timeout=500).check()
    got = json.loads(restored_out.read_text())
    assert got["step"] == 3 and got["process_count"] == 1 and got["wrong_sharding"] == []
    assert got["fingerprint"] == json.loads(saved_out.read_text())["fingerprints"]["3"]
    assert_no_secret(s3_server, restore.output)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_drill_on_s3(s3_env, s3_url, s3_server, tmp_path, monkeypatch):
    """`distckpt drill --dir s3://...`: checkpoints on S3, logs and results in a local temp
    dir; verified, and no secret in any file the drill wrote (INFO logs included)."""
    monkeypatch.setenv("DISTCKPT_LOG", "INFO")
    report_path = tmp_path / "report.json"
    res = cli("drill", "--dir", s3_url, "--from", "2x2", "--to", "1x2", "--steps", "2",
              "--save-every", "2", "--json", str(report_path), timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["verified"] is True and report["restored_step"] == 2
    assert report["checkpoints"] == s3_url and "://" not in report["directory"]
    assert listed(s3_url) == [2]
    workdir = Path(report["directory"])
    written = [p.read_text(errors="replace") for p in workdir.rglob("*") if p.is_file()]
    assert written and any("DRILL" in text for text in written)  # the logs are there
    assert_no_secret(s3_server, res.stdout, res.stderr, report_path.read_text(), *written)
    assert_objects_hold_no_secret(s3_server, s3_url)
    again = cli("drill", "--dir", s3_url, "--steps", "2", "--save-every", "2")
    assert again.returncode != 0 and "not empty" in again.stdout + again.stderr
    shutil.rmtree(workdir)
