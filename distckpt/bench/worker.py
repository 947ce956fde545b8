"""One simulated host of a `distckpt bench` job: builds the state, runs the contenders.

Started by :func:`distckpt.bench.harness.run_bench` through the local launcher, one process per
simulated host (each calls ``jax.distributed.initialize``)::

    python -m distckpt.bench.worker SPEC.json
    python -m distckpt.bench.worker --probe SPEC.json   # one tiny save per contender
    python -m distckpt.bench.worker --devices gpu       # {"count": .., "kind": ..}

With ``--platform gpu`` or ``tpu`` (the spec's ``single_process``) the job is one process
whose mesh covers this machine's devices of that platform; with ``--platform cpu
--single-process`` the same code runs over the launcher's CPU devices (how the tests cover
the accelerator path).

Every process writes its own measurements to ``<out_dir>/<label>.p<i>.json``; the driver
takes, for every timed operation, the slowest process (a multi-host save is done when its
last host is done). Operations start together: each is preceded by a named barrier.

What one repetition does for each contender, in the order given (A B C A B C ...):

1. **save**: ``save()`` (the blocking stall), then wait until the step is committed on
   every process (time to commit, from the start of ``save()``); peak RSS over the whole
   save, commit included (VmHWM after resetting it through ``/proc/self/clear_refs``).
2. **evict**: drop the step's files from the page cache (``posix_fadvise(DONTNEED)``
   after ``fdatasync``; no root needed), so that reads come from the disk, as far as this
   machine can tell (a virtual disk may still be cached by its host).
3. **restore** the step into an abstract target with this job's shardings; peak RSS.
4. **raw read** of the same files (evicted again), split over the processes: what plain
   reads of that file layout cost.
5. **cross-topology restore** (when the driver passes another job's checkpoints): restore
   the step the other topology saved, onto this one's mesh.

On ``s3://`` (the spec's root is a URL) step 2 does not apply (the reads go over HTTP to
the server; nothing local to evict) and step 4 GETs the step's objects instead
(:func:`distckpt.bench.s3.read_objects`).

Bytes read during each restore (``/proc/self/io``: ``rchar``, what the process read
through read calls, and ``read_bytes``, what it caused the disk to serve) are recorded
with it. Then, on the jobs that measure the extras, the distinct-shapes state: per
contender a first and a second save (stall, commit) and restore of many small leaves of
distinct shapes (:meth:`Job.shapes_phase`). Then ``rss_saves`` consecutive saves per contender (RSS after each commit), and the
reference training loop (:mod:`distckpt.tools.train`) in blocks of steps without saving and
saving every step with each contender.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from distckpt.bench import s3 as bench_s3
from distckpt.bench.contenders import (
    Context,
    bench_path,
    host_arrays,
    local_shards,
    make_contender,
    remove_tree,
    slug,
)
from distckpt.bench.measure import (
    PeakRSS,
    ReadBytes,
    evict,
    files_under,
    read_files,
    release_free_memory,
    rss_bytes,
)
from distckpt.multihost import coordinator

_BENCH_RULES = {"rows": "fsdp"}


class BenchState(nnx.Module):
    """`leaves` float32 parameter matrices [rows, cols], rows sharded over the fsdp axis."""

    def __init__(self, shapes: list[tuple[int, int]]):
        init = nnx.with_partitioning(nnx.initializers.zeros_init(), ("rows", None))
        self.params = nnx.List([nnx.Param(init(jax.random.key(0), s, np.float32))
                                for s in shapes])


def abstract_state(shapes: list[tuple[int, int]], mesh: Any) -> BenchState:
    """The state with ShapeDtypeStruct leaves in this mesh's shardings (nothing allocated)."""
    from distckpt.state.mesh import Rules, abstract_target

    return abstract_target(lambda: BenchState(shapes), mesh, Rules.of(_BENCH_RULES))


def random_state(shapes: list[tuple[int, int]], mesh: Any, seed: int = 0) -> BenchState:
    """The benchmark state, random normal float32 (constants would compress), each shard
    generated where it lives from a seed and its index, so any topology builds the same."""
    graphdef, state = nnx.split(abstract_state(shapes, mesh))
    counter = iter(range(10**6))

    def fill(_path, variable):
        sds = variable.get_value()
        leaf = next(counter)

        def block(index):
            start = [s.start or 0 for s in index]
            stop = [s.stop if s.stop is not None else dim
                    for s, dim in zip(index, sds.shape, strict=True)]
            rng = np.random.default_rng([seed, leaf, *start])
            return rng.standard_normal([b - a for a, b in zip(start, stop, strict=True)],
                                       dtype=np.float32)

        return variable.replace(jax.make_array_from_callback(sds.shape, sds.sharding, block))

    return nnx.merge(graphdef, nnx.map_state(fill, state))


def memcpy_seconds(shards: list[np.ndarray], reps: int = 3) -> tuple[float, float]:
    """(into preallocated buffers, into fresh buffers): median of `reps` copies of `shards`."""
    dst = [np.empty_like(s) for s in shards]
    for d, s in zip(dst, shards, strict=True):
        np.copyto(d, s)  # fault the pages in once
    warm, fresh = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        for d, s in zip(dst, shards, strict=True):
            np.copyto(d, s)
        warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        copies = [s.copy() for s in shards]
        fresh.append(time.perf_counter() - t0)
        del copies
    return float(np.median(warm)), float(np.median(fresh))


# --------------------------------------------------------------------------- the job
class Job:
    """One benchmark job: this process's part of every measurement on one topology."""

    def __init__(self, spec: dict[str, Any]):
        from distckpt.state.mesh import make_mesh

        self.spec = spec
        self.label = spec["label"]
        self.timeout_s = float(spec["timeout_s"])
        self.pid = jax.process_index()
        self.devices = job_devices(spec)
        self.mesh = make_mesh(spec["mesh"], self.devices)
        self.shapes = [tuple(s) for s in spec["shapes"]]
        self.record: dict[str, Any] = {"process": self.pid, "label": self.label, "reps": [],
                                       "rss_growth": {}, "train": {}, "phase_s": {}}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Record how long `phase` took (since the previous lap)."""
        now = time.perf_counter()
        self.record["phase_s"][phase] = now - self._t
        self._t = now

    def barrier(self, name: str) -> None:
        coordinator.barrier(f"bench:{self.label}:{name}", self.timeout_s)

    def emit(self, **fields: Any) -> None:
        if coordinator.is_primary():
            print("BENCH " + json.dumps({"job": self.label, **fields}), flush=True)

    def evict_dir(self, path: Path, name: str) -> None:
        """The primary drops the files under `path` from the page cache; everyone waits."""
        self.barrier(f"evict:{name}:start")
        if coordinator.is_primary():
            evict(files_under(path))
        self.barrier(f"evict:{name}:done")

    def timed_save(self, c: Any, step: int, items: dict[str, Any], name: str
                   ) -> dict[str, Any]:
        self.barrier(f"{name}:save:{step}")
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            c.save(step, items)
            stall = time.perf_counter() - t0
            c.wait()
            commit = time.perf_counter() - t0
        return {"stall_s": stall, "commit_s": commit, "save_rss_base": mem.base,
                "save_rss_peak": mem.peak}

    def timed_restore(self, c: Any, step: int, step_dir: Any, name: str, cold: bool,
                      reader: Any = None) -> dict[str, Any]:
        if cold:
            self.evict_dir(step_dir, f"{name}:restore")
        self.barrier(f"{name}:restore")
        local = not bench_s3.is_url(step_dir)
        with PeakRSS() as mem, ReadBytes() as io:
            t0 = time.perf_counter()
            arrays = c.restore(step, reader)
            seconds = time.perf_counter() - t0
        del arrays
        return {"restore_s": seconds, "restore_rss_base": mem.base,
                "restore_rss_peak": mem.peak,
                # From local files only: an s3:// restore reads sockets (not counted alike).
                "restore_read_bytes": io.calls if local else None,
                "restore_disk_read_bytes": io.disk if local else None}

    def timed_raw_read(self, step_dir: Any, name: str, cold: bool) -> dict[str, Any]:
        if bench_s3.is_url(step_dir):
            return self.timed_raw_get(os.fspath(step_dir), name)
        if cold:
            self.evict_dir(step_dir, f"{name}:rawread")
        self.barrier(f"{name}:rawread")
        files = files_under(step_dir)
        mine = files[self.pid::jax.process_count()]
        t0 = time.perf_counter()
        read_files(mine)
        seconds = time.perf_counter() - t0
        return {"raw_read_files_s": seconds,
                "files_bytes": sum(p.stat().st_size for p in files), "files": len(files)}

    def timed_raw_get(self, url: str, name: str) -> dict[str, Any]:
        """The object-store form of the raw read: every process lists the step's objects
        and GETs its share of them (:data:`bench_s3.IN_FLIGHT` at a time)."""
        from distckpt import storage

        sizes = storage.list_files(url)
        keys = sorted(sizes)
        mine = keys[self.pid::jax.process_count()]
        self.barrier(f"{name}:rawread")
        t0 = time.perf_counter()
        bench_s3.read_objects(url, mine)
        seconds = time.perf_counter() - t0
        return {"raw_read_files_s": seconds, "files_bytes": sum(sizes.values()),
                "files": len(keys)}

    def run(self) -> dict[str, Any]:
        spec, root = self.spec, bench_path(self.spec["root"])
        cold = spec["cold"]
        prepare(spec["root"])
        module = random_state(self.shapes, self.mesh, seed=spec["seed"])
        items = {"state": module}
        arrays = host_arrays(items)
        jax.block_until_ready(arrays)
        shards = local_shards(arrays, unique=False)
        self.record.update(
            shard_bytes=int(sum(s.nbytes for s in shards)),
            unique_shard_bytes=int(sum(s.nbytes for s in local_shards(arrays, unique=True))),
            total_bytes=int(sum(a.nbytes for a in arrays)), leaves=len(arrays),
            shapes=[list(s) for s in self.shapes])
        self.record["memcpy_s"], self.record["memcpy_alloc_s"] = memcpy_seconds(shards)
        del shards
        self.lap("setup")
        ctx = Context(make_target=lambda: {"state": abstract_state(self.shapes, self.mesh)},
                      item_names=("state",), timeout_s=self.timeout_s)
        contenders = {name: make_contender(name, root / "reps" / slug(name), ctx)
                      for name in spec["contenders"]}
        # Another topology's checkpoints of the same state, restored onto this mesh.
        cross: dict[str, tuple[Any, int, Any]] = {}
        if spec.get("cross_root"):
            for name, c in contenders.items():
                other = bench_path(spec["cross_root"]) / "reps" / slug(name)
                if c.kind == "raw" or not other.exists():
                    continue
                step = c.latest_step(other)
                if step is not None:
                    cross[name] = (c.open_reader(other), step, c.step_dir(step, other))
        total = spec["warmup"] + spec["reps"]
        for rep in range(total):
            step = rep + 1
            for name, c in contenders.items():
                self.emit(phase="reps", rep=rep, of=total, contender=name)
                key = f"{name}:{rep}"
                row: dict[str, Any] = {"rep": rep, "warmup": rep < spec["warmup"],
                                       "contender": name, "step": step}
                row.update(self.timed_save(c, step, items, key))
                row.update(self.timed_restore(c, step, c.step_dir(step), key, cold))
                row.update(self.timed_raw_read(c.step_dir(step), key, cold))
                if name in cross:
                    reader, other_step, other_dir = cross[name]
                    got = self.timed_restore(c, other_step, other_dir, f"{key}:cross", cold,
                                             reader=reader)
                    row.update({f"cross_{k}": v for k, v in got.items()})
                if step > 3:
                    c.delete(step - 3)
                self.record["reps"].append(row)
        for reader, _, _ in cross.values():
            reader.close()
        for c in contenders.values():
            c.close()
        self.lap("reps")
        self.shapes_phase(root, cold)
        self.lap("shapes")
        self.rss_phase(root, items)
        self.lap("rss")
        del module, items, arrays
        gc.collect()
        if spec["train"]["rounds"] > 0:
            self.train_phase(root)
        return self.record

    def abstract_items(self, shapes: list[tuple[int, int]]) -> dict[str, Any]:
        """{'state': the abstract state of `shapes` on this job's mesh}."""
        return {"state": abstract_state(shapes, self.mesh)}

    def shapes_phase(self, root: Any, cold: bool) -> None:
        """A state of many small leaves of distinct shapes, saved twice and restored twice
        per contender in a fresh directory: the first save()'s stall (and commit, and
        restore) pays whatever is built per shape (compiling the digest kernels, on an
        accelerator and on CPU), the second shows the steady state. Each contender gets
        shapes of its own (columns shifted by its index x the leaf count)."""
        base = [tuple(s) for s in self.spec.get("distinct_shapes") or []]
        if not base:
            return
        out: dict[str, Any] = {"leaves": len(base)}
        for k, name in enumerate(self.spec["contenders"]):
            # Shapes no earlier contender used: what one compiled for a shape (e.g. Orbax's
            # device-to-host copies) must not make another's first save look warm.
            shapes = [(rows, cols + k * len(base)) for rows, cols in base]
            items = {"state": random_state(shapes, self.mesh, seed=self.spec["seed"] + 1)}
            jax.block_until_ready(host_arrays(items))
            out.setdefault("bytes", int(sum(a.nbytes for a in host_arrays(items))))
            ctx = Context(make_target=functools.partial(self.abstract_items, shapes),
                          item_names=("state",), timeout_s=self.timeout_s)
            self.emit(phase="shapes", contender=name)
            c = make_contender(name, root / "shapes" / slug(name), ctx)
            row: dict[str, Any] = {}
            for step, which in ((1, "first"), (2, "second")):
                got = self.timed_save(c, step, items, f"shapes:{name}:{which}")
                row[f"{which}_stall_s"] = got["stall_s"]
                row[f"{which}_commit_s"] = got["commit_s"]
            for step, which in ((1, "first"), (2, "second")):
                got = self.timed_restore(c, step, c.step_dir(step), f"shapes:{name}:{which}",
                                         cold)
                row[f"{which}_restore_s"] = got["restore_s"]
            c.close()
            out[name] = row
            self.barrier(f"shapes:{name}:cleanup")
            if coordinator.is_primary():
                remove_tree(root / "shapes" / slug(name))
        self.record["distinct_shapes"] = out

    def rss_phase(self, root: Any, items: dict[str, Any]) -> None:
        """RSS after each of `rss_saves` consecutive saves (committed), per contender."""
        n = self.spec["rss_saves"]
        if n < 1:
            return
        ctx = Context(make_target=dict, item_names=("state",), timeout_s=self.timeout_s)
        for name in self.spec["contenders"]:
            c = make_contender(name, root / "rss" / slug(name), ctx)
            after = []
            for i in range(n):
                self.emit(phase="rss", contender=name, save=i, of=n)
                self.barrier(f"rss:{name}:{i}")
                c.save(i + 1, items)
                c.wait()
                if i >= 3:
                    c.delete(i - 2)
                release_free_memory()
                after.append(rss_bytes())
            c.close()
            self.record["rss_growth"][name] = after
            self.barrier(f"rss:{name}:cleanup")
            if coordinator.is_primary():
                remove_tree(root / "rss" / slug(name))

    def train_phase(self, root: Any) -> None:
        """Seconds per step of the reference loop: blocks without saving, then saving every
        step with each contender (the block's time includes finishing its last save)."""
        from distckpt.state.mesh import make_mesh
        from distckpt.tools import train
        from distckpt.tools.model import ModelConfig

        t = self.spec["train"]
        mesh = make_mesh(t["mesh"], self.devices)
        cfg = train.TrainConfig(model=ModelConfig(**t["model"]), batch=t["batch"],
                                seq_len=t["seq_len"])
        state = train.new_state(cfg, mesh)
        step_fn = train.make_train_step(mesh)
        ctx = Context(make_target=dict, item_names=("model", "optimizer"),
                      timeout_s=self.timeout_s)
        contenders = {name: make_contender(name, root / "train" / slug(name), ctx)
                      for name in self.spec["contenders"]}
        self.record["train"]["state_bytes"] = int(sum(a.nbytes for a in host_arrays(state)))
        blocks: dict[str, list[float]] = {"none": [], **{name: [] for name in contenders}}
        step = 0
        loss = float(step_fn(state["model"], state["optimizer"],
                             train.tokens_for_step(0, cfg, mesh)))  # compiles
        self.lap("train_setup")
        for rnd in range(t["rounds"] + 1):
            for name in ["none", *contenders]:
                c = contenders.get(name)
                self.emit(phase="train", round=rnd, of=t["rounds"] + 1, contender=name)
                self.barrier(f"train:{rnd}:{name}")
                t0 = time.perf_counter()
                for _ in range(t["steps"]):
                    step += 1
                    loss = float(step_fn(state["model"], state["optimizer"],
                                         train.tokens_for_step(step, cfg, mesh)))
                    if c is not None:
                        c.save(step, state)
                if c is not None:
                    c.wait()
                if rnd > 0:  # round 0 warms up: compilation, every contender's first save
                    blocks[name].append((time.perf_counter() - t0) / t["steps"])
        for c in contenders.values():
            c.close()
        self.record["train"]["seconds_per_step"] = blocks
        self.record["train"]["last_loss"] = loss
        self.barrier("train:cleanup")
        if coordinator.is_primary():
            remove_tree(root / "train")
        self.lap("train")


def use_platform(platform: str) -> None:
    """Let jax see `platform`'s devices: for gpu and tpu, every backend (the launcher sets
    JAX_PLATFORMS=cpu for simulated hosts); cpu stays as the environment says."""
    if platform != "cpu":
        jax.config.update("jax_platforms", "")


def job_devices(spec: dict[str, Any]) -> list[Any] | None:
    """The devices a job's mesh is laid over: in a one-process run, this machine's devices
    of the spec's platform; for simulated hosts None (jax.make_mesh over all devices)."""
    if not spec.get("single_process"):
        return None
    return list(jax.devices(spec.get("platform", "cpu")))


def device_summary(platform: str) -> dict[str, Any]:
    """{'count', 'kind'} of this machine's `platform` devices, or {'error': why not}."""
    use_platform(platform)
    try:
        devices = jax.devices(platform)
    except Exception as e:  # jax says why (no such backend, a driver that failed)
        return {"error": error_line(e, limit=300)}
    return {"count": len(devices), "kind": devices[0].device_kind if devices else None}


def prepare(root: str) -> None:
    """Configure this process for an ``s3://`` root (epath/s3fs and the Orbax adapter, from
    the ``AWS_*`` environment), as CheckpointService would; nothing for a local one."""
    if bench_s3.is_url(root):
        from distckpt import storage

        storage.open_directory(root)


def error_line(e: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message', at most `limit` characters."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def probe(spec: dict[str, Any]) -> dict[str, str | None]:
    """One tiny save, wait and restore per contender, in one process: name -> None if it
    worked, else :func:`error_line` of what it raised.

    The driver asks this before the jobs for contenders that may not work on the storage
    at all (plain Orbax on ``s3://``), so that a failure is reported as the measured
    outcome instead of breaking a multi-process job halfway (where the other processes
    would wait at Orbax's barriers until they time out).
    """
    from contextlib import suppress

    from distckpt.state.mesh import make_mesh

    root = bench_path(spec["root"])  # not prepared: the AWS_* environment only, as stock
    mesh = make_mesh(spec["mesh"])      # Orbax would run (distckpt's adapter not installed)
    shapes = [tuple(s) for s in spec["shapes"]]
    items = {"state": random_state(shapes, mesh)}
    ctx = Context(make_target=lambda: {"state": abstract_state(shapes, mesh)},
                  item_names=("state",), timeout_s=float(spec["timeout_s"]))
    out: dict[str, str | None] = {}
    for name in spec["contenders"]:
        c = None
        try:
            c = make_contender(name, root / slug(name), ctx)
            c.save(1, items)
            c.wait()
            c.restore(1)
            out[name] = None
        except Exception as e:  # the failure is the measurement
            out[name] = error_line(e)
        finally:
            if c is not None:
                with suppress(Exception):
                    c.close()
    remove_tree(root)
    return out


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m distckpt.bench.worker [--probe] SPEC.json``."""
    import logging

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--devices"] and len(argv) == 2:
        print(json.dumps(device_summary(argv[1])), flush=True)
        return 0
    probing = argv[:1] == ["--probe"]
    argv = argv[1:] if probing else argv
    if len(argv) != 1:
        print("usage: python -m distckpt.bench.worker [--probe] SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("DISTCKPT_LOG", "WARNING"), force=True,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    spec = json.loads(Path(argv[0]).read_text())
    use_platform(spec.get("platform", "cpu"))
    coordinator.initialize()
    if probing:
        Path(spec["out"]).write_text(json.dumps(probe(spec)))
        return 0
    record = Job(spec).run()
    out = Path(spec["out_dir"]) / f"{spec['label']}.p{jax.process_index()}.json"
    out.write_text(json.dumps(record))
    coordinator.barrier(f"bench:{spec['label']}:done", float(spec["timeout_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
