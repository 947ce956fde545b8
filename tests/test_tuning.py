"""distckpt.checkpoint.tuning and the tuning fields of CheckpointOptions (one process, 8 CPU devices).

Mechanics only: what the options write and that the result stays readable by stock Orbax
onto another mesh. Speed is measured by ``distckpt bench``, not asserted here.
"""

from __future__ import annotations

import asyncio
import json
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint._src.multihost import multihost

import distckpt
from distckpt.checkpoint import tuning
from tests.mp_worker import factory
from tests.test_service import arrays

pytestmark = pytest.mark.fast  # single-process, no subprocess jobs, seconds each


def _zarray_compressors(step_dir) -> set:
    """The compressor of every array, from the zarr metadata inside the OCDBT database."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{step_dir / 'state'}"}).result()
    found = set()
    for key in kv.list().result():
        if key.endswith(b".zarray"):
            meta = json.loads(kv.read(key).result().value)
            found.add(None if meta["compressor"] is None else meta["compressor"]["id"])
    return found


@pytest.mark.parametrize("compression", [False, True])
def test_compression_option_and_stock_orbax_reads_it_onto_another_mesh(tmp_path, compression):
    mesh = distckpt.make_mesh("data=2,fsdp=2,tensor=2")
    items = distckpt.init_sharded(factory(), mesh)
    before = arrays(items)
    options = distckpt.CheckpointOptions(compression=compression)
    with distckpt.CheckpointService(tmp_path, options) as ckpt:
        ckpt.save(1, items)
    found = _zarray_compressors(tmp_path / "1")
    assert found and (None not in found if compression else found == {None}), found

    # Stock Orbax, no distckpt code, restores it onto a different mesh.
    other = jax.make_mesh((8,), ("x",))
    handler = ocp.PyTreeCheckpointHandler()
    meta = handler.metadata(tmp_path / "1" / "state").tree

    def target(m):
        spec = PartitionSpec("x") if m.shape and m.shape[0] % 8 == 0 else PartitionSpec()
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=NamedSharding(other, spec))

    tree = jax.tree.map(target, meta)
    out = handler.restore(tmp_path / "1" / "state", args=ocp.args.PyTreeRestore(
        item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree)))
    handler.close()
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(out)[0]}
    checked = 0
    for name, value in before.items():
        if name in flat and value.dtype.kind == "f":
            np.testing.assert_array_equal(flat[name], value, err_msg=name)
            checked += 1
    assert checked >= 4, (sorted(flat)[:5], sorted(before)[:5])


def test_tuning_options_are_validated():
    with pytest.raises(ValueError, match="save_concurrent_gb"):
        distckpt.CheckpointOptions(save_concurrent_gb=0)
    with pytest.raises(TypeError, match="save_policy"):
        distckpt.CheckpointOptions(save_policy=object())
    kwargs = distckpt.CheckpointOptions(restore_concurrent_gb=0.5).handler_kwargs()
    assert kwargs["use_compression"] is False and kwargs["restore_concurrent_gb"] == 0.5
    registry = kwargs["type_handler_registry"]
    assert isinstance(registry.get(jax.Array)._array_metadata_store, tuning.FastPollStore)


def _wait_as_non_primary(store: tuning.FastPollStore, path) -> None:
    asyncio.run(store._maybe_create_base_dir(path))


def test_fast_poll_store_waits_for_the_primarys_folder(tmp_path):
    """A non-primary host returns once the folder exists, and times out with a clear error
    if it never does. This single process is not host 1, so with primary_host=1 it takes
    the non-primary path; a thread plays the primary creating the folder."""
    assert not multihost.is_primary_host(1)
    store = tuning.FastPollStore(primary_host=1, write_timeout_secs=30)
    folder = tmp_path / "array_metadatas"
    creator = threading.Timer(0.05, folder.mkdir)
    creator.start()
    _wait_as_non_primary(store, folder)
    creator.join()
    assert folder.is_dir()

    never = tuning.FastPollStore(primary_host=1, write_timeout_secs=0)
    with pytest.raises(ValueError, match="primary host"):
        _wait_as_non_primary(never, tmp_path / "never")
