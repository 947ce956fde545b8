"""The contenders of `distckpt bench`: raw file (or object) I/O, plain Orbax, distckpt.

Each has the same small interface, used by :mod:`distckpt.bench.worker`: ``save(step,
items)`` returns when a training loop could go on (the stall), ``wait()`` when the step is
committed on every process, ``restore(step, reader=None)`` returns the restored arrays (ready),
``step_dir(step, root=None)`` names the step's files, ``open_reader(root)`` opens another
topology's checkpoints for a cross-topology restore, ``delete(step)`` and ``close()``.
``items`` maps names to NNX objects (``{"state": module}`` or the training loop's
``{"model": ..., "optimizer": ...}``).

Roots are local :class:`pathlib.Path` objects or, for ``--dir s3://...``, etils paths of
the URL (:func:`bench_path`); ``raw`` is then :class:`RawObjects` (PUT/GET) instead of
:class:`Raw` (write+fsync/read).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from distckpt.bench.names import parse_contender
from distckpt.multihost import coordinator


@dataclasses.dataclass
class Context:
    """What every contender needs about the job."""

    make_target: Callable[[], dict[str, Any]]
    """Fresh abstract target items (same structure as the saved items, this job's
    shardings)."""
    item_names: tuple[str, ...]
    """Names of the items saved (e.g. ('state',) or ('model', 'optimizer'))."""
    timeout_s: float


def _parse_flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (0/1/true/false), got {value!r}")


def host_arrays(items: dict[str, Any]) -> list[jax.Array]:
    """Every array of the items; typed PRNG keys as their key data."""
    from distckpt.state import nnx_state

    out = []
    for leaf in nnx_state.flatten_items(items):
        value = leaf.value
        out.append(jax.random.key_data(value) if leaf.is_key else value)
    return out


def local_shards(arrays: list[jax.Array], unique: bool) -> list[np.ndarray]:
    """Host views of this process's shards (CPU: zero-copy); unique: replica 0 only."""
    out = []
    for a in arrays:
        for shard in a.addressable_shards:
            if unique and shard.replica_id != 0:
                continue
            out.append(np.asarray(shard.data))
    return out


def bench_path(text: str) -> Any:
    """A local directory as a Path, an ``s3://`` URL as an etils path (Path would fold the
    '//' of the URL)."""
    from distckpt.bench import s3 as bench_s3

    if bench_s3.is_url(text):
        from etils import epath

        return epath.Path(text)
    return Path(text)


def remove_tree(path: Any) -> None:
    """Delete a directory tree, or every object below an ``s3://`` prefix."""
    from distckpt import storage
    from distckpt.bench import s3 as bench_s3

    if bench_s3.is_url(path):
        storage.remove_objects(os.fspath(path))
    else:
        shutil.rmtree(path, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Raw:
    """The limit: each process writes its unique shard bytes to one file, buffered, with
    fsync (file and directory), and reads them back into preallocated host buffers."""

    kind = "raw"
    holds = "files"

    def __init__(self, root: Path, options: dict[str, str], ctx: Context):
        if options:
            raise ValueError(f"raw takes no options, got {sorted(options)}")
        self.root, self.ctx = root, ctx
        self.buffer = 8 << 20
        self._items: dict[str, Any] | None = None

    def _file(self, step: int) -> Path:
        return self.root / str(step) / f"process_{jax.process_index()}.bin"

    def save(self, step: int, items: dict[str, Any]) -> None:
        path = self._file(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._items = items
        with open(path, "wb", buffering=self.buffer) as f:
            for shard in local_shards(host_arrays(items), unique=True):
                f.write(memoryview(shard).cast("B"))  # type: ignore[arg-type]  # numpy stubs declare ndarray.__buffer__ for 3.12+ only
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(path.parent)

    def wait(self) -> None:
        coordinator.barrier("bench:raw:committed", self.ctx.timeout_s)

    def step_dir(self, step: int, root: Path | None = None) -> Path:
        return (root or self.root) / str(step)

    def open_reader(self, root: Path) -> Any:
        raise ValueError(f"raw {self.holds} hold one topology's shards; they cannot be "
                         "resharded")

    def _buffers(self, reader: Any) -> list[np.ndarray]:
        """Preallocated host buffers for this process's unique shards of the saved items."""
        assert reader is None and self._items is not None
        return [np.empty_like(s) for s in local_shards(host_arrays(self._items), unique=True)]

    def restore(self, step: int, reader: Any = None) -> list[np.ndarray]:
        out = self._buffers(reader)
        with open(self._file(step), "rb", buffering=0) as f:
            for buf in out:
                view = memoryview(buf).cast("B")  # type: ignore[arg-type]  # numpy stubs declare ndarray.__buffer__ for 3.12+ only
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise OSError(f"{self._file(step)} ended early")
                    got += n
        return out

    def delete(self, step: int) -> None:
        coordinator.barrier(f"bench:raw:delete:{step}", self.ctx.timeout_s)
        if coordinator.is_primary():
            shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def close(self) -> None:
        pass


class RawObjects(Raw):
    """The limit on an object store: each process PUTs its unique shard bytes as objects
    through TensorStore's s3 kvstore (the driver Orbax and distckpt write array data with;
    spec from :meth:`distckpt.storage.Location.kvstore_spec`, so the same endpoint and
    credentials), then GETs them back into preallocated host buffers.

    Committed = every PUT acknowledged on every process: an object store makes an object
    durable before it acknowledges the PUT, so there is no fsync to add.

    Why 4 MiB objects, all issued at once (``bench_s3.OBJECT_BYTES``): a fair ceiling needs
    many requests in flight on parallel connections (TensorStore runs them concurrently, up
    to its ``s3_request_concurrency``), as distckpt has with its OCDBT data files; one object
    per process would serialize each process's bytes on one connection, and much smaller
    objects would pay a request's fixed cost per few KiB. The state's bytes are cut across
    shard boundaries, so the object count does not depend on the sharding.
    """

    holds = "objects"

    def __init__(self, root: Any, options: dict[str, str], ctx: Context):
        from distckpt.bench import s3 as bench_s3

        super().__init__(root, options, ctx)
        self.kv = bench_s3.kvstore(os.fspath(root))

    def _keys(self, step: int, nbytes: int) -> list[str]:
        from distckpt.bench import s3 as bench_s3

        return [f"{step}/process_{jax.process_index()}/{i:06d}"
                for i in range(bench_s3.object_count(nbytes))]

    def save(self, step: int, items: dict[str, Any]) -> None:
        from distckpt.bench import s3 as bench_s3

        self._items = items
        shards = local_shards(host_arrays(items), unique=True)
        keys = self._keys(step, sum(s.nbytes for s in shards))
        views = (memoryview(s).cast("B") for s in shards)  # type: ignore[arg-type]  # numpy stubs declare ndarray.__buffer__ for 3.12+ only
        puts = [self.kv.write(key, data)
                for key, data in zip(keys, bench_s3.pack(views), strict=True)]
        for put in puts:
            put.result()

    def restore(self, step: int, reader: Any = None) -> list[np.ndarray]:
        from distckpt.bench import s3 as bench_s3

        out = self._buffers(reader)
        gets = [self.kv.read(key) for key in self._keys(step, sum(s.nbytes for s in out))]
        bench_s3.unpack((get.result().value for get in gets),
                        [memoryview(buf).cast("B") for buf in out])  # type: ignore[arg-type]  # numpy stubs declare ndarray.__buffer__ for 3.12+ only
        return out

    def delete(self, step: int) -> None:
        import tensorstore as ts

        coordinator.barrier(f"bench:raw:delete:{step}", self.ctx.timeout_s)
        if coordinator.is_primary():
            self.kv.delete_range(ts.KvStore.KeyRange(inclusive_min=f"{step}/",
                                                     exclusive_max=f"{step}0")).result()


class PlainOrbax:
    """Orbax ``CheckpointManager`` as the seeds use it (``StandardSave`` of each item's NNX
    state, default options); with options, a ``PyTreeCheckpointHandler`` tuned by them:

    ``ocdbt=0|1``, ``zarr3=0|1``, ``compression=0|1``, ``chunk=BYTES`` (SaveArgs
    chunk_byte_size), ``file_size=BYTES`` (OCDBT target data file size; needs zarr3),
    ``save_gb=X``/``restore_gb=X`` (concurrent GB, 1e9 bytes, fractions allowed),
    ``replica_parallel=0|1``, ``async=0|1``.
    """

    kind = "orbax"
    KEYS = ("ocdbt", "zarr3", "compression", "chunk", "file_size", "save_gb", "restore_gb",
            "replica_parallel", "async")

    def __init__(self, root: Path, options: dict[str, str], ctx: Context,
                 max_to_keep: int = 3):
        import orbax.checkpoint as ocp

        from distckpt.remat.budget import parse_bytes

        unknown = sorted(set(options) - set(self.KEYS))
        if unknown:
            raise ValueError(f"unknown orbax option(s) {unknown}; known: {list(self.KEYS)}")
        self.ocp, self.ctx, self.root = ocp, ctx, root
        self.custom = bool(set(options) - {"async"})
        self.chunk = parse_bytes(options["chunk"]) if "chunk" in options else None
        self.file_size = parse_bytes(options["file_size"]) if "file_size" in options else None
        self.handler_kwargs: dict[str, Any] = {}
        for key, arg, conv in (("ocdbt", "use_ocdbt", _parse_flag),
                               ("zarr3", "use_zarr3", _parse_flag),
                               ("compression", "use_compression", _parse_flag),
                               ("save_gb", "save_concurrent_gb", float),
                               ("restore_gb", "restore_concurrent_gb", float)):
            if key in options:
                self.handler_kwargs[arg] = conv(options[key])
        if "replica_parallel" in options:
            from distckpt import compat
            from distckpt.checkpoint import tuning

            # Orbax's own metadata store (its 250 ms poll included): this is plain Orbax.
            self.handler_kwargs["type_handler_registry"] = tuning.type_handler_registry(
                replica_parallel=_parse_flag(options["replica_parallel"]),
                array_metadata_store=compat.ArrayMetadataStore())
        self.manager = self._manager(root, ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=_parse_flag(options.get("async", "1"))))

    def _manager(self, root: Path, options: Any) -> Any:
        if not self.custom:
            return self.ocp.CheckpointManager(root, options=options)
        handlers = {name: self.ocp.PyTreeCheckpointHandler(**self.handler_kwargs)
                    for name in self.ctx.item_names}
        return self.ocp.CheckpointManager(root, item_names=self.ctx.item_names,
                                          item_handlers=handlers, options=options)

    def save(self, step: int, items: dict[str, Any]) -> None:
        ocp = self.ocp
        args = {}
        for name, obj in items.items():
            state = nnx.state(obj)
            if not self.custom:
                args[name] = ocp.args.StandardSave(state)
                continue
            save_args = None
            if self.chunk is not None:
                save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=self.chunk),
                                         state)
            args[name] = ocp.args.PyTreeSave(state, save_args=save_args,
                                             ocdbt_target_data_file_size=self.file_size)
        self.manager.save(step, args=ocp.args.Composite(**args))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def step_dir(self, step: int, root: Path | None = None) -> Path:
        return (root or self.root) / str(step)

    def open_reader(self, root: Path) -> Any:
        return self._manager(root, self.ocp.CheckpointManagerOptions(read_only=True))

    def restore(self, step: int, reader: Any = None) -> list[jax.Array]:
        ocp = self.ocp
        args = {}
        for name, obj in self.ctx.make_target().items():
            target = nnx.state(obj)
            if self.custom:
                args[name] = ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target))
            else:
                args[name] = ocp.args.StandardRestore(target)
        out = (reader or self.manager).restore(step, args=ocp.args.Composite(**args))
        arrays = [x for x in jax.tree.leaves([out[n] for n in args])
                  if isinstance(x, jax.Array)]
        jax.block_until_ready(arrays)
        return arrays

    def latest_step(self, root: Path) -> int | None:
        reader = self.open_reader(root)
        try:
            return reader.latest_step()
        finally:
            reader.close()

    def delete(self, step: int) -> None:
        pass  # retention (max_to_keep) deletes

    def close(self) -> None:
        self.manager.close()


class Distckpt:
    """distckpt's CheckpointService with its defaults; options are CheckpointOptions
    fields, e.g. ``distckpt:async_save=0``."""

    kind = "distckpt"

    def __init__(self, root: Path, options: dict[str, str], ctx: Context,
                 max_to_keep: int = 3):
        from distckpt.checkpoint.service import CheckpointOptions, CheckpointService

        fields = {f.name: f for f in dataclasses.fields(CheckpointOptions)}
        kwargs: dict[str, Any] = {"max_to_keep": max_to_keep}
        for key, raw in options.items():
            if key not in fields:
                raise ValueError(f"unknown distckpt option {key!r}; CheckpointOptions fields: "
                                 f"{sorted(fields)}")
            default = fields[key].default
            kwargs[key] = (_parse_flag(raw) if isinstance(default, bool)
                           else type(default)(raw) if isinstance(default, int | float | str)
                           else json.loads(raw))
        self.ctx, self.root = ctx, root
        self.options_cls, self.service_cls = CheckpointOptions, CheckpointService
        self.service = CheckpointService(root, CheckpointOptions(**kwargs))

    def save(self, step: int, items: dict[str, Any]) -> None:
        self.service.save(step, items, force=True)

    def wait(self) -> None:
        self.service.wait()

    def step_dir(self, step: int, root: Path | None = None) -> Path:
        return (root or self.root) / str(step)

    def open_reader(self, root: Path) -> Any:
        return self.service_cls(root, self.options_cls(read_only=True))

    def restore(self, step: int, reader: Any = None) -> list[jax.Array]:
        from distckpt.state.process_state import drop_process_state

        service = reader or self.service
        restored = service.restore(self.ctx.make_target(), step=step,
                                   process_state_remap=drop_process_state)
        arrays = host_arrays(restored.items)
        jax.block_until_ready(arrays)
        return arrays

    def latest_step(self, root: Path) -> int | None:
        with self.open_reader(root) as reader:
            return reader.latest_step()

    def delete(self, step: int) -> None:
        pass  # retention (max_to_keep) deletes

    def close(self) -> None:
        self.service.close()


KINDS = {"raw": Raw, "orbax": PlainOrbax, "distckpt": Distckpt}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def make_contender(text: str, root: Any, ctx: Context, **kwargs: Any):
    """The contender `text` (KIND[:options]) saving below `root` (a Path or an s3:// etils
    path: ``raw`` there is :class:`RawObjects`)."""
    from distckpt.bench import s3 as bench_s3

    kind, options = parse_contender(text)
    if kind == "raw":
        cls = RawObjects if bench_s3.is_url(root) else Raw
        return cls(root, options, ctx)
    return KINDS[kind](root, options, ctx, **kwargs)
