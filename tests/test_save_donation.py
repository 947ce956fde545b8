"""A step holds the values its save() was given, whatever training does to the device
buffers afterwards: save() returns before anything is written, and the next jitted step
may donate (reuse) those buffers or the caller may delete the arrays. Real saves, real
restores, one process over the CPU devices (where staging takes no copy: the views it
takes keep the buffers from being donated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import distckpt


def _state(mesh) -> dict:
    sharded = NamedSharding(mesh, PartitionSpec("fsdp"))
    replicated = NamedSharding(mesh, PartitionSpec())
    return {"state": {
        "w": jax.device_put(jnp.arange(4096 * 64, dtype=jnp.float32).reshape(4096, 64),
                            sharded),
        "b": jax.device_put(jnp.arange(64, dtype=jnp.bfloat16), replicated),
        "n": jax.device_put(jnp.arange(16, dtype=jnp.int32), sharded),
    }}


@pytest.mark.parametrize("tiers", ["persistent", "local", "both"])
@pytest.mark.parametrize("background", [True, False])
def test_donating_and_deleting_after_save_does_not_change_the_step(tmp_path, tiers,
                                                                   background):
    mesh = distckpt.make_mesh(f"fsdp={jax.device_count()}")
    state = _state(mesh)
    want = jax.tree.map(lambda x: np.array(x), state)
    local = str(tmp_path / "local" / "{host}") if tiers != "persistent" else None
    options = distckpt.CheckpointOptions(
        save_in_background=background, local_directory=local,
        save_interval_steps=None if tiers == "local" else 1, max_to_keep=None)
    overwrite = jax.jit(lambda t: jax.tree.map(lambda x: x * 0 + 7, t), donate_argnums=0)
    with distckpt.CheckpointService(tmp_path / "ckpt", options) as svc:
        assert svc.save(1, state)
        for _ in range(3):  # training goes on at once, reusing the buffers if it can
            state = overwrite(state)
        jax.block_until_ready(state)
        for x in jax.tree.leaves(state):
            x.delete()
        svc.wait()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=x.sharding),
                              _state(mesh))
        restored = svc.restore(target)
    assert restored.step == 1
    assert restored.tier == ("persistent" if tiers == "persistent" else "local")
    got = jax.tree.map(lambda x: np.array(x), restored.items)
    for path, w in jax.tree_util.tree_leaves_with_path(want):
        g = got["state"][path[-1].key]
        assert g.dtype == w.dtype and np.array_equal(g, w), path
