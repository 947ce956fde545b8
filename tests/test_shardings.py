"""Restored leaves carry exactly the target's shardings, on 1 to 8 devices, for every kind.

A restored leaf whose sharding is merely *equivalent* to the target's (``P(None,)`` on a
rank-0 typed key where the target says ``P()``) is invalid for its rank under
`with_sharding_constraint` and splits jit caches between restored and fresh state, so
these tests compare shardings with ``==``. Plain pytree items (a dict of arrays next to
the NNX objects) go through `abstract_target`, `init_sharded`, save and restore too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import distckpt
from distckpt.state import nnx_state

pytestmark = pytest.mark.fast  # single-process, no subprocess jobs, seconds each

# Every width is divisible by 1, 2, 3, 4 and 8, so each mesh below can shard it.
WIDTH = 24
MESHES = {1: "data=1", 2: "fsdp=2", 3: "tensor=3", 4: "fsdp=2,tensor=2",
          8: "data=2,fsdp=2,tensor=2"}
RO = distckpt.CheckpointOptions(read_only=True)


class Model(nnx.Module):
    """Sharded and replicated arrays, typed keys (rank 0 and sharded rank 1), scalars."""

    def __init__(self, rngs: nnx.Rngs):
        part = nnx.with_partitioning
        self.embed = nnx.Param(part(nnx.initializers.normal(1.0), ("vocab", "embed"))(
            rngs.params(), (WIDTH, WIDTH)))
        self.dense = nnx.Linear(WIDTH, WIDTH, rngs=rngs, kernel_init=part(
            nnx.initializers.lecun_normal(), ("embed", "mlp")))
        self.norm = nnx.BatchNorm(WIDTH, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.noise = nnx.Rngs(noise=11)  # rank-0 typed key + int scalar count
        self.step = nnx.Variable(jnp.int32(7))
        self.streams = nnx.Variable(jax.random.split(jax.random.key(5), WIDTH),
                                    out_sharding=("batch",))


def model_factory():
    def make():
        model = Model(nnx.Rngs(params=0, dropout=1))
        return {"model": model, "optimizer": nnx.Optimizer(model, optax.adam(1e-2),
                                                            wrt=nnx.Param)}

    return make


def plain_factory():
    """An NNX model next to a plain pytree of arrays (the issue's shape of state)."""

    def make():
        extra = {"w": jnp.arange(32, dtype=jnp.float32).reshape(8, 4), "count": jnp.int32(3),
                 "key": jax.random.key(9), "pair": [jnp.ones((2,)), jnp.full((3,), 2.0)],
                 "table": nnx.Variable(jnp.arange(WIDTH * 2, dtype=jnp.float32).reshape(
                     WIDTH, 2), out_sharding=("embed", None))}
        return {"model": Model(nnx.Rngs(params=0, dropout=1)), "extra": extra}

    return make


def mesh_of(n: int):
    return distckpt.make_mesh(MESHES[n], jax.devices()[:n])


def leaves(items) -> dict[str, object]:
    return {leaf.name: leaf.value for leaf in nnx_state.flatten_items(items)}


def host(value) -> np.ndarray:
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    return np.asarray(value)


def assert_exact(restored, want, saved) -> None:
    """Every leaf: the target's sharding (== and spec), the saved bits, a valid spec."""
    got, before = leaves(restored), leaves(saved)
    assert got.keys() == want.keys() == before.keys()
    for name, value in got.items():
        sharding = want[name].sharding
        assert isinstance(sharding, NamedSharding), name
        assert value.sharding == sharding, (name, value.sharding, sharding)
        assert value.sharding.spec == sharding.spec, name
        assert len(value.sharding.spec) <= value.ndim, (name, value.sharding.spec)
        assert value.dtype == before[name].dtype, name
        np.testing.assert_array_equal(host(value), host(before[name]), err_msg=name)


def round_trip(tmp_path, factory, n: int):
    """(saved items, the target's leaves before restoring, restored) on an n-device mesh."""
    mesh = mesh_of(n)
    saved = distckpt.init_sharded(factory, mesh)
    with distckpt.CheckpointService(tmp_path) as ckpt:
        assert ckpt.save(1, saved)
    target = distckpt.abstract_target(factory, mesh)
    want = leaves(target)  # restore updates the target's graph nodes in place
    with distckpt.CheckpointService(tmp_path, RO) as ckpt:
        restored = ckpt.restore(target)
    return saved, want, restored


@pytest.mark.parametrize("n", sorted(MESHES))
def test_restored_shardings_equal_the_target_exactly(tmp_path, n):
    saved, want, restored = round_trip(tmp_path, model_factory(), n)
    assert_exact(restored.items, want, saved)
    # Fresh state has the same shardings, so restored and fresh share jit caches.
    for name, value in leaves(saved).items():
        assert value.sharding == want[name].sharding, name
    # A restored rank-0 key takes its own sharding as a constraint (P(None,) would not).
    key = restored.items["model"].noise.noise.key[...]
    assert key.ndim == 0
    jax.jit(lambda k: jax.lax.with_sharding_constraint(k, key.sharding))(key)
    # The sharded key array really is sharded where the mesh has a batch axis.
    streams = restored.items["model"].streams[...]
    assert streams.sharding.spec == want["model/streams"].sharding.spec
    if n in (2, 4, 8):
        assert streams.sharding.spec != PartitionSpec()


def test_plain_pytree_items_get_shardings_in_abstract_target():
    mesh = mesh_of(8)
    target = distckpt.abstract_target(plain_factory(), mesh)
    extra = leaves({"extra": target["extra"]})
    assert set(extra) == {"extra/w", "extra/count", "extra/key", "extra/pair/0",
                          "extra/pair/1", "extra/table/value"}
    for name, value in extra.items():
        assert isinstance(value, jax.ShapeDtypeStruct), name
        assert isinstance(value.sharding, NamedSharding), name
        assert value.sharding.mesh == mesh, name
    # Bare arrays are replicated; a Variable's logical axes go through the rules.
    assert extra["extra/w"].sharding.spec == PartitionSpec()
    assert extra["extra/key"].dtype == jax.random.key(0).dtype
    assert extra["extra/table/value"].sharding.spec == PartitionSpec("fsdp")
    assert leaves(target)["model/dense/kernel"].sharding.spec == PartitionSpec("fsdp", "tensor")


def test_init_sharded_builds_plain_pytree_items_in_place():
    mesh = mesh_of(4)
    factory = plain_factory()
    items = distckpt.init_sharded(factory, mesh)
    target = leaves(distckpt.abstract_target(factory, mesh))
    with nnx.use_eager_sharding(False):  # the Variable's axes are names, not a mesh's
        fresh = leaves(factory())
    for name, value in leaves(items).items():
        assert isinstance(value, jax.Array), name
        assert value.sharding == target[name].sharding, name
        np.testing.assert_array_equal(host(value), host(fresh[name]), err_msg=name)
    assert isinstance(items["extra"]["pair"], list)
    assert isinstance(items["extra"]["table"], nnx.Variable)


def test_init_sharded_keeps_shared_references():
    def make():
        model = Model(nnx.Rngs(params=0, dropout=1))
        return {"model": model, "both": nnx.ModelAndOptimizer(model, optax.sgd(0.1))}

    items = distckpt.init_sharded(make, mesh_of(2))
    assert items["both"].model is items["model"]


@pytest.mark.parametrize("n", sorted(MESHES))
def test_plain_pytree_items_round_trip(tmp_path, n):
    saved, want, restored = round_trip(tmp_path, plain_factory(), n)
    assert_exact(restored.items, want, saved)
    assert isinstance(restored.items["extra"]["pair"], list)


@pytest.mark.parametrize("n", [1, 8])
def test_an_equivalent_sharding_is_relabelled_without_a_copy(n):
    mesh = mesh_of(n)
    target = NamedSharding(mesh, PartitionSpec())
    restored = jax.device_put(jnp.arange(WIDTH, dtype=jnp.float32),
                              NamedSharding(mesh, PartitionSpec(None)))
    assert restored.sharding != target
    leaf = nnx_state.Leaf(("extra", "w"), jax.ShapeDtypeStruct((WIDTH,), jnp.float32,
                                                               sharding=target))
    value = nnx_state.rebuild_value(leaf, restored)
    assert value.sharding == target
    assert [s.data.unsafe_buffer_pointer() for s in value.addressable_shards] == \
        [s.data.unsafe_buffer_pointer() for s in restored.addressable_shards]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(restored))
