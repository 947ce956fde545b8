"""Meshes, logical axis rules and sharded abstract targets for NNX state.

A model names the *logical* axes of each parameter (``nnx.with_partitioning(init,
("embed", "mlp"))``); a :class:`Rules` table maps each logical axis to a mesh
axis (or several, or none). The same model and rules then shard onto any mesh:
a logical axis whose mesh axis the mesh lacks is replicated, so
``data=2,fsdp=4`` and ``fsdp=2,tensor=2`` both work without new rules.

:func:`abstract_target` builds the restore target: the model/optimizer objects
with `jax.ShapeDtypeStruct` leaves *carrying the target shardings*, without
allocating a parameter (``nnx.eval_shape`` alone drops shardings, flax#5110).
:func:`init_sharded` materialises fresh state directly into its shardings. Arrays of
plain pytrees next to the NNX objects (``{"model": model, "data": {"pos": pos}}``) have
no logical axes and are replicated.

Eager sharding (flax>=0.12 applies annotations at variable creation) is turned
off inside these helpers: distckpt applies the rules itself so a model is not
tied to one mesh's axis names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from distckpt.state.meshspec import MeshSpec as MeshSpec

T = TypeVar("T")


class AxisSizes(Protocol):
    """Anything with a mesh's ``shape`` (axis name -> size): Mesh, AbstractMesh, planners."""

    @property
    def shape(self) -> Mapping[str, int]: ...

def make_mesh(spec: str | MeshSpec, devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A mesh over all global devices (or `devices`) with Auto axis types.

    Auto axes accept `with_sharding_constraint`, which explicit axes (jax 0.10's
    `make_mesh` default) reject.
    """
    spec = MeshSpec.parse(spec) if isinstance(spec, str) else spec
    devs = list(devices) if devices is not None else jax.devices()
    if spec.size != len(devs):
        raise ValueError(
            f"mesh {spec} needs {spec.size} devices but {len(devs)} are available "
            f"({jax.process_count()} processes x {jax.local_device_count()} local devices); "
            "choose axis sizes whose product is the device count"
        )
    if devices is None:
        return jax.make_mesh(spec.shape, spec.names, axis_types=(AxisType.Auto,) * len(spec.axes))
    array = np.asarray(devs, dtype=object).reshape(spec.shape)
    return Mesh(array, spec.names, axis_types=(AxisType.Auto,) * len(spec.axes))


def mesh_spec_of(mesh: Mesh) -> MeshSpec:
    return MeshSpec(tuple((str(n), int(s)) for n, s in mesh.shape.items()))


MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicate)."""

    table: tuple[tuple[str, MeshAxes], ...]
    """(logical axis, mesh axes) pairs; the first match wins."""

    @classmethod
    def of(cls, mapping: Mapping[str, MeshAxes] | Iterable[tuple[str, MeshAxes]]) -> Rules:
        items = mapping.items() if isinstance(mapping, Mapping) else mapping
        return cls(tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items))

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return None
        for name, axes in self.table:
            if name == logical:
                return axes
        return None

    def spec(self, logical_axes: tuple[str | None, ...], shape: tuple[int, ...],
             mesh: AxisSizes, path: str = "") -> PartitionSpec:
        """The PartitionSpec for an array with these logical axes on `mesh`.

        Mesh axes the mesh lacks (or of size 1) are dropped, a mesh axis is used at most
        once per array, and a dimension that the mesh axes do not divide raises.
        """
        if len(logical_axes) != len(shape):
            raise ValueError(
                f"{path or 'array'}: {len(logical_axes)} logical axes {logical_axes} for an "
                f"array of rank {len(shape)} {shape}"
            )
        used: set[str] = set()
        out: list[MeshAxes] = []
        for dim, logical in zip(shape, logical_axes, strict=True):
            axes = self.mesh_axes(logical)
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1
                          and n not in used)
            size = math.prod(mesh.shape[n] for n in names)
            if names and dim % size:
                raise ValueError(
                    f"{path or 'array'}: dimension {dim} (logical axis {logical!r}) is not "
                    f"divisible by mesh axes {names} of total size {size}; pick a mesh whose "
                    f"axis sizes divide it or map {logical!r} to another axis in the rules"
                )
            used.update(names)
            out.append(None if not names else names[0] if len(names) == 1 else names)
        while out and out[-1] is None:
            out.pop()
        return PartitionSpec(*out)


# Rules for distckpt's reference transformer (and MaxText-style names): batch over the
# data-parallel axes, parameters' embed dimension over fsdp, heads and MLP over tensor.
DEFAULT_RULES = Rules.of({
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "seq": None,
})


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names an NNX variable was annotated with, if any."""
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None and not isinstance(names, (NamedSharding, PartitionSpec)):
            return tuple(names)
        if isinstance(names, PartitionSpec):
            return tuple(names)
    return None


def path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def _leaf_sharding(path: tuple[Any, ...], leaf: Any, mesh: Mesh | AbstractMesh, rules: Rules
                   ) -> NamedSharding:
    """A Variable with logical axes by the rules; anything else replicated.

    A typed PRNG key array's spec names every dimension (``P(None,)``, not ``P()``, for a
    replicated rank-1 key): JAX derives a key array's sharding from its key data's and
    gives it in that form on more than one device, whatever sharding was asked for, so
    only that form lets fresh, restored and target keys compare equal.
    """
    is_variable = isinstance(leaf, nnx.Variable)
    value = leaf.get_value() if is_variable else leaf
    shape = tuple(getattr(value, "shape", ()))
    logical = logical_axes_of(leaf) if is_variable else None
    spec = PartitionSpec() if logical is None else rules.spec(
        logical, shape, mesh, path_str(path))
    if jax.dtypes.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key):
        spec = PartitionSpec(*spec, *(None,) * (len(shape) - len(spec)))
    return NamedSharding(mesh, spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A State of NamedShardings: annotated variables by the rules, the rest replicated.

    Bare arrays (a plain pytree's leaves) have no logical axes and are replicated; to
    shard one, hold it in a Variable with axes, e.g.
    ``nnx.Variable(x, out_sharding=("embed", None))`` (inside ``nnx.use_eager_sharding(False)``
    when built outside these helpers).
    """

    def one(path, leaf):
        sharding = _leaf_sharding(path, leaf, mesh, rules)
        return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

    return nnx.map_state(one, state)


def _no_eager(fn: Callable[[], T]) -> Callable[[], T]:
    def wrapped():
        with nnx.use_eager_sharding(False):
            return fn()

    return wrapped


def _split_abstract(factory: Callable[[], T]) -> tuple[nnx.GraphDef[T], nnx.State]:
    """`factory()`'s graphdef and its state of ShapeDtypeStructs, allocating nothing.

    The split happens inside the trace, as in `init_sharded`'s jit: split outside it (on
    ``nnx.eval_shape``'s result), a plain pytree's arrays next to the NNX objects would be
    static attributes of the graphdef rather than state leaves, so they would get no
    sharding and the two graphdefs would not match.
    """
    graphdefs: list[nnx.GraphDef[T]] = []

    def split() -> nnx.State:
        graphdef, state = nnx.split(factory())
        graphdefs.append(graphdef)  # static: the same on every trace of `factory`
        return state

    state = jax.eval_shape(_no_eager(split))
    return graphdefs[-1], state


def abstract_target(factory: Callable[[], T], mesh: Mesh | AbstractMesh,
                    rules: Rules = DEFAULT_RULES) -> T:
    """Abstract objects from `factory()` whose leaves are ShapeDtypeStructs with target shardings.

    `factory` builds the model (and optimizer), e.g. ``lambda: {"model": m := Model(...),
    "optimizer": nnx.Optimizer(m, tx, wrt=nnx.Param)}``, and may hold plain pytrees of
    arrays too (``"data": {"pos": jnp.zeros((), jnp.int32)}``), which are replicated
    (see `state_shardings`). Nothing is allocated.
    """
    graphdef, state = _split_abstract(factory)

    def with_sharding(path, leaf):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        sds = jax.ShapeDtypeStruct(value.shape, value.dtype,
                                   sharding=_leaf_sharding(path, leaf, mesh, rules))
        return leaf.replace(sds) if isinstance(leaf, nnx.Variable) else sds

    return nnx.merge(graphdef, nnx.map_state(with_sharding, state))


def init_sharded(factory: Callable[[], T], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> T:
    """Build `factory()` with every variable created directly in its target sharding."""
    graphdef, abstract = _split_abstract(factory)
    shardings = state_shardings(abstract, mesh, rules)
    make = _no_eager(factory)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shardings_of(obj: Any) -> Any:
    """The shardings of an object's leaves (arrays or ShapeDtypeStructs)."""
    state = nnx.state(obj) if isinstance(obj, nnx.Object | nnx.Module) else obj
    return jax.tree.map(lambda x: getattr(x, "sharding", None), state)
