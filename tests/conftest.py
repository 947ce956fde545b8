"""Test harness: 8 simulated CPU devices in-process; real multi-process jobs via the launcher.

XLA_FLAGS must be set before jax initialises its backend, so it is set here, at import.
Multi-process tests start real processes with `distckpt.tools.launcher.launch` (each calls
`jax.distributed.initialize` with gloo collectives); nothing in the distributed layer,
Orbax or the filesystem is mocked.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import pytest  # noqa: E402

from distckpt.tools.launcher import launch  # noqa: E402

pytest_plugins = ["tests.s3_fixture"]  # a real SeaweedFS S3 server (tests/s3_fixture.py)

WORKER = str(Path(__file__).parent / "mp_worker.py")


class Job:
    def __init__(self, returncode: int, output: str, returncodes):
        self.returncode, self.output, self.returncodes = returncode, output, returncodes

    def check(self) -> Job:
        assert self.returncode == 0, f"job failed ({self.returncodes}):\n{self.output[-6000:]}"
        return self


@pytest.fixture(scope="session")
def run_hosts():
    """run_hosts(hosts, devices, *worker_args, timeout=...) -> Job (python tests/mp_worker.py)."""

    def run(hosts: int, devices: int, *args: str, timeout: float = 300, command=None) -> Job:
        buf = io.StringIO()
        cmd = command or [sys.executable, WORKER, *args]
        result = launch(cmd, hosts, devices, out=buf, timeout_s=timeout, forward_signals=False,
                        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        return Job(result.returncode, buf.getvalue(), result.returncodes)

    return run
