"""Coordinated preemption: SIGTERM to any process -> every process saves the same step, exits 0.

Real jobs through the launcher (2 hosts x 2 devices, gloo); nothing is mocked. The
reference job (`distckpt train`) is used where bit-exact resumption is the point; the
protocol's other cases use tests/preempt_worker.py, the same loop around a toy state
that needs no model compile (a job costs seconds, not ~15 s).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distckpt.multihost.preemption import PreemptionGuard
from distckpt.tools.launcher import launch

multiprocess = pytest.mark.multiprocess

ROOT = Path(__file__).parent.parent
WORKER = [sys.executable, str(Path(__file__).parent / "preempt_worker.py")]
STEPS = 16
TRAIN = [sys.executable, "-m", "distckpt.tools.cli", "train", "--steps", str(STEPS), "--save-every",
         "3", "--mesh", "data=2,fsdp=2", "--max-to-keep", "10"]
STEP_DELAY = ["--step-delay", "0.2"]  # a slower step (same numbers): room to land a signal
JOB_TIMEOUT = 300  # generous: other test suites share these 2 cores
SERVICE_OFF = {"JAX_ENABLE_PREEMPTION_SERVICE": "false"}


class Job:
    def __init__(self, returncode, returncodes, output):
        self.returncode, self.returncodes, self.output = returncode, returncodes, output

    def check(self) -> Job:
        assert self.returncode == 0 and self.returncodes in (None, [0, 0]), \
            f"job failed ({self.returncode}, {self.returncodes}):\n{self.output[-6000:]}"
        return self

    def train_result(self) -> dict:
        lines = [line.split("] ", 1)[1] for line in self.output.splitlines()
                 if line.startswith("[host 0] {")]
        assert lines, self.output[-4000:]
        return json.loads(lines[-1])

    def worker_results(self) -> list[dict]:
        found = {}
        for line in self.output.splitlines():
            m = re.match(r"\[host (\d+)\] RESULT (.*)$", line)
            if m:
                found[int(m.group(1))] = json.loads(m.group(2))
        assert sorted(found) == [0, 1], self.output[-4000:]
        return [found[0], found[1]]

    def saved_on_preemption(self) -> dict[int, int]:
        """process -> the step it logged as saved and committed on the preemption notice."""
        return {int(p): int(s) for p, s in re.findall(
            r"\[process=(\d+)\] preempted: saved step (\d+), committed", self.output)}


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}


def run_job(command, *, extra_env=None, on_start=None, line_callback=None) -> Job:
    buf = io.StringIO()
    result = launch(command, 2, 2, out=buf, timeout_s=JOB_TIMEOUT, forward_signals=False,
                    env=env(extra_env), on_start=on_start, line_callback=line_callback)
    return Job(result.returncode, result.returncodes, buf.getvalue())


def first_step_committed(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() and int(p.name) > 0
                                      for p in directory.iterdir())


def sigterm_one_host_when(ready, host: int, delay_s: float, sent: list):
    """on_start hook: once ready() holds, wait delay_s, then SIGTERM that host only."""

    def on_start(pids: list[int]) -> None:
        def fire() -> None:
            deadline = time.monotonic() + JOB_TIMEOUT
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(delay_s)
            os.kill(pids[host], signal.SIGTERM)
            sent.append(pids[host])

        threading.Thread(target=fire, daemon=True).start()

    return on_start


def launch_cli(command, extra_env=None) -> subprocess.Popen:
    """`distckpt launch` as its own process, so the test can signal the launcher itself."""
    return subprocess.Popen([sys.executable, "-m", "distckpt.tools.cli", "launch", "--hosts", "2",
                             "--devices-per-host", "2", "--timeout", str(JOB_TIMEOUT), "--",
                             *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env(extra_env), cwd=ROOT)


def sigterm_launcher_when(proc: subprocess.Popen, ready, delay_s: float) -> Job:
    """Collect the launcher's output; once ready(lines) holds, wait delay_s, SIGTERM it.

    The launcher forwards the signal to every host; its exit status is 0 only if every
    host exited 0 (returncodes of the hosts are not visible from here: None).
    """
    lines: list[str] = []
    assert proc.stdout is not None

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + JOB_TIMEOUT
    fired = False
    while proc.poll() is None and time.monotonic() < deadline:
        if ready(list(lines)):
            time.sleep(delay_s)
            proc.send_signal(signal.SIGTERM)
            fired = True
            break
        time.sleep(0.05)
    proc.wait(timeout=JOB_TIMEOUT)
    reader.join(timeout=10)
    proc.stdout.close()
    output = "".join(lines)
    assert fired, f"never became ready:\n{output[-4000:]}"
    return Job(proc.returncode, None, output)


def both_ready(lines: list[str]) -> bool:
    return sum("READY" in line for line in lines) == 2


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted run of the reference job: losses of steps 1..STEPS."""
    out = run_job(TRAIN + ["--dir", str(tmp_path_factory.mktemp("ref") / "ckpt")]).check()
    result = out.train_result()
    assert result["preempted_at"] is None and result["last_step"] == STEPS
    return result["losses"]


def check_preempted_then_resumed(job: Job, directory: Path, reference: dict) -> int:
    """Every process saved the same step S; the restart resumes from S, bit for bit."""
    job.check()
    saved = job.saved_on_preemption()
    assert sorted(saved) == [0, 1], job.output[-4000:]
    step = saved[0]
    assert saved[1] == step, saved
    result = job.train_result()
    assert result["preempted_at"] == step and result["last_step"] == step
    assert step in result["saved_steps"]
    # A notice in the last steps saves the last step (final=True in the reference loop).
    assert step <= STEPS, step

    resumed = run_job(TRAIN + STEP_DELAY + ["--dir", str(directory)]).check().train_result()
    assert resumed["start_step"] == step and resumed["preempted_at"] is None
    assert sorted(resumed["losses"], key=int) == [str(s) for s in range(step + 1, STEPS + 1)]
    for s, loss in resumed["losses"].items():
        assert loss == reference[s], (s, loss, reference[s])  # bit for bit
    for s, loss in result["losses"].items():
        assert loss == reference[s], (s, loss, reference[s])
    return step


# ------------------------------------------------------------------ the reference job
@multiprocess
@pytest.mark.slow  # three reference training jobs; CI runs it in its slow pass
def test_sigterm_to_one_process_saves_the_same_step_and_resumes_bit_exact(tmp_path, reference):
    directory = tmp_path / "ckpt"
    host, delay, sent = random.randrange(2), random.uniform(0.0, 1.5), []
    print(f"SIGTERM to host {host} {delay:.2f}s after the first save")
    job = run_job(TRAIN + STEP_DELAY + ["--dir", str(directory)],
                  on_start=sigterm_one_host_when(lambda: first_step_committed(directory), host,
                                                 delay, sent))
    assert sent, "the signal was never sent"
    check_preempted_then_resumed(job, directory, reference)


@multiprocess
@pytest.mark.slow
def test_randomized_preemption_trials(tmp_path, reference):
    """DISTCKPT_SLOW_TRIALS runs: random target (one host / the launcher), time, save
    interval (1: a save is in flight almost always) and JAX preemption service on/off."""
    trials = int(os.environ.get("DISTCKPT_SLOW_TRIALS", "30"))
    rng = random.Random(os.environ.get("DISTCKPT_SLOW_SEED"))
    for trial in range(trials):
        directory = tmp_path / f"trial{trial}"
        save_every = rng.choice(["1", "3"])
        command = TRAIN + STEP_DELAY + ["--dir", str(directory), "--save-every", save_every]
        extra = SERVICE_OFF if rng.random() < 0.5 else None
        delay = rng.uniform(0.0, 2.0)
        what = f"trial {trial}: save every {save_every}, service {'off' if extra else 'on'}, "
        if rng.random() < 0.5:
            host, sent = rng.randrange(2), []
            print(what + f"SIGTERM to host {host} {delay:.2f}s after the first save", flush=True)
            job = run_job(command, extra_env=extra, on_start=sigterm_one_host_when(
                lambda d=directory: first_step_committed(d), host, delay, sent))
        else:
            print(what + f"SIGTERM to the launcher {delay:.2f}s after the first save", flush=True)
            proc = launch_cli(command, extra)
            job = sigterm_launcher_when(
                proc, lambda _lines, d=directory: first_step_committed(d), delay)
        check_preempted_then_resumed(job, directory, reference)


# ------------------------------------------------------------------ protocol cases
@multiprocess
@pytest.mark.parametrize("term_at", [5, pytest.param(6, marks=pytest.mark.slow)])
def test_a_notice_in_the_last_steps_still_saves_the_same_last_step_everywhere(tmp_path,
                                                                              term_at):
    """SIGTERM to process 1 at the last step (6) or the one before: the agreed step would
    be past the end, and without final=True nothing was saved; every process must save
    step 6, the last one, and say so."""
    directory = tmp_path / "ckpt"
    job = run_job(WORKER + ["--dir", str(directory), "--steps", "6",
                            "--term-at-step", str(term_at)]).check()
    assert f"SIGTERM to myself at step {term_at}" in job.output
    r0, r1 = job.worker_results()
    assert r0["preempted_at"] == r1["preempted_at"] == 6, (r0, r1)
    assert r0["steps"] == r1["steps"] == [6], (r0, r1)  # --save-every 1000: only that save
    assert "guard exited before the agreed save step" not in job.output


@multiprocess
def test_without_final_a_notice_at_the_last_step_is_not_honoured(tmp_path):
    """What final=True fixes: the old loop ends without the save and the guard says so."""
    job = run_job(WORKER + ["--dir", str(tmp_path / "ckpt"), "--steps", "6",
                            "--term-at-step", "6", "--no-final"]).check()
    r0, r1 = job.worker_results()
    assert r0["preempted_at"] is None and r1["preempted_at"] is None, (r0, r1)
    assert "guard exited before the agreed save step" in job.output


@multiprocess
def test_sigterm_to_the_launcher_is_forwarded_and_every_process_saves(tmp_path):
    directory = tmp_path / "ckpt"
    command = WORKER + ["--dir", str(directory), "--steps", "400", "--save-every", "5",
                        "--step-delay", "0.05"]
    job = sigterm_launcher_when(launch_cli(command), both_ready, random.uniform(0.0, 0.5))
    job.check()
    r0, r1 = job.worker_results()
    step = r0["preempted_at"]
    assert step is not None and r1["preempted_at"] == step, (r0, r1)
    assert r0["steps"][-1] == r1["steps"][-1] == step
    assert r0["values"] == r1["values"]
    # JAX's native SIGTERM handler was there before the guard and is back after it.
    assert r0["native_handler"] and r0["handler_restored"] and r1["handler_restored"]

    resumed = run_job(WORKER + ["--dir", str(directory), "--steps", str(step + 2)]).check()
    for r in resumed.worker_results():
        assert r["start_step"] == step and sorted(r["values"], key=int) == [
            str(step + 1), str(step + 2)]


@multiprocess
def test_sigterm_while_a_save_is_in_flight_with_jax_preemption_service_off(tmp_path):
    """Process 1 signals itself inside the background commit of step 4 (slow commits)."""
    directory = tmp_path / "ckpt"
    job = run_job(WORKER + ["--dir", str(directory), "--steps", "400", "--save-every", "2",
                            "--step-delay", "0.05", "--commit-delay", "0.3",
                            "--term-in-commit", "4"], extra_env=SERVICE_OFF).check()
    assert "SIGTERM to myself during the commit of step 4" in job.output
    r0, r1 = job.worker_results()
    assert not r0["jax_service"] and not r1["jax_service"]
    assert not r0["native_handler"] and r0["handler_restored"]
    step = r0["preempted_at"]
    assert step is not None and step > 4 and r1["preempted_at"] == step, (r0, r1)
    assert 4 in r0["steps"] and r0["steps"][-1] == step

    resumed = run_job(WORKER + ["--dir", str(directory), "--steps", str(step)],
                      extra_env=SERVICE_OFF).check()
    assert [r["start_step"] for r in resumed.worker_results()] == [step, step]


@multiprocess
def test_a_user_handler_installed_after_the_guard_is_chained_with_a_warning(tmp_path):
    directory = tmp_path / "ckpt"
    replaced = threading.Event()

    def on_line(host: int, line: str) -> None:
        if host == 0 and "handler of the preemption guard was replaced" in line:
            replaced.set()

    job = run_job(WORKER + ["--dir", str(directory), "--steps", "400", "--step-delay", "0.05",
                            "--user-handler"],
                  on_start=sigterm_one_host_when(replaced.is_set, 0, 0.2, []),
                  line_callback=on_line).check()
    assert job.output.count("re-installed it in front") == 2, job.output[-4000:]
    r0, r1 = job.worker_results()
    assert r0["jax_service"]  # the guard took SIGTERM over from JAX's native handler
    assert r0["preempted_at"] is not None and r1["preempted_at"] == r0["preempted_at"]
    assert r0["user_handler_calls"] == 1 and r1["user_handler_calls"] == 0


@multiprocess
def test_sigterm_before_the_guard_is_picked_up_from_jax_preemption_service(tmp_path):
    """JAX's native handler swallows a SIGTERM sent before the guard; its job-wide notice
    still makes every process save the same step."""
    job = run_job(WORKER + ["--dir", str(tmp_path / "ckpt"), "--steps", "400",
                            "--step-delay", "0.05", "--term-before-guard"]).check()
    r0, r1 = job.worker_results()
    assert r0["jax_service"]
    assert "notice (JAX preemption service notice)" in job.output
    assert r0["preempted_at"] is not None and r1["preempted_at"] == r0["preempted_at"]
    assert r0["steps"] == r1["steps"] == [r0["preempted_at"]]


# ------------------------------------------------------------------ in this process
@pytest.mark.fast
def test_guard_restores_the_previous_handler_and_chains_to_it():
    calls = []

    def mine(signum, _frame):
        calls.append(signum)

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with PreemptionGuard("unit") as guard:
            assert signal.getsignal(signal.SIGTERM) is not mine
            assert guard.reached_sync_point(1) is False
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs in the main thread, between bytecodes
            assert calls == [signal.SIGTERM]  # chained
            assert guard.reached_sync_point(2) is True  # single process: the next step
            assert guard.sync_step == 2
            assert guard.reached_sync_point(3) is False  # one preemption per guard
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.fast
def test_guard_keeps_detection_when_user_code_replaces_its_handler(caplog):
    calls = []
    before = signal.getsignal(signal.SIGTERM)
    try:
        with PreemptionGuard("unit") as guard:
            guard.reached_sync_point(1)
            signal.signal(signal.SIGTERM, lambda s, _f: calls.append(s))
            with caplog.at_level("WARNING", logger="distckpt.multihost.preemption"):
                assert guard.reached_sync_point(2) is False
            assert "was replaced by" in caplog.text
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert calls == [signal.SIGTERM]
            assert guard.reached_sync_point(3) is True
        assert signal.getsignal(signal.SIGTERM) is not before  # the user's handler stays
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.fast
def test_guard_restores_a_native_handler_python_cannot_see():
    """Like JAX's notifier: installed below Python, so signal.getsignal says SIG_DFL."""
    import ctypes

    from distckpt.multihost.preemption import _address, _read_action

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    libc = ctypes.CDLL(None)
    libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
    try:
        libc.signal(signal.SIGTERM, 1)  # SIG_IGN, set natively
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # Python's stale view
        with PreemptionGuard("unit"):
            assert _address(_read_action(signal.SIGTERM)) not in (0, 1)
        assert _address(_read_action(signal.SIGTERM)) == 1  # the native handler is back
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.fast
def test_a_second_active_guard_is_refused():
    with PreemptionGuard("unit"):
        with pytest.raises(RuntimeError, match="another PreemptionGuard"):
            with PreemptionGuard("unit"):
                pass
    with PreemptionGuard("unit"):  # after the first exited, fine
        pass


@pytest.mark.fast
def test_guard_must_be_entered_in_the_main_thread():
    errors = []

    def enter():
        try:
            with PreemptionGuard("unit"):
                pass
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]
