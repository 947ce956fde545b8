"""Bring an existing checkpoint into distckpt: ``distckpt import`` and :func:`import_checkpoint`.

Reads a plain Orbax checkpoint (or, on explicit opt-in, a pickle file) in any of the
layouts :mod:`distckpt.tools.import_source` recognizes, maps its tree onto the items a
distckpt save of ``{"model": model, "optimizer": optimizer}`` writes
(:mod:`distckpt.tools.import_tree`), and saves them as one committed step of a
distckpt directory: digests, provenance and commit record as for any save, plus an
``imported_from`` entry in the step's metadata naming the source, its layout and its
step number; the source's metrics become the step's metrics.

Every process of the job runs the same import. Orbax restores each array straight
into a sharding over all of the job's devices (its largest dimension that divides
the device count, split over every device; replicated if none does), so each
process reads and holds only its shards and no process holds the whole state. A
pickle file has no shards: every process unpickles all of it and keeps only its
shards on its devices.

Order, so that a refusal changes nothing: find the layout (small files only), check
the destination, read the arrays, check the destination again with the final step
number, then save. The source is only read. The destination is created by the save.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distckpt import storage
from distckpt.checkpoint import committed
from distckpt.checkpoint.options import CheckpointOptions
from distckpt.checkpoint.service import CheckpointService
from distckpt.multihost import coordinator
from distckpt.state.mesh import make_mesh
from distckpt.tools import import_tree
from distckpt.tools.import_source import ImportSourceError, Layout, Source, detect

logger = logging.getLogger(__name__)

__all__ = ["ImportReport", "ImportSourceError", "PickleRefusedError", "import_checkpoint"]

PICKLE_WARNING = ("unpickling executes code stored in the file, so distckpt reads a pickle "
                  "file only when told to")


class PickleRefusedError(ImportSourceError):
    """The source is a pickle file and the caller did not allow unpickling it."""


@dataclasses.dataclass
class ImportReport:
    """What an import read and wrote."""

    source: str
    layout: str
    description: str
    destination: str
    step: int
    source_step: int | None
    items: dict[str, int]
    """Item name -> number of arrays written."""
    kinds: dict[str, str]
    """Item name -> what the source held there."""
    arrays: int
    bytes: int
    """Bytes of all arrays (global shapes)."""
    process_bytes: int
    """Bytes this process held on its devices (its shards)."""
    unmapped: list[str]
    """Source paths of arrays that map to no item (not written)."""
    metadata: dict[str, Any]
    metrics: dict[str, float] | None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _sharding_for(mesh: Mesh) -> Callable[[tuple[int, ...]], NamedSharding]:
    """Shard an array's largest dimension that the device count divides over every device."""
    axes = tuple(mesh.axis_names)
    size = mesh.devices.size

    def sharding(shape: tuple[int, ...]) -> NamedSharding:
        dims = sorted(range(len(shape)), key=lambda d: -shape[d])
        for d in dims:
            if size > 1 and shape[d] % size == 0:
                spec: list[Any] = [None] * len(shape)
                spec[d] = axes if len(axes) > 1 else axes[0]
                return NamedSharding(mesh, PartitionSpec(*spec))
        return NamedSharding(mesh, PartitionSpec())

    return sharding


def _one_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:160]}" + ("..." if len(text) > 160 else "")


def _read_orbax(path: epath.Path, sharding: Callable[[tuple[int, ...]], NamedSharding]) -> Any:
    """One Orbax item, each array restored straight into its sharding."""
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        metadata = checkpointer.metadata(path).item_metadata
        tree = metadata.tree if hasattr(metadata, "tree") else metadata
        if not jax.tree.leaves(tree):  # Orbax logs why and returns nothing
            raise ImportSourceError(
                f"{path}: Orbax could not read the arrays' metadata of this item; the "
                "checkpoint is truncated or damaged (or not an Orbax pytree save)")

        def restore_args(meta: Any) -> Any:
            if isinstance(meta, ocp.metadata.ArrayMetadata):
                return ocp.ArrayRestoreArgs(sharding=sharding(tuple(meta.shape)),
                                            global_shape=tuple(meta.shape), dtype=meta.dtype)
            return ocp.RestoreArgs()

        args = jax.tree.map(restore_args, tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    finally:
        checkpointer.close()


def _place(value: Any, sharding: Callable[[tuple[int, ...]], NamedSharding]) -> Any:
    """A host array as a jax.Array whose devices hold only their shards."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding(host.shape),
                                        lambda index: host[index])


def _read(source: Source, item: str, allow_pickle: bool,
          sharding: Callable[[tuple[int, ...]], NamedSharding]) -> import_tree.Mapped:
    if source.layout is Layout.PICKLE:
        if not allow_pickle:
            raise PickleRefusedError(
                f"{source.path} is a pickle file; {PICKLE_WARNING}: if you trust it, rerun "
                "with --allow-pickle (Python: allow_pickle=True). Nothing was written")
        try:
            with open(os.fspath(source.path), "rb") as f:
                loaded = pickle.load(f)  # noqa: S301 - the caller allowed it, knowing
        except Exception as e:
            raise ImportSourceError(f"{source.path}: could not unpickle it ({_one_line(e)}); "
                                    "the file is truncated or not a checkpoint") from e
        tree = import_tree.plain(loaded)
        for path, value in import_tree.leaves(tree):
            if import_tree.is_array(value):
                node = tree
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = _place(value, sharding)
        return import_tree.split_items(tree, item)
    mapped = import_tree.Mapped()
    for name, path in source.items.items():
        handler = source.handlers.get(name, "")
        if "Json" in handler:
            mapped.values.update(_read_json_item(path, name))
            continue
        try:
            tree = import_tree.plain(_read_orbax(path, sharding))
        except ImportSourceError:
            raise
        except Exception as e:
            raise ImportSourceError(
                f"{path}: Orbax could not read this item ({_one_line(e)}); the checkpoint is "
                "truncated, damaged or not an Orbax pytree save") from e
        if name in import_tree.MODEL_KEYS:
            mapped.add_item(item, tree, f"item '{name}'", name)
        elif name in import_tree.OPTIMIZER_KEYS:
            import_tree.add_optimizer(mapped, tree, name)
        else:  # 'default', 'state', or a single save ("")
            import_tree.split_items(tree, item, mapped, name)
    return mapped


def _read_json_item(path: epath.Path, name: str) -> dict[str, Any]:
    """A JsonCheckpointHandler item (e.g. ``metrics``, the seeds' ``metadata``), flattened."""
    out: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}{import_tree.SEP}{k}", v)
        else:
            out[prefix] = value

    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        if entry.is_file() and not entry.name.startswith(("_", ".")) and \
                entry.name != "commit_success.txt":
            try:
                flatten(name, json.loads(entry.read_text()))
            except ValueError:
                continue
    return out


def _check_destination(dst: epath.Path, src: epath.Path, step: int | None,
                       overwrite: bool) -> None:
    if committed.is_local(dst):
        d, s = os.path.realpath(os.fspath(dst)), os.path.realpath(os.fspath(src))
        if d == s or d.startswith(s.rstrip(os.sep) + os.sep):
            raise ImportSourceError(f"the destination {dst} is inside the source {src}; the "
                                    "source is never modified: choose a directory outside it")
        if dst.exists() and not dst.is_dir():
            raise ImportSourceError(f"the destination {dst} is a file; give a new or a "
                                    "distckpt checkpoint directory")
    if step is not None and not overwrite and dst.exists() and \
            step in committed.committed_steps(dst):
        raise ImportSourceError(
            f"{dst} already has step {step}; pass --overwrite (Python: overwrite=True) to "
            "replace it, or import into another directory. Nothing was written")


def _step_of(source: Source, mapped: import_tree.Mapped, step: int | None) -> int:
    if step is not None:
        return step
    if source.step is not None:
        return source.step
    found = sorted((key.count(import_tree.SEP), key) for key, value in mapped.values.items()
                   if key.rsplit(import_tree.SEP, 1)[-1] == "step" and isinstance(value, int)
                   and not isinstance(value, bool) and value >= 0)
    return int(mapped.values[found[0][1]]) if found else 0


def _metrics_of(source: Source, mapped: import_tree.Mapped) -> dict[str, float]:
    metrics = dict(source.metrics)
    for key, value in mapped.values.items():
        parts = key.split(import_tree.SEP)
        if "metrics" in parts[:-1] and isinstance(value, int | float) and \
                not isinstance(value, bool):
            metrics.setdefault(parts[-1], float(value))
    return metrics


def import_checkpoint(src: str | os.PathLike, dst: str | os.PathLike | storage.Location, *,
                      step: int | None = None, item: str = "model",
                      allow_pickle: bool = False, overwrite: bool = False,
                      mesh: Mesh | None = None,
                      options: CheckpointOptions | None = None) -> ImportReport:
    """Import the checkpoint at `src` as one committed step of the distckpt directory `dst`.

    `src` is an Orbax CheckpointManager directory (its newest step, or `step`), one of its
    step directories, a single StandardCheckpointer/PyTreeCheckpointer save, or (only with
    `allow_pickle`: unpickling runs code from the file) a pickle file. A single model's
    tree becomes item `item`; model + optimizer layouts become `item` and ``optimizer``.
    The step keeps the source's step number (`step` overrides it; 0 when the source has
    none). Refuses, before writing anything, a `dst` that already has that step unless
    `overwrite`. Every process of a multi-process job calls it with the same arguments
    (after :func:`distckpt.initialize`); arrays are read sharded over `mesh` (default: all
    devices on one axis). Never modifies `src`. Raises :class:`ImportSourceError` for a
    source or destination it cannot use.
    """
    if not isinstance(item, str) or not item or import_tree.SEP in item:
        raise ImportSourceError(f"--item {item!r}: give a non-empty name without '/'")
    if step is not None and (not isinstance(step, int) or step < 0):
        raise ImportSourceError(f"--step {step}: give a step number >= 0")
    source = detect(src, step)
    _, dst_path = storage.open_directory(dst)
    known = step if step is not None else source.step

    def check(final: int | None) -> bool:
        _check_destination(dst_path, source.path, final, overwrite)
        return True

    coordinator.primary_decides("import:destination", lambda: check(known))
    if mesh is None:
        mesh = make_mesh(f"fsdp={jax.device_count()}")
    mapped = _read(source, item, allow_pickle, _sharding_for(mesh))
    if not mapped.items:
        raise ImportSourceError(f"{src}: no arrays found in {source.describe()}; nothing to "
                                "import")
    final = _step_of(source, mapped, step)
    if final != known:
        coordinator.primary_decides("import:destination:step", lambda: check(final))
    metrics = _metrics_of(source, mapped)
    imported = {"source": os.fspath(source.path), "layout": str(source.layout),
                "description": source.describe(), "source_step": source.step,
                "items": mapped.kinds, "values": mapped.values, "unmapped": mapped.unmapped}
    options = options or CheckpointOptions(max_to_keep=None, async_save=False,
                                           allow_older_steps=True)
    with CheckpointService(dst, options) as service:
        service.save(final, mapped.items, metrics=metrics or None,
                     metadata={"imported_from": imported}, force=True, overwrite=overwrite,
                     origin={"imported_from": {k: imported[k] for k in (
                         "source", "layout", "source_step")}})
    arrays = [v for tree in mapped.items.values() for _, v in import_tree.leaves(tree)]
    report = ImportReport(
        source=os.fspath(source.path), layout=str(source.layout),
        description=source.describe(), destination=os.fspath(dst_path), step=final,
        source_step=source.step,
        items={n: sum(1 for _ in import_tree.leaves(t)) for n, t in mapped.items.items()},
        kinds=dict(mapped.kinds), arrays=len(arrays),
        bytes=sum(int(a.size) * a.dtype.itemsize for a in arrays),
        process_bytes=sum(s.data.nbytes for a in arrays for s in a.addressable_shards),
        unmapped=list(mapped.unmapped), metadata=dict(mapped.values),
        metrics=metrics or None)
    logger.info("[process=%d] imported %s (%s) into %s step %d: %d arrays, %d bytes",
                jax.process_index(), report.source, report.layout, report.destination,
                final, report.arrays, report.bytes)
    return report
