"""The local multi-host launcher: environment, prefixes, failure and signal handling."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from distckpt.tools.launcher import launch

PY = sys.executable


def test_each_host_gets_its_environment_and_prefix():
    buf = io.StringIO()
    code = ("import os; print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], "
            "os.environ['JAX_COORDINATOR_ADDRESS'].startswith('127.0.0.1:'), "
            "os.environ['XLA_FLAGS'].split()[-1])")
    result = launch([PY, "-c", code], 3, 4, out=buf, forward_signals=False)
    assert result.returncode == 0 and result.returncodes == [0, 0, 0]
    lines = sorted(buf.getvalue().splitlines())
    assert lines == [f"[host {i}] {i} 3 True --xla_force_host_platform_device_count=4"
                     for i in range(3)]


def test_python_is_the_virtual_environments_without_activating_it(tmp_path):
    """Found as a newcomer: `.venv/bin/distckpt launch -- python examples/quickstart.py`
    without activating the environment ran the system's Python ("No module named 'jax'")."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the launcher only does this from a virtual environment; this test "
                    "runs outside one")
    env = {**os.environ, "PATH": os.pathsep.join(
        p for p in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if os.path.realpath(p) != os.path.realpath(os.path.dirname(PY)))}  # not activated
    res = subprocess.run([PY, "-m", "distckpt.tools.cli", "launch", "--hosts", "2", "--",
                          "python", "-c", "import sys, jax; print(sys.prefix)"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(res.stdout.splitlines()) == [f"[host {i}] {sys.prefix}" for i in (0, 1)]


def test_one_failure_stops_the_others_and_fails_the_launch():
    buf = io.StringIO()
    code = ("import os, sys, time\n"
            "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
            "time.sleep(120)")
    t0 = time.monotonic()
    result = launch([PY, "-c", code], 3, 1, out=buf, forward_signals=False, grace_s=5)
    assert time.monotonic() - t0 < 60
    assert result.returncode == 3 and result.first_failure == 1
    assert result.returncodes[0] != 0 and result.returncodes[2] != 0  # stopped, not finished
    assert "host 1 exited with 3" in buf.getvalue()


def test_sigterm_is_forwarded_to_every_host(tmp_path):
    code = ("import os, signal, sys, time, pathlib\n"
            "d = pathlib.Path(sys.argv[1]); i = os.environ['JAX_PROCESS_ID']\n"
            "def bye(*_):\n"
            "    (d / f'term{i}').write_text('x'); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\n"
            "(d / f'ready{i}').write_text('x')\n"
            "time.sleep(120)")
    proc = subprocess.Popen([PY, "-m", "distckpt.tools.cli", "launch", "--hosts", "2", "--", PY, "-c",
                             code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline, "hosts never became ready"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (tmp_path / "term0").exists() and (tmp_path / "term1").exists()


def test_cli_usage_errors():
    env = {**os.environ}
    res = subprocess.run([PY, "-m", "distckpt.tools.cli", "launch", "--hosts", "2"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "give the command after '--'" in res.stderr
    res = subprocess.run([PY, "-m", "distckpt.tools.cli", "launch", "--hosts", "0", "--", "true"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and ">= 1" in res.stderr


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that may never come counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


# Each host starts a child in its process group that ignores SIGTERM (and holds no pipe to
# the launcher), writes both pids, and exits on SIGTERM itself: only a SIGKILL to the whole
# group stops that child.
_FAMILY = ("import os, signal, subprocess, sys, time, pathlib\n"
           "d = pathlib.Path(sys.argv[1]); i = os.environ['JAX_PROCESS_ID']\n"
           "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
           "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'], "
           "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
           "(d / f'pids{i}').write_text(f'{os.getpid()} {child.pid}')\n"
           "time.sleep(600)")


def _family_pids(d, hosts: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while not all((d / f"pids{i}").exists() for i in range(hosts)):
        assert time.monotonic() < deadline, "hosts never started"
        time.sleep(0.05)
    time.sleep(0.2)  # the children install their SIGTERM handler
    return [int(p) for i in range(hosts) for p in (d / f"pids{i}").read_text().split()]


def _assert_all_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in pids if _alive(p)] == []


def test_timed_out_launch_leaves_no_process_alive(tmp_path):
    buf = io.StringIO()
    got: list[int] = []
    result = launch([PY, "-c", _FAMILY, str(tmp_path)], 2, 1, out=buf, forward_signals=False,
                    timeout_s=3, grace_s=1,
                    on_start=lambda _pids: got.extend(_family_pids(tmp_path, 2)))
    assert result.returncode == 124 and "timed out after 3s" in buf.getvalue()
    assert result.seconds < 60
    assert all(code is not None for code in result.returncodes)  # every host reaped
    assert len(got) == 4
    _assert_all_gone(got, timeout=1)


def test_an_exception_in_the_launcher_leaves_no_process_alive(tmp_path):
    """A test harness's SIGALRM timeout raises inside launch(): nothing may leak."""
    class Alarm(Exception):
        pass

    def on_alarm(_sig, _frame):
        raise Alarm

    got: list[int] = []
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with pytest.raises(Alarm):
            launch([PY, "-c", _FAMILY, str(tmp_path)], 2, 1, out=io.StringIO(),
                   forward_signals=True, grace_s=1,
                   on_start=lambda _pids: (got.extend(_family_pids(tmp_path, 2)),
                                           signal.setitimer(signal.ITIMER_REAL, 0.5)))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(got) == 4
    _assert_all_gone(got, timeout=1)


def test_sigalrm_to_the_cli_launcher_stops_every_host(tmp_path):
    proc = subprocess.Popen([PY, "-m", "distckpt.tools.cli", "launch", "--hosts", "2", "--", PY, "-c",
                             _FAMILY, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    got = _family_pids(tmp_path, 2)
    proc.send_signal(signal.SIGALRM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGALRM, out
    assert "got SIGALRM; stopping all hosts" in out
    _assert_all_gone(got, timeout=1)


def test_a_second_ctrl_c_kills_hosts_that_do_not_stop(tmp_path):
    # Hosts that note the first SIGINT and go on (a job stuck in a collective, or one
    # saving for longer than the user will wait): the second SIGINT kills them all.
    code = ("import os, signal, sys, time, pathlib\n"
            "d = pathlib.Path(sys.argv[1]); i = os.environ['JAX_PROCESS_ID']\n"
            "signal.signal(signal.SIGINT, lambda *_: (d / f'got{i}').write_text('x'))\n"
            "(d / f'pids{i}').write_text(str(os.getpid()))\n"
            "time.sleep(600)")
    proc = subprocess.Popen([PY, "-m", "distckpt.tools.cli", "launch", "--hosts", "2", "--", PY,
                             "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"pids{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline, "hosts never started"
        time.sleep(0.05)
    pids = [int((tmp_path / f"pids{i}").read_text()) for i in range(2)]
    proc.send_signal(signal.SIGINT)
    while not all((tmp_path / f"got{i}").exists() for i in range(2)):  # forwarded, ignored
        assert time.monotonic() < deadline, "the first SIGINT was not forwarded"
        time.sleep(0.05)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "got a second SIGINT; killing all hosts now" in out
    _assert_all_gone(pids, timeout=1)


@pytest.mark.slow  # cosmetic output
def test_gloo_connection_lines_are_hidden_unless_asked(tmp_path):
    # Real gloo: two hosts initialise jax.distributed and run one collective.
    code = ("from distckpt.multihost import coordinator; import jax.numpy as jnp\n"
            "from jax.experimental import multihost_utils\n"
            "coordinator.initialize()\n"
            "print('sum', multihost_utils.process_allgather(jnp.ones(1)).sum())")
    res = subprocess.run([PY, "-m", "distckpt.tools.cli", "launch", "--hosts", "2", "--", PY, "-c",
                          code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[host 0] sum 2.0" in res.stdout and "[host 1] sum 2.0" in res.stdout
    assert "[Gloo]" not in res.stdout
    # Asked for (the API flag, the CLI's --verbose or the environment): every line kept.
    line = "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks"
    printer = [PY, "-c", f"print({line!r}); print('other')"]
    buf = io.StringIO()
    assert launch(printer, 1, 1, out=buf, forward_signals=False).returncode == 0
    assert buf.getvalue() == "[host 0] other\n"
    # Gloo's threads print at once: lines made of pieces of several notices, seen in a
    # launch of examples/quickstart.py, are hidden too; a line with anything else is kept.
    garbled = ["[Gloo] Rank 1[Gloo] Rank  is connected to [Gloo] Rank 1 is connected to 01"
               "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected "
               "peer ranks is : 1", " peer ranks. Expected number of connected peer ranks is : 1",
               "1 peer ranks. Expected number of connected peer ranks is : 1",
               "saved step 3 [Gloo] Rank 0 is connected to 1 peer ranks"]
    buf = io.StringIO()
    assert launch([PY, "-c", f"print(*{garbled!r}, sep=chr(10))"], 1, 1, out=buf,
                  forward_signals=False).returncode == 0
    assert buf.getvalue() == f"[host 0] {garbled[-1]}\n"
    buf = io.StringIO()
    assert launch(printer, 1, 1, out=buf, forward_signals=False, show_gloo=True).returncode == 0
    assert buf.getvalue() == f"[host 0] {line}\n[host 0] other\n"
    for args, env in [(["launch", "--verbose"], {}), (["launch"], {"DISTCKPT_SHOW_GLOO": "1"})]:
        res = subprocess.run([PY, "-m", "distckpt.tools.cli", *args, "--hosts", "1", "--", *printer],
                             capture_output=True, text=True, env={**os.environ, **env})
        assert res.returncode == 0 and res.stdout == f"[host 0] {line}\n[host 0] other\n", args
