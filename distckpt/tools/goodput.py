"""``distckpt goodput``: the reference trainer under injected host failures, and its ETTR.

For each configuration (persistent-only, then multi-tier: a host-local tier with a peer
copy, plus the persistent one) the supervisor:

1. **Calibrates** with two short jobs of ``distckpt train --progress`` on the same slice:
   job A trains from scratch with a save every few steps and exits; then one host's local
   tier is wiped, the persistent tier evicted from the page cache and job B restarts from
   A's checkpoint; the supervisor SIGKILLs a host after B's third step (with the local
   tier: the step after B's first local save, which refilled the wiped host). From their
   ``TRAIN {json}`` lines it takes the step time, each tier's save stall and commit
   latency, the start of the job (B's launch until it trains), and the restart (kill ->
   torn down -> host replaced -> relaunched -> restored -> training again).
   :mod:`distckpt.tools.goodput_model` turns these into the checkpoint intervals
   (Young/Daly) and the ETTR the plan expects.
2. **Runs** the job for exactly ``duration`` seconds of wall time under failures, in the
   same directories, so its first start is a restart from the calibration's checkpoint
   like every later one (productive steps are those gained during the run). Failure
   times are exponential with mean ``mtbf`` (a Poisson process over the whole wall time:
   a failure may hit a starting or restoring job, as in Daly's model), each on a host
   drawn uniformly, all from ``seed``; both configurations get the same schedule. A
   failure SIGKILLs that host's process group; the launcher stops the others at once
   (SIGTERM then SIGKILL, no grace: a peer of a dead host cannot save); the supervisor
   wipes the dead host's local tier (a replaced machine), evicts the persistent tier from
   the page cache (a new host has nothing cached) and relaunches the whole job, which
   restores the newest step any tier holds, as a cluster scheduler would. At the
   deadline the job is stopped the same way.

Every job of a run shares a JAX persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``
in the run's directory, filled by calibration job A) and a directory of compiled training
steps, one per process (``distckpt train --executable-cache``: JAX's cache is written by
process 0 only, and on CPU the other processes' keys differ), so a restart loads the
compiled training step on every host instead of compiling it again, as production jobs do;
the restart cost is still real: process start, ``jax.distributed`` initialization, restore,
tracing and loading programs.

What is reported (ETTR, steps lost, recovery time, the costs measured in the run and the
ETTR predicted from them) is defined in :mod:`distckpt.tools.goodput_report`.

The multi-tier configuration passes ``--local-dir DIR/{host} --local-every K`` to the
trainer (``CheckpointOptions.local_directory``, ``local_interval_steps``; the launcher sets
``DISTCKPT_HOST=host<slot>``), so a wiped host is ``rm -rf DIR/host<slot>``.

The persistent tier is ``<run directory>/persistent`` by default, or an object-store prefix
(``GoodputConfig.persistent``, e.g. ``s3://bucket/prefix``; each run under
``<prefix>/<run>``, emptied after the run), which is what it is on most clusters: a
persistent save and a restore from it then pay object-store requests, and nothing of it
is in a page cache to evict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from distckpt.tools import goodput_model as model
from distckpt.tools.goodput_report import Attempt, RunReport, step_costs, summarize

PROGRESS = re.compile(r"^TRAIN (\{.*\})$")  # distckpt train --progress (train.PROGRESS_PREFIX)
RUN_KINDS = {"persistent": ("persistent",), "multi": ("local", "persistent")}
"""Configuration name -> the tiers it checkpoints to."""
CAL_SAVE_EVERY = 8
"""Calibration: persistent save interval (with the local tier: local every 4). Far enough
apart that a save's background work (a persistent commit takes a few steps' time) has
ended before the next save, so the step time between saves is a clean one and each save's
cost is seen whole; at 4 (and local every 2) most steps ran beside some save's
background work, so the step time came out high and each save's cost low: a run on S3
measured a local save at 0.133 s against the 0.048 s its calibration planned with."""
CAL_LOCAL_EVERY = CAL_SAVE_EVERY // 2
"""Calibration with the local tier: local save interval."""
CAL_STEPS = 32
"""Calibration job A trains this many steps (four persistent saves)."""
FOREVER = 10**9
"""--steps of a run's job: it is stopped at the deadline, never finishes."""


@dataclasses.dataclass(frozen=True)
class GoodputConfig:
    """One ``distckpt goodput`` invocation."""

    duration_s: float
    """Wall time of each run (calibration not included)."""
    mtbf_s: float
    """Mean time between injected failures."""
    hosts: int = 4
    """Simulated hosts (processes)."""
    devices_per_host: int = 2
    """CPU devices per host."""
    seed: int = 0
    """Seeds the failure schedule (times and hosts); both runs share it."""
    step_delay_s: float = 0.2
    """Sleep added to every training step, so that a step takes a controlled time."""
    runs: tuple[str, ...] = ("persistent", "multi")
    """Configurations to run, in order (keys of RUN_KINDS)."""
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides of distckpt.tools.model.ModelConfig fields."""
    batch: int = 8
    """Global batch size."""
    persistent: str | None = None
    """Object-store prefix of the persistent tier (``s3://bucket/prefix``, credentials from
    the ``AWS_*`` environment); each run writes under ``<prefix>/<run>``. None: a directory
    in each run's work directory."""

    def __post_init__(self):
        if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"--duration must be a positive time, got {self.duration_s:g}s")
        if not (self.mtbf_s > 0 and math.isfinite(self.mtbf_s)):
            raise ValueError(f"--mtbf must be a positive time, got {self.mtbf_s:g}s")
        if self.hosts < 1 or self.devices_per_host < 1:
            raise ValueError(f"--hosts and --devices-per-host must be >= 1, got "
                             f"{self.hosts}x{self.devices_per_host}")
        if not (self.step_delay_s >= 0 and math.isfinite(self.step_delay_s)):
            raise ValueError(f"--step-delay must be >= 0 seconds, got {self.step_delay_s:g}")
        bad = [r for r in self.runs if r not in RUN_KINDS]
        if bad or not self.runs or len(set(self.runs)) != len(self.runs):
            raise ValueError(f"--runs {','.join(self.runs)}: give distinct names among "
                             f"{', '.join(RUN_KINDS)}")
        if self.persistent is not None and not self.persistent.startswith("s3://"):
            raise ValueError(f"--persistent {self.persistent}: give an s3://bucket/prefix (a "
                             "local persistent tier is the default, in the work directory)")

    def persistent_dir(self, run_dir: Path) -> str:
        """Where the run working in `run_dir` (``<dir>/<run>``) keeps its persistent tier."""
        if self.persistent is None:
            return str(run_dir / "persistent")
        return f"{self.persistent.rstrip('/')}/{run_dir.name}"


def failure_schedule(seed: int, mtbf_s: float, duration_s: float, hosts: int
                     ) -> list[tuple[float, int]]:
    """(seconds from the run's start, host) of each failure before `duration_s`.

    >>> failure_schedule(0, 10.0, 30.0, 4) == failure_schedule(0, 10.0, 30.0, 4)
    True
    >>> all(0 <= t < 30 and 0 <= h < 4 for t, h in failure_schedule(1, 5.0, 30.0, 4))
    True
    """
    rng = random.Random(seed)
    out: list[tuple[float, int]] = []
    t = 0.0
    while True:
        t += rng.expovariate(1.0 / mtbf_s)
        if t >= duration_s:
            return out
        out.append((t, rng.randrange(hosts)))


# --------------------------------------------------------------------------- one job
class Job:
    """Launches ``distckpt train`` attempts on one slice, logging to one file."""

    def __init__(self, config: GoodputConfig, command: Sequence[str], log: TextIO,
                 compile_cache: Path):
        self.config, self.command, self.log = config, list(command), log
        # Restarts load the compiled programs, as production jobs do: the training step
        # from each process's own file (train.CachedStep; JAX's cache below serves only
        # process 0 on CPU), everything else from JAX's persistent cache.
        self.executables = compile_cache / "executables"
        self.env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def attempt(self, deadline: float, kill_at: tuple[float, int] | None = None,
                kill_when: Callable[[dict[str, Any]], int | None] | None = None) -> Attempt:
        """Run one attempt until it exits, fails, or `deadline` (time.time()) passes.

        `kill_at` (time, host): SIGKILL that host at that time (at once if past).
        `kill_when(event)`: a host to SIGKILL as soon as that progress event is seen.
        """
        from distckpt.tools.launcher import launch

        attempt = Attempt(launched=time.time())
        self.log.write(f"[goodput] launch at {attempt.launched:.3f}: "
                       f"{shlex.join(self.command)}\n")
        pids: list[int] = []
        lock = threading.Lock()
        timers: list[threading.Timer] = []
        over = threading.Event()  # launch() returned: its hosts are reaped, no more kills

        def kill(host: int) -> None:
            with lock:
                if attempt.killed is not None or over.is_set():
                    return
                try:
                    os.killpg(pids[host], signal.SIGKILL)
                except ProcessLookupError:
                    return  # the host ended by itself meanwhile: no kill issued
                attempt.killed = (time.time(), host)
                self.log.write(f"[goodput] SIGKILL host {host} at {attempt.killed[0]:.3f}\n")

        def on_start(started: list[int]) -> None:
            pids.extend(started)
            if kill_at is not None:
                timer = threading.Timer(max(0.0, kill_at[0] - time.time()), kill, (kill_at[1],))
                timer.daemon = True
                timers.append(timer)
                timer.start()

        def on_line(_host: int, line: str) -> None:
            match = PROGRESS.match(line)
            if not match:
                return
            event = json.loads(match.group(1))
            attempt.events.append(event)
            if kill_when is not None and pids:
                host = kill_when(event)
                if host is not None:
                    kill(host)

        try:
            result = launch(self.command + ["--executable-cache", str(self.executables)],
                            self.config.hosts, self.config.devices_per_host,
                            env=self.env, out=self.log,
                            timeout_s=max(0.1, deadline - time.time()),
                            grace_s=0.0, line_callback=on_line, on_start=on_start)
        finally:
            for timer in timers:
                timer.cancel()
            with lock:
                over.set()
                attempt.ended = time.time()
        if result.forwarded:
            raise GoodputStopped(result.forwarded[0], getattr(self.log, "name", None))
        attempt.returncode = result.returncode
        return attempt


def train_command(config: GoodputConfig, ckpt_dir: str, steps: int, save_every: int,
                  local_dir: Path | None, local_every: int | None) -> list[str]:
    """The trainer's command line (every host runs the same one)."""
    cmd = [sys.executable, "-m", "distckpt.tools.cli", "train", "--dir", ckpt_dir,
           "--steps", str(steps), "--save-every", str(save_every), "--max-to-keep", "2",
           "--step-delay", repr(config.step_delay_s), "--progress",
           "--batch", str(config.batch)]
    flags = {"d_model": "--d-model", "n_layers": "--layers", "n_heads": "--heads",
             "n_kv_heads": "--kv-heads", "head_dim": "--head-dim", "d_ff": "--d-ff",
             "vocab": "--vocab"}
    for field, value in config.model.items():
        cmd += [flags[field], str(value)]
    if local_dir is not None:
        cmd += ["--local-dir", str(local_dir / "{host}"), "--local-every", str(local_every)]
    return cmd


def replace_host(local_dir: Path | None, host: int, persistent: str) -> None:
    """What a replaced machine looks like: its local tier gone, nothing in the page cache
    from a local persistent tier (evicted for every host: they share this machine's
    cache; an object store's is not this machine's to evict)."""
    from distckpt import storage
    from distckpt.bench.measure import evict, files_under

    if local_dir is not None:
        shutil.rmtree(local_dir / f"host{host}", ignore_errors=True)
    if storage.Location.parse(persistent).is_local and Path(persistent).exists():
        evict(files_under(Path(persistent)))


class GoodputError(RuntimeError):
    """A job failed by itself (not from an injected failure); the log says why."""


class GoodputStopped(GoodputError):
    """The supervisor got SIGINT or SIGTERM (a scheduler's time limit, Ctrl-C): the running
    job was passed the signal (it saves and stops) and nothing is reported."""

    def __init__(self, signum: int, log_name: str | None = None):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (
            f" (the running job got it too: it saved and stopped; see {log_name})"
            if log_name else "") + "; no report was written")


def _failed(what: str, attempt: Attempt, log_path: Path) -> GoodputError:
    return GoodputError(f"{what} exited {attempt.returncode} without an injected failure; "
                        f"see {log_path}")


# --------------------------------------------------------------------------- calibrate
def calibrate(config: GoodputConfig, kind: str, workdir: Path, log: TextIO, log_path: Path,
              compile_cache: Path, timeout_s: float = 600.0) -> model.Costs:
    """The warm-up jobs A and B of one configuration (see the module docstring)."""
    local = kind == "multi"
    ckpt, local_dir = config.persistent_dir(workdir), (workdir / "local" if local else None)
    local_every = CAL_LOCAL_EVERY if local else None
    job = Job(config, train_command(config, ckpt, CAL_STEPS, CAL_SAVE_EVERY, local_dir,
                                    local_every), log, compile_cache)
    a = job.attempt(time.time() + timeout_s)
    if a.returncode != 0 or len(a.steps()) < CAL_STEPS:
        raise _failed(f"calibration job A ({kind})", a, log_path)
    got = step_costs([a], CAL_SAVE_EVERY, local_every)
    step_s, stall = got["step_s"], got["stall_s"]
    if step_s is None or stall is None or (local and got["local_stall_s"] is None):
        raise GoodputError(f"calibration job A ({kind}) measured no steps or saves; see "
                           f"{log_path}")

    # Job B: a failure of the last host, exactly as in the run, then a restart.
    replace_host(local_dir, config.hosts - 1, ckpt)
    job.command = train_command(config, ckpt, FOREVER, CAL_SAVE_EVERY, local_dir, local_every)
    relaunched = time.time()

    # Killed three steps in, or with the local tier one step after its first local save:
    # B's restore refilled the replaced host's local tier only then, and without it the
    # run would start having lost a host and its peer's copy (a persistent restore).
    kill_at = CAL_STEPS + (local_every + 1 if local_every else 3)

    def after_steps(event: dict[str, Any]) -> int | None:
        return 0 if event.get("event") == "step" and event["step"] >= kill_at else None

    b = job.attempt(time.time() + timeout_s, kill_when=after_steps)
    resumed = b.resumed()
    if b.killed is None or resumed is None or not b.steps():
        raise _failed(f"calibration job B ({kind})", b, log_path)
    replace_host(local_dir, b.killed[1], ckpt)
    teardown = time.time() - b.killed[0]  # kill -> job gone -> host replaced
    resume = max(0.0, b.steps()[0]["t"] - relaunched - step_s)
    start_s = resume  # the run's first start is such a restart, without a kill before it
    restart = teardown + resume
    local_stall = got["local_stall_s"]
    return model.Costs(step_s=step_s, start_s=start_s, restart_s=restart, stall_s=stall,
                       commit_s=got["commit_s"] or stall, local_stall_s=local_stall,
                       local_commit_s=got["local_commit_s"] or local_stall,
                       cost_s=got["cost_s"], local_cost_s=got["local_cost_s"])


# --------------------------------------------------------------------------- one run
def run_one(config: GoodputConfig, kind: str, workdir: Path, log: TextIO, log_path: Path,
            on_event: Callable[[str, dict[str, Any]], None] | None = None) -> RunReport:
    """Calibrate, plan, then run `kind` for the configured duration."""
    local = kind == "multi"
    cache = workdir / "compile-cache"
    cal = calibrate(config, kind, workdir, log, log_path, cache)
    plan = model.plan(cal, config.mtbf_s, config.duration_s, local=local)
    if on_event is not None:
        on_event("planned", {"calibration": cal.to_json(), "plan": plan.to_json(),
                             "ettr_planned": model.predict(cal, plan)})
    ckpt, local_dir = config.persistent_dir(workdir), (workdir / "local" if local else None)
    job = Job(config, train_command(config, ckpt, FOREVER, plan.save_every, local_dir,
                                    plan.local_every), log, cache)
    schedule = failure_schedule(config.seed, config.mtbf_s, config.duration_s, config.hosts)
    t0 = time.time()
    deadline = t0 + config.duration_s
    attempts: list[Attempt] = []
    pending = [(t0 + t, host) for t, host in schedule]
    while time.time() < deadline:
        attempt = job.attempt(deadline, kill_at=pending[0] if pending else None)
        attempts.append(attempt)
        if attempt.killed is not None:
            pending.pop(0)
            replace_host(local_dir, attempt.killed[1], ckpt)
            if on_event is not None:
                on_event("failure", {"at": attempt.killed[0] - t0, "host": attempt.killed[1],
                                     "step": attempt.last_step()})
        elif attempt.returncode != 124:  # 124: stopped at the deadline
            raise _failed(f"the {kind} run's job", attempt, log_path)
    return summarize(kind, RUN_KINDS[kind], attempts, t0, config.duration_s, cal, plan)


# --------------------------------------------------------------------------- all runs
def run_goodput(config: GoodputConfig, workdir: Path,
                on_event: Callable[[str, dict[str, Any]], None] | None = None
                ) -> list[RunReport]:
    """Every configured run in turn, each in ``workdir/<name>`` (log: ``<name>.log``);
    the checkpoints are removed after each run, the logs kept."""
    reports = []
    for kind in config.runs:
        log_path = workdir / f"{kind}.log"
        with open(log_path, "w") as log:
            if on_event is not None:
                on_event("start", {"run": kind, "log": str(log_path)})
            try:
                report = run_one(config, kind, workdir / kind, log, log_path,
                                 on_event=on_event)
            finally:
                shutil.rmtree(workdir / kind, ignore_errors=True)  # local tiers too
                if config.persistent is not None:  # an object-store persistent tier
                    from distckpt import storage

                    storage.remove_objects(config.persistent_dir(workdir / kind))
        reports.append(report)
        if on_event is not None:
            on_event("done", report.to_json())
    return reports
