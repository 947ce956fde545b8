"""Barriers, decisions and gathers across real processes; cluster parameter precedence."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distckpt.multihost import coordinator


@pytest.mark.multiprocess
def test_barrier_timeout_names_missing_process(tmp_path, run_hosts):
    out = tmp_path / "barrier"
    timeout = 3.0
    job = run_hosts(3, 1, "barrier", str(out), "--absent", "1", "--timeout", str(timeout))
    job.check()
    for pid in (0, 2):
        got = json.loads((tmp_path / f"barrier.{pid}").read_text())
        assert got["decided"] == {"step": 42, "ok": True}
        assert got["gathered"] == [0, 10, 20]
        assert got["missing"] == [1], got["error"]
        assert "test:never-complete" in got["error"] and "did not arrive: 1" in got["error"]
        # It waited out its time limit. No upper bound (a loaded machine may be slow to
        # wake it): a barrier that outlived process 1's sleep would have ended the job
        # without this file, process 1 having left, and only a timeout names the missing.
        assert got["elapsed"] >= timeout * 0.99, got["elapsed"]


@pytest.mark.slow  # 150 gathers on 3 processes; the coordinator's other tests stay
@pytest.mark.multiprocess
def test_gathers_back_to_back_get_every_value_fresh(tmp_path, run_hosts):
    """A gather's value is deleted at the process's next gather (no second barrier):
    gathers under one name, alternating names and from two threads never see a value
    that is missing or stale."""
    out = tmp_path / "gathers"
    steps = 150
    run_hosts(3, 1, "gathers", str(out), "--steps", str(steps)).check()
    for pid in range(3):
        got = json.loads((tmp_path / f"gathers.{pid}").read_text())
        for kind in ("same", "alternating", "thread"):
            want = [[[i, p] for p in range(3)] for i in range(steps)]
            bad = [(i, g) for i, (g, w) in enumerate(zip(got[kind], want, strict=False))
                   if g != w]
            assert len(got[kind]) == steps and not bad, (pid, kind, bad[:5])


@pytest.mark.multiprocess
def test_decisions_under_one_name_never_read_an_earlier_value(tmp_path, run_hosts):
    """300 decisions named alike, back to back: a peer leaving one decision's barrier
    before the primary deleted its value used to read it again as the next one."""
    out = tmp_path / "decisions"
    run_hosts(2, 1, "decisions", str(out), "--steps", "300").check()
    for pid in (0, 1):
        got = json.loads((tmp_path / f"decisions.{pid}").read_text())
        stale = [(i, v) for i, v in enumerate(got) if v != i]
        assert not stale, f"process {pid} read earlier decisions' values: {stale[:10]}"


def _resolve_in_subprocess(env: dict[str, str], code: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
    clean.update(env)
    script = ("import json\nfrom distckpt.multihost import coordinator\n" + code)
    res = subprocess.run([sys.executable, "-c", script], env=clean, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_resolve_precedence_arguments_then_env_then_single():
    code = ("import dataclasses\n"
            "print(json.dumps([dataclasses.asdict(coordinator.resolve_cluster()),"
            "dataclasses.asdict(coordinator.resolve_cluster('h:9', 4, 3))]))")
    env_only, explicit = _resolve_in_subprocess(
        {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "8",
         "JAX_PROCESS_ID": "5"}, code)
    assert env_only == {"coordinator_address": "10.0.0.1:1234", "num_processes": 8,
                        "process_id": 5, "source": "environment"}
    assert explicit == {"coordinator_address": "h:9", "num_processes": 4, "process_id": 3,
                        "source": "arguments"}
    single = _resolve_in_subprocess({}, "import dataclasses\nprint(json.dumps("
                                    "dataclasses.asdict(coordinator.resolve_cluster())))")
    assert single["num_processes"] == 1 and single["source"] == "single process"


def test_incomplete_environment_is_an_actionable_error():
    code = ("try:\n    coordinator.resolve_cluster()\n    print(json.dumps('no error'))\n"
            "except ValueError as e:\n    print(json.dumps(str(e)))")
    msg = _resolve_in_subprocess({"JAX_COORDINATOR_ADDRESS": "h:1"}, code)
    assert "JAX_NUM_PROCESSES" in msg and "JAX_PROCESS_ID" in msg
    msg = _resolve_in_subprocess({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                  "JAX_PROCESS_ID": "2"}, code)
    assert "outside 0..1" in msg


@pytest.mark.fast
def test_single_process_helpers_need_no_service():
    assert coordinator.primary_decides("t", lambda: 7) == 7
    assert coordinator.all_gather("t", {"a": 1}) == [{"a": 1}]
    coordinator.barrier("t", timeout_s=1)
    assert coordinator.is_primary()
    with pytest.raises(ValueError, match="small values"):
        coordinator.primary_decides("big", lambda: "x" * (2 << 20))


@pytest.mark.fast
def test_missing_tasks_parsed_from_service_message():
    msg = ("DEADLINE_EXCEEDED: Barrier timed out. Id: b3::0. ...\n# of tasks that reached the "
           "barrier: 1/3.\nThe first task at the barrier: 0. Some timed out task names:\n1\n2\n\n")
    assert coordinator._missing_from_error(msg, 3) == [1, 2]
    assert coordinator._missing_from_error(
        "Some timed out task names:\n/job:jax_worker/replica:0/task:2\n", 3) == [2]


@pytest.mark.fast
def test_await_coordinator_returns_once_the_port_listens():
    # A process that called jax.distributed.initialize before process 0 had started the
    # coordination service lost gRPC's 1 s reconnect backoff at every (re)start.
    import socket
    import threading
    import time

    from distckpt.tools.launcher import free_port

    port = free_port()
    listener: list[socket.socket] = []

    def listen_later() -> None:
        time.sleep(0.3)
        sock = socket.create_server(("127.0.0.1", port))
        listener.append(sock)

    thread = threading.Thread(target=listen_later)
    thread.start()
    try:
        assert coordinator.await_coordinator(f"127.0.0.1:{port}", timeout_s=60)
        assert listener, "returned before the port listened"
    finally:
        thread.join()
        for sock in listener:
            sock.close()


@pytest.mark.fast
def test_await_coordinator_gives_up_and_leaves_the_error_to_jax():
    import time

    from distckpt.tools.launcher import free_port

    start = time.monotonic()
    assert not coordinator.await_coordinator("no-such-host.invalid:1234", timeout_s=60)
    # Not the whole timeout: the name cannot resolve (a resolver with unreachable servers
    # may take its own ~30 s to say so, still well under the 60 s).
    assert time.monotonic() - start < 55
    assert not coordinator.await_coordinator(f"127.0.0.1:{free_port()}", timeout_s=0.3)
