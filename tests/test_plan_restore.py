"""``distckpt plan-restore``: the plan's figures against what the restore then did.

* Boxes: :func:`distckpt.checkpoint.plan.device_boxes` (pure arithmetic) against
  ``NamedSharding.devices_indices_map`` on the 8 in-process CPU devices.
* Bytes: real saves, a plan, then the restore onto that target; the planned bytes equal
  the bytes the restore read from storage (``Restored.read_bytes``, counted where
  TensorStore hands them over) exactly. In process (one host of 8 devices) on the saving
  mesh and resharded, many pieces per shard, float32/bfloat16/int8/0-d/typed-key leaves;
  by real processes (tests/plan_worker.py) per host, on the saving slice and resharded.
* Files: every OCDBT location the plan names holds the bytes TensorStore reads for that
  key.
* Memory: a 64 MiB restore in a fresh process; its peak RSS growth is within the
  documented tolerance of the prediction (docs/plan-restore.md). Times are printed, not
  asserted.
* CLI: bad input gets one line and exit 2 and writes nothing; ``--json`` has the schema.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import distckpt
from distckpt.checkpoint import plan as plan_lib
from distckpt.checkpoint.reader import StepReader
from distckpt.state import nnx_state
from distckpt.state.mesh import MeshSpec
from tests.test_cli_input import CLI, ROOT, assert_one_line_error

PLAN_WORKER = str(Path(__file__).parent / "plan_worker.py")
MEMORY_TOLERANCE = 0.2
"""Peak memory: within 20% of the prediction, or 16 MiB (docs/plan-restore.md)."""
MEMORY_FLOOR = 16 << 20


def _mesh(spec: str) -> jax.sharding.Mesh:
    return distckpt.make_mesh(spec)


@pytest.mark.fast
@pytest.mark.parametrize("mesh, shape, spec", [
    ("data=2,fsdp=4", (16, 8), P("fsdp", None)),
    ("data=2,fsdp=4", (16, 8), P("data", "fsdp")),
    ("data=2,fsdp=4", (16, 8, 3), P(None, ("data", "fsdp"))),
    ("data=2,fsdp=4", (16, 8), P(("fsdp", "data"))),
    ("fsdp=8", (8,), P()),
    ("a=2,b=2,c=2", (4, 6, 2), P("c", None, "a")),
    ("fsdp=8", (), P()),
])
def test_device_boxes_are_what_jax_shards(mesh, shape, spec):
    m = _mesh(mesh)
    want = NamedSharding(m, spec).devices_indices_map(shape)
    got = plan_lib.device_boxes(shape, tuple(spec), MeshSpec.parse(mesh))
    for device, box in zip(m.devices.flat, got, strict=True):
        lo = tuple(s.indices(n)[0] for s, n in zip(want[device], shape, strict=True))
        hi = tuple(s.indices(n)[1] for s, n in zip(want[device], shape, strict=True))
        assert box == (lo, hi), (device, box, want[device])


def _items(mesh: jax.sharding.Mesh) -> dict:
    """Leaves of every kind a plan meets: shards larger than a 1 MiB budget's pieces,
    narrow floats (assembled in a carrier dtype), a 0-d array, typed PRNG keys."""
    rng = np.random.default_rng(0)

    def put(x, spec):
        return jax.device_put(x, NamedSharding(mesh, spec))

    return {"model": {
        "w": put(rng.standard_normal((512, 768), np.float32), P("fsdp", None)),
        "v": put(jnp.asarray(rng.standard_normal((256, 1024)), jnp.bfloat16), P(None, "fsdp")),
        "e": put(rng.integers(-9, 9, (64, 96), np.int8), P(("data", "fsdp"))),
        "s": put(np.float32(3.0), P()),
    }, "rngs": {
        "key": put(jax.random.key(1), P()),
        "keys": put(jax.random.split(jax.random.key(2), 8), P("data")),
    }}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A step saved on data=2,fsdp=4 over the 8 in-process devices."""
    directory = tmp_path_factory.mktemp("plan") / "ckpt"
    with distckpt.CheckpointService(directory) as ckpt:
        ckpt.save(3, _items(_mesh("data=2,fsdp=4")))
        ckpt.wait()
    return directory


def _target(mesh: jax.sharding.Mesh, specs: dict[str, P]) -> dict:
    items = jax.eval_shape(lambda: _items(_mesh("data=2,fsdp=4")))
    flat = {leaf.name: leaf for leaf in nnx_state.flatten_items(items)}
    pairs = [(leaf.path, jax.ShapeDtypeStruct(leaf.value.shape, leaf.value.dtype,
                                              sharding=NamedSharding(mesh, specs[name])))
             for name, leaf in flat.items()]
    return nnx_state.nest(pairs)


SAME = {"model/w": P("fsdp", None), "model/v": P(None, "fsdp"), "model/e": P(("data", "fsdp")),
        "model/s": P(), "rngs/key": P(), "rngs/keys": P("data")}
# What a user expects on fsdp=8: the saved specs with the mesh axis it lacks dropped.
RESHARDED = {"model/w": P("fsdp", None), "model/v": P(None, "fsdp"), "model/e": P("fsdp"),
             "model/s": P(), "rngs/key": P(), "rngs/keys": P()}


def _restore(directory, target, memory_mb: int):
    options = distckpt.CheckpointOptions(read_only=True, restore_memory_mb=memory_mb)
    with distckpt.CheckpointService(directory, options) as ckpt:
        return ckpt.restore(target)


def _shard_bytes(items) -> int:
    total = 0
    for leaf in nnx_state.flatten_items(items):
        value = leaf.value
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        total += sum(s.data.nbytes for s in value.addressable_shards)
    return total


@pytest.mark.parametrize("to, specs, strict", [
    ("1x8:data=2,fsdp=4", SAME, True),
    ("1x8:fsdp=8", RESHARDED, False),
])
@pytest.mark.parametrize("memory_mb", [1, 256])
def test_planned_bytes_are_the_bytes_the_restore_reads(saved, to, specs, strict, memory_mb):
    plan = distckpt.plan_restore(saved, to, memory_mb=memory_mb, read_gbps=1.0)
    assert plan.step == 3 and plan.strict is strict and plan.exact
    if not strict:  # the leaves whose saved spec names 'data'
        assert [m.split(":")[0].strip() for m in plan.mismatches] == ["model/e", "rngs/keys"]
    (host,) = plan.hosts
    assert host.tier == "persistent" and host.process == 0
    mesh = _mesh(to.split(":")[1])
    restored = _restore(saved, _target(mesh, specs), memory_mb)
    assert restored.verified and restored.step == 3
    assert host.bytes == restored.read_bytes
    assert host.shard_bytes == _shard_bytes(restored.items)
    assert sum(host.files.values()) == host.bytes
    assert host.seconds == pytest.approx(host.bytes / 1e9)
    record = StepReader(saved, 3).record["files"]
    assert set(host.files) <= set(record), set(host.files) - set(record)
    # The same plan from the restore target itself: strict, whatever the mesh.
    given = distckpt.plan_restore(saved, to, memory_mb=memory_mb, read_gbps=1.0,
                                  target=_target(mesh, specs))
    assert given.strict and given.hosts[0].bytes == host.bytes


def test_plan_from_a_target_lists_what_the_restore_would_refuse(saved):
    mesh = _mesh("fsdp=8")
    target = _target(mesh, RESHARDED)
    del target["model"]["s"]
    target["model"]["w"] = jax.ShapeDtypeStruct((512, 767), jnp.float32,
                                                sharding=NamedSharding(mesh, P()))
    plan = distckpt.plan_restore(saved, "2x4:fsdp=8", target=target, read_gbps=1.0)
    assert not plan.strict
    assert [m.strip() for m in plan.mismatches] == [
        "model/w: shape (512, 768) saved, (512, 767) in target",
        "model/s: in step 3 but not in the target"]
    # Two hosts, the refused leaves left out: each reads its half of what remains.
    assert [h.process for h in plan.hosts] == [0, 1]
    full = distckpt.plan_restore(saved, "2x4:fsdp=8", read_gbps=1.0)
    assert sum(h.bytes for h in plan.hosts) < sum(h.bytes for h in full.hosts)
    with pytest.raises(ValueError, match="not the slice's mesh"):
        distckpt.plan_restore(saved, "1x8:data=8", target=target, read_gbps=1.0)


def test_every_file_location_holds_the_value_tensorstore_reads(saved):
    state = Path(saved) / "3" / "state"
    base = ts.KvStore.open(f"file://{state}/").result()
    where = plan_lib.ocdbt_files(base)
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
    keys = [k.decode() for k in store.list().result()]
    assert sorted(where) == sorted(keys)
    indirect = 0
    for key in keys:
        value = store.read(key).result().value
        loc = where[key]
        assert (state / loc.file).is_file(), loc
        if loc.offset is None:  # inline: in a b-tree node of the top-level database
            assert loc.file.startswith("d/") and len(value) <= 1024
            continue
        indirect += 1
        with open(state / loc.file, "rb") as f:
            f.seek(loc.offset)
            assert f.read(loc.length) == value, key
    assert indirect >= 8  # the big arrays' chunks live in the per-process data files


@pytest.mark.parametrize("options, exact", [
    ({"use_ocdbt": False}, True),  # a file per chunk
    ({"compression": True}, False),  # TensorStore reads (and decodes) the chunks itself
])
def test_other_layouts(tmp_path, options, exact):
    mesh = _mesh("fsdp=8")
    x = jax.device_put(jnp.arange(64 * 96, dtype=jnp.float32).reshape(64, 96),
                       NamedSharding(mesh, P("fsdp")))
    with distckpt.CheckpointService(tmp_path, distckpt.CheckpointOptions(**options)) as ckpt:
        ckpt.save(1, {"m": {"x": x}})
        ckpt.wait()
    plan = distckpt.plan_restore(tmp_path, "1x8:data=2,fsdp=4", memory_mb=1, read_gbps=1.0)
    assert plan.strict and plan.exact is exact
    target = {"m": {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        _mesh("data=2,fsdp=4"), P("fsdp")))}}
    restored = _restore(tmp_path, target, 1)
    assert plan.hosts[0].bytes == restored.read_bytes
    step = Path(tmp_path) / "1"
    if exact:  # each chunk file, read whole: every shard once (data=2 holds it twice)
        assert {f: n for f, n in plan.hosts[0].files.items()} == {
            f"state/m.x/{i}.0": 8 * 96 * 4 for i in range(8)}
        assert all((step / f).is_file() for f in plan.hosts[0].files)
    else:
        assert plan.hosts[0].files == {"state/m.x/": x.nbytes}


@pytest.mark.slow  # starts the session's S3 server (~10 s) for one small step
def test_plan_on_s3(s3_env, s3_url):
    mesh = _mesh("data=2,fsdp=4")
    x = jax.device_put(jnp.arange(256 * 64, dtype=jnp.float32).reshape(256, 64),
                       NamedSharding(mesh, P("fsdp")))
    with distckpt.CheckpointService(s3_url) as ckpt:
        ckpt.save(1, {"m": {"x": x}})
        ckpt.wait()
    plan = distckpt.plan_restore(s3_url, "1x8:fsdp=8")  # the bandwidth probe reads S3 too
    assert plan.strict and plan.exact and plan.read_gbps_measured and plan.read_gbps > 0
    target = {"m": {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        _mesh("fsdp=8"), P("fsdp")))}}
    restored = _restore(s3_url, target, 256)
    assert plan.hosts[0].bytes == restored.read_bytes == x.nbytes
    assert all(f.startswith("state/ocdbt.process_0/d/") for f in plan.hosts[0].files)


@pytest.mark.multiprocess
def test_each_host_reads_what_its_plan_says(tmp_path, run_hosts):
    """2 hosts x 2 devices save on data=2,fsdp=2, then restore onto the same slice and
    onto fsdp=4 (resharded); each process compares its own read with its plan."""
    out = tmp_path / "plan"
    run_hosts(2, 2, "--dir", str(tmp_path / "ckpt"), "--out", str(out),
              command=[sys.executable, PLAN_WORKER, "--dir", str(tmp_path / "ckpt"),
                       "--out", str(out)]).check()
    got = [json.loads(Path(f"{out}.{p}").read_text()) for p in range(2)]
    for g in got:
        for run in g["runs"]:
            print(run)
            assert run["verified"]
            assert run["planned"] == run["read"], run
            assert run["planned_shards"] == run["shards"], run
    # The resharded run splits fsdp over both hosts: each reads its half, fewer bytes
    # than on the saving mesh, where each host holds a whole data replica.
    same, resharded = ([r for r in got[0]["runs"] if r["to"] == to][0]
                       for to in ("2x2:data=2,fsdp=2", "2x2:fsdp=4"))
    assert resharded["planned"] < same["planned"]


MEMORY_WORKER = """
import gc, json, sys, time
import jax, jax.numpy as jnp
import distckpt
from distckpt.bench.measure import PeakRSS
from jax.sharding import NamedSharding, PartitionSpec as P
directory, memory_mb = sys.argv[1], int(sys.argv[2])
shapes = {"w": ((4096, 4096), jnp.float32)}
specs = {"w": P("fsdp", None)}
mesh = distckpt.make_mesh("data=2,fsdp=4")
items = {"m": {k: jax.device_put(jnp.ones(s, d), NamedSharding(mesh, specs[k]))
               for k, (s, d) in shapes.items()}}
with distckpt.CheckpointService(directory) as ckpt:
    ckpt.save(1, items)
    ckpt.wait()
del items
gc.collect()
plan = distckpt.plan_restore(directory, "1x8:fsdp=8", memory_mb=memory_mb)
mesh = distckpt.make_mesh("fsdp=8")
target = {"m": {k: jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, specs[k]))
                for k, (s, d) in shapes.items()}}
options = distckpt.CheckpointOptions(read_only=True, restore_memory_mb=memory_mb)
with distckpt.CheckpointService(directory, options) as ckpt:
    jax.block_until_ready(ckpt.restore(target).items)  # compiles; its memory goes back
    with PeakRSS() as m:
        t0 = time.perf_counter()
        out = ckpt.restore(target)
        jax.block_until_ready(out.items)  # the last copies are asynchronous
        seconds = time.perf_counter() - t0
host = plan.hosts[0]
print(json.dumps({"growth": m.peak - m.base, "predicted": host.peak_memory_bytes,
                  "shards": host.shard_bytes, "planned": host.bytes, "read": out.read_bytes,
                  "seconds": seconds, "planned_seconds": host.seconds,
                  "read_gbps": plan.read_gbps}))
"""


def test_peak_memory_is_within_the_stated_tolerance(tmp_path):
    """64 MiB of shards on 8 devices with a 64 MiB budget: each 8 MiB shard is one piece,
    two read ahead, each digested by the XLA kernel (its temporaries modelled): the
    prediction is well above the shards alone, and must hold."""
    memory_mb = 64
    script = tmp_path / "worker.py"
    script.write_text(MEMORY_WORKER)
    # A fixed mmap threshold: large blocks go back to the OS when freed, so the warm-up
    # restore's memory does not lower the measured one's growth (tests/test_streaming.py).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(memory_mb)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    f = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"budget {memory_mb} MiB: growth {f['growth'] / 2**20:.1f} MiB, predicted "
          f"{f['predicted'] / 2**20:.1f} MiB (shards {f['shards'] / 2**20:.1f} MiB); restore "
          f"{f['seconds']:.2f}s, planned read time {f['planned_seconds']:.3f}s at "
          f"{f['read_gbps']:.2f} GB/s")
    assert f["planned"] == f["read"]
    assert f["predicted"] - f["shards"] > 2 * MEMORY_FLOOR  # the transient matters here
    assert abs(f["growth"] - f["predicted"]) <= max(MEMORY_TOLERANCE * f["predicted"],
                                                    MEMORY_FLOOR), f


# --------------------------------------------------------------------------- CLI
def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(cwd)}
    return subprocess.run(CLI + ["plan-restore", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.fast
@pytest.mark.parametrize("args, needle", [
    (["missing", "--to", "1x8"], "does not exist"),
    (["empty", "--to", "1x8"], "no committed step in"),
    (["CKPT", "--to", "2x0"], "--to 2x0: hosts and devices per host must be >= 1"),
    (["CKPT", "--to", "bogus"], "--to 'bogus' is not a slice"),
    (["CKPT", "--to", "2x4:data=3"], "--to 2x4:data=3: slice 2x4 has 8 devices"),
    (["CKPT", "--to", "1x8", "--step", "4"], "step 4 is not a committed step"),
    (["CKPT", "--to", "1x8", "--step", "-1"], "--step -1"),
    (["CKPT", "--to", "1x8", "--read-gbps", "0"], "--read-gbps 0"),
    (["CKPT", "--to", "1x8", "--memory-mb", "0"], "--memory-mb 0"),
    (["CKPT"], "the following arguments are required: --to"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(saved, tmp_path, monkeypatch, capsys,
                                                      args, needle):
    """In this process (the command's main); the real command in a subprocess below."""
    from distckpt.tools import cli

    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    args = [str(saved) if a == "CKPT" else a for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        code = cli.main(["plan-restore", *args, "--json", "plan.json"])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    res = subprocess.CompletedProcess(args, code, *capsys.readouterr())
    line = assert_one_line_error(res, needle)
    assert res.returncode == 2 and line.startswith("distckpt plan-restore: error: "), line
    assert res.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_prints_a_table_per_host_and_writes_json(saved, tmp_path):
    res = _cli(tmp_path, str(saved), "--to", "2x4:fsdp=8", "--json", "plan.json",
               "--read-gbps", "2")
    assert res.returncode == 1, res.stderr  # not strict: 'data' is gone
    assert "NOT a strict match" in res.stdout and "model/e" in res.stdout
    assert "restore plan per host" in res.stdout and "persistent" in res.stdout
    report = json.loads((tmp_path / "plan.json").read_text())
    assert set(report) == {"directory", "step", "target", "saved", "hosts", "strict",
                           "mismatches", "new_axes", "exact", "memory_mb", "read_gbps",
                           "read_gbps_measured", "bytes", "seconds"}
    assert report["step"] == 3 and report["target"] == "2x4:fsdp=8"
    assert report["read_gbps"] == 2 and not report["read_gbps_measured"]
    assert [h["process"] for h in report["hosts"]] == [0, 1]
    for h in report["hosts"]:
        assert set(h) == {"process", "tier", "bytes", "files", "shard_bytes",
                          "peak_memory_bytes", "seconds"}
        assert h["tier"] == "persistent" and sum(h["files"].values()) == h["bytes"]
    assert report["bytes"] == sum(h["bytes"] for h in report["hosts"])


def test_cli_strict_match_exits_0_with_a_measured_bandwidth(saved, capsys):
    from distckpt.tools import cli

    assert cli.main(["plan-restore", str(saved), "--to", "1x8:data=2,fsdp=4"]) == 0
    out = capsys.readouterr().out
    assert "strict match" in out and "measured from the step's data" in out
