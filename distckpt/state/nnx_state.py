"""NNX objects <-> the plain, string-keyed tree of arrays that goes to disk.

What a step holds is a mapping of named *items* (``{"model": model, "optimizer":
optimizer, "data": {"pos": array}}``). Each item is an NNX graph node (Module,
Optimizer, ``nnx.List``/``nnx.Dict``), an ``nnx.State``, or a plain pytree of
arrays. Every variable type is kept (``Param``, ``BatchStat``, ``RngKey``/
``RngCount``, ``OptState``, custom ``Variable`` subclasses): a leaf is
identified by its path, and its value is written back into the same variable
of the target on restore, so the variable's type comes from the target.

Two encodings keep the tree portable:

* path keys are strings on disk (``nnx.List`` index ``0`` becomes ``"0"``); on
  restore the target supplies the real keys, so integer keys stay integers
  (orbax#2561 returned strings and ``nnx.update`` silently updated nothing);
* typed PRNG keys (``key<fry>``) are written as their ``key_data`` (uint32) and
  re-wrapped with the same implementation on restore (orbax#1105, #2540).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from distckpt import compat

SEP = "/"


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One saved array: where it lives in the items and how to rebuild it."""

    path: tuple[Any, ...]
    """Key path from the item name down (item name first); keys keep their types."""
    value: Any
    """A jax.Array, a typed key array, or a ShapeDtypeStruct (restore targets)."""

    @property
    def name(self) -> str:
        return SEP.join(str(k) for k in self.path)

    @property
    def is_key(self) -> bool:
        return jnp.issubdtype(self.value.dtype, jax.dtypes.prng_key)

    @property
    def key_impl(self) -> str | None:
        """Name of the PRNG implementation of a typed key leaf (e.g. 'threefry2x32')."""
        return compat.key_impl_name(self.value.dtype) if self.is_key else None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> str:
        return str(self.value.dtype)


def _is_graph(obj: Any) -> bool:
    return nnx.graph.is_graph_node(obj) or isinstance(obj, nnx.State)


def _variables(obj: Any) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, Variable) pairs of a graph node or State, in a deterministic order."""
    state = obj if isinstance(obj, nnx.State) else nnx.state(obj)
    for path, variable in nnx.to_flat_state(state):
        yield tuple(path), variable


def flatten_items(items: Mapping[str, Any]) -> list[Leaf]:
    """All leaves of the items, each with its full path (item name first)."""
    if not isinstance(items, Mapping) or not items:
        raise TypeError(
            "items must be a non-empty mapping of name -> NNX object / State / pytree, e.g. "
            "{'model': model, 'optimizer': optimizer}"
        )
    leaves: list[Leaf] = []
    for name, obj in items.items():
        if not isinstance(name, str) or not name or SEP in name:
            raise ValueError(f"item names must be non-empty strings without '/', got {name!r}")
        if _is_graph(obj):
            for path, variable in _variables(obj):
                leaves.append(Leaf((name, *path), variable.get_value()))
        else:
            flat, _ = jax.tree_util.tree_flatten_with_path(obj)
            for path, value in flat:
                keys = tuple(_key_of(k) for k in path)
                leaves.append(Leaf((name, *keys), value))
    seen: dict[str, tuple] = {}
    for leaf in leaves:
        if leaf.name in seen and seen[leaf.name] != leaf.path:
            raise ValueError(f"two leaves map to the same saved name {leaf.name!r}")
        seen[leaf.name] = leaf.path
        if not hasattr(leaf.value, "shape") or not hasattr(leaf.value, "dtype"):
            raise TypeError(
                f"leaf {leaf.name!r} is a {type(leaf.value).__name__}, not an array; store "
                "Python values in metadata= (JSON) or process_state=, not in items"
            )
    return leaves


def _key_of(k: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def nest(pairs: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """Nested dicts from (key path, value) pairs."""
    tree: dict[str, Any] = {}
    for path, value in pairs:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _disk_path(leaf: Leaf) -> tuple[str, ...]:
    return tuple(str(k) for k in leaf.path)


def to_saveable(leaves: list[Leaf]) -> dict[str, Any]:
    """The nested str-keyed tree of plain arrays that Orbax writes."""
    pairs = []
    for leaf in leaves:
        value = leaf.value
        if leaf.is_key:
            value = jax.random.key_data(value)
        pairs.append((_disk_path(leaf), value))
    return nest(pairs)


def key_data_target(value: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """Restore target for a typed key array: its uint32 key_data with the same sharding.

    The key's own sharding object is used as is: a NamedSharding leaves the trailing
    key-data dimension unnamed (replicated), and on one device `wrap_key_data` hands the
    key data's sharding straight back, so padding the spec here would give a rank-0 key
    ``P(None,)`` instead of the target's ``P()``.
    """
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(value.shape, value.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=value.sharding)


def restore_target(leaves: list[Leaf]) -> dict[str, Any]:
    """The nested tree of ShapeDtypeStructs (with shardings) Orbax restores into."""
    return nest([(_disk_path(leaf), target_of(leaf)) for leaf in leaves])


def target_of(leaf: Leaf) -> jax.ShapeDtypeStruct:
    """What a leaf is restored as: shape, dtype and sharding (a typed key as key data)."""
    value = leaf.value
    if isinstance(value, jax.Array):
        value = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=value.sharding)
    if getattr(value, "sharding", None) is None:
        raise ValueError(
            f"restore target leaf {leaf.name!r} has no sharding; build the target with "
            "distckpt.abstract_target(factory, mesh, rules) so every leaf carries one, "
            "or give it one: jax.ShapeDtypeStruct(shape, dtype, sharding=...)"
        )
    if leaf.is_key:
        value = key_data_target(value)
    return value


def lookup(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for key in path:
        node = node[key]
    return node


def rebuild_value(leaf: Leaf, restored: Any) -> Any:
    """Turn a restored array back into what the target leaf holds (re-wrap typed keys).

    The result carries the target leaf's sharding object, not just an equivalent one (a
    ``P(None,)`` where the target says ``P()`` splits jit caches between restored and
    fresh state, and is invalid on a rank-0 array under `with_sharding_constraint`).
    Orbax restores arrays in the sharding asked for; should one come back in an
    equivalent sharding, it is relabelled on the same device buffers (no copy, no
    collective). A typed key's sharding is derived by JAX from its key data's (which
    `key_data_target` asks for in the key's own sharding); on more than one device JAX
    names every dimension, so a target for a rank >= 1 key should too, as
    `distckpt.abstract_target` does.
    """
    if leaf.is_key:
        return jax.random.wrap_key_data(restored, impl=leaf.key_impl)
    want = getattr(leaf.value, "sharding", None)
    if (want is not None and restored.sharding != want
            and restored.sharding.is_equivalent_to(want, restored.ndim)):
        return jax.make_array_from_single_device_arrays(
            restored.shape, want, [shard.data for shard in restored.addressable_shards])
    return restored


def write_back(items: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Put restored values (by leaf name) into the target items.

    Graph nodes are updated in place (shared references, e.g. an optimizer's model,
    stay shared); States and plain pytrees are rebuilt. Leaves absent from `values`
    are left as they are. Returns the items mapping with the restored objects.
    """
    out: dict[str, Any] = {}
    for name, obj in items.items():
        if _is_graph(obj):
            state = obj if isinstance(obj, nnx.State) else nnx.state(obj)
            flat = []
            for path, variable in nnx.to_flat_state(state):
                key = SEP.join(str(k) for k in (name, *path))
                if key in values:
                    variable = variable.replace(values[key])
                flat.append((path, variable))
            new_state = nnx.from_flat_state(flat)
            if isinstance(obj, nnx.State):
                out[name] = new_state
            else:
                nnx.update(obj, new_state)
                out[name] = obj
        else:
            flat, treedef = jax.tree_util.tree_flatten_with_path(obj)
            new = []
            for path, value in flat:
                key = SEP.join(str(k) for k in (name, *(_key_of(p) for p in path)))
                new.append(values.get(key, value))
            out[name] = jax.tree_util.tree_unflatten(treedef, new)
    return out


def spec_of(value: Any) -> list[Any] | None:
    """A JSON-friendly PartitionSpec of a leaf's sharding (None if not a NamedSharding)."""
    sharding = getattr(value, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    return [list(a) if isinstance(a, tuple) else a for a in sharding.spec]
