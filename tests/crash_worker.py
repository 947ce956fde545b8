"""One process of a crash-consistency or failure test job (tests/test_crash.py).

    python tests/crash_worker.py SCENARIO --dir DIR --log LOG [options]

Run through the launcher (or, for the peer-death test, started directly with the
launcher's environment). Scenarios:

``run``      a training-like loop that saves a small NNX state every step asynchronously
             (max_to_keep=2, so retention deletes old steps) until it is killed. At start
             it checks what a previous, killed job left (listing, restore of the newest
             step, restore of every listed step, digests) and writes that to
             ``LOG/check.<job>.json``. A fault hook can SIGKILL any process at a named
             save point (``--hook-point/--hook-step/--hook-targets``), at once or after a
             delay, synchronously (the save stands still at that point) or from a timer
             thread (the save goes on and is killed at a random moment after the point).
``peer``     commit step 1, then the victim process SIGKILLs itself in the background write
             of step 2; the survivors wait for that save (until they die).
``diskfull`` commit step 1, then save step 2 into a filesystem too small for it; every
             process records the error it got, then restores the newest step.
``efbig``    the same with a file size limit (RLIMIT_FSIZE) on one process instead.
``restore``  a fresh job restores the newest step read-only and records what it got.
``probe``    every process is given its own directory (``--dir`` holds ``{i}``).
``strace``   save one step, wait, close (run under strace by the test).

The saved state is a pure function of the step (:func:`set_state`), so any job can
compute what a step must contain; the saving job also records each step's digests
in ``LOG/events.<job>.<process>.jsonl``, but only after the commit was confirmed (the
next ``save()`` or ``wait()`` returned on every process). Only JSON is written.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import distckpt
from distckpt.multihost import coordinator
from distckpt.state import digest, nnx_state

MESH = "fsdp=2,tensor=2"  # 2 processes x 2 devices: every matrix is split across processes


class Counter(nnx.Variable):
    """A custom Variable subclass, integer-valued."""


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int):
        part = nnx.with_partitioning
        normal = nnx.initializers.normal(1.0)
        self.w1 = nnx.Param(part(normal, ("embed", "mlp"))(rngs.params(), (width, width)))
        self.w2 = nnx.Param(part(normal, ("mlp", "embed"))(rngs.params(), (width, width)))
        self.b = nnx.Param(part(normal, ("mlp",))(rngs.params(), (width,)))
        self.count = Counter(jnp.arange(8, dtype=jnp.int32))


def factory(width: int):
    def make():
        return {"model": Net(nnx.Rngs(params=0), width)}

    return make


@jax.jit
def _at(base, step):
    def one(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return x * (1 + step.astype(x.dtype) * 1e-3) + step.astype(x.dtype)
        return x + step.astype(x.dtype)

    return jax.tree.map(one, base)


class State:
    """The job's items and a way to set them to the state of any step."""

    def __init__(self, width: int):
        self.mesh = distckpt.make_mesh(MESH)
        self.width = width
        self.items = distckpt.init_sharded(factory(width), self.mesh)
        # Plain arrays (nnx.state holds the live Variables, which set() changes).
        self.base = nnx.to_pure_dict(nnx.state(self.items["model"]))

    def set(self, step: int) -> None:
        live = nnx.state(self.items["model"])
        nnx.replace_by_pure_dict(live, _at(self.base, jnp.int32(step)))
        nnx.update(self.items["model"], live)

    def target(self):
        return distckpt.abstract_target(factory(self.width), self.mesh)


def arrays(items) -> dict[str, jax.Array]:
    return {leaf.name: leaf.value for leaf in nnx_state.flatten_items(items)}


def digests_of(items, name: str) -> dict[str, str]:
    return digest.digests(arrays(items), name)


def expected_digests(state: State, step: int, name: str) -> dict[str, str]:
    state.set(step)
    return digests_of(state.items, name)


class Log:
    """Append-only JSON lines in the test's log directory (one file per process)."""

    def __init__(self, root: str, job: int):
        self.root = Path(root)
        self.job = job
        self.me = jax.process_index()
        self._events = open(self.root / f"events.{job}.{self.me}.jsonl", "a")  # noqa: SIM115

    def event(self, **fields) -> None:
        self._events.write(json.dumps({"t": time.time(), **fields}) + "\n")
        self._events.flush()  # in the page cache: survives SIGKILL of this process

    def write_pid(self) -> None:
        (self.root / f"pid.{self.job}.{self.me}").write_text(str(os.getpid()))

    def pid_of(self, process: int) -> int:
        path = self.root / f"pid.{self.job}.{process}"
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return int(path.read_text())


def kill_hook(a, log: Log):
    """fault_hook that SIGKILLs --hook-targets when the first process reaches the point."""
    if not a.hook_point:
        return None
    targets = (list(range(jax.process_count())) if a.hook_targets == "all"
               else [int(t) for t in a.hook_targets.split(",")])

    def kill() -> None:
        if a.hook_delay > 0:
            time.sleep(a.hook_delay)
        print(f"KILL targets={targets} at {a.hook_point} step={a.hook_step} "
              f"delay={a.hook_delay} t={time.time():.6f}", flush=True)
        for process in targets:  # peers first, this process last
            if process != log.me:
                try:
                    os.kill(log.pid_of(process), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if log.me in targets:
            os.kill(os.getpid(), signal.SIGKILL)

    def hook(point: str, step: int) -> None:
        if point != a.hook_point or step != a.hook_step:
            return
        try:  # only the first process to get here fires (a point can run on every process)
            fd = os.open(log.root / f"fired.{a.job}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, json.dumps({"process": log.me, "point": point, "step": step,
                                 "t": time.time()}).encode())
        os.close(fd)
        if a.hook_async:
            threading.Thread(target=kill, daemon=True, name="crash-test-kill").start()
        else:
            kill()

    return hook


def check_start(ckpt: distckpt.CheckpointService, state: State, a) -> dict:
    """What a fresh start sees in a directory a killed job left behind."""
    listed = ckpt.all_steps()
    report: dict = {"listed": listed, "entries": sorted(os.listdir(a.dir)),
                    "listed_by_process": coordinator.all_gather("check:listed", listed)}
    trash = Path(a.dir) / "distckpt-trash"
    report["trash_left"] = sorted(os.listdir(trash)) if trash.exists() else []
    if not listed:
        try:
            ckpt.restore(state.target())
            report["restore_error"] = None
        except distckpt.NoCheckpointError as e:
            report["restore_error"] = f"{type(e).__name__}: {e}"
        return report
    restored = ckpt.restore(state.target())  # no step: the newest usable one
    report["restored"] = {"step": restored.step, "verified": restored.verified,
                          "skipped": [list(s) for s in restored.skipped],
                          "digests": digests_of(restored.items, "check:newest")}
    report["expected"] = {}
    report["per_step"] = {}
    for step in listed:  # every listed step must restore and verify, not just the newest
        report["expected"][str(step)] = expected_digests(state, step, f"check:expect:{step}")
        try:
            one = ckpt.restore(state.target(), step=step)
            report["per_step"][str(step)] = {
                "verified": one.verified, "digests": digests_of(one.items, f"check:{step}"),
                "metadata": one.metadata}
        except distckpt.CheckpointError as e:
            report["per_step"][str(step)] = {"error": f"{type(e).__name__}: {e}"}
    return report


def scenario_run(a) -> None:
    distckpt.initialize()
    log = Log(a.log, a.job)
    log.write_pid()
    state = State(a.width)
    opts = distckpt.CheckpointOptions(max_to_keep=2, timeout_s=a.timeout,
                                      fault_hook=kill_hook(a, log))
    ckpt = distckpt.CheckpointService(a.dir, opts)
    report = check_start(ckpt, state, a)
    if log.me == 0:
        (Path(a.log) / f"check.{a.job}.json").write_text(json.dumps(report))
    listed = set(report["listed"])
    print("READY", flush=True)
    previous: tuple[int, dict[str, str]] | None = None
    for step in range(a.first_step, a.first_step + a.steps):
        state.set(step)
        sums = digests_of(state.items, f"run:{step}")
        overwrite = step in listed
        log.event(e="start", s=step, overwrite=overwrite)
        ckpt.save(step, state.items, metadata={"step": step}, force=True, overwrite=overwrite)
        # save() began by agreeing that the previous save committed on every process.
        if previous is not None:
            log.event(e="committed", s=previous[0], digests=previous[1])
        previous = (step, sums)
    if a.hook_point or a.await_kill:
        await_kill(a, log)
    ckpt.wait()
    if previous is not None:
        log.event(e="committed", s=previous[0], digests=previous[1])
    ckpt.close()
    print(f"DONE steps={ckpt.all_steps()}", flush=True)


def await_kill(a, log: Log, limit_s: float = 240.0) -> None:
    """A job whose kill is armed never ends before the kill lands: a timer may still be
    sleeping, or the hook's point (in the background commit) may not have run yet. Every
    process of the job waits here, past its last save, until it is killed (or its peer
    is, and the launcher ends it); only a kill that never comes ends the wait, and then
    the job exits 3 and says so, which the test reports as a harness failure."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"KILL NEVER CAME: {a.hook_point} step {a.hook_step} (fired: "
          f"{(Path(a.log) / f'fired.{a.job}').exists()})", flush=True)
    sys.exit(3)


def scenario_peer(a) -> None:
    """The victim dies in the background write of step 2; survivors wait for it."""
    distckpt.initialize()
    log = Log(a.log, a.job)
    log.write_pid()
    state = State(a.width)
    me = jax.process_index()

    def hook(point: str, step: int) -> None:
        if point == "process_state:write" and step == 2 and me == a.victim:
            (Path(a.log) / "killed").write_text(json.dumps({"process": me, "t": time.time()}))
            print("KILL self", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    # The default timeout (600 s): only the heartbeat can end the survivors' wait in time.
    ckpt = distckpt.CheckpointService(a.dir, distckpt.CheckpointOptions(
        max_to_keep=None, fault_hook=hook))
    state.set(1)
    ckpt.save(1, state.items)
    ckpt.wait()
    print("COMMITTED 1", flush=True)
    state.set(2)
    ckpt.save(2, state.items)
    ckpt.wait()
    print(f"UNEXPECTED: step 2 committed without process {a.victim}", flush=True)


def scenario_diskfull(a) -> None:
    distckpt.initialize()
    me = jax.process_index()
    state = State(a.width)
    opts = distckpt.CheckpointOptions(max_to_keep=None, timeout_s=a.timeout)
    out: dict = {"process": me}
    ckpt = distckpt.CheckpointService(a.dir, opts)
    state.set(1)
    ckpt.save(1, state.items)
    ckpt.wait()
    out["expected"] = digests_of(state.items, "diskfull:1")
    state.set(2)
    t0 = time.monotonic()
    out["raised_at"] = None
    try:
        ckpt.save(2, state.items)
        out["raised_at"] = "wait"
        ckpt.wait()
        out["raised_at"] = None
        out["error"] = None
    except distckpt.CheckpointError as e:
        out["error_type"] = type(e).__name__
        out["error"] = str(e)
    out["error_seconds"] = time.monotonic() - t0
    out["steps_after"] = ckpt.all_steps()
    restored = ckpt.restore(state.target())
    out["restored"] = {"step": restored.step, "verified": restored.verified,
                       "digests": digests_of(restored.items, "diskfull:restored")}
    t0 = time.monotonic()
    try:  # the failure was raised once, by save() or wait(): close() returns promptly
        ckpt.close()
        out["close_error"] = None
    except Exception as e:
        out["close_error"] = f"{type(e).__name__}: {e}"[:500]
    out["close_seconds"] = time.monotonic() - t0
    Path(f"{a.out}.{me}").write_text(json.dumps(out))


def scenario_efbig(a) -> None:
    """Process --victim may write no file larger than --fsize bytes (RLIMIT_FSIZE) when it
    saves step 2: its array write fails with EFBIG, a real filesystem error that needs
    neither root nor a small filesystem. Every process must hear of it promptly."""
    distckpt.initialize()
    me = jax.process_index()
    state = State(a.width)
    ckpt = distckpt.CheckpointService(a.dir, distckpt.CheckpointOptions(
        max_to_keep=None, timeout_s=a.timeout))
    state.set(1)
    ckpt.save(1, state.items)
    ckpt.wait()
    out: dict = {"process": me, "expected": digests_of(state.items, "efbig:1")}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if me == a.victim:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (a.fsize, hard))
    state.set(2)
    t0 = time.monotonic()
    try:
        ckpt.save(2, state.items)
        ckpt.wait()
        out["error"] = None
    except distckpt.CheckpointError as e:
        out["error_type"] = type(e).__name__
        out["error"] = str(e)
    out["error_seconds"] = time.monotonic() - t0
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    out["steps_after"] = ckpt.all_steps()
    restored = ckpt.restore(state.target())
    out["restored"] = {"step": restored.step, "verified": restored.verified,
                       "digests": digests_of(restored.items, "efbig:restored")}
    Path(f"{a.out}.{me}").write_text(json.dumps(out))
    # close() would raise the error again once Orbax's threads give up at their barrier
    # timeout (the disk-full test checks that); this test is about hearing it promptly.
    coordinator.barrier("efbig:written", 60)
    sys.stdout.flush()
    os._exit(0)


def scenario_restore(a) -> None:
    distckpt.initialize()
    state = State(a.width)
    with distckpt.CheckpointService(a.dir, distckpt.CheckpointOptions(read_only=True)) as ckpt:
        listed = ckpt.all_steps()
        restored = ckpt.restore(state.target())
        got = digests_of(restored.items, "restore:got")
    want = expected_digests(state, restored.step, "restore:want")
    Path(f"{a.out}.{jax.process_index()}").write_text(json.dumps({
        "listed": listed, "step": restored.step, "verified": restored.verified,
        "skipped": [list(s) for s in restored.skipped], "digests": got, "expected": want}))


def scenario_probe(a) -> None:
    distckpt.initialize()
    me = jax.process_index()
    directory = a.dir.format(i=me)
    state = State(a.width)
    out: dict = {"process": me, "dir": directory}
    t0 = time.monotonic()
    try:
        distckpt.CheckpointService(directory, distckpt.CheckpointOptions(probe_timeout_s=2.0))
        out["error"] = None
    except distckpt.CheckpointError as e:
        out["error_type"] = type(e).__name__
        out["error"] = str(e)
    out["seconds"] = time.monotonic() - t0
    out["entries_after_probe"] = sorted(os.listdir(directory))
    # Per-host local mode: chosen explicitly, it proceeds.
    local = distckpt.CheckpointService(directory, distckpt.CheckpointOptions(
        require_shared_storage=False, timeout_s=a.timeout))
    out["local_mode_constructed"] = True
    out["local_mode_steps"] = local.all_steps()
    if a.local_save:  # informational: what a save does on unshared directories
        try:
            state.set(1)
            local.save(1, state.items)
            local.wait()
            out["local_save"] = {"ok": True, "steps": local.all_steps()}
        except Exception as e:  # report whatever happens; the test prints it
            out["local_save"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1500]}
    Path(f"{a.out}.{me}").write_text(json.dumps(out))
    sys.stdout.flush()
    # Process 0 hosts the coordination service: leaving before the others have heard the
    # last barrier's answer kills them mid-RPC (seen under load). Meet once more first.
    try:
        coordinator.barrier("probe:done", 60.0)
    except Exception as e:  # report, but never hang here
        print(f"final barrier: {e}", flush=True)
    # A failed save's commit thread may still wait at a barrier; do not hang in close().
    os._exit(0)


def scenario_strace(a) -> None:
    distckpt.initialize()
    state = State(a.width)
    state.set(1)
    with distckpt.CheckpointService(a.dir, distckpt.CheckpointOptions(max_to_keep=None)) \
            as ckpt:
        ckpt.save(1, state.items)
        ckpt.wait()
        steps = ckpt.all_steps()
    print(f"SAVED {steps}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("--dir", required=True)
    p.add_argument("--log", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--job", type=int, default=0)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--first-step", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--hook-point", default=None)
    p.add_argument("--hook-step", type=int, default=-1)
    p.add_argument("--hook-targets", default="all", help="'all' or process ids, e.g. '0' or '1'")
    p.add_argument("--hook-delay", type=float, default=0.0)
    p.add_argument("--hook-async", action="store_true")
    p.add_argument("--await-kill", action="store_true",
                   help="an external kill is coming: never end before it lands")
    p.add_argument("--victim", type=int, default=1)
    p.add_argument("--local-save", action="store_true")
    p.add_argument("--fsize", type=int, default=64 * 1024)
    a = p.parse_args()
    globals()[f"scenario_{a.scenario}"](a)


if __name__ == "__main__":
    main()
