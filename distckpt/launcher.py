"""Start N processes on this machine as N simulated hosts of one JAX job.

Each process gets ``JAX_COORDINATOR_ADDRESS`` (a free port on 127.0.0.1),
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=M``, so a program that calls
:func:`distckpt.initialize` runs exactly as it would with one process per host
on a real cluster. Output lines are prefixed ``[host i]``.

If any process exits non-zero the others are stopped (SIGTERM, then SIGKILL
after a grace period) and the launch fails with that exit code: a multi-host
job whose peer died would otherwise hang in its next collective. SIGINT and
SIGTERM sent to the launcher are forwarded to every process.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_env(process_id: int, num_processes: int, devices_per_host: int, port: int,
             base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of simulated host `process_id`."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_host}")
    env.update({
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(process_id),
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
) -> LaunchResult:
    """Run `command` as `hosts` processes with `devices_per_host` CPU devices each.

    `on_start(pids)`, if given, is called once every process has started, with their
    pids by host index (tests use it to signal one host directly).
    """
    if hosts < 1 or devices_per_host < 1:
        raise ValueError(f"need hosts >= 1 and devices per host >= 1, got {hosts}x"
                         f"{devices_per_host}")
    if not command:
        raise ValueError("no command to launch; usage: distckpt launch --hosts N -- CMD ARGS...")
    out = out or sys.stdout
    port = free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    for i in range(hosts):
        procs.append(subprocess.Popen(
            list(command), env=host_env(i, hosts, devices_per_host, port, env), cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            start_new_session=True))

    def pump(i: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            with lock:
                out.write(f"[host {i}] {line}\n")
                out.flush()
            if line_callback is not None:
                line_callback(i, line)

    pumps = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    if on_start is not None:
        on_start([p.pid for p in procs])

    def signal_all(sig: int) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    previous = {}
    if forward_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda s, _f: signal_all(s))
    first_failure: int | None = None
    try:
        deadline = None if timeout_s is None else t0 + timeout_s
        while True:
            codes = [p.poll() for p in procs]
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
            time.sleep(0.05)
        if first_failure is not None:
            signal_all(signal.SIGTERM)
            end = time.monotonic() + grace_s
            while time.monotonic() < end and any(p.poll() is None for p in procs):
                time.sleep(0.05)
            signal_all(signal.SIGKILL)
        for p in procs:
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for t in pumps:
            t.join(timeout=5)
        for p in procs:
            if p.stdout is not None:
                p.stdout.close()
    codes = [p.poll() for p in procs]
    if first_failure is None:
        rc = 0
    elif first_failure == -1:
        rc = 124
    else:
        rc = codes[first_failure] or 1
        with lock:
            out.write(f"[launcher] host {first_failure} exited with {rc}; stopped the others\n")
    return LaunchResult(returncode=rc, returncodes=codes,
                        first_failure=None if first_failure in (None, -1) else first_failure,
                        seconds=time.monotonic() - t0)
