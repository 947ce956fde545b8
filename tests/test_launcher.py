"""The local multi-host launcher: environment, prefixes, failure and signal handling."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

from distckpt.launcher import launch

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
    proc = subprocess.Popen([PY, "-m", "distckpt.cli", "launch", "--hosts", "2", "--", PY, "-c",
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
    res = subprocess.run([PY, "-m", "distckpt.cli", "launch", "--hosts", "2"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "give the command after '--'" in res.stderr
    res = subprocess.run([PY, "-m", "distckpt.cli", "launch", "--hosts", "0", "--", "true"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and ">= 1" in res.stderr
