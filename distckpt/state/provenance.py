"""The provenance record the primary host writes with every step.

It says what the step holds and where it came from, so a step can be inspected,
checked against a restore target and explained without the saving job:
the format version, step, wall time (the primary's clock), process and device
counts, the mesh shape and axis names, every leaf's shape, dtype and
PartitionSpec, typed-key implementations, the device kind and library versions.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import time
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding

from distckpt.state import nnx_state

FORMAT_VERSION = 1
_PACKAGES = ("distckpt", "jax", "jaxlib", "flax", "orbax-checkpoint", "tensorstore", "optax")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a checkpoint depends on (a copy; read once per
    process: importlib.metadata parses every package's METADATA, ~7 ms, on each call)."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    out["python"] = platform.python_version()
    return out


def _mesh_of(leaves: list[nnx_state.Leaf]) -> dict[str, Any] | None:
    for leaf in leaves:
        sharding = getattr(leaf.value, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return {"axis_names": [str(n) for n in sharding.mesh.axis_names],
                    "shape": [int(s) for s in sharding.mesh.devices.shape]}
    return None


def leaf_record(leaf: nnx_state.Leaf) -> dict[str, Any]:
    record: dict[str, Any] = {"shape": list(leaf.shape), "dtype": leaf.dtype,
                              "spec": nnx_state.spec_of(leaf.value)}
    if leaf.is_key:
        record["key_impl"] = leaf.key_impl
    return record


def build(step: int, leaves: list[nnx_state.Leaf], *, has_process_state: bool,
          origin: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The provenance record of a step; `origin` (JSON), when given, says where the saved
    state came from (e.g. the checkpoint `distckpt import` read)."""
    devices = jax.devices()
    record = {
        "format": "distckpt",
        "format_version": FORMAT_VERSION,
        "step": step,
        "wall_time": time.time(),
        "process_count": jax.process_count(),
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "mesh": _mesh_of(leaves),
        "has_process_state": has_process_state,
        "leaves": {leaf.name: leaf_record(leaf) for leaf in leaves},
        "versions": library_versions(),
    }
    if origin is not None:
        record["origin"] = dict(origin)
    return record
