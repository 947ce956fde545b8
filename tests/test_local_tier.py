"""The local tier in one process (8 CPU devices): its files, its checks, its restore onto
any sharding of the same job. Multi-process behaviour (peers, lost hosts, permuted ids)
is in tests/test_tiers.py."""

from __future__ import annotations

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec

import distckpt
from distckpt.checkpoint.local_tier import LocalDir

pytestmark = pytest.mark.fast

MESHES = [(8,), (4, 2), (2, 4), (2, 2, 2), (1, 8)]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.int8, jnp.uint32, jnp.float16, jnp.int64]


def _mesh(shape):
    return jax.make_mesh(shape, tuple("abc"[: len(shape)]))


def _bits(a) -> bytes:
    return np.asarray(jax.device_get(a)).tobytes()


@st.composite
def cases(draw):
    mesh_shape = draw(st.sampled_from(MESHES))
    axes = "abc"[: len(mesh_shape)]
    arrays = []
    for _ in range(draw(st.integers(1, 4))):
        ndim = draw(st.integers(0, 3))
        spec, shape = [], []
        free = list(axes)
        for _ in range(ndim):
            axis = draw(st.sampled_from([None, *free])) if free else None
            if axis is not None:
                free.remove(axis)
            size = mesh_shape[axes.index(axis)] if axis else 1
            shape.append(size * draw(st.integers(1, 3)))
            spec.append(axis)
        arrays.append((tuple(shape), tuple(spec), draw(st.sampled_from(DTYPES))))
    target_spec = draw(st.booleans())  # restore onto another sharding of the same mesh
    return mesh_shape, arrays, target_spec, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cases())
def test_local_round_trip_is_bit_exact_on_any_sharding(tmp_path, case):
    mesh_shape, specs, reshard, seed = case
    print(f"case {case}")
    mesh = _mesh(mesh_shape)
    rng = np.random.default_rng(seed)
    values = {}
    for i, (shape, spec, dtype) in enumerate(specs):
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * jnp.dtype(dtype).itemsize,
                           dtype=np.uint8)
        host = raw.view(jnp.dtype(dtype)).reshape(shape)  # any bits: NaN payloads too
        values[f"a{i}"] = jax.device_put(host, NamedSharding(mesh, PartitionSpec(*spec)))
    work = tmp_path / f"w{random.getrandbits(32)}"
    options = distckpt.CheckpointOptions(save_interval_steps=None,
                                         local_directory=str(work / "local"))
    with distckpt.CheckpointService(str(work / "ckpt"), options) as svc:
        assert svc.save(3, {"s": values}, metadata={"m": 1}, process_state={"pos": 7})
        svc.wait()
        assert svc.all_steps() == []  # local only: nothing persistent
        target = {"s": {k: jax.ShapeDtypeStruct(
            v.shape, v.dtype, sharding=NamedSharding(mesh, PartitionSpec()) if reshard
            else v.sharding) for k, v in values.items()}}
        restored = svc.restore(target)
    assert restored.tier == "local" and restored.restored_from == ("local",)
    assert restored.step == 3 and restored.metadata == {"m": 1}
    assert restored.process_state == {"pos": 7} and restored.verified
    for k, v in values.items():
        got = restored.items["s"][k]
        assert got.sharding == target["s"][k].sharding
        assert _bits(got) == _bits(v), k


def _save_two_steps(tmp_path):
    mesh = _mesh((8,))
    x = jax.device_put(jnp.arange(64, dtype=jnp.float32),
                       NamedSharding(mesh, PartitionSpec("a")))
    options = distckpt.CheckpointOptions(save_interval_steps=2,
                                         local_directory=str(tmp_path / "local"))
    svc = distckpt.CheckpointService(str(tmp_path / "ckpt"), options)
    for step in (2, 3):
        svc.save(step, {"s": {"x": x * step}})
    svc.wait()
    target = {"s": {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)}}
    return svc, x, target


def test_newest_step_across_tiers_and_a_corrupt_copy_falls_back(tmp_path):
    svc, x, target = _save_two_steps(tmp_path)
    assert svc.all_steps() == [2]  # persistent every 2 steps; local every step
    own = tmp_path / "local" / "3" / "own"
    restored = svc.restore(target)
    assert (restored.step, restored.tier) == (3, "local")
    victim = max(own.glob("*.bin"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[3] ^= 0x01  # one flipped bit
    victim.write_bytes(bytes(data))
    restored = svc.restore(target)
    assert (restored.step, restored.tier) == (2, "local")  # the next local copy
    np.testing.assert_array_equal(np.asarray(restored.items["s"]["x"]), np.asarray(x * 2))
    # Restoring step 2 drops the local copies of the abandoned step 3.
    assert not own.exists()
    svc.close()


def test_torn_copy_is_never_listed_and_is_cleaned_on_open(tmp_path):
    svc, _, target = _save_two_steps(tmp_path)
    svc.close()
    step3 = tmp_path / "local" / "3"
    os.replace(step3 / "own", step3 / ".tmp-own-torn")  # a crash before the rename
    (step3 / "own").mkdir()  # and a copy with no record
    (step3 / "own" / "0.x.0.bin").write_bytes(b"\0" * 8)
    local = LocalDir(tmp_path / "local")
    assert "3" not in local.inventory()["own"]
    assert not (step3 / ".tmp-own-torn").exists()
    with distckpt.CheckpointService(str(tmp_path / "ckpt"), distckpt.CheckpointOptions(
            local_directory=str(tmp_path / "local"))) as svc2:
        restored = svc2.restore(target)
    assert restored.step == 2  # step 2 is held by both tiers; either is right


def test_copy_with_a_wrong_size_is_not_listed(tmp_path):
    svc, _, _ = _save_two_steps(tmp_path)
    svc.close()
    own = tmp_path / "local" / "3" / "own"
    victim = next(own.glob("*.bin"))
    victim.write_bytes(victim.read_bytes()[:-4])
    assert "3" not in LocalDir(tmp_path / "local").inventory()["own"]


def test_local_retention_keeps_the_newest(tmp_path):
    mesh = _mesh((8,))
    x = jax.device_put(jnp.ones((8,)), NamedSharding(mesh, PartitionSpec("a")))
    options = distckpt.CheckpointOptions(save_interval_steps=None, local_max_to_keep=2,
                                         local_directory=str(tmp_path / "local"))
    with distckpt.CheckpointService(str(tmp_path / "ckpt"), options) as svc:
        for step in range(1, 6):
            svc.save(step, {"s": {"x": x}})
        svc.wait()
    assert sorted(int(p.name) for p in (tmp_path / "local").iterdir() if p.name.isdigit()) \
        == [4, 5]
    record = json.loads((tmp_path / "local" / "5" / "own" / "record.json").read_text())
    assert record["role"] == 0 and record["job"]["process_count"] == 1


@pytest.mark.parametrize("bad, message", [
    ({"local_directory": ""}, "local_directory"),
    ({"local_interval_steps": 0}, "local_interval_steps"),
    ({"local_max_to_keep": 0}, "local_max_to_keep"),
    ({"local_timeout_s": 0}, "local_timeout_s"),
])
def test_bad_local_options_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        distckpt.CheckpointOptions(**bad)


def test_two_processes_cannot_share_a_local_directory_template_without_host(tmp_path):
    with pytest.raises(ValueError, match="only the field"):
        distckpt.CheckpointService(str(tmp_path / "ckpt"), distckpt.CheckpointOptions(
            local_directory=str(tmp_path / "{job}")))


def test_a_step_due_in_both_tiers_is_staged_once_and_both_copies_restore(tmp_path):
    """Both tiers write from one host copy (pinned_host, same sharding); the persistent
    step restores with and without the local tier, bit-exact, typed keys included."""
    mesh = _mesh((4, 2))
    values = {"w": jax.device_put(jnp.arange(64, dtype=jnp.bfloat16).reshape(8, 8),
                                  NamedSharding(mesh, PartitionSpec("a", "b"))),
              "key": jax.random.key(7), "n": jnp.int32(3)}
    options = distckpt.CheckpointOptions(save_interval_steps=1,
                                         local_directory=str(tmp_path / "local"))
    with distckpt.CheckpointService(str(tmp_path / "ckpt"), options) as svc:
        svc.save(1, {"s": values})
        svc.wait()
        assert svc.local is not None and svc.local.failures == []
        assert (tmp_path / "local" / "1" / "own" / "record.json").is_file()
    target = {"s": {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in values.items()}}
    for opts in (distckpt.CheckpointOptions(read_only=True),
                 distckpt.CheckpointOptions(local_directory=str(tmp_path / "local"))):
        with distckpt.CheckpointService(str(tmp_path / "ckpt"), opts) as svc:
            restored = svc.restore(target)
        assert restored.tier == ("persistent" if opts.local_directory is None else "local")
        got = restored.items["s"]
        assert got["w"].sharding.memory_kind == values["w"].sharding.memory_kind
        assert _bits(got["w"]) == _bits(values["w"]) and int(got["n"]) == 3
        assert _bits(jax.random.key_data(got["key"])) == _bits(jax.random.key_data(values["key"]))


def test_read_only_service_changes_nothing_in_the_local_tier(tmp_path):
    svc, x, target = _save_two_steps(tmp_path)
    svc.close()
    (tmp_path / "local" / "3" / ".tmp-own-leftover").mkdir()

    def tree():
        return sorted((str(p), p.stat().st_mtime_ns) for p in (tmp_path / "local").rglob("*"))

    before = tree()
    for local in (tmp_path / "local", tmp_path / "absent"):
        options = distckpt.CheckpointOptions(read_only=True, local_directory=str(local))
        with distckpt.CheckpointService(str(tmp_path / "ckpt"), options) as ro:
            restored = ro.restore(target)
        assert restored.step == (3 if local.name == "local" else 2)
    assert tree() == before and not (tmp_path / "absent").exists()


def test_should_save_counts_the_local_interval(tmp_path):
    options = distckpt.CheckpointOptions(save_interval_steps=10, local_interval_steps=3,
                                         local_directory=str(tmp_path / "local"))
    with distckpt.CheckpointService(str(tmp_path / "ckpt"), options) as svc:
        assert [s for s in range(1, 13) if svc.should_save(s)] == [3, 6, 9, 10, 12]


def test_plan_restore_of_the_local_tier(tmp_path):
    from distckpt.tools.plan import plan_restore

    svc, _, target = _save_two_steps(tmp_path)
    with pytest.raises(ValueError, match="only the field"):
        plan_restore(tmp_path / "ckpt", "1x8", local_directory=str(tmp_path / "{oops}"))
    plan = plan_restore(tmp_path / "ckpt", "1x8", local_directory=str(tmp_path / "local"))
    assert plan.step == 3 and [h.tier for h in plan.hosts] == ["local"]
    restored = svc.restore(target)
    svc.close()
    assert restored.step == 3 and restored.read_bytes == plan.hosts[0].bytes > 0


ARRAYS = st.lists(st.tuples(
    st.lists(st.integers(0, 40), max_size=3),
    st.sampled_from(["float32", "bfloat16", "int8", "uint32", "bool", "float64", "int16"]),
    st.integers(0, 2**32 - 1)), max_size=12)


@settings(max_examples=60, deadline=None)
@given(ARRAYS, st.sampled_from([(64, 256), (300, 1000), (1 << 20, 8 << 20)]))
def test_peer_offers_pack_small_arrays_and_unpack_them_bit_exact(arrays, limits):
    """What travels to a peer (peers._units) unpacks (peers._unpack) to the same bytes,
    every array once, zero-size ones not at all, each packed array at an aligned offset."""
    from distckpt.checkpoint import peers
    from distckpt.checkpoint.local_tier import ALIGN, dtype_of

    data = []
    for shape, dtype, seed in arrays:
        raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) *
                                                  dtype_of(dtype).itemsize, dtype=np.uint8)
        data.append(raw.view(dtype_of(dtype)).reshape(shape))
    old = peers.PACK_BELOW, peers.PACK_BYTES
    peers.PACK_BELOW, peers.PACK_BYTES = limits
    try:
        units = peers._units(data)
    finally:
        peers.PACK_BELOW, peers.PACK_BYTES = old
    units = json.loads(json.dumps([u for _, u in units])), [a for a, _ in units]
    shapes = [(a.shape, a.dtype) for a in data]
    got: dict[int, np.ndarray] = {}
    for unit, sent in zip(*units, strict=True):
        for offset in (o for _, o in unit.get("pack", [])):
            assert offset % ALIGN == 0
        for i, a in peers._unpack(unit, np.array(sent), shapes):
            assert i not in got
            got[i] = a
    assert sorted(got) == [i for i, a in enumerate(data) if a.size]
    for i, a in got.items():
        assert a.shape == data[i].shape and a.dtype == data[i].dtype
        assert a.tobytes() == data[i].tobytes()


def test_a_copy_in_the_one_file_per_shard_format_still_restores(tmp_path):
    """Copies written before shards.bin (format distckpt-local/1, a file per shard) are
    read as before: same step, same tier, bit-exact."""
    svc, x, target = _save_two_steps(tmp_path)
    svc.close()
    own = tmp_path / "local" / "3" / "own"
    record = json.loads((own / "record.json").read_text())
    assert record["format"] == "distckpt-local/2"
    assert sorted(os.listdir(own)) == ["record.json", "shards.bin"]
    packed = (own / "shards.bin").read_bytes()
    for i, leaf in enumerate(record["leaves"]):
        for k, s in enumerate(leaf["shards"]):
            name = f"{i}.{k}.bin"
            (own / name).write_bytes(packed[s["offset"]:s["offset"] + s["nbytes"]])
            s["file"] = name
            del s["offset"]
    record["format"] = "distckpt-local/1"
    (own / "shards.bin").unlink()
    (own / "record.json").write_text(json.dumps(record))
    with distckpt.CheckpointService(str(tmp_path / "ckpt"), distckpt.CheckpointOptions(
            local_directory=str(tmp_path / "local"))) as svc2:
        restored = svc2.restore(target)
    assert (restored.step, restored.tier) == (3, "local")
    np.testing.assert_array_equal(np.asarray(restored.items["s"]["x"]), np.asarray(x * 3))
