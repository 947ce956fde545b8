"""Crash consistency and loud failures, with real processes.

* SIGKILL harness: a 2-process x 2-device job saves a small NNX state every step
  (async, max_to_keep=2, so retention deletes steps) and is killed with SIGKILL, one
  process or all, by the service's fault hooks at named save points or by the test at
  a random moment. The next job starts in the same directory, checks what it finds
  (:func:`check_kill`), re-saves the interrupted step and is itself killed, and so on:
  a chain of kills in one directory ends with a job that runs to completion.
* Durability: one save under strace; every file of the step is fsynced before the
  commit record is renamed into place, the checkpoint directory after the step rename.
* Peer death: SIGKILL of process 1, or of process 0 (the coordination service), in the
  middle of a save; every survivor exits non-zero within heartbeat timeout + 30 s.
* Disk full (a size-limited tmpfs in a private mount namespace), a file size limit on
  one process (no privileges needed), and a checkpoint directory that the hosts do not
  share: each fails on every process, promptly, saying what to do.

Workers: tests/crash_worker.py. Randomized runs print their seed; rerun one with
``DISTCKPT_CRASH_SEED=<seed>``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from etils import epath

from distckpt.checkpoint import commit, committed
from distckpt.tools.launcher import free_port, host_env, launch

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).parent.parent
WORKER = str(Path(__file__).parent / "crash_worker.py")
HEARTBEAT_S = 10
"""Heartbeat timeout of the peer-death jobs (DISTCKPT_HEARTBEAT_TIMEOUT_S): a survivor of
a killed peer is stopped by the coordination service within this, not after JAX's 100 s.
Other jobs keep JAX's default (the launcher stops their survivors), so a host starved of
CPU by a busy machine is not declared dead."""
JOB_TIMEOUT = 300.0  # others run tests on the same 2 cores: generous
HOOK_POINTS = ("save:staged", "process_state:write", "commit:renamed", "commit:recorded")


def job_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # conftest's 8 devices; the launcher sets 2 per host
    env.pop("DISTCKPT_HEARTBEAT_TIMEOUT_S", None)
    env.update(extra)
    return env


# ---------------------------------------------------------------------- SIGKILL harness
@dataclasses.dataclass(frozen=True)
class Kill:
    """How one job of a chain dies."""

    how: str
    """'hook' (the service's fault hook at `point`) or 'external' (the test, at a random time)."""
    targets: str
    """'0', '1' or 'all'."""
    point: str | None = None
    offset: int = 1
    """Hook kills fire in the save of first_step + offset (the re-save commits first)."""
    delay: float = 0.0
    """Hook: seconds after the point; external: seconds after every process is READY."""
    background: bool = False
    """Hook: kill from a timer thread while the save goes on (else the save stands still)."""

    def describe(self) -> str:
        if self.how == "external":
            return f"external SIGKILL of {self.targets} {self.delay:.2f}s after READY"
        mode = "timer" if self.background else "in place"
        return (f"hook SIGKILL of {self.targets} at {self.point} (+{self.offset} step, "
                f"{self.delay:.2f}s, {mode})")


@dataclasses.dataclass
class JobRun:
    job: int
    first_step: int
    kill: Kill | None
    returncode: int
    returncodes: list
    output: str
    seconds: float
    killed_at: float | None = None


def _is_worker(pid: int) -> bool:
    try:
        return b"crash_worker.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def run_job(directory: Path, log: Path, job: int, first_step: int, kill: Kill | None) -> JobRun:
    """One job of a chain: check the directory, re-save from first_step, die as `kill` says."""
    steps = 3 if kill is None else (kill.offset + 3 if kill.how == "hook" else 1000)
    args = [sys.executable, WORKER, "run", "--dir", str(directory), "--log", str(log),
            "--job", str(job), "--first-step", str(first_step), "--steps", str(steps)]
    if kill is not None and kill.how == "hook":
        args += ["--hook-point", kill.point, "--hook-step", str(first_step + kill.offset),
                 "--hook-targets", kill.targets, "--hook-delay", str(kill.delay)]
        if kill.background:
            args.append("--hook-async")
    if kill is not None:
        args.append("--await-kill")  # the job outlives its kill, however late that comes
    ready = threading.Event()
    done = threading.Event()
    seen: set[int] = set()
    killed_at: list[float] = []

    def on_line(host: int, line: str) -> None:
        if line.strip() == "READY":
            seen.add(host)
            if len(seen) == 2:
                ready.set()

    def killer(pids: list[int]) -> None:
        while not ready.wait(0.1):
            if done.is_set():
                return
        if done.wait(kill.delay):
            return
        targets = [0, 1] if kill.targets == "all" else [int(kill.targets)]
        killed_at.append(time.monotonic())
        for t in targets:
            if _is_worker(pids[t]):
                os.kill(pids[t], signal.SIGKILL)

    def on_start(pids: list[int]) -> None:
        if kill is not None and kill.how == "external":
            threading.Thread(target=killer, args=(pids,), daemon=True).start()

    buf = io.StringIO()
    t0 = time.monotonic()
    try:
        result = launch(args, 2, 2, env=job_env(), out=buf, timeout_s=JOB_TIMEOUT, grace_s=3.0,
                        forward_signals=False, line_callback=on_line, on_start=on_start)
    finally:
        done.set()
    return JobRun(job, first_step, kill, result.returncode, result.returncodes, buf.getvalue(),
                  time.monotonic() - t0, killed_at[0] - t0 if killed_at else None)


def read_events(log: Path, job: int) -> list[dict]:
    events = []
    for path in sorted(log.glob(f"events.{job}.*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by SIGKILL
                pass
    return events


@dataclasses.dataclass
class ChainState:
    """What the test knows about the directory from the jobs' own logs."""

    started: set[int] = dataclasses.field(default_factory=set)
    confirmed: dict[int, dict[str, str]] = dataclasses.field(default_factory=dict)
    """step -> digests, for every step some job saw committed (its next save/wait returned)."""
    leftovers: list[str] = dataclasses.field(default_factory=list)
    resaves_committed: int = 0


def check_kill(tag: str, state: ChainState, killed: JobRun, check: dict, scanned: list[int],
               listed_before: list[int]) -> None:
    """Everything a fresh start must find after `killed` died."""
    events = read_events(Path(check["_log"]), killed.job)
    started = {e["s"] for e in events if e["e"] == "start"}
    committed = {e["s"]: e["digests"] for e in events if e["e"] == "committed"}
    overwriting = {e["s"] for e in events if e["e"] == "start" and e["overwrite"]}
    state.started |= started
    state.confirmed.update(committed)
    listed = check["listed"]
    ctx = f"{tag}: after {killed.kill.describe() if killed.kill else 'no kill'}"

    # What a fresh start lists is what an independent scan found right after the kill,
    # and every process lists the same steps.
    assert listed == scanned, f"{ctx}: job lists {listed}, the directory holds {scanned}"
    assert all(v == listed for v in check["listed_by_process"]), f"{ctx}: {check}"
    # Nothing appears that was not saved.
    assert set(listed) <= set(listed_before) | started, \
        f"{ctx}: listed {listed}, but only {sorted(started)} were started (before: " \
        f"{listed_before})"
    # Nothing committed is lost: a step some job saw committed is still listed unless
    # retention (max_to_keep=2) had two newer committed steps to keep instead, or the
    # killed job was overwriting it (overwrite deletes the old step first).
    lost = [s for s in sorted(set(state.confirmed) | set(listed_before))
            if s not in listed and sum(t > s for t in listed) < 2
            and not (s in overwriting and s not in committed)]
    assert not lost, f"{ctx}: committed step(s) {lost} lost; listed {listed}"
    # Retention's trash was purged on open; leftovers are never listed.
    assert check["trash_left"] == [], f"{ctx}: {check['trash_left']}"
    extra = [e for e in check["entries"] if e not in {str(s) for s in listed}
             and e not in ("distckpt-trash", "distckpt-quarantine")]
    for entry in extra:
        assert re.fullmatch(r"\d+(\.orbax-checkpoint-tmp.*)?", entry), f"{ctx}: junk {entry}"
    state.leftovers += extra
    if not listed:
        assert "no committed checkpoint" in (check.get("restore_error") or ""), f"{ctx}: {check}"
        return
    # restore() with no step picks the newest committed step, which needs no fallback,
    # verifies, and holds exactly what was saved at that step.
    restored = check["restored"]
    assert restored["step"] == max(listed), f"{ctx}: restored {restored['step']} of {listed}"
    assert restored["skipped"] == [], f"{ctx}: a listed step was broken: {restored['skipped']}"
    assert restored["verified"], f"{ctx}: {restored}"
    assert restored["digests"] == check["expected"][str(max(listed))], f"{ctx}: contents differ"
    # So does every other listed step, and each equals what the saving job recorded.
    for step in listed:
        one = check["per_step"][str(step)]
        assert "error" not in one, f"{ctx}: listed step {step} does not restore: {one}"
        assert one["verified"] and one["metadata"] == {"step": step}, f"{ctx}: {one}"
        assert one["digests"] == check["expected"][str(step)], f"{ctx}: step {step} differs"
        if step in state.confirmed:
            assert one["digests"] == state.confirmed[step], f"{ctx}: step {step} differs " \
                "from the saving job's digests"


def run_chain(root: Path, kills: list[Kill], tag: str) -> list[str]:
    """Jobs in one directory, each killed as `kills` says, then one that completes."""
    directory, log = root / "ckpt", root / "log"
    log.mkdir(parents=True)
    state = ChainState()
    notes = []
    first_step, listed_before, scanned = 1, [], []
    previous: JobRun | None = None
    for job, kill in enumerate([*kills, None]):
        run = run_job(directory, log, job, first_step, kill)
        check_path = log / f"check.{job}.json"
        assert check_path.exists(), \
            f"{tag}: job {job} died before checking the directory:\n{run.output[-5000:]}"
        check = {**json.loads(check_path.read_text()), "_log": str(log)}
        if previous is not None:
            check_kill(f"{tag} job {previous.job}", state, previous, check, scanned,
                       listed_before)
        if kill is None:
            assert run.returncode == 0, f"{tag}: the final job failed:\n{run.output[-6000:]}"
            events = read_events(log, job)
            assert {e["s"] for e in events if e["e"] == "committed"} >= \
                {first_step, first_step + 1, first_step + 2}, f"{tag}: {events}"
            state.resaves_committed += 1
            notes.append(f"job {job}: completed in {run.seconds:.1f}s")
            break
        # The job died: it never exits 0 (a kill that came too late is a test bug).
        assert run.returncode != 0, f"{tag}: job {job} was not killed ({kill.describe()}):\n" \
                                    f"{run.output[-4000:]}"
        assert "KILL NEVER CAME" not in run.output, f"{tag}: job {job}: {kill.describe()} " \
            f"never landed:\n{run.output[-4000:]}"
        if kill.how == "hook":
            assert (log / f"fired.{job}").exists(), f"{tag}: hook never fired\n{run.output[-4000:]}"
        scanned = committed.committed_steps(epath.Path(directory))  # before anything else touches it
        trash = directory / commit.TRASH_DIR
        in_trash = sorted(os.listdir(trash)) if trash.exists() else []
        listed_before = check["listed"]
        events = read_events(log, job)
        started = {e["s"] for e in events if e["e"] == "start"}
        confirmed_now = {e["s"] for e in events if e["e"] == "committed"}
        notes.append(f"job {job}: {kill.describe()}; started {sorted(started)}, "
                     f"committed after: {scanned}, in retention's trash: {in_trash} "
                     f"({run.seconds:.1f}s)")
        # The next job re-saves the step whose commit the kill interrupted (the oldest
        # started step newer than every committed one), or, if the kill came after its
        # commit record, the newest started step again (overwrite).
        if job > 0 and (first_step in scanned or first_step in confirmed_now):
            state.resaves_committed += 1
        newer = sorted(s for s in started if s > max(scanned, default=-1))
        first_step = newer[0] if newer else max(started, default=first_step)
        previous = run
    notes.append(f"leftovers ignored: {sorted(set(state.leftovers))}; interrupted steps "
                 f"re-saved and committed before the next kill: {state.resaves_committed}"
                 f" of {len(kills)}")
    return notes


DEFAULT_CHAIN = [
    # One process dies in its background write (its shards may be half written).
    Kill("hook", "1", "process_state:write", offset=1),
    # Every process dies after the step's rename, before the commit record.
    Kill("hook", "all", "commit:renamed", offset=2),
    # The primary dies while retention moves old steps to the trash and deletes them.
    Kill("hook", "0", "commit:recorded", offset=2, delay=0.05, background=True),
    # Everyone dies while the arrays of a step are being written in the background.
    Kill("hook", "all", "save:staged", offset=1, delay=0.1, background=True),
]


def test_sigkill_at_each_save_point_leaves_only_committed_restorable_steps(tmp_path):
    notes = run_chain(tmp_path, DEFAULT_CHAIN, "default chain")
    print("\n".join(notes))


def random_kill(rng: random.Random) -> Kill:
    targets = rng.choice(["0", "1", "all"])
    if rng.random() < 0.5:
        return Kill("external", targets, delay=rng.uniform(0.0, 4.0))
    return Kill("hook", targets, rng.choice(HOOK_POINTS), offset=rng.randint(1, 3),
                delay=rng.choice([0.0, rng.uniform(0.0, 0.3)]), background=rng.random() < 0.5)


@pytest.mark.slow
def test_sigkill_randomized(tmp_path):
    trials = int(os.environ.get("DISTCKPT_SLOW_TRIALS", "30"))
    seed = int(os.environ.get("DISTCKPT_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"DISTCKPT_CRASH_SEED={seed} ({trials} kills)")
    rng = random.Random(seed)
    kills = [random_kill(rng) for _ in range(trials)]
    chain_len = 5
    for c in range(0, trials, chain_len):
        tag = f"seed {seed} chain {c // chain_len} (rerun: DISTCKPT_CRASH_SEED={seed})"
        notes = run_chain(tmp_path / f"chain{c // chain_len}", kills[c:c + chain_len], tag)
        print(f"{tag}:\n  " + "\n  ".join(notes))


# ---------------------------------------------------------------------- durability
STRACE_CALLS = "fsync,fdatasync,rename,renameat,renameat2,openat"
_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")


def _strace_or_skip() -> list[str]:
    """The strace command prefix; skip (or fail where CI requires it) if it cannot run."""
    required = os.environ.get("DISTCKPT_REQUIRE_STRACE") == "1"
    strace = shutil.which("strace")
    problem = None
    if strace is None:
        problem = ("strace is not installed; install it with `apt-get install strace` "
                   "(Debian/Ubuntu) or `dnf install strace`")
    else:
        prefix = [strace, "-f", "-y", "-qq"]
        for extra in (["--seccomp-bpf"], []):  # seccomp-bpf makes tracing far cheaper
            r = subprocess.run([*prefix, *extra, "-e", "trace=openat", "-o", os.devnull,
                                "true"], capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                return [*prefix, *extra]
        problem = (f"strace cannot trace here ({r.stderr.strip()[:300]}); ptrace is "
                   "blocked (container seccomp profile or kernel.yama.ptrace_scope=3)")
    message = f"the durability test needs strace: {problem}"
    if required:
        pytest.fail(message + " (DISTCKPT_REQUIRE_STRACE=1: CI must run this test)")
    pytest.skip(message)


@dataclasses.dataclass
class Call:
    index: int
    """Position in the trace, at completion (what matters for ordering durability)."""
    name: str
    args: str
    result: str

    def paths(self) -> list[str]:
        return re.findall(r'"((?:[^"\\]|\\.)*)"', self.args)

    def fd_path(self) -> str | None:
        m = re.match(r"\s*\d+<(.*?)>", self.args)
        return m.group(1) if m else None


def parse_strace(text: str) -> list[Call]:
    """Completed calls of an `strace -f -y` log, in completion order."""
    calls, pending = [], {}
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        pid, body = m.groups()
        if body.endswith("<unfinished ...>"):
            call = _CALL.match(body[:-len("<unfinished ...>")].rstrip())
            if call:
                pending[pid] = call.groups()
            continue
        resumed = _RESUMED.match(body)
        if resumed:
            name, rest = resumed.groups()
            if pid not in pending:
                continue
            name, head = pending.pop(pid)
            body = f"{name}({head}{rest}"
        call = _CALL.match(body)
        if not call or " = " not in body:
            continue
        name, rest = call.groups()
        args, _, result = rest.rpartition(" = ")
        calls.append(Call(len(calls), name, args.rstrip(")").rstrip(), result.strip()))
    return calls


def test_commit_is_durable_every_file_fsynced_before_the_commit_record(tmp_path):
    strace = _strace_or_skip()
    directory = tmp_path / "ckpt"
    trace = tmp_path / "trace"
    cmd = [*strace, "-o", str(trace), "-e", f"trace={STRACE_CALLS}", sys.executable, "-m",
           "distckpt.tools.cli", "launch", "--hosts", "2", "--devices-per-host", "2", "--timeout",
           str(JOB_TIMEOUT), "--", sys.executable, WORKER, "strace", "--dir", str(directory)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=job_env(), cwd=ROOT,
                       timeout=JOB_TIMEOUT + 60)
    assert r.returncode == 0 and r.stdout.count("SAVED [1]") == 2, r.stdout[-4000:] + r.stderr
    calls = [c for c in parse_strace(trace.read_text()) if not c.result.startswith("-1")]
    root = os.path.realpath(directory)
    step, record = f"{root}/1", f"{root}/1/{committed.COMMIT_FILE}"
    fsyncs = [(c.index, c.fd_path()) for c in calls if c.name in ("fsync", "fdatasync")]
    renames = [(c.index, *(os.path.realpath(p) for p in c.paths()[:2])) for c in calls
               if c.name.startswith("rename")]
    step_renames = [i for i, src, dst in renames if dst == step]
    record_renames = [(i, src) for i, src, dst in renames if dst == record]
    assert len(step_renames) == 1, renames
    assert len(record_renames) == 1, renames
    renamed, (recorded, record_tmp) = step_renames[0], record_renames[0]
    assert renamed < recorded

    def fsynced_between(path: str, lo: float, hi: float) -> bool:
        return any(lo < i < hi and p == path for i, p in fsyncs)

    # Every file and directory of the committed step, whoever wrote it (process 1's
    # shards included), is fsynced under its final name after the rename and before the
    # commit record is renamed into place.
    files, dirs = [], []
    for dirpath, _, names in os.walk(step):
        dirs.append(dirpath)
        files += [os.path.join(dirpath, n) for n in names if n != committed.COMMIT_FILE]
    assert len(files) > 10 and any("ocdbt.process_1" in f for f in files), files
    unsynced = [p for p in files + dirs if not fsynced_between(p, renamed, recorded)]
    assert not unsynced, f"not fsynced before the commit record: {unsynced}"
    # The checkpoint directory is fsynced after the step's rename (the rename is durable)
    # and before the record; the record itself is fsynced before its rename, and the
    # step directory after it.
    assert fsynced_between(root, renamed, recorded), "checkpoint directory not fsynced"
    assert fsynced_between(record_tmp, -1, recorded), "commit record not fsynced"
    assert fsynced_between(step, recorded, float("inf")), "step directory not fsynced after record"
    # Nothing in the step is written after its files were fsynced (the record's sizes
    # would be stale and the data not durable).
    writes = [(c.index, os.path.realpath(c.paths()[0])) for c in calls
              if c.name == "openat" and c.paths() and re.search(r"O_WRONLY|O_RDWR", c.args)]
    late = [p for i, p in writes if i > renamed and p.startswith(step + "/") and p != record_tmp]
    assert not late, f"written after the commit's fsync: {late}"
    print(f"{len(files)} files, {len(dirs)} directories fsynced between the step rename "
          f"(trace line {renamed}) and the commit record rename (line {recorded})")


# ---------------------------------------------------------------------- peer death
class Processes:
    """N simulated hosts started directly with the launcher's environment.

    Not through launch(): the launcher stops every host as soon as one fails, and this
    test is about what the survivors do on their own, as on a real cluster.
    """

    def __init__(self, args: list[str], out: Path, hosts: int = 2, devices: int = 2):
        port = free_port()
        self.logs = [out / f"host{i}.log" for i in range(hosts)]
        self.procs = []
        for i in range(hosts):
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(
                    args, env=host_env(i, hosts, devices, port, job_env(
                        DISTCKPT_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S))), cwd=ROOT,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        self.exited_at: list[float | None] = [None] * hosts

    def poll(self) -> None:
        for i, p in enumerate(self.procs):
            if self.exited_at[i] is None and p.poll() is not None:
                self.exited_at[i] = time.time()

    def running(self) -> bool:
        self.poll()
        return any(t is None for t in self.exited_at)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def output(self) -> str:
        return "\n".join(f"--- host {i}\n{log.read_text()[-3000:]}"
                         for i, log in enumerate(self.logs))


@pytest.mark.parametrize("victim", [pytest.param(1, marks=pytest.mark.slow), 0],  # slow: one victim is enough by default
                         ids=["process1", "process0-coordinator"])
def test_peer_death_mid_save_stops_every_survivor(tmp_path, victim):
    directory, log = tmp_path / "ckpt", tmp_path / "log"
    log.mkdir()
    bound = HEARTBEAT_S + 30  # heartbeat timeout + 30 s
    hosts = Processes([sys.executable, WORKER, "peer", "--dir", str(directory), "--log",
                       str(log), "--victim", str(victim)], tmp_path)
    killed = log / "killed"
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not killed.exists() and hosts.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert killed.exists(), f"the victim never reached its kill point\n{hosts.output()}"
        # Watch well past the bound, so a slow survivor is measured, not cut off.
        deadline = time.monotonic() + bound + 60
        while hosts.running() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        hosts.kill()
    t_kill = json.loads(killed.read_text())["t"]
    codes = [p.returncode for p in hosts.procs]
    assert codes[victim] == -signal.SIGKILL, (codes, hosts.output())
    for i in range(len(hosts.procs)):
        if i == victim:
            continue
        took = (hosts.exited_at[i] or float("inf")) - t_kill
        assert hosts.exited_at[i] is not None and took <= bound, \
            f"survivor {i} still running {took:.0f}s after the kill (bound {bound}s)\n" \
            f"{hosts.output()}"
        assert codes[i] not in (0, None), f"survivor {i} exited {codes[i]}\n{hosts.output()}"
        print(f"victim {victim}: survivor {i} exited {codes[i]} {took:.1f}s after the kill "
              f"(heartbeat timeout {HEARTBEAT_S}s)")
    assert "COMMITTED 1" in hosts.output()
    assert "UNEXPECTED" not in hosts.output()
    assert committed.committed_steps(epath.Path(directory)) == [1], os.listdir(directory)


# ---------------------------------------------------------------------- disk full
DISK_KB = 900  # one step of the worker's state (~570 KB on disk) fits, two do not


def _private_tmpfs_prefix(probe: Path) -> list[str]:
    """A command prefix that runs in a private mount namespace where a tmpfs can be mounted.

    Root: `unshare --mount`. Others: an unprivileged user namespace mapping the user to
    root (`unshare --user --map-root-user --mount`). Skips, saying why, if neither works.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("the disk-full test needs `unshare` (util-linux) to mount a private, "
                    "size-limited tmpfs; install util-linux")
    candidates = [[unshare, "--user", "--map-root-user", "--mount", "--propagation", "private"]]
    if os.geteuid() == 0:
        candidates.insert(0, [unshare, "--mount", "--propagation", "private"])
    probe.mkdir()
    failures = []
    for prefix in candidates:
        r = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{probe}' "
                            "&& echo mounted"], capture_output=True, text=True, timeout=60)
        if r.returncode == 0 and "mounted" in r.stdout:
            return prefix
        failures.append(f"`{' '.join(prefix[1:])} mount -t tmpfs` exited {r.returncode}: "
                        f"{r.stderr.strip()[:200]}")
    pytest.skip("cannot mount a size-limited tmpfs in a private mount namespace here (not "
                "root, and unprivileged user namespaces are disabled: "
                "sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces / "
                "kernel.apparmor_restrict_unprivileged_userns): " + "; ".join(failures))


@pytest.mark.slow  # a failing save on every process: test_save_failures
def test_disk_full_fails_loudly_on_every_process_and_keeps_earlier_steps(tmp_path):
    prefix = _private_tmpfs_prefix(tmp_path / "probe")
    mnt, out = tmp_path / "small", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    ckpt = mnt / "ckpt"
    launch_cmd = f"{sys.executable} -m distckpt.tools.cli launch --hosts 2 --devices-per-host 2 " \
                 f"--timeout {JOB_TIMEOUT:g} -- {sys.executable} {WORKER}"
    script = "\n".join([
        f"mount -t tmpfs -o size={DISK_KB}k tmpfs '{mnt}' || exit 90",
        f"{launch_cmd} diskfull --dir '{ckpt}' --out '{out}/full' --timeout 20",
        "echo SAVE_JOB_RC=$?",
        # A fresh job (read-only) restores the newest step from the full filesystem.
        f"{launch_cmd} restore --dir '{ckpt}' --out '{out}/fresh'",
        "echo RESTORE_JOB_RC=$?",
        f"df -k '{mnt}' | tail -1",
    ])
    r = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True,
                       env=job_env(), cwd=ROOT, timeout=3 * JOB_TIMEOUT)
    text = r.stdout + r.stderr
    assert "SAVE_JOB_RC=0" in text and "RESTORE_JOB_RC=0" in text, text[-6000:]
    for process in (0, 1):
        got = json.loads((out / f"full.{process}").read_text())
        error = got.get("error") or ""
        # The error is raised on every process, names the step and the directory and says
        # what happened.
        assert got.get("error_type") in ("SaveFailedError", "CheckpointError"), got
        assert "step 2" in error, error
        assert str(ckpt) in error, error
        assert "No space left on device" in error or "ENOSPC" in error, error
        assert got["steps_after"] == [1], got
        assert got["restored"]["step"] == 1 and got["restored"]["verified"], got
        assert got["restored"]["digests"] == got["expected"], got
        # The failure is raised once; close() then neither raises again nor times out at a
        # barrier (either would be close_error; a hang would hit the job's timeout).
        assert got["close_error"] is None, got
        assert "The filesystem is full" in error, error
        fresh = json.loads((out / f"fresh.{process}").read_text())
        assert fresh["listed"] == [1] and fresh["step"] == 1 and fresh["verified"], fresh
        assert fresh["skipped"] == [] and fresh["digests"] == got["expected"], fresh
        print(f"process {process}: raised by {got['raised_at']}() after "
              f"{got['error_seconds']:.1f}s, close() {got['close_seconds']:.1f}s: {error}")


def test_failed_array_write_on_one_process_is_heard_promptly_on_every_process(tmp_path):
    """No root needed: process 1 may write no file over 64 KiB (RLIMIT_FSIZE) in step 2.

    Its array write fails with EFBIG in Orbax's background thread. Before distckpt
    reported such failures itself, wait() spun forever on every process: Orbax's own
    finalize thread took the error and its closing barrier timed out, leaving the save
    "in progress" for good.
    """
    out = tmp_path / "efbig"
    timeout = 60.0
    buf = io.StringIO()
    result = launch([sys.executable, WORKER, "efbig", "--dir", str(tmp_path / "ckpt"), "--out",
                     str(out), "--timeout", str(timeout)], 2, 2, env=job_env(), out=buf,
                    timeout_s=JOB_TIMEOUT, forward_signals=False)
    assert result.returncode == 0, buf.getvalue()[-6000:]
    for process in (0, 1):
        got = json.loads(Path(f"{out}.{process}").read_text())
        error = got.get("error") or ""
        assert got.get("error_type") == "SaveFailedError", got
        assert f"step 2 to {tmp_path / 'ckpt'} failed" in error, error
        assert "process 1:" in error and "File too large" in error, error
        # Heard from process 1's failure, not from a timeout (whose error names no
        # process and no EFBIG); the time is printed, not asserted.
        print(f"process {process}: heard after {got['error_seconds']:.1f}s")
        assert got["steps_after"] == [1], got
        assert got["restored"]["step"] == 1 and got["restored"]["verified"], got
        assert got["restored"]["digests"] == got["expected"], got


# ---------------------------------------------------------------------- unshared storage
@pytest.mark.parametrize("layout", ["different-paths",  # the other layout: slow tier
                                    pytest.param("same-path-private-mounts", marks=pytest.mark.slow)])
def test_directories_not_shared_by_the_hosts_are_refused_at_start(tmp_path, layout):
    """Each host sees its own empty directory: refused on every process within seconds.

    'different-paths': host i is given tmp/host{i}. 'same-path-private-mounts': every
    host is given the same path, but each mounts its own tmpfs there in a private mount
    namespace, as hosts with local disks do.
    """
    out = tmp_path / "probe"
    if layout == "different-paths":
        dirs = [tmp_path / "host0", tmp_path / "host1"]
        for d in dirs:
            d.mkdir()
        command = [sys.executable, WORKER, "probe", "--dir", str(tmp_path / "host{i}"),
                   "--out", str(out)]
    else:
        prefix = _private_tmpfs_prefix(tmp_path / "capability-probe")
        shared = tmp_path / "ckpt"
        shared.mkdir()
        dirs = [shared, shared]
        command = [*prefix, "sh", "-c",
                   f"mount -t tmpfs -o size=16m tmpfs '{shared}' && exec \"$0\" \"$@\"",
                   sys.executable, WORKER, "probe", "--dir", str(shared), "--out", str(out)]
    buf = io.StringIO()
    result = launch(command, 2, 2, env=job_env(), out=buf, timeout_s=JOB_TIMEOUT,
                    forward_signals=False)
    assert result.returncode == 0, buf.getvalue()[-5000:]
    for i in (0, 1):
        got = json.loads(Path(f"{out}.{i}").read_text())
        assert got["error_type"] == "StorageNotSharedError", got
        msg = got["error"]
        assert f"checkpoint directory {dirs[i]} is not shared" in msg, msg
        assert "process(es) [1] did not see the probe file" in msg, msg
        assert "require_shared_storage=False" in msg and "Nothing was written" in msg, msg
        if layout == "different-paths":
            assert f"the primary host's directory is {dirs[0]}" in msg or i == 0, msg
        print(f"process {i}: refused after {got['seconds']:.1f}s (probe_timeout_s=2)")
        assert got["entries_after_probe"] == [], got  # the probe file was removed
        # Per-host local mode, chosen explicitly, proceeds.
        assert got["local_mode_constructed"] and got["local_mode_steps"] == [], got
    if layout == "different-paths":
        assert os.listdir(dirs[0]) == [] and os.listdir(dirs[1]) == []


def test_heartbeat_timeout_comes_from_the_environment_and_is_checked(monkeypatch):
    """DISTCKPT_HEARTBEAT_TIMEOUT_S (used above) reaches initialize(); nonsense is refused."""
    import distckpt

    for bad, match in (("0", ">= 1 second"), ("soon", "must be an integer")):
        monkeypatch.setenv("DISTCKPT_HEARTBEAT_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match=match):
            distckpt.initialize()
    with pytest.raises(ValueError, match=">= 1 second"):
        distckpt.initialize(heartbeat_timeout_s=0)
