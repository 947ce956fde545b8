"""Start N processes on this machine as N simulated hosts of one JAX job.

Each process gets ``JAX_COORDINATOR_ADDRESS`` (a free port on 127.0.0.1),
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=M``, so a program that calls
:func:`distckpt.initialize` runs exactly as it would with one process per host
on a real cluster. Output lines are prefixed ``[host i]``.

If any process exits non-zero the others are stopped (SIGTERM, then SIGKILL
after a grace period) and the launch fails with that exit code: a multi-host
job whose peer died would otherwise hang in its next collective. SIGINT and
SIGTERM sent to the launcher are forwarded to every process (a distckpt job takes
SIGTERM as a preemption notice: it saves and exits). A second SIGINT or SIGTERM (a
second Ctrl-C on a job that does not stop) SIGKILLs every host at once and the launch
exits 128 + N.

Each host runs in its own process group (session). However the launch ends (every
host done, a failure, the timeout, a signal, an exception in the launcher such as a
test's SIGALRM timeout), every host's whole process group is SIGKILLed and every
host reaped before :func:`launch` returns or raises, so nothing a host started
outlives the launch.

Launched from a virtual environment, the hosts find its ``bin`` directory first on
``PATH`` (``.venv/bin/distckpt launch -- python x.py`` runs the environment's Python
without activating it).

Gloo prints one ``[Gloo] Rank N is connected to M peer ranks`` line per host and
collective group; those are dropped from the output unless ``show_gloo`` (the CLI's
``-v``/``--verbose``, or ``DISTCKPT_SHOW_GLOO=1``). Every other line is kept.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

GLOO_CONNECTED = re.compile(r"^\[Gloo\] Rank \d+ is connected to \d+ peer ranks")
"""Gloo's per-connection notice, hidden unless asked for."""
_GLOO_PIECES = re.compile(r"\[Gloo\] Rank|is connected to|peer ranks\. Expected number of "
                          r"connected peer ranks is :|peer ranks|\d+|\s+")
"""What Gloo's notices are made of: several threads print them at once, so a line may be
pieces of several ("[Gloo] Rank 1[Gloo] Rank  is connected to ...", " peer ranks.
Expected number of connected peer ranks is : 1")."""

SHOW_GLOO_ENV = "DISTCKPT_SHOW_GLOO"
HOST_ENV = "DISTCKPT_HOST"
"""The simulated machine's name (``host<slot>``), read by the local checkpoint tier."""


def gloo_notice(line: str) -> bool:
    """Whether `line` is Gloo's connection notice, or pieces of several and nothing else.

    >>> gloo_notice("[Gloo] Rank 1[Gloo] Rank  is connected to 01[Gloo] Rank 0 is connected"
    ...             " to 1 peer ranks. Expected number of connected peer ranks is : 1")
    True
    >>> gloo_notice(" peer ranks. Expected number of connected peer ranks is : 1")
    True
    >>> gloo_notice("step 1 [Gloo] Rank 0 is connected to 1 peer ranks"), gloo_notice("12")
    (False, False)
    """
    if GLOO_CONNECTED.match(line):
        return True
    return (("[Gloo] Rank" in line or "Expected number of connected peer ranks" in line)
            and not _GLOO_PIECES.sub("", line))


class LaunchError(ValueError):
    """The command could not be started (not found, not executable); nothing is running."""

    def __init__(self, message: str, returncode: int = 127):
        super().__init__(message)
        self.returncode = returncode
        """The exit status a shell gives: 127 not found, 126 not executable."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_env(process_id: int, num_processes: int, devices_per_host: int, port: int,
             base: Mapping[str, str] | None = None, slot: int | None = None) -> dict[str, str]:
    """The environment of simulated host `process_id`, running on machine `slot`
    (default: the same number). ``DISTCKPT_HOST=host<slot>`` names the machine, as a
    hostname does on a cluster: a local checkpoint tier keyed by it stays with the
    machine when process ids change between launches.

    Run from a virtual environment (``.venv/bin/distckpt launch``, activated or not), the
    environment's ``bin`` directory comes first on ``PATH``, so ``-- python x.py`` runs
    the environment's Python, the one distckpt is installed in."""
    env = dict(os.environ if base is None else base)
    if sys.prefix != sys.base_prefix:  # a virtual environment's launcher: its python first
        venv_bin = os.path.dirname(sys.executable)
        path = env.get("PATH", os.defpath)
        if path.split(os.pathsep)[0] != venv_bin:
            env["PATH"] = venv_bin + os.pathsep + path
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_host}")
    env.update({
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(process_id),
        HOST_ENV: f"host{process_id if slot is None else slot}",
        "JAX_PLATFORMS": env.get("JAX_PLATFORMS", "cpu") or "cpu",
        "XLA_FLAGS": " ".join(flags),
        "PYTHONUNBUFFERED": "1",
    })
    return env


@dataclasses.dataclass
class LaunchResult:
    """How a launch ended."""

    returncode: int
    """0 if every process exited 0, else the first failure's code (-N for signal N)."""
    returncodes: list[int | None]
    """Each host's exit code (None if it had to be killed and never reported)."""
    first_failure: int | None
    """Index of the host that failed first, if any."""
    seconds: float
    forwarded: tuple[int, ...] = ()
    """Signals the launcher received and passed on to every host (SIGINT, SIGTERM)."""


def launch(
    command: Sequence[str],
    hosts: int,
    devices_per_host: int,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout_s: float | None = None,
    grace_s: float = 10.0,
    out: TextIO | None = None,
    line_callback: Callable[[int, str], None] | None = None,
    forward_signals: bool = True,
    on_start: Callable[[list[int]], None] | None = None,
    show_gloo: bool | None = None,
    process_ids: Sequence[int] | None = None,
) -> LaunchResult:
    """Run `command` as `hosts` processes with `devices_per_host` CPU devices each.

    `on_start(pids)`, if given, is called once every process has started, with their
    pids by host index (tests use it to signal one host directly). `show_gloo` keeps
    Gloo's connection lines in `out` (default: ``DISTCKPT_SHOW_GLOO=1`` in the
    environment); `line_callback` sees every line either way. `process_ids` gives the
    JAX process id of each machine slot (a permutation of ``range(hosts)``; default the
    identity): real clusters do not keep process ids stable across restarts. Host
    indices in output, pids and return codes are slots. Raises :class:`LaunchError`
    when the command cannot be started.
    """
    if show_gloo is None:
        show_gloo = os.environ.get(SHOW_GLOO_ENV, "") not in ("", "0")
    if hosts < 1 or devices_per_host < 1:
        raise ValueError(f"need hosts >= 1 and devices per host >= 1, got {hosts}x"
                         f"{devices_per_host}")
    if not command:
        raise ValueError("no command to launch; usage: distckpt launch --hosts N -- CMD ARGS...")
    ids = list(range(hosts)) if process_ids is None else [int(i) for i in process_ids]
    if sorted(ids) != list(range(hosts)):
        raise ValueError(f"process_ids must be a permutation of 0..{hosts - 1}, got {ids}")
    out = out or sys.stdout
    port = free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    try:
        for i in range(hosts):
            procs.append(subprocess.Popen(
                list(command), env=host_env(ids[i], hosts, devices_per_host, port, env, slot=i),
                cwd=cwd,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                start_new_session=True))
    except OSError as e:
        _kill_and_reap(procs, 0.0)
        if isinstance(e, FileNotFoundError) and cwd is not None and not os.path.isdir(cwd):
            why = f"working directory {cwd} does not exist"
        elif isinstance(e, FileNotFoundError):
            why = "no such program; check the name or give its full path"
        elif isinstance(e, PermissionError):
            why = "permission denied; make it executable (chmod +x) or run it with its interpreter"
        else:
            why = f"{e.strerror or e}"
        raise LaunchError(f"cannot start {command[0]!r}: {why}",
                          126 if isinstance(e, PermissionError) else 127) from e

    def pump(i: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if show_gloo or not gloo_notice(line):
                with lock:
                    out.write(f"[host {i}] {line}\n")
                    out.flush()
            if line_callback is not None:
                line_callback(i, line)

    def signal_all(sig: int) -> None:
        for p in procs:
            if p.returncode is None:  # not reaped, so the group id is still this host's
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    stopped_by: list[int] = []
    forwarded: list[int] = []
    escalated: list[int] = []

    def forward(sig: int) -> None:
        if forwarded:  # the second one: no more waiting for the hosts
            escalated.append(sig)
            stopped_by.append(sig)
            return
        forwarded.append(sig)
        signal_all(sig)

    pumps = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    previous = {}
    first_failure: int | None = None
    try:
        for t in pumps:
            t.start()
        if forward_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda s, _f: forward(s))
            # Left at their default, these would end the launcher at once and leave the hosts
            # (each in its own session) running: stop the hosts first, then exit 128 + N.
            for sig in (signal.SIGHUP, signal.SIGALRM):
                if signal.getsignal(sig) is signal.SIG_DFL:
                    previous[sig] = signal.signal(sig, lambda s, _f: stopped_by.append(s))
        if on_start is not None:
            on_start([p.pid for p in procs])
        deadline = None if timeout_s is None else t0 + timeout_s
        while True:
            codes = [_exit_code(p) for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and first_failure is None:
                first_failure = failed[0]
                break
            if all(c is not None for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                with lock:
                    out.write(f"[launcher] timed out after {timeout_s:g}s; stopping all hosts\n")
                first_failure = -1
                break
            if stopped_by:
                name = signal.Signals(stopped_by[0]).name
                with lock:
                    out.write(f"[launcher] got a second {name}; killing all hosts now\n"
                              if escalated else f"[launcher] got {name}; stopping all hosts\n")
                first_failure = -1
                break
            time.sleep(0.05)
        if first_failure is not None and not escalated:
            signal_all(signal.SIGTERM)
            end = time.monotonic() + grace_s
            while (time.monotonic() < end and not escalated
                   and any(_exit_code(p) is None for p in procs)):
                time.sleep(0.05)
    finally:
        # Every path (done, failed, timed out, an exception such as a test timeout's
        # SIGALRM): kill whatever is left of each host's process group, then reap the hosts.
        _kill_and_reap(procs, 1.0 if escalated else grace_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for t in pumps:
            if t.ident is not None:  # started
                t.join(timeout=5)
        for p in procs:
            if p.stdout is not None:
                p.stdout.close()
    codes = [p.returncode for p in procs]
    if first_failure is None:
        rc = 0
    elif first_failure == -1:
        rc = 128 + stopped_by[0] if stopped_by else 124
    else:
        rc = codes[first_failure] or 1
        with lock:
            out.write(f"[launcher] host {first_failure} exited with {rc}; stopped the others\n")
    return LaunchResult(returncode=rc, returncodes=codes,
                        first_failure=None if first_failure in (None, -1) else first_failure,
                        seconds=time.monotonic() - t0, forwarded=tuple(forwarded))


def _exit_code(p: subprocess.Popen) -> int | None:
    """`p`'s exit code (-N for signal N) without reaping it where the OS allows.

    An unreaped host keeps its pid, so its process group id cannot be handed to another
    process before :func:`_kill_and_reap` signals the group.
    """
    if p.returncode is not None or not hasattr(os, "waitid"):
        return p.poll()
    try:
        info = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return p.poll()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _kill_and_reap(procs: Sequence[subprocess.Popen], wait_s: float) -> None:
    """SIGKILL each host's whole process group (its children too), then reap each host."""
    for p in procs:
        if p.returncode is None:  # not reaped yet, so the group id is still ours
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for p in procs:
        try:
            p.wait(timeout=max(wait_s, 1.0))
        except subprocess.TimeoutExpired:  # stuck in the kernel (D state); nothing more to do
            pass
