"""CheckpointService, inspect, verify and the drill on ``s3://``, on a real S3 server.

Every test talks to the session's SeaweedFS server (tests/s3_fixture.py) with credentials
from the environment (one test: from explicit options only); nothing in Orbax,
TensorStore, s3fs or the distributed layer is mocked. Damage (a flipped byte, a crash in
the middle of a retention delete) is done to real objects with plain PUTs and DELETEs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distckpt
from distckpt import compat, storage
from distckpt.checkpoint import commit, committed
from distckpt.checkpoint.reader import StepReader
from distckpt.errors import StepUnusableError
from distckpt.state import nnx_state
from distckpt.testing.kvfiles import SmallFiles, small_files
from distckpt.tools.inspection import inspect_directory
from distckpt.tools.launcher import free_port, launch
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
    return small_files(url).list(prefix)


def listed(url: str) -> list[int]:
    return committed.committed_steps(storage.open_directory(url)[1])


READ_ONLY = distckpt.CheckpointOptions(read_only=True)


def assert_no_secret(server, *texts: str) -> None:
    for text in texts:
        assert server.secret_access_key not in text


def assert_objects_hold_no_secret(server, url: str) -> None:
    files = small_files(url)
    for key in files.list():
        assert server.secret_access_key.encode() not in files.read_bytes(key), key


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distckpt.tools.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO})


def biggest_data_object(url: str, step: int) -> str:
    sizes = storage.list_files(storage.open_directory(url)[1] / str(step) / "state")
    data = {rel: size for rel, size in sizes.items() if rel.rsplit("/", 2)[-2:-1] == ["d"]}
    return f"{step}/state/{max(data, key=lambda r: data[r])}"


def flip_object(url: str, key: str) -> None:
    files = small_files(url)
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
        assert isinstance(compat.checkpoint_deleter(ckpt._saver.manager), commit.ObjectStoreDeleter)
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
    record = small_files(s3_url).read_json(f"3/{committed.COMMIT_FILE}")
    sizes = storage.list_files(storage.open_directory(s3_url)[1] / "3")
    assert record["files"] == {k: v for k, v in sizes.items() if k != committed.COMMIT_FILE}
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
    to_s3 = small_files(f"{s3_url}/from-local")
    without_record = small_files(f"{s3_url}/no-record")
    for rel in storage.list_files(local / "1"):
        data = (local / "1" / rel).read_bytes()
        to_s3.write_bytes(f"1/{rel}", data)
        if rel != committed.COMMIT_FILE:
            without_record.write_bytes(f"1/{rel}", data)
    assert listed(f"{s3_url}/no-record") == []
    with distckpt.CheckpointService(f"{s3_url}/from-local", READ_ONLY) as ckpt:
        restored = ckpt.restore(target())
    assert restored.step == 1 and restored.verified
    assert_same(arrays(restored.items), want)

    with distckpt.CheckpointService(f"{s3_url}/from-s3") as ckpt:
        ckpt.save(2, items)
    back = tmp_path / "back"
    from_s3 = small_files(f"{s3_url}/from-s3")
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
        reader.restore_arrays(tree)
    assert commit.quarantine(root, 3, "incomplete") is None  # a writer moves nothing then
    assert keys(s3_url, commit.QUARANTINE_DIR + "/") == []
    # A crash after the record of step 2 was deleted and before its other objects were.
    small_files(s3_url).write_json(f"{commit.TRASH_DIR}/2.20260101T000000Z.deleting",
                                           {"step": 2})
    small_files(s3_url).delete(f"2/{committed.COMMIT_FILE}")
    assert listed(s3_url) == [1] and keys(s3_url, "2/")
    with distckpt.CheckpointService(s3_url, READ_ONLY) as ckpt:
        restored = ckpt.restore(target())
        assert restored.step == 1 and restored.verified and restored.skipped == ()
    assert keys(s3_url, "2/")  # the reader changed nothing
    with distckpt.CheckpointService(s3_url) as ckpt:  # a writer finishes the delete
        assert ckpt.all_steps() == [1]
    assert keys(s3_url, "2/") == [] and keys(s3_url, commit.TRASH_DIR + "/") == []


@pytest.mark.slow  # corruption and fallback on local disk: test_integrity
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
    assert any(k.endswith("/" + committed.COMMIT_FILE) for k in moved)
    report = inspect_directory(s3_url)
    assert len(report["quarantined"]) == 1 and report["problems"] == []


@pytest.mark.slow  # kills: test_crash
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
    assert "2/state/manifest.ocdbt" in left and f"2/{committed.COMMIT_FILE}" not in left
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
@pytest.mark.slow  # resharded restores: test_multihost
@pytest.mark.multiprocess
def test_two_hosts_save_restore_on_one_host(s3_env, s3_url, s3_server, tmp_path, run_hosts):
    """2 hosts x 2 devices save asynchronously to one prefix (the storage probe runs on
    S3) and restore in the same job; then 1 host x 8 devices (this process) restores
    bit-exact (a separate 1 x 4 job: test_restore_from_s3_onto_another_job, slow)."""
    saved_out = tmp_path / "save.json"
    # fsdp over both hosts: each host holds shards only it can write (with a data axis
    # across the hosts, replica 0's host writes the replicated shards: replica_parallel).
    save = run_hosts(2, 2, "save", str(saved_out), "--dir", s3_url, "--mesh",
                     "fsdp=4", timeout=500).check()
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


def test_drill_refuses_a_prefix_that_holds_objects(s3_env, s3_url):
    # Checked before anything starts (the same check as bench and goodput): one line, exit
    # 2, the object left alone.
    store = small_files(s3_url)
    store.write_bytes("theirs/step", b"not the drill's")
    res = cli("drill", "--dir", s3_url, "--steps", "2", "--save-every", "2")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-1] == (f"distckpt drill: error: --dir {s3_url} is not empty (1 object(s), "
                         "e.g. theirs/step); give a new or empty prefix (distckpt never "
                         "touches objects it did not write)"), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert storage.list_objects(s3_url) == ["theirs/step"]


def test_remove_objects_empties_the_prefix_and_nothing_beside_it(s3_env, s3_url):
    # What bench and goodput clean up with after writing below a prefix they checked empty.
    store = small_files(s3_url)
    for key in ("a", "d/b", "d/e/c"):
        store.write_bytes(key, b"x")
    beside = small_files(s3_url + "-beside")
    beside.write_bytes("keep", b"y")
    storage.remove_objects(s3_url)
    assert storage.list_objects(s3_url) == []
    assert storage.list_objects(s3_url + "-beside") == ["keep"]
    storage.remove_objects(s3_url + "-beside")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_drill_on_s3(s3_env, s3_url, s3_server, tmp_path, monkeypatch):
    """`distckpt drill --dir s3://...`: checkpoints on S3, logs and results in a local temp
    dir (kept with --keep, so the test can read them); verified, and no secret in any file
    the drill wrote (INFO logs included)."""
    monkeypatch.setenv("DISTCKPT_LOG", "INFO")
    report_path = tmp_path / "report.json"
    res = cli("drill", "--dir", s3_url, "--from", "2x2", "--to", "1x2", "--steps", "2",
              "--save-every", "2", "--json", str(report_path), "--keep", timeout=900)
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


# --------------------------------------------------------------------------- explicit options
@pytest.mark.multiprocess
def test_explicit_location_without_aws_environment_keeps_the_secret_out(
        s3_server, s3_url, tmp_path, monkeypatch, run_hosts):
    """Endpoint and credentials given as options (no AWS_* variable, no ~/.aws): a save,
    retention and a bit-exact restore through CheckpointService(Location); the secret is
    in no object written (Orbax's metadata, sharding files and TensorStore specs included),
    in no log line (every Python logger at DEBUG, TensorStore's verbose logging on), in
    no repr/str, metadata or inspect report."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "home"  # no ~/.aws/config or ~/.aws/credentials to fall back on
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    # TensorStore's own request logs too (its C++ logging, off by default).
    monkeypatch.setenv("TENSORSTORE_VERBOSE_LOGGING", "all")
    config = tmp_path / "s3.json"  # the worker's only source of the secret
    config.touch(mode=0o600)
    config.write_text(json.dumps({
        "url": s3_url, "endpoint": s3_server.endpoint,
        "access_key_id": s3_server.access_key_id,
        "secret_access_key": s3_server.secret_access_key}))
    out = tmp_path / "explicit.json"
    job = run_hosts(1, 4, timeout=400, command=[
        sys.executable, S3_WORKER, "explicit", str(config), str(out)]).check()
    got = json.loads(out.read_text())
    assert got["aws_env"] == [] and not (home / ".aws").exists()
    assert got["steps"] == [2, 3] and got["restored_step"] == 3 and got["verified"]
    assert got["mismatches"] == []
    assert got["metadata"] == {"where": {
        "url": s3_url, "scheme": "s3", "endpoint": s3_server.endpoint, "region": "us-east-1",
        "credentials": "explicit"}}
    assert [s["step"] for s in got["inspect"]["steps"] if s["committed"]] == [2, 3]
    assert got["inspect"]["problems"] == []
    # The logs really were at DEBUG (ours, s3fs/botocore's, TensorStore's HTTP requests)
    # and hold no secret.
    assert "DEBUG distckpt.test: explicit location Location(" in job.output
    assert "credentials='explicit'" in job.output
    assert "DEBUG botocore" in job.output or "DEBUG s3fs" in job.output
    assert "s3_key_value_store.cc" in job.output and "HttpRequest{PUT" in job.output
    assert "outside a profile" not in job.output  # TensorStore reads the profile cleanly
    assert_no_secret(s3_server, job.output, json.dumps(got))
    # Every object of the checkpoint, read with the same explicit options.
    profile = got["profile_file"]
    files = SmallFiles(storage.Location.parse(
        s3_url, endpoint=s3_server.endpoint, credentials=storage.S3Credentials(
            s3_server.access_key_id, s3_server.secret_access_key), environ={}))
    objects = {key: files.read_bytes(key) for key in files.list()}
    assert {"3/_CHECKPOINT_METADATA", "3/state/_METADATA", "3/state/_sharding",
            "3/state/array_metadatas/process_0", "3/state/manifest.ocdbt"} <= set(objects)
    for key, data in objects.items():
        for needle in (s3_server.secret_access_key, s3_server.access_key_id, profile,
                       os.path.dirname(profile), "aws_credentials", "credentials_file"):
            assert needle.encode() not in data, (key, needle)
    # `distckpt inspect` reads credentials from the environment only.
    res = subprocess.run(
        [sys.executable, "-m", "distckpt.tools.cli", "inspect", s3_url, "--json"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, **s3_server.env(), "XLA_FLAGS": "", "PYTHONPATH": REPO})
    assert res.returncode == 0, res.stdout + res.stderr
    assert [s["step"] for s in json.loads(res.stdout)["steps"] if s["committed"]] == [2, 3]
    assert_no_secret(s3_server, res.stdout, res.stderr)


# --------------------------------------------------------------------------- storage probe
@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [
    # The local-disk probe is tested in test_crash; both S3 layouts run in CI's slow pass.
    pytest.param("different-buckets", marks=pytest.mark.slow),
    pytest.param("unreachable-endpoint", marks=pytest.mark.slow)])
def test_storage_probe_on_s3_refuses_hosts_that_do_not_share_storage(
        s3_env, s3_server, s3_url, tmp_path, layout):
    """2 hosts that do not see the same objects are refused at start, on both, in seconds:
    host 1 given another bucket (same prefix), or the same URL but an S3 endpoint of its
    own that it cannot reach. The same prefix on both passes the probe and saves."""
    prefix = s3_url.removeprefix(f"s3://{s3_server.bucket}/")
    config: dict = {"attempts": []}
    if layout == "different-buckets":
        other = f"{s3_server.bucket}-other"
        small_files(f"s3://{other}/{prefix}").write_bytes("create-bucket", b"")
        small_files(f"s3://{other}/{prefix}").delete("create-bucket")
        refused = [f"{s3_url}/run", f"s3://{other}/{prefix}/run"]
        config["attempts"] = [{"name": "refused", "urls": refused},
                              {"name": "shared", "urls": [f"{s3_url}/shared"] * 2,
                               "save": True}]
    else:
        refused = [f"{s3_url}/run"] * 2
        config["endpoints"] = [s3_server.endpoint, f"http://127.0.0.1:{free_port()}"]
        config["attempts"] = [{"name": "refused", "urls": refused}]
    (tmp_path / "probe.json").write_text(json.dumps(config))
    out = tmp_path / "probe-out"
    buf = io.StringIO()
    result = launch([sys.executable, S3_WORKER, "probe", str(tmp_path / "probe.json"),
                     str(out)], 2, 2, out=buf, timeout_s=300, forward_signals=False,
                    env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, buf.getvalue()[-6000:]
    for i in (0, 1):
        got = {a["name"]: a for a in json.loads(Path(f"{out}.{i}").read_text())}
        first = got["refused"]
        assert first["error_type"] == "StorageNotSharedError", first
        msg = first["error"]
        assert f"checkpoint directory {refused[i]} is not shared" in msg, msg
        assert "process(es) [1] did not see the probe file" in msg, msg
        assert "same shared filesystem or object store path" in msg, msg
        assert "Nothing was written" in msg, msg
        if layout == "different-buckets" and i == 1:
            assert f"the primary host's directory is {refused[0]};" in msg, msg
        assert f"this host uses Location('{refused[i]}', endpoint=" in msg, msg
        if layout == "unreachable-endpoint":  # every host hears why host 1 saw nothing
            assert "process 1 could not look: EndpointConnectionError" in msg, msg
            assert config["endpoints"][1] in msg, msg
        # Prompt: a refusal after the coordination timeout (60 s) would have been a
        # timeout error, not StorageNotSharedError; no wall-clock bound is asserted.
        if "shared" in got:
            assert got["shared"]["error_type"] is None and got["shared"]["steps"] == [1]
    assert_no_secret(s3_server, buf.getvalue())
    # Nothing left by the refused attempt: no probe object, no step, in either place.
    assert keys(refused[0]) == [] and keys(refused[1]) == []
    assert not [k for k in keys(s3_url) if ".distckpt-probe" in k]
    if layout == "different-buckets":
        assert listed(f"{s3_url}/shared") == [1]


# --------------------------------------------------------------------------- retention
@pytest.mark.slow  # retention on S3 is in the default suite above; CI's slow pass runs this
def test_best_n_keep_forever_and_keep_period_retention_on_s3(s3_env, s3_url):
    """Retention by newest-N, best-N, keep_period and keep_forever on s3:// deletes exactly
    the other steps (every object of them), across two writer sessions (the second reads
    the metrics and the keep_forever marks back); kept steps restore bit-exact."""
    items = trained()
    losses = {1: 0.9, 2: 0.3, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.95}
    opts = distckpt.CheckpointOptions(max_to_keep=2, best_metric="loss", best_mode="min",
                                      best_n=1, keep_period=4)
    saved = {}
    with distckpt.CheckpointService(s3_url, opts) as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, items, metrics={"loss": loss})
            saved[step] = arrays(items)
            train_step(items["model"], items["optimizer"],
                       jnp.ones((4, 8), jnp.float32) * step)
            if step == 1:
                ckpt.wait()
                ckpt.keep_forever(1)
        ckpt.wait()
        # newest 2 (5, 6), best (2), every 4th (4), marked (1)
        assert ckpt.all_steps() == [1, 2, 4, 5, 6] and ckpt.best_step() == 2
    assert small_files(s3_url).read_json("distckpt_keep_forever.json") == \
        {"steps": [1]}
    assert keys(s3_url, "3/") == [] and listed(s3_url) == [1, 2, 4, 5, 6]
    with distckpt.CheckpointService(s3_url, opts) as ckpt:  # a new session
        for step, loss in ((7, 0.5), (8, 0.4)):
            ckpt.save(step, items, metrics={"loss": loss})
            saved[step] = arrays(items)
            train_step(items["model"], items["optimizer"], jnp.ones((4, 8), jnp.float32))
        ckpt.wait()
        # newest 2 (7, 8), best still 2 (read back from storage), 4, marked 1
        assert ckpt.all_steps() == [1, 2, 4, 7, 8]
    everything = keys(s3_url)
    for gone in (3, 5, 6):
        assert not [k for k in everything if k.startswith(f"{gone}/")], gone
    assert not [k for k in everything if k.startswith(commit.TRASH_DIR + "/")]
    report = inspect_directory(s3_url)
    # Deleted steps are not reported at all, not even as uncommitted (SeaweedFS keeps
    # listing their emptied "folders", as GCS hierarchical-namespace buckets do).
    assert report["steps"] == [{"step": s, "committed": True} for s in (1, 2, 4, 7, 8)]
    assert report["problems"] == []
    with distckpt.CheckpointService(s3_url, dataclasses.replace(opts, read_only=True)) \
            as ckpt:
        assert ckpt.all_steps() == [1, 2, 4, 7, 8] and ckpt.best_step() == 2
        for step in (1, 2, 4, 8):
            restored = ckpt.restore(target(), step=step)
            assert restored.step == step and restored.verified
            assert restored.metrics == {"loss": {**losses, 7: 0.5, 8: 0.4}[step]}
            assert_same(arrays(restored.items), saved[step])
        assert ckpt.restore(target(), step="best").step == 2
        for gone in (3, 5, 6):
            with pytest.raises(distckpt.NoCheckpointError, match=f"step {gone} is not"):
                ckpt.restore(target(), step=gone)


# --------------------------------------------------------------------------- concurrent reader
@pytest.mark.slow  # the local-disk reader test stays
def test_reader_restoring_while_retention_deletes_on_s3(s3_env, s3_url, tmp_path):
    """A read-only reader in another process lists and restores the newest (and, every
    other round, the oldest) listed step over and over while a writer saves with
    max_to_keep=2: every restore is bit-exact or a StepUnusableError/NoCheckpointError
    for a step retention deleted after it was listed; nothing else is ever raised."""
    items = trained()
    arrays_dir, done, out = tmp_path / "arrays", tmp_path / "done", tmp_path / "reader.json"
    arrays_dir.mkdir()
    opts = distckpt.CheckpointOptions(max_to_keep=2)

    def save(ckpt, step):
        np.savez(arrays_dir / f"{step}.npz", **arrays(items))  # before it can be listed
        ckpt.save(step, items)
        train_step(items["model"], items["optimizer"], jnp.ones((4, 8), jnp.float32) * step)

    with distckpt.CheckpointService(s3_url, opts) as ckpt, \
            open(tmp_path / "reader.log", "w") as log:
        save(ckpt, 1)
        ckpt.wait()
        reader = subprocess.Popen(
            [sys.executable, S3_WORKER, "reader", s3_url, str(arrays_dir), str(done), str(out)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": REPO})
        try:
            deadline = time.monotonic() + 120
            while not Path(f"{out}.ready").exists() and reader.poll() is None:
                assert time.monotonic() < deadline, "the reader never started"
                time.sleep(0.2)
            for step in range(2, 11):
                save(ckpt, step)
            ckpt.wait()
            assert ckpt.all_steps() == [9, 10]
        finally:
            done.touch()
            try:
                reader.wait(timeout=180)
            finally:
                if reader.poll() is None:
                    reader.kill()
    output = (tmp_path / "reader.log").read_text()
    assert reader.returncode == 0, output[-6000:]
    got = json.loads(out.read_text())
    assert got["unexpected"] is None, got["unexpected"]
    runs = got["iterations"]
    restored = [r for r in runs if r["outcome"] == "restored"]
    refused = [r for r in runs if r["outcome"] != "restored"]
    assert len(runs) >= 3 and 10 in [r["step"] for r in restored], runs
    for r in restored:
        assert r["verified"] and r["mismatches"] == [] and r["restored_step"] == r["step"], r
    for r in refused:  # only for a step retention deleted after the reader listed it
        assert r["step"] not in r["steps_after"], r
        assert r["step"] <= 8, r
    print(f"reader: {len(runs)} rounds, {len(restored)} restored, refused: "
          f"{[(r['step'], r['outcome'], r['reason'][:120]) for r in refused]}")
