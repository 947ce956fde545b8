"""The local tier: real processes through the launcher (gloo on CPU), real files, JAX's
transfer server between the processes; nothing mocked.

One 4x2 job saves steps 1..6 (a local step every step, a persistent one every 4th), then
host 2 is SIGKILLed (the job dies with it), and every test restores from its own copy of
what it left: a lost host fed by its peer, a
host lost with its peer, a topology change, corrupted local bytes. A 2-host job checks
that permuted process ids still restore locally. The plan every host computes
(:func:`choose`) is checked against Hypothesis-generated losses.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distckpt.checkpoint.local_restore import choose
from distckpt.state.process_state import FaultPoint
from distckpt.tools.launcher import launch
from distckpt.tools.plan import plan_restore
from tests.local_copies import flip_a_shard_byte

WORKER = str(Path(__file__).parent / "tier_worker.py")
ROOT = str(Path(__file__).parent.parent)


def run(workdir: Path, phase: str, hosts: int, devices: int, *args: str,
        process_ids=None, expect_rc: int = 0) -> str:
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    for old in out.glob("restored.*.json"):
        old.unlink()
    buf = io.StringIO()
    result = launch([sys.executable, WORKER, phase, str(out), "--dir", str(workdir / "ckpt"),
                     "--local", str(workdir / "local" / "{host}"), *args], hosts, devices,
                    out=buf, timeout_s=600, forward_signals=False, process_ids=process_ids,
                    env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == expect_rc, buf.getvalue()[-6000:]
    return buf.getvalue()


def restored(workdir: Path, hosts: int) -> list[dict]:
    return [json.loads((workdir / "out" / f"restored.{i}.json").read_text())
            for i in range(hosts)]


def saved_fingerprint(workdir: Path, step: int) -> dict:
    return json.loads((workdir / "out" / "saved.json").read_text())["fingerprints"][str(step)]


def tree_state(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def saved_4x2(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tier4x2")
    run(work, "save", 4, 2, "--lose", "2", expect_rc=-9)  # host 2 SIGKILLed after step 6
    return work


@pytest.fixture
def job(saved_4x2, tmp_path) -> Path:
    work = tmp_path / "job"
    shutil.copytree(saved_4x2, work)
    return work


def test_replaced_host_gets_its_shards_from_its_peer(job):
    persistent = tree_state(job / "ckpt")
    assert sorted(p.name for p in (job / "ckpt").iterdir() if p.name.isdigit()) == ["4"]
    shutil.rmtree(job / "local" / "host2")  # host 2 replaced: an empty local directory
    plan = plan_restore(job / "ckpt", "4x2:data=2,fsdp=4",
                        local_directory=str(job / "local" / "{host}"))
    run(job, "restore", 4, 2)
    got = restored(job, 4)
    # The plan, before any data was read, said what the restore then did, bytes exactly.
    assert plan.step == 6 and [h.tier for h in plan.hosts] == got[0]["restored_from"]
    assert [h.bytes for h in plan.hosts] == [r["read_bytes"] for r in got]
    assert {r["step"] for r in got} == {6}
    assert [r["restored_from"] for r in got] == [["local", "local", "peer", "local"]] * 4
    assert {r["tier"] for r in got} == {"peer"}
    assert all(r["fingerprint"] == saved_fingerprint(job, 6) for r in got)
    assert [r["process_state"] for r in got] == [{"process": i, "pos": 60} for i in range(4)]
    assert tree_state(job / "ckpt") == persistent  # the persistent tier untouched


def test_every_host_reads_its_own_copy(job):
    run(job, "restore", 4, 2, "--read-only")
    got = restored(job, 4)
    assert [r["restored_from"] for r in got] == [["local"] * 4] * 4
    assert all(r["step"] == 6 and r["fingerprint"] == saved_fingerprint(job, 6) for r in got)


@pytest.mark.slow  # an acceptance variant; CI's slow pass runs it
def test_host_lost_with_its_peer_falls_back_to_persistent(job):
    for host in ("host2", "host3"):  # host 3 holds host 2's copy
        shutil.rmtree(job / "local" / host)
    plan = plan_restore(job / "ckpt", "4x2:data=2,fsdp=4",
                        local_directory=str(job / "local" / "{host}"))
    assert plan.step == 4 and {h.tier for h in plan.hosts} == {"persistent"}
    run(job, "restore", 4, 2)
    got = restored(job, 4)
    assert all(r["step"] == 4 and r["tier"] == "persistent" for r in got)
    assert all(r["fingerprint"] == saved_fingerprint(job, 4) for r in got)


def test_topology_change_reads_persistent(job):
    run(job, "restore", 2, 4, "--mesh", "data=2,fsdp=4", "--other-hosts")
    got = restored(job, 2)
    assert all(r["step"] == 4 and r["tier"] == "persistent" for r in got)
    assert all(r["fingerprint"] == saved_fingerprint(job, 4) for r in got)


def test_corrupt_local_copy_is_never_restored(job):
    flip_a_shard_byte(job / "local" / "host1" / "6" / "own")
    out = run(job, "restore", 4, 2, "--read-only")
    got = restored(job, 4)
    assert "differs from what was saved" in out
    assert all(r["step"] == 5 and r["tier"] == "local" for r in got)  # the next local step
    assert all(r["fingerprint"] == saved_fingerprint(job, 5) for r in got)


@pytest.mark.slow  # an acceptance variant; CI's slow pass runs it
def test_permuted_process_ids_still_restore_locally(tmp_path):
    run(tmp_path, "save", 2, 2, "--mesh", "data=2,fsdp=2")
    run(tmp_path, "restore", 2, 2, "--mesh", "data=2,fsdp=2", process_ids=[1, 0])
    got = restored(tmp_path, 2)
    assert [r["machine"] for r in got] == ["host1", "host0"]
    assert all(r["restored_from"] == ["local", "local"] and r["step"] == 6 for r in got)
    assert all(r["fingerprint"] == saved_fingerprint(tmp_path, 6) for r in got)
    # Each process gets the state its process index saved, wherever it runs now.
    assert [r["process_state"] for r in got] == [{"process": i, "pos": 60} for i in range(2)]


LOCAL_POINTS = [p for p in FaultPoint if p.value.startswith("local:")]


def _crash_then_restore(tmp_path: Path, point: FaultPoint) -> None:
    out = run(tmp_path, "save", 2, 2, "--mesh", "data=2,fsdp=2", "--kill-at", point.value,
              expect_rc=-9)
    assert f"KILL at {point.value} step 6" in out
    copies = [*(tmp_path / "local").glob("*/*/own"), *(tmp_path / "local").glob("*/*/peer-*")]
    assert all((c / "record.json").is_file() for c in copies)  # a final name means complete
    run(tmp_path, "restore", 2, 2, "--mesh", "data=2,fsdp=2", "--read-only")
    got = restored(tmp_path, 2)
    step = got[0]["step"]
    assert {r["step"] for r in got} == {step} and step >= 4
    assert all(r["fingerprint"] == saved_fingerprint(tmp_path, step) for r in got)
    assert all(r["verified"] for r in got)


@pytest.mark.slow
@pytest.mark.parametrize("point", LOCAL_POINTS, ids=[p.value for p in LOCAL_POINTS])
def test_killed_at_every_point_of_a_local_save(tmp_path, point):
    """SIGKILL one host at each point of a local save and of its peer copy (the launcher
    then stops the other): the restart restores a step that checks out, never a torn one."""
    _crash_then_restore(tmp_path, point)


# ---------------------------------------------------------------------- the plan
JOB = {"process_count": 0, "devices_per_process": 2, "directory": "d"}


def inventories(n: int, steps: list[int], lost: set[int], order: list[int]):
    """What n hosts hold after saving `steps` with ring peer copies, once the machines in
    `lost` came back empty; `order[c]` is the machine process c now runs on."""
    job = {**JOB, "process_count": n}
    by_machine = []
    for m in range(n):
        if m in lost:
            by_machine.append({"uid": f"new{m}", "own": {}, "peer": {}})
            continue
        pred = (m - 1) % n
        by_machine.append({
            "uid": f"u{m}",
            "own": {str(s): {"role": m, "owner": f"u{m}", "job": job, "name": "own"}
                    for s in steps},
            "peer": {str(s): [{"role": pred, "owner": f"u{pred}", "job": job,
                               "name": f"peer-u{pred}"}] for s in steps} if n > 1 else {}})
    return [by_machine[m] for m in order], job


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(
    st.just(n), st.sets(st.integers(0, n - 1)), st.permutations(range(n)))))
def test_plan_covers_every_role_or_falls_back(case):
    n, lost, order = case
    invs, job = inventories(n, [5, 6], lost, list(order))
    plan = choose(invs, job, newest_persistent=4)
    # A role survives if its machine or its ring successor (which holds its copy) survives.
    recoverable = all(q not in lost or (n > 1 and (q + 1) % n not in lost) for q in range(n))
    assert (plan is not None) == recoverable, (n, lost, order, plan)
    if plan is None:
        return
    assert plan["step"] == 6
    assert sorted(plan["roles"]) == list(range(n))
    for c, (role, src) in enumerate(zip(plan["roles"], plan["sources"], strict=True)):
        machine = order[c]
        if src[0] == "own":
            assert machine not in lost and role == machine
        elif src[0] == "fetch":
            holder_machine = order[src[1]]
            assert holder_machine == (role + 1) % n and holder_machine not in lost
        else:  # a peer copy this host holds itself
            assert machine == (role + 1) % n


def test_plan_prefers_a_newer_persistent_step():
    invs, job = inventories(2, [5, 6], set(), [0, 1])
    assert choose(invs, job, newest_persistent=7) is None
    assert choose(invs, job, newest_persistent=6)["step"] == 6
    assert choose(invs, job, newest_persistent=None, step=5)["step"] == 5
    other = {**job, "process_count": 3}
    assert choose(invs, other, newest_persistent=None) is None  # another job shape


@pytest.mark.multiprocess
def test_peer_copy_pulled_in_groups_is_checked_group_by_group(tmp_path, run_hosts):
    """A copy offered in many groups (zero-size shards among them, small shards packed
    together) arrives bit for bit; one byte changed after its CRC was taken is refused,
    naming the shard, whether it travelled alone or in a pack."""
    out = tmp_path / "peers"
    run_hosts(2, 1, "peers", str(out), "--steps", "7").check()
    got = json.loads((tmp_path / "peers.1").read_text())
    assert got["intact"]["groups"] > 3 and all(got["intact"]["equal"]), got
    kinds = {"pack" if "pack" in u else "array" for u in got["intact"]["units"]}
    assert kinds == {"pack", "array"}, got  # both ways of travelling are exercised
    assert "leaf4 box [[0, 33], [0, 33]] differs from what was saved" in \
        got["flipped"]["error"], got
    assert "leaf0 box [[0, 100], [0, 7]] differs from what was saved" in \
        got["flipped-packed"]["error"], got


@pytest.mark.multiprocess
def test_peer_copy_does_not_wait_behind_a_training_step(tmp_path, run_hosts):
    """Host 0 has a step in flight whose all-reduce needs host 1 when it offers its copy;
    host 1 pulls before joining that step. Offered and pulled on a device training used,
    the pull waited behind the step, which waited for host 1: the job hung (in test_tiers'
    4x2 fixture, 4 runs in 21). Now the pull arrives and the step runs."""
    out = tmp_path / "order"
    run_hosts(2, 2, "peerorder", str(out), "--timeout", "30", timeout=180).check()
    got = json.loads((tmp_path / "order.1").read_text())
    assert got.get("equal") is True, got


@pytest.mark.slow  # a leak check over many saves
@pytest.mark.multiprocess
def test_offers_nobody_pulls_do_not_pile_up_in_memory(tmp_path, run_hosts):
    """A transfer server holds an offered copy until it is pulled. A host whose RAM disk
    is full still pulls its predecessor's offers (they piled up, one per local save,
    before); an offer left unpulled past the timeout is freed with the server at the
    next offer, and that next offer still arrives."""
    out = tmp_path / "offers"
    run_hosts(2, 2, "offers", str(out), "--dir", str(tmp_path / "ckpt"), "--mesh", "fsdp=4",
              "--timeout", "2", timeout=240).check()
    sender = json.loads((tmp_path / "offers.0").read_text())
    receiver = json.loads((tmp_path / "offers.1").read_text())
    assert sender["pending"] == 0, sender  # 3 without the drain: steps 2-4 never pulled
    assert [s for s, _ in receiver["failures"]] == [2, 3, 4], receiver
    assert all("RAM disk full" in why for _, why in receiver["failures"]), receiver
    assert sender["failures"] == [], sender
    assert sender["replaced"] == 1 and sender["pending_after"] == 0, sender
    assert receiver["second_equal"] is True, receiver
    assert receiver["first"] != "pulled", receiver  # freed with the old server
