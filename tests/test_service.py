"""CheckpointService in one process with 8 CPU devices: round trips, strictness, retention."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distckpt
from distckpt.state import nnx_state
from tests.mp_worker import factory, train_step


def arrays(items) -> dict[str, np.ndarray]:
    out = {}
    for leaf in nnx_state.flatten_items(items):
        value = leaf.value
        if leaf.is_key:
            value = jax.random.key_data(value)
        out[leaf.name] = np.asarray(value)
    return out


def shardings(items) -> dict:
    return {leaf.name: leaf.value.sharding for leaf in nnx_state.flatten_items(items)}


@pytest.fixture
def trained():
    mesh = distckpt.make_mesh("data=2,fsdp=2,tensor=2")
    items = distckpt.init_sharded(factory(), mesh)
    x = jnp.linspace(-1, 1, 32, dtype=jnp.float32).reshape(4, 8)
    train_step(items["model"], items["optimizer"], x)
    return items


def test_round_trip_bit_exact_with_target_shardings(tmp_path, trained):
    assert jax.device_count() == 8
    before = arrays(trained)
    with distckpt.CheckpointService(tmp_path) as ckpt:
        assert ckpt.save(5, trained, metrics={"loss": 0.5}, metadata={"run": "a"})
    for spec in ("data=2,fsdp=2,tensor=2", "fsdp=8", "tensor=4,data=2"):
        mesh = distckpt.make_mesh(spec)
        target = distckpt.abstract_target(factory(), mesh)
        want = shardings(target)
        with distckpt.CheckpointService(tmp_path, distckpt.CheckpointOptions(read_only=True)) \
                as ckpt:
            restored = ckpt.restore(target)
        assert restored.step == 5 and restored.metrics == {"loss": 0.5}
        assert restored.metadata == {"run": "a"}
        after = arrays(restored.items)
        assert after.keys() == before.keys()
        for name in before:
            assert after[name].dtype == before[name].dtype, name
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
        for leaf in nnx_state.flatten_items(restored.items):
            assert leaf.value.sharding.is_equivalent_to(want[leaf.name], leaf.value.ndim), \
                (spec, leaf.name)
    # A sharded parameter really is sharded on the target mesh.
    kernel = nnx.state(restored.items["model"])["layers"][0]["kernel"].get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")  # (embed, mlp)


def _save_one(tmp_path, items) -> None:
    with distckpt.CheckpointService(tmp_path) as ckpt:
        ckpt.save(1, items)


@pytest.mark.fast
def test_strict_restore_names_every_offending_path(tmp_path):
    mesh = distckpt.make_mesh("fsdp=8")
    _save_one(tmp_path, distckpt.init_sharded(factory(layers=4), mesh))
    ro = distckpt.CheckpointOptions(read_only=True)
    listing = sorted(os.listdir(tmp_path / "1" / "state"))

    with distckpt.CheckpointService(tmp_path, ro) as ckpt:
        # 4-layer checkpoint into a 6-layer model.
        with pytest.raises(distckpt.TargetMismatchError) as err:
            ckpt.restore(distckpt.abstract_target(factory(layers=6), mesh))
        msg = str(err.value)
        for i in (4, 5):
            assert f"model/layers/{i}/kernel: in the target but not in step 1" in msg
            assert f"optimizer/opt_state/0/mu/layers/{i}/kernel" in msg
        # 6-layer checkpoint data into a 4-layer model is the same error the other way round.
        # Shape change.
        with pytest.raises(distckpt.TargetMismatchError) as err:
            ckpt.restore(distckpt.abstract_target(factory(layers=4, width=16), mesh))
        assert "model/layers/0/kernel: shape (8, 8) saved, (16, 16) in target" in str(err.value)
        # Dtype change: never cast.
        with pytest.raises(distckpt.TargetMismatchError) as err:
            ckpt.restore(distckpt.abstract_target(factory(layers=4, dtype=jnp.bfloat16), mesh))
        assert "model/layers/0/kernel: dtype float32 saved, bfloat16 in target" in str(err.value)
        assert "never casts" in str(err.value)
    # Nothing on disk changed.
    assert sorted(os.listdir(tmp_path / "1" / "state")) == listing


@pytest.mark.fast
def test_partial_restore_reports_untouched_paths(tmp_path):
    mesh = distckpt.make_mesh("fsdp=8")
    saved = distckpt.init_sharded(factory(layers=2), mesh)
    _save_one(tmp_path, saved)
    grown = distckpt.init_sharded(factory(layers=3), mesh)
    fresh_layer2 = np.asarray(nnx.state(grown["model"])["layers"][2]["kernel"].get_value())
    with distckpt.CheckpointService(tmp_path) as ckpt:
        restored = ckpt.restore(grown, partial=True)
    assert "model/layers/2/kernel" in restored.untouched
    state = nnx.state(restored.items["model"])
    np.testing.assert_array_equal(state["layers"][2]["kernel"].get_value(), fresh_layer2)
    np.testing.assert_array_equal(
        state["layers"][0]["kernel"].get_value(),
        nnx.state(saved["model"])["layers"][0]["kernel"].get_value())


@pytest.mark.fast
def test_retention_best_and_keep_forever(tmp_path):
    mesh = distckpt.make_mesh("fsdp=8")
    items = distckpt.init_sharded(factory(), mesh)
    losses = {1: 0.9, 2: 0.3, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.95}
    opts = distckpt.CheckpointOptions(max_to_keep=2, best_metric="loss", best_mode="min",
                                      best_n=1, keep_period=4)
    with distckpt.CheckpointService(tmp_path, opts) as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, items, metrics={"loss": loss})
            if step == 1:
                ckpt.wait()
                ckpt.keep_forever(1)
        ckpt.wait()
        assert ckpt.best_step() == 2
    with distckpt.CheckpointService(tmp_path, opts) as ckpt:
        # newest 2 (5, 6), best (2), every 4th (4), marked (1).
        assert ckpt.all_steps() == [1, 2, 4, 5, 6]
        restored = ckpt.restore(distckpt.abstract_target(factory(), mesh), step="best")
        assert restored.step == 2 and restored.metrics == {"loss": 0.3}
    assert json.loads((tmp_path / "distckpt_keep_forever.json").read_text()) == {"steps": [1]}


@pytest.mark.fast
def test_save_interval_explicit_steps_and_force(tmp_path):
    mesh = distckpt.make_mesh("fsdp=8")
    items = distckpt.init_sharded(factory(), mesh)
    opts = distckpt.CheckpointOptions(save_interval_steps=10, save_on_steps=(3,), max_to_keep=None,
                                      allow_older_steps=True)  # for step 7 after 20
    with distckpt.CheckpointService(tmp_path, opts) as ckpt:
        saved = [s for s in range(1, 22) if ckpt.save(s, items)]
        assert ckpt.save(7, items, force=True)
        ckpt.wait()
        assert saved == [3, 10, 20]
        assert ckpt.all_steps() == [3, 7, 10, 20]
        assert ckpt.latest_step() == 20


@pytest.mark.fast
def test_bad_input_is_a_clear_error_and_changes_nothing(tmp_path):
    mesh = distckpt.make_mesh("fsdp=8")
    with pytest.raises(distckpt.NoCheckpointError, match="does not exist"):
        distckpt.CheckpointService(tmp_path / "nope", distckpt.CheckpointOptions(read_only=True))
    assert not (tmp_path / "nope").exists()
    (tmp_path / "empty").mkdir()
    with distckpt.CheckpointService(tmp_path / "empty",
                                    distckpt.CheckpointOptions(read_only=True)) as ckpt:
        with pytest.raises(distckpt.NoCheckpointError, match="no committed checkpoint"):
            ckpt.restore(distckpt.abstract_target(factory(), mesh))
    assert os.listdir(tmp_path / "empty") == []
    with distckpt.CheckpointService(tmp_path / "ck") as ckpt:
        items = distckpt.init_sharded(factory(), mesh)
        with pytest.raises(ValueError, match="non-negative int"):
            ckpt.save(-1, items)
        with pytest.raises(TypeError, match="non-empty mapping"):
            ckpt.save(1, [items["model"]])
        with pytest.raises(TypeError, match="JSON-serializable"):
            ckpt.save(1, items, metadata={"x": object()})
        assert ckpt.all_steps() == []
        ckpt.save(1, items)
        ckpt.wait()
        with pytest.raises(distckpt.NoCheckpointError, match="step 9 is not a committed"):
            ckpt.restore(distckpt.abstract_target(factory(), mesh), step=9)
    with pytest.raises(ValueError, match="max_to_keep"):
        distckpt.CheckpointOptions(max_to_keep=0)
    with pytest.raises(ValueError, match="best_mode"):
        distckpt.CheckpointOptions(best_mode="lowest")


@pytest.mark.fast
def test_mesh_spec_and_rules_errors():
    assert str(distckpt.MeshSpec.parse("data=2, fsdp=4")) == "data=2,fsdp=4"
    for bad, match in [("data", "AXIS=SIZE"), ("data=0", ">= 1"), ("a=2,a=4", "unique"),
                       ("data=x", "AXIS=SIZE")]:
        with pytest.raises(ValueError, match=match):
            distckpt.MeshSpec.parse(bad)
    with pytest.raises(ValueError, match="needs 6 devices but 8"):
        distckpt.make_mesh("data=2,fsdp=3")
    mesh = distckpt.make_mesh("fsdp=8")
    with pytest.raises(ValueError, match="not divisible"):
        distckpt.DEFAULT_RULES.spec(("embed",), (12,), mesh, "w")
    spec = distckpt.DEFAULT_RULES.spec(("embed", "mlp"), (16, 8), mesh)
    assert spec == jax.sharding.PartitionSpec("fsdp")


@pytest.mark.fast
def test_only_steps_with_a_commit_record_count_and_leftovers_are_moved_aside(tmp_path):
    """Junk, a symlinked step, a deleted record and a planted temp dir."""
    mesh = distckpt.make_mesh("fsdp=8")
    items = distckpt.init_sharded(factory(), mesh)
    with distckpt.CheckpointService(tmp_path, distckpt.CheckpointOptions(max_to_keep=None)) \
            as ckpt:
        ckpt.save(1, items)
        ckpt.save(2, items)
    (tmp_path / "7").mkdir()  # junk named like a step (plain Orbax made it latest_step)
    (tmp_path / "9").symlink_to(tmp_path / "1")  # plain Orbax restored step 1's data as 9
    (tmp_path / "2" / "distckpt_commit.json").unlink()  # a step whose record was deleted
    planted = tmp_path / "11.orbax-checkpoint-tmp"
    planted.mkdir()
    (planted / "junk").write_text("x")
    target = lambda: distckpt.abstract_target(factory(), mesh)  # noqa: E731
    with distckpt.CheckpointService(tmp_path, distckpt.CheckpointOptions(read_only=True)) \
            as reader:
        assert reader.all_steps() == [1] and reader.latest_step() == 1
        assert reader.restore(target()).step == 1
        with pytest.raises(distckpt.NoCheckpointError, match="committed steps: \\[1\\]"):
            reader.restore(target(), step=9)
    assert sorted(os.listdir(tmp_path)) == ["1", "11.orbax-checkpoint-tmp", "2", "7", "9"]
    again = distckpt.CheckpointOptions(max_to_keep=None, allow_older_steps=True)  # 2 < 9
    with distckpt.CheckpointService(tmp_path, again) as ckpt:
        for step in (7, 9, 2, 11):  # saving each again works
            ckpt.save(step, items)
            ckpt.wait()
            assert ckpt.restore(target(), step=step).verified
        assert ckpt.all_steps() == [1, 2, 7, 9, 11]
        assert ckpt.restore(target(), step=1).verified  # the symlink's target is untouched
    moved = sorted(p.split(".")[0] for p in os.listdir(tmp_path / "distckpt-quarantine"))
    assert moved == ["2", "7", "9"]  # set aside, never deleted


@pytest.mark.fast
def test_out_of_space_is_found_by_errno_through_the_chain():
    import errno

    from distckpt.checkpoint.failures import out_of_space as _out_of_space

    full = OSError(errno.ENOSPC, "disk full, said differently")
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("the background save failed") from e
    except RuntimeError as wrapped:
        assert _out_of_space(wrapped)
    assert not _out_of_space(OSError(errno.EACCES, "No space left on device"))
    assert not _out_of_space(ValueError("bad input"))
    # TensorStore reports the OS error as text only (no errno).
    assert _out_of_space(ValueError("writing chunk: No space left on device [OS error]"))


@pytest.mark.fast
def test_origin_is_recorded_in_provenance_and_must_be_json(tmp_path):
    items = {"s": {"w": jnp.arange(4.0)}}
    with distckpt.CheckpointService(tmp_path) as ckpt:
        with pytest.raises(TypeError):
            ckpt.save(1, items, origin={"run": object()})
        assert ckpt.all_steps() == [] and not (tmp_path / "1").exists()
        ckpt.save(1, items, origin={"run": "exp-7", "from_step": 12})
        ckpt.wait()
    target = {"s": {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.
                                             SingleDeviceSharding(jax.devices()[0]))}}
    with distckpt.CheckpointService(tmp_path, distckpt.CheckpointOptions(read_only=True)) as c:
        assert c.restore(target).provenance["origin"] == {"run": "exp-7", "from_step": 12}


@pytest.mark.parametrize("background", [True, False])
def test_overwriting_the_best_step_without_metrics_unranks_it(tmp_path, background):
    """max_to_keep=1 and the best step by loss: step 1 is best, then overwritten without
    metrics; it is no longer best, so only the newest step stays. Retention used to read
    the replaced step's metrics back from disk (the old step 1 is still there while the
    new one commits) and kept step 1 for good (found by the stateful test, seed
    870477257)."""
    options = distckpt.CheckpointOptions(
        max_to_keep=1, best_metric="loss", best_mode="min", best_n=1,
        allow_older_steps=True, save_in_background=background)
    state = {"x": jnp.zeros(4)}
    with distckpt.CheckpointService(tmp_path / "ckpt", options) as svc:
        svc.save(0, state)
        svc.save(1, state, metrics={"loss": 0.25})
        svc.save(2, state)
        svc.save(3, state)
        svc.wait()
        assert svc.all_steps() == [1, 3]  # the newest and the best
        svc.save(1, state, overwrite=True)
        svc.wait()
        assert svc.all_steps() == [3]
        svc.save(4, state, metrics={"loss": 0.5})
        svc.wait()
        assert svc.all_steps() == [4]


def test_opening_tells_a_file_and_a_missing_directory_apart(tmp_path):
    # The primary's look at the directory: a directory (the usual case, one request on
    # an object store), a file, or nothing there.
    afile = tmp_path / "afile"
    afile.write_text("not a checkpoint")
    with pytest.raises(distckpt.CheckpointError, match="is a file, not a checkpoint directory"):
        distckpt.CheckpointService(afile)
    assert afile.read_text() == "not a checkpoint"
    missing = tmp_path / "missing"
    with pytest.raises(distckpt.NoCheckpointError, match="does not exist .opened read-only"):
        distckpt.CheckpointService(missing, distckpt.CheckpointOptions(read_only=True))
    assert not missing.exists()
    with distckpt.CheckpointService(missing) as ckpt:  # created when writable
        assert ckpt.all_steps() == []
    assert missing.is_dir()
