"""Read once per replica group (CheckpointOptions.restore_read_once), by real processes."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("hosts,devices,mesh", [
    (2, 2, "data=2,fsdp=2"),  # each process holds a whole replica
    pytest.param(4, 1, "data=2,fsdp=2", marks=pytest.mark.slow),  # pairs of processes hold the same half
])
def test_read_once_reads_the_unique_bytes_once(tmp_path, run_hosts, hosts, devices, mesh):
    out = tmp_path / "once"
    run_hosts(hosts, devices, "readonce", str(out), "--dir", str(tmp_path / "ckpt"),
              "--mesh", mesh, "--width", "1024").check()
    got = [json.loads((tmp_path / f"once.{p}").read_text()) for p in range(hosts)]
    unique = got[0]["unique"]
    assert got[0]["array_bytes"] > 16 << 20  # big enough that metadata reads are noise
    for mode in ("False", "True"):
        for g in got:
            for run in g["runs"][mode]:
                assert run["wrong_bytes"] == [] and run["wrong_sharding"] == [], (mode, run)
                assert run["verified"], mode
        # The target does replicate: some process holds replicas other than replica 0.
        assert sum(g["runs"][mode][0]["leaves_with_replicas"] for g in got) > 0

    def read(g, mode):  # the fewer bytes of the two runs (see scenario_readonce)
        return min(run["read"] for run in g["runs"][mode])

    every = sum(read(g, "False") for g in got)
    once = [read(g, "True") for g in got]
    # Without read-once both replicas are read from storage (about 2x unique); with it
    # the second one is not read at all. Beyond the unique bytes every process reads its
    # small files (commit record, provenance, Orbax and OCDBT metadata, per-process
    # records): measured 0.1 to 1.1 MiB a process; 2 MiB a process is allowed. Bounds are
    # on the read-once run and on the gap between the modes, never on timing; a run
    # without read-once that read less than 2x (an earlier run's bytes held in a cache)
    # only makes the gap bound stricter.
    metadata = 2 * 2**20 * hosts
    assert every >= 1.9 * unique, (every, unique)  # the test can tell the modes apart
    assert sum(once) <= 1.02 * unique + metadata, (every, once, unique)
    assert every - sum(once) >= 0.9 * unique - metadata, (every, once, unique)
    # ...and the reading is spread: each process reads its share of what it holds.
    assert max(once) <= 1.5 * unique / hosts, (once, unique)
    # A flipped byte in array data is still caught, on every process.
    for g in got:
        assert g["corrupt"] is not None, g
        assert g["corrupt"]["kind"] in ("corrupt", "unreadable"), g["corrupt"]
        # A read failing on one process mid-way is raised on every process, none hangs.
        assert "injected read failure" in (g["read_error"] or ""), g["read_error"]
