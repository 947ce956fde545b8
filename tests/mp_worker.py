"""One process of a multi-process test job. Run through the launcher (tests/conftest.py).

    python tests/mp_worker.py SCENARIO OUT_JSON [options]

Each scenario writes its findings (primary host) to OUT_JSON; the test asserts on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import distckpt
from distckpt.multihost import coordinator
from distckpt.state import digest, nnx_state
from distckpt.state.mesh import Rules


class Counter(nnx.Variable):
    """A custom Variable subclass (maxtext PR 4343: these came back as zeros)."""


class RoundTripModel(nnx.Module):
    """Every kind of NNX state the service must keep."""

    def __init__(self, rngs: nnx.Rngs, layers: int = 2, width: int = 8, dtype=jnp.float32):
        part = nnx.with_partitioning
        self.embed = nnx.Param(part(nnx.initializers.normal(1.0), ("vocab", "embed"))(
            rngs.params(), (16, width), dtype))
        self.layers = nnx.List([
            nnx.Linear(width, width, kernel_init=part(nnx.initializers.lecun_normal(),
                                                      ("embed", "mlp")),
                       param_dtype=dtype, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.BatchNorm(width, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.table = nnx.data({0: Counter(jnp.arange(4, dtype=jnp.int32)),
                               7: Counter(jnp.full((3,), 7, jnp.int32))})
        self.noise = nnx.Rngs(noise=11)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.drop(self.norm(x))


def factory(layers: int = 2, width: int = 8, dtype=jnp.float32):
    def make():
        model = RoundTripModel(nnx.Rngs(params=0, dropout=1), layers, width, dtype)
        optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
        return {"model": model, "optimizer": optimizer}

    return make


@nnx.jit
def train_step(model, optimizer, x):
    def loss_fn(m):
        return jnp.mean(m(x) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def next_dropout_mask(model):
    return model.drop(jnp.ones((4, 8))) != 0


def fingerprint(items) -> dict:
    """Digests of every leaf, the next dropout mask, the optimizer step (all processes)."""
    arrays = {leaf.name: leaf.value for leaf in nnx_state.flatten_items(items)}
    out = {"digests": digest.digests(arrays, "fingerprint:leaves")}
    # Masks are computed on a copy so the caller's RNG state does not advance.
    model = nnx.clone(items["model"]) if hasattr(nnx, "clone") else items["model"]
    mask = next_dropout_mask(model)
    out["mask"] = digest.digests({"mask": mask}, "fingerprint:mask")["mask"]
    out["opt_step"] = int(np.asarray(jax.device_get(
        items["optimizer"].step[...].addressable_shards[0].data)))
    return out


def rules_from(text: str | None) -> Rules:
    return distckpt.DEFAULT_RULES if not text else Rules.of(json.loads(text))


def write(out: str, value) -> None:
    if distckpt.is_primary():
        Path(out).write_text(json.dumps(value))


def scenario_save(a) -> None:
    """Train 3 steps on a mesh, save steps 1..3 asynchronously, then restore on the same job."""
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    items = distckpt.init_sharded(factory(), mesh, rules_from(a.rules))
    x = jax.device_put(jnp.linspace(-1, 1, 32, dtype=jnp.float32).reshape(4, 8),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    returned_before_commit = []
    finger = {}
    with distckpt.CheckpointService(a.dir, distckpt.CheckpointOptions(max_to_keep=None)) as ckpt:
        for step in range(1, 4):
            train_step(items["model"], items["optimizer"], x)
            ckpt.save(step, items, metrics={"step": step}, metadata={"note": f"step {step}"},
                      process_state={"host": jax.process_index(), "pos": step * 10})
            # Async: save() returned; was the commit still pending?
            returned_before_commit.append(ckpt.save_stats[-1].commit_s is None)
            finger[step] = fingerprint(items)
        ckpt.wait()
        steps = ckpt.all_steps()
        # Same-topology restore in the same job.
        target = distckpt.abstract_target(factory(), mesh, rules_from(a.rules))
        restored = ckpt.restore(target)
        same = fingerprint(restored.items)
    write(a.out, {"steps": steps, "fingerprints": finger, "returned_before_commit":
                  returned_before_commit, "same_topology": same,
                  "restored_step": restored.step, "process_state": restored.process_state,
                  "metadata": restored.metadata, "metrics": restored.metrics})


def scenario_restore(a) -> None:
    """Restore the newest step onto this job's mesh; compare with the saved fingerprints."""
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    rules = rules_from(a.rules)
    target = distckpt.abstract_target(factory(), mesh, rules)
    want = {leaf.name: leaf.value.sharding for leaf in nnx_state.flatten_items(target)}
    with distckpt.CheckpointService(a.dir, distckpt.CheckpointOptions(read_only=True)) as ckpt:
        try:
            ckpt.restore(target)
            process_state_error = None
        except ValueError as e:
            process_state_error = str(e)
        target = distckpt.abstract_target(factory(), mesh, rules)
        restored = ckpt.restore(target, process_state_remap=lambda recs, i, n: recs)
    leaves = nnx_state.flatten_items(restored.items)
    wrong_sharding = [leaf.name for leaf in leaves
                      if not leaf.value.sharding.is_equivalent_to(want[leaf.name],
                                                                  leaf.value.ndim)]
    model_state = nnx.state(restored.items["model"])
    types = {"table0": type(model_state["table"][0]).__name__,
             "layers_keys": [type(k).__name__ for k in model_state["layers"].keys()],
             "table_keys": sorted(model_state["table"].keys()),
             "rng_key_dtype": str(model_state["noise"]["noise"]["key"].get_value().dtype),
             "bn_mean": type(model_state["norm"]["mean"]).__name__}
    write(a.out, {"step": restored.step, "fingerprint": fingerprint(restored.items),
                  "wrong_sharding": wrong_sharding, "types": types,
                  "process_state_error": process_state_error,
                  "process_states": restored.process_state, "process_count": jax.process_count()})


def scenario_writes(a) -> None:
    """Log every file this process opens for writing under the checkpoint dir (audit hook)."""
    root = os.path.realpath(a.dir)
    log = []

    def hook(event, args):
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            path = os.fsdecode(args[0])
            mode = args[1] if isinstance(args[1], str) else ""
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writing = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
            if writing and os.path.realpath(path).startswith(root):
                log.append(os.path.relpath(os.path.realpath(path), root))

    sys.addaudithook(hook)
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    items = distckpt.init_sharded(factory(), mesh)
    with distckpt.CheckpointService(a.dir) as ckpt:
        ckpt.save(1, items, metrics={"loss": 1.0}, metadata={"run": "w"},
                  process_state={"pos": jax.process_index()})
        ckpt.wait()
        errors = []
        for overwrite in (False,):
            try:
                ckpt.save(1, items, overwrite=overwrite)
            except distckpt.StepExistsError as e:
                errors.append(str(e))
        ckpt.save(1, items, metadata={"run": "again"}, overwrite=True)
        ckpt.wait()
        after = ckpt.metadata(1)
        # Only process 1 passes a bad per-process record: every process must refuse step 2
        # (none may walk alone into the save's barriers), and the job goes on.
        bad = {"not json": {1, 2}} if jax.process_index() == 1 else {"ok": 1}
        try:
            ckpt.save(2, items, process_state=bad)
            rejected = None
        except Exception as e:
            rejected = f"{type(e).__name__}: {e}"
        ckpt.save(3, items)
        ckpt.wait()
        steps = ckpt.all_steps()
    writes = coordinator.all_gather("test:writes", sorted(set(log)))
    write(a.out, {"writes": writes, "exists_errors": coordinator.all_gather("test:errs", errors),
                  "metadata_after_overwrite": after, "steps": steps,
                  "rejected": coordinator.all_gather("test:rejected", rejected)})


def scenario_bgfail(a) -> None:
    """Process 1's background write of step 2 fails; every process must hear of it."""
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    items = distckpt.init_sharded(factory(), mesh)

    def fault(point: str, step: int) -> None:
        if point == "process_state:write" and step == 2 and jax.process_index() == 1:
            raise OSError(f"injected write failure at {point}")

    opts = distckpt.CheckpointOptions(max_to_keep=None, timeout_s=a.timeout, fault_hook=fault)
    ckpt = distckpt.CheckpointService(a.dir, opts)
    ckpt.save(1, items)
    ckpt.wait()
    ckpt.save(2, items)  # returns once staged; the failure happens in the background
    t0 = time.monotonic()
    try:
        ckpt.wait()
        error = None
    except distckpt.SaveFailedError as e:
        error = str(e)
    elapsed = time.monotonic() - t0
    steps = ckpt.all_steps()
    Path(f"{a.out}.{jax.process_index()}").write_text(json.dumps(
        {"error": error, "elapsed": elapsed, "steps": steps}))
    try:
        ckpt.close()  # the failed commit's thread may still be at its barrier until timeout
    except Exception:
        pass


def scenario_barrier(a) -> None:
    """Process `absent` never reaches the barrier; the others must time out naming it."""
    distckpt.initialize()
    decided = distckpt.primary_decides("test:decision", lambda: {"step": 42, "ok": True})
    gathered = distckpt.all_gather("test:gather", jax.process_index() * 10)
    result = {"decided": decided, "gathered": gathered}
    if jax.process_index() == a.absent:
        time.sleep(a.timeout + 8)
        return
    t0 = time.monotonic()
    try:
        distckpt.barrier("test:never-complete", timeout_s=a.timeout)
        result["error"] = None
    except distckpt.BarrierTimeoutError as e:
        result.update(error=str(e), missing=list(e.missing))
    result["elapsed"] = time.monotonic() - t0
    Path(f"{a.out}.{jax.process_index()}").write_text(json.dumps(result))


def scenario_fallback(a) -> None:
    """Restore with the newest steps damaged (by the test): every process ends on one step."""
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    out = {}
    for mode in ("read_only", "writable"):
        opts = distckpt.CheckpointOptions(read_only=mode == "read_only")
        with distckpt.CheckpointService(a.dir, opts) as ckpt:
            restored = ckpt.restore(distckpt.abstract_target(factory(width=a.width), mesh))
            out[mode] = {"step": restored.step, "skipped": restored.skipped,
                         "verified": restored.verified,
                         "fingerprint": fingerprint(restored.items)["digests"],
                         "listed": ckpt.all_steps()}
    agreed = coordinator.all_gather("fallback:steps", [out[m]["step"] for m in out])
    out["steps_by_process"] = agreed
    write(a.out, out)


def mine(out: str, value) -> None:
    """Every process writes its own findings to OUT.<process index>."""
    Path(f"{out}.{jax.process_index()}").write_text(json.dumps(value))


def scenario_relative(a) -> None:
    """Each process runs in its own working directory (process i in CWD/host<i>, where
    host1/ckpt is a symlink to host0/ckpt) and is given the relative path 'ckpt'."""
    os.chdir(Path(a.dir) / f"host{os.environ['JAX_PROCESS_ID']}")  # before JAX starts
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    items = distckpt.init_sharded(factory(), mesh)
    with distckpt.CheckpointService("ckpt", distckpt.CheckpointOptions(
            max_to_keep=None, timeout_s=60)) as ckpt:
        ckpt.save(1, items, metadata={"cwd": os.getcwd()})
        ckpt.save(2, items)
        ckpt.wait()
        steps = ckpt.all_steps()
        restored = ckpt.restore(distckpt.abstract_target(factory(), mesh), step=1)
    mine(a.out, {"steps": steps, "restored": restored.step, "verified": restored.verified,
                 "metadata": restored.metadata, "cwd": os.getcwd()})


def scenario_reuse(a) -> None:
    """Steps only go up in a used directory: refused on every process, nothing written."""
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    items = distckpt.init_sharded(factory(), mesh)
    opts = distckpt.CheckpointOptions(max_to_keep=2, timeout_s=60)
    with distckpt.CheckpointService(a.dir, opts) as ckpt:
        ckpt.save(20, items)
        ckpt.save(30, items, metadata={"run": "first"})
    out = {}
    with distckpt.CheckpointService(a.dir, opts) as ckpt:
        try:
            ckpt.save(10, items)
            out["order"] = None
        except distckpt.StepOrderError as e:
            out["order"] = str(e)
        out["entries_after_refusal"] = sorted(os.listdir(a.dir))
        try:
            ckpt.save(30, items)
            out["exists"] = None
        except distckpt.StepExistsError as e:
            out["exists"] = str(e)
        ckpt.save(30, items, metadata={"run": "again"}, overwrite=True)
        ckpt.wait()
        out["metadata_30"] = ckpt.metadata(30)
        out["steps"] = ckpt.all_steps()
    allow = dataclasses.replace(opts, allow_older_steps=True)
    with distckpt.CheckpointService(a.dir, allow) as ckpt:
        ckpt.save(10, items)  # below the 2 highest: retention removes it once committed
        ckpt.wait()
        out["steps_allowed"] = ckpt.all_steps()
    mine(a.out, out)


def scenario_recover(a) -> None:
    """Process 1's background write fails twice: every wait()/close() returns promptly
    (well inside timeout_s), the failure is raised once, and the service saves again."""
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    items = distckpt.init_sharded(factory(), mesh)

    def fault(point: str, step: int) -> None:
        if point == "process_state:write" and step in (2, 4) and jax.process_index() == 1:
            raise OSError(f"injected write failure of step {step}")

    opts = distckpt.CheckpointOptions(max_to_keep=None, timeout_s=a.timeout, fault_hook=fault)
    ckpt = distckpt.CheckpointService(a.dir, opts)
    out: dict = {}
    ckpt.save(1, items)
    ckpt.save(2, items)  # fails in the background
    t0 = time.monotonic()
    try:
        ckpt.wait()
        out["wait_error"] = None
    except distckpt.SaveFailedError as e:
        out["wait_error"] = str(e)
    out["wait_s"] = time.monotonic() - t0
    ckpt.wait()  # raised once: nothing left to report
    out["saved_3"] = ckpt.save(3, items)
    ckpt.wait()
    out["steps"] = ckpt.all_steps()
    ckpt.save(4, items)  # fails again; close() reports it
    t0 = time.monotonic()
    try:
        ckpt.close()
        out["close_error"] = None
    except distckpt.SaveFailedError as e:
        out["close_error"] = str(e)
    out["close_s"] = time.monotonic() - t0
    with distckpt.CheckpointService(a.dir, distckpt.CheckpointOptions(read_only=True)) as ro:
        out["steps_after"] = ro.all_steps()
    mine(a.out, out)


def scenario_overwrite_fails(a) -> None:
    """overwrite=True whose commit fails after the rename (before the record): the old
    step is back at once; with --crash the primary is killed there instead."""
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    items = distckpt.init_sharded(factory(), mesh)
    armed = []

    def fault(point: str, step: int) -> None:
        if point == "commit:renamed" and armed:
            if a.crash:
                os.kill(os.getpid(), 9)
            raise OSError("injected failure between the rename and the commit record")

    opts = distckpt.CheckpointOptions(max_to_keep=None, timeout_s=60, fault_hook=fault)
    out: dict = {}
    with distckpt.CheckpointService(a.dir, opts) as ckpt:
        ckpt.save(1, items, metadata={"run": "old"})
        ckpt.save(2, items, metadata={"run": "old"})
        ckpt.wait()
        armed.append(True)
        ckpt.save(2, items, metadata={"run": "new"}, overwrite=True)
        try:
            ckpt.wait()
            out["error"] = None
        except distckpt.SaveFailedError as e:
            out["error"] = str(e)
        armed.clear()
        out["steps"] = ckpt.all_steps()
        out["metadata_2"] = ckpt.metadata(2)
        out["verified_2"] = ckpt.restore(distckpt.abstract_target(factory(), mesh),
                                         step=2).verified
        out["entries"] = sorted(os.listdir(a.dir))
    mine(a.out, out)


def scenario_readonly_primary(a) -> None:
    """The primary host may not write the (existing) directory: every host fails fast."""
    if os.environ.get("JAX_PROCESS_ID") == "0" and os.geteuid() == 0 and \
            not os.environ.get("DISTCKPT_TEST_NO_DAC"):
        # root ignores permission bits; drop that capability for the primary only
        os.environ["DISTCKPT_TEST_NO_DAC"] = "1"
        os.execv("/usr/bin/setpriv", ["setpriv", "--bounding-set=-dac_override",
                                      sys.executable, *sys.argv])
    distckpt.initialize()
    t0 = time.monotonic()
    try:
        distckpt.CheckpointService(a.dir, distckpt.CheckpointOptions(timeout_s=a.timeout))
        error = None
    except distckpt.CheckpointError as e:
        error = f"{type(e).__name__}: {e}"
    mine(a.out, {"error": error, "elapsed": time.monotonic() - t0})


def scenario_decisions(a) -> None:
    """Many decisions under one name in a row: each process gets every value, in order."""
    distckpt.initialize()
    got = [distckpt.primary_decides("test:same-name", lambda i=i: i) for i in range(a.steps)]
    mine(a.out, got)


def scenario_gathers(a) -> None:
    """Many gathers back to back, under one name and under alternating names, and from
    two threads at once: every process gets every value of every gather, fresh."""
    import threading

    from distckpt.multihost import coordinator

    distckpt.initialize()
    me = jax.process_index()
    got = {"same": [], "alternating": [], "thread": []}
    for i in range(a.steps):
        got["same"].append(coordinator.all_gather("test:same", [i, me]))
        got["alternating"].append(coordinator.all_gather(f"test:alt{i % 2}", [i, me]))

    def other() -> None:
        for i in range(a.steps):
            got["thread"].append(coordinator.all_gather("test:thread", [i, me]))

    t = threading.Thread(target=other)
    t.start()
    for i in range(a.steps):
        coordinator.all_gather("test:main", [i, me])
    t.join()
    mine(a.out, got)


def scenario_peers(a) -> None:
    """Process 0 offers copies to process 1 over the transfer server, in several groups
    (zero-size shards among them); process 1 pulls and checks them: an intact copy comes
    back bit for bit, a copy with one byte changed after its CRC was taken is refused."""
    from distckpt.checkpoint import local_save, peers
    from distckpt.checkpoint.local_tier import Copy, Shard, seal

    distckpt.initialize()
    peers.GROUP_BYTES = 3000  # many groups from small shards
    peers.PACK_BELOW, peers.PACK_BYTES = 4000, 2000  # some shards packed, some alone
    rng = np.random.default_rng(a.steps)
    shapes = [(100, 7), (0, 3), (1000,), (5, 0), (33, 33), (1,), (2000,)]
    datas = [rng.integers(0, 256, s, dtype=np.uint8).astype(np.float32) for s in shapes]

    def copy_of(flip: int | None) -> Copy:
        leaves = {}
        for k, d in enumerate(datas):
            s = Shard(tuple((0, n) for n in d.shape), (0,), d.copy())
            seal(s)
            if flip == k:
                s.data.reshape(-1)[s.data.size // 2] += 1
            leaves[f"leaf{k}"] = {"shape": d.shape, "dtype": "float32", "sharding": None,
                                  "shards": [s]}
        return Copy(step=3, role=0, owner="host-a", job={"n": 1}, leaves=leaves, extra={})

    link = peers.PeerLink(None, 60.0)
    out = {}
    for case, flip in (("intact", None), ("flipped", 4), ("flipped-packed", 0)):
        key = f"test-peers-{case}"
        if jax.process_index() == 0:
            c = copy_of(flip)
            link.offer(key, [s.data for leaf in c.leaves.values() for s in leaf["shards"]],
                       meta=c.offer_record())
        else:
            note = link.note(key)
            try:
                got = local_save.pull_copy(link, note)
                out[case] = {"groups": len(note["groups"]), "units": note["units"], "equal": [
                    bool(np.array_equal(got.leaves[f"leaf{k}"]["shards"][0].data, d))
                    for k, d in enumerate(datas)]}
            except ValueError as e:
                out[case] = {"groups": len(note["groups"]), "error": str(e)}
        coordinator_barrier(f"peers:{case}")
    mine(a.out, out)


def scenario_peerorder(a) -> None:
    """A peer copy must not wait behind training. Process 0 dispatches a step whose
    all-reduce needs process 1, then offers its copy; process 1 pulls that copy before it
    joins the step (its main thread waits for its last local save). If the offer or the
    pull went through a device that the step occupies, neither could finish."""
    from distckpt.checkpoint import peers

    distckpt.initialize()
    mesh = distckpt.make_mesh(f"fsdp={jax.device_count()}")
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    x = jax.device_put(jnp.arange(mesh.size * 256, dtype=jnp.float32), sharding)
    step = jax.jit(lambda x: x * 0.5 + jnp.mean(x))  # the mean all-reduces over both
    jax.block_until_ready(step(x))  # compiled before the race
    link = peers.PeerLink(None, a.timeout)
    data = [np.arange(100_000, dtype=np.float32) + k for k in range(3)]
    out: dict = {}
    if jax.process_index() == 0:
        y = step(x)  # in flight: waits for process 1
        link.offer("test-peerorder", data)
        jax.block_until_ready(y)
    else:
        note = link.note("test-peerorder")
        t0 = time.perf_counter()
        try:
            got = link.pull(note)
            out["equal"] = all(np.array_equal(g, d) for g, d in zip(got, data, strict=True))
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["error"] = f"{type(e).__name__}: {e}"
        out["pull_s"] = time.perf_counter() - t0
        jax.block_until_ready(step(x))
    mine(a.out, out)


def coordinator_barrier(name: str) -> None:
    from distckpt.multihost import coordinator

    coordinator.barrier(name, 60.0)


def _global_bytes(value) -> bytes:
    """The whole array's bytes (key arrays: their key data), on every process."""
    from jax.experimental import multihost_utils
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def scenario_readonce(a) -> None:
    """Save fully sharded (fsdp over every device), then restore onto a.mesh, whose data
    axis spans the processes, with and without read-once: bytes of every shard, shardings,
    verification, bytes read per process (/proc/self/io rchar); then flip a byte in array
    data and restore again with read-once."""
    from distckpt.bench.measure import io_counters
    from distckpt.errors import StepUnusableError
    distckpt.initialize()
    save_mesh = distckpt.make_mesh(f"fsdp={jax.device_count()}")
    items = distckpt.init_sharded(factory(width=a.width), save_mesh)
    with distckpt.CheckpointService(a.dir, distckpt.CheckpointOptions(max_to_keep=None)) as c:
        c.save(1, items)
        c.wait()
    saved = {leaf.name: _global_bytes(leaf.value) for leaf in nnx_state.flatten_items(items)}
    mesh = distckpt.make_mesh(a.mesh)
    out: dict = {"process": jax.process_index(), "runs": {}}
    for run, once in enumerate((False, True, False, True)):
        target = distckpt.abstract_target(factory(width=a.width), mesh)
        want = {leaf.name: leaf.value.sharding for leaf in nnx_state.flatten_items(target)}
        options = distckpt.CheckpointOptions(read_only=True, restore_read_once=once)
        with distckpt.CheckpointService(a.dir, options) as ckpt:
            coordinator.barrier(f"readonce:{run}:start")
            before = io_counters()["rchar"]
            t0 = time.perf_counter()
            restored = ckpt.restore(target, step=1)
            seconds = time.perf_counter() - t0
            read = io_counters()["rchar"] - before
        wrong_sharding, wrong_bytes, replicated = [], [], 0
        for leaf in nnx_state.flatten_items(restored.items):
            value = leaf.value
            if not value.sharding.is_equivalent_to(want[leaf.name], value.ndim):
                wrong_sharding.append(leaf.name)
            data = jax.random.key_data(value) if jnp.issubdtype(
                value.dtype, jax.dtypes.prng_key) else value
            full = saved[leaf.name]
            for shard in data.addressable_shards:
                if np.asarray(shard.data).tobytes() != full[shard.index].tobytes():
                    wrong_bytes.append(leaf.name)
            replicated += any(shard.replica_id for shard in value.addressable_shards)
        # Two runs of each mode: the test takes the fewer bytes (a process's rchar also
        # counts reads by unrelated threads, e.g. lazy imports: seen 1.5 MiB extra).
        out["runs"].setdefault(str(once), []).append({"read": read, "seconds": seconds, "verified": restored.verified,
                                  "wrong_sharding": wrong_sharding, "wrong_bytes": wrong_bytes,
                                  "leaves_with_replicas": replicated})
    if distckpt.is_primary():
        data_files = [p for p in Path(a.dir, "1", "state").rglob("*")
                      if p.is_file() and p.parent.name == "d"]
        biggest = max(data_files, key=lambda p: p.stat().st_size)
        blob = bytearray(biggest.read_bytes())
        blob[len(blob) // 2] ^= 0x10
        biggest.write_bytes(bytes(blob))
    coordinator.barrier("readonce:flipped")
    target = distckpt.abstract_target(factory(width=a.width), mesh)
    options = distckpt.CheckpointOptions(read_only=True, restore_read_once=True)
    with distckpt.CheckpointService(a.dir, options) as ckpt:
        try:
            ckpt.restore(target, step=1)
            out["corrupt"] = None
        except StepUnusableError as e:
            out["corrupt"] = {"kind": e.kind.value, "reason": e.reason}
    # A read that fails on the last process mid-way: it keeps joining the all-gathers and
    # every process raises (no process is left waiting in a collective).
    from distckpt.checkpoint import streaming
    original = streaming._Read.result
    calls = [0]

    def failing(self):
        calls[0] += 1
        if jax.process_index() == jax.process_count() - 1 and calls[0] == 2:
            raise OSError("injected read failure")
        return original(self)

    streaming._Read.result = failing
    try:
        with distckpt.CheckpointService(a.dir, options) as ckpt:
            try:
                ckpt.restore(distckpt.abstract_target(factory(width=a.width), mesh), step=1)
                out["read_error"] = None
            except StepUnusableError as e:
                out["read_error"] = e.reason
    finally:
        streaming._Read.result = original
    out["unique"] = sum(p.stat().st_size for p in Path(a.dir, "1").rglob("*") if p.is_file())
    out["array_bytes"] = sum(len(b.tobytes()) for b in saved.values())
    mine(a.out, out)


def scenario_bgtrain(a) -> None:
    """Save every step in the background while the main thread keeps running a step whose
    all-reduce spans every process (the collectives a real training step issues). Writes
    whether the newest step restored bit-exact."""
    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    sharding = jax.sharding.NamedSharding(mesh, spec)
    x = jax.device_put(jnp.arange(mesh.size * 1024, dtype=jnp.float32), sharding)

    @jax.jit
    def step(x):
        return x * 0.5 + jnp.mean(x)  # the mean all-reduces across every process

    local = str(Path(a.dir).parent / "local" / "{host}") if a.tiers == "both" else None
    options = distckpt.CheckpointOptions(max_to_keep=2, save_in_background=True,
                                         timeout_s=a.timeout, local_directory=local,
                                         save_interval_steps=2 if local else 1)
    with distckpt.CheckpointService(a.dir, options) as ckpt:
        for i in range(1, a.steps + 1):
            x = step(x)
            for _ in range(3):  # collectives in flight while Orbax's save() call runs
                x = step(step(x)) - step(x) + x
            ckpt.save(i, {"x": x})
        ckpt.wait()
        restored = ckpt.restore({"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)})
        same = _global_bytes(restored.items["x"]).tobytes() == _global_bytes(x).tobytes()
    write(a.out, {"step": restored.step, "same": same})


def scenario_offers(a) -> None:
    """Offers of peer copies never pile up in a sender's memory. A: process 1's RAM disk
    is full at steps 2-4 (every local write raises), yet it still pulls process 0's offers,
    so process 0 holds none when the job ends. B: an offer nobody pulls within the timeout
    is freed (the transfer server replaced) at the next offer, which travels on."""
    from distckpt.checkpoint import peers
    from distckpt.state.process_state import FaultPoint

    distckpt.initialize()
    mesh = distckpt.make_mesh(a.mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    x = jax.device_put(jnp.arange(mesh.size * 64, dtype=jnp.float32), sharding)

    def full(point, step):
        if point == FaultPoint.LOCAL_FILE and 2 <= step <= 4 and jax.process_index() == 1:
            raise OSError(28, "No space left on device (injected: RAM disk full)")

    local = str(Path(a.dir).parent / "local" / "{host}")
    options = distckpt.CheckpointOptions(save_interval_steps=None, local_directory=local,
                                         local_interval_steps=1, fault_hook=full,
                                         timeout_s=60, local_timeout_s=60)
    out: dict = {}
    with distckpt.CheckpointService(a.dir, options) as ckpt:
        assert ckpt.local is not None
        for step in range(1, 6):
            ckpt.save(step, {"x": x * step})
            ckpt.local.wait()
        coordinator_barrier("offers:saved")
        out["pending"] = ckpt.local.link.pending()
        out["failures"] = [[s, why] for s, why in ckpt.local.failures]
    link = peers.PeerLink(None, a.timeout)
    data = [np.arange(1000, dtype=np.float32) + k for k in range(2)]
    if jax.process_index() == 0:
        link.offer("test-offers-1", data)  # never pulled
        coordinator_barrier("offers:first")
        time.sleep(a.timeout + 0.5)
        link.offer("test-offers-2", data)
        out["replaced"] = link.replaced
        coordinator_barrier("offers:second")
        coordinator_barrier("offers:pulled")
        out["pending_after"] = link.pending()
    else:
        coordinator_barrier("offers:first")
        first = link.note("test-offers-1")
        coordinator_barrier("offers:second")
        got = link.pull(link.note("test-offers-2"))
        link.confirm("test-offers-2")
        out["second_equal"] = all(np.array_equal(g, d) for g, d in zip(got, data, strict=True))
        try:
            link.pull(first)
            out["first"] = "pulled"
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["first"] = f"{type(e).__name__}: {e}"
        coordinator_barrier("offers:pulled")
    mine(a.out, out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("out")
    p.add_argument("--dir")
    p.add_argument("--mesh", default="fsdp=2")
    p.add_argument("--rules")
    p.add_argument("--absent", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--crash", action="store_true")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--tiers", default="persistent", choices=["persistent", "both"])
    a = p.parse_args()
    globals()[f"scenario_{a.scenario}"](a)


if __name__ == "__main__":
    main()
