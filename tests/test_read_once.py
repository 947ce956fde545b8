"""Read once per replica group (CheckpointOptions.restore_read_once), by real processes."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("hosts,devices,mesh", [
    (2, 2, "data=2,fsdp=2"),  # each process holds a whole replica
])
def test_read_once_reads_the_unique_bytes_once(tmp_path, run_hosts, hosts, devices, mesh):
    out = tmp_path / "once"
    run_hosts(hosts, devices, "readonce", str(out), "--dir", str(tmp_path / "ckpt"),
              "--mesh", mesh, "--width", "512").check()
    got = [json.loads((tmp_path / f"once.{p}").read_text()) for p in range(hosts)]
    unique = got[0]["unique"]
    assert got[0]["array_bytes"] > 4 << 20  # big enough that metadata reads are noise
    for mode in ("False", "True"):
        for g in got:
            run = g["runs"][mode]
            assert run["wrong_bytes"] == [] and run["wrong_sharding"] == [], (mode, run)
            assert run["verified"], mode
            assert run["leaves_with_replicas"] > 0  # the target does replicate
    every = sum(g["runs"]["False"]["read"] for g in got)
    once = [g["runs"]["True"]["read"] for g in got]
    # Without read-once every process reads the whole step; with it the processes
    # together read the unique bytes once. The margin is for what each process reads
    # besides array data (commit record, provenance, Orbax and OCDBT metadata, per-process
    # records: a few hundred KiB at most, measured below 3% of a 6.5 MiB step).
    assert every >= 0.95 * hosts * unique, (every, unique)
    assert sum(once) <= unique * 1.05 + (256 << 10) * hosts, (once, unique)
    # ...and the reading is spread: no process reads (nearly) everything.
    assert max(once) <= 0.75 * unique, (once, unique)
    # A flipped byte in array data is still caught, on every process.
    for g in got:
        assert g["corrupt"] is not None, g
        assert g["corrupt"]["kind"] in ("corrupt", "unreadable"), g["corrupt"]
