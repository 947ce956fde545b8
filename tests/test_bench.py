"""`distckpt bench`: the harness's mechanics, on a tiny state (no timing assertions).

The end-to-end test runs the real thing: two jobs of real processes (2 hosts, then 1),
every contender, the cross-topology restore, RSS growth and the training loop. The s3://
tests run against the session's real SeaweedFS server (tests/s3_fixture.py).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distckpt.bench import figures as bench_figures
from distckpt.bench import harness as bench
from distckpt.bench import report as bench_report
from distckpt.bench import s3 as bench_s3
from distckpt.bench.figures import aggregate, targets
from distckpt.bench.harness import BenchConfig
from distckpt.bench.names import parse_contender
from distckpt.testing.kvfiles import small_files

ROOT = Path(__file__).parent.parent
TINY_MODEL = "d_model=16,n_layers=1,d_ff=32,vocab=32,n_heads=2,n_kv_heads=1,head_dim=8"
FIGURES = ("stall_s", "commit_s", "restore_s", "raw_read_files_s", "save_gibps",
           "restore_gibps", "raw_read_files_gibps", "save_rss", "restore_rss", "files_bytes")


# --------------------------------------------------------------------------- pure parts
def _process(pid: int, stall: float, shard: int = 100) -> dict:
    """A fake per-process record: 2 repetitions (1 warm-up) of raw, orbax, distckpt."""
    reps = []
    for rep in (0, 1):
        for name, k in (("raw", 1.0), ("orbax", 4.0), ("distckpt", 2.0)):
            reps.append({
                "rep": rep, "warmup": rep == 0, "contender": name, "step": rep + 1,
                "stall_s": stall * k, "commit_s": 2 * stall * k, "restore_s": stall * k,
                "raw_read_files_s": stall / 2, "files_bytes": 2**30, "files": 3,
                "save_rss_base": 1000, "save_rss_peak": 1000 + 50 * k + pid,
                "restore_rss_base": 0, "restore_rss_peak": shard,
                "restore_read_bytes": 2**30 + pid, "restore_disk_read_bytes": 2**29,
                **({"cross_restore_s": stall * k * 1.1, "cross_restore_rss_base": 0,
                    "cross_restore_rss_peak": shard} if name != "raw" else {})})
    return {"process": pid, "label": "2x1", "reps": reps, "shard_bytes": shard,
            "unique_shard_bytes": shard, "total_bytes": 2**30, "leaves": 2,
            "shapes": [[4, 4]], "memcpy_s": 0.01 * (pid + 1), "memcpy_alloc_s": 0.02,
            "phase_s": {},
            "distinct_shapes": {"leaves": 3, "bytes": 96,
                                **{name: {"first_stall_s": 1.0 + pid, "second_stall_s": 0.1,
                                          "first_commit_s": 2.0, "second_commit_s": 0.2,
                                          "first_restore_s": 0.5, "second_restore_s": 0.05}
                                   for name in ("raw", "orbax", "distckpt")}},
            "rss_growth": {"raw": [0, 10, 10, 10], "orbax": [0, 10, 10 + 2**20, 10 + 2**21],
                           "distckpt": [0, 10, 10, 10]},
            "train": {"seconds_per_step": {"none": [1.0, 1.0], "raw": [1.5, 1.5],
                                           "orbax": [2.0, 2.0], "distckpt": [1.02, 1.04]},
                      "state_bytes": 8}}


@pytest.mark.fast
def test_aggregate_takes_the_slowest_process_and_the_median_of_timed_reps():
    names = ["raw", "orbax", "distckpt"]
    topo = aggregate([_process(1, stall=0.2), _process(0, stall=0.1)], names)
    bench_figures.add_ratios(topo, names)
    d, o, r = (topo["contenders"][n] for n in ("distckpt", "orbax", "raw"))
    assert topo["processes"] == 2 and topo["memcpy_s"] == 0.02  # slowest process
    assert d["stall_s"] == pytest.approx(0.4) and d["commit_s"] == pytest.approx(0.8)
    assert d["save_gibps"] == pytest.approx(1 / 0.8) and r["save_gibps"] == pytest.approx(2.5)
    assert d["raw_read_files_gibps"] == pytest.approx(1 / 0.1)
    ratios = d["ratios"]
    assert ratios["save_vs_raw"] == pytest.approx(0.5)
    assert ratios["save_vs_orbax"] == pytest.approx(2.0)
    assert ratios["restore_vs_orbax"] == pytest.approx(2.0)
    assert ratios["restore_vs_files"] == pytest.approx((1 / 0.4) / 10)
    assert ratios["cross_vs_same"] == pytest.approx(1.1)
    assert ratios["stall_vs_memcpy"] == pytest.approx(0.4 / 0.02)
    assert ratios["stall_vs_orbax"] == pytest.approx(0.5)
    assert ratios["save_rss"] == pytest.approx((100 + 1) / 100)  # process 1: 50*2 + 1
    assert ratios["restore_rss"] == pytest.approx(1.0)
    assert ratios["rss_growth_mib_per_save"] == 0.0
    assert o["ratios"]["rss_growth_mib_per_save"] == pytest.approx(1.0)  # 2 MiB over 2 saves
    assert ratios["train_inflation"] == pytest.approx(0.03)
    assert "cross_restore_s" not in r or r["cross_restore_s"] is None

    # Bytes read on restore: summed over processes; unique bytes: the step's files.
    assert d["restore_read_bytes"] == 2 * 2**30 + 1 and d["unique_bytes"] == 2**30
    assert d["restore_disk_read_bytes"] == 2**30
    assert ratios["restore_read_vs_unique"] == pytest.approx(2.0, rel=1e-6)
    # Distinct shapes: the slowest process's first and second save.
    assert topo["distinct_shapes"] == {"leaves": 3, "bytes": 96}
    assert d["shapes_first_stall_s"] == 2.0 and d["shapes_second_stall_s"] == 0.1
    assert ratios["shapes_first_stall_vs_second"] == pytest.approx(20.0)
    cells = dict(zip([h for h, _ in bench_report.FIGURES],
                     dict(bench_report.columns({"config": {}}, topo))["distckpt"], strict=True))
    assert cells["bytes read on restore / unique bytes"] == "2048 MiB / 1024 MiB (2.00x)"
    assert cells["save() stall, distinct shapes: 1st / 2nd"] == "2.00 s / 100 ms"
    assert "3 leaves of distinct shapes" in bench_report.topology_caption(
        "2x1", {**topo, "hosts": 2, "devices_per_host": 1, "mesh": "fsdp=2"})

    report = {"references": bench_figures.reference_names(names), "topologies": {"2x1": topo}}
    rows = {row["ratio"]: row for row in targets(report)}
    # The replicated-state target is checked only where the state is replicated.
    assert set(rows) == {t["ratio"] for t in bench_figures.TARGETS if not t.get("replicated")}
    replicated = {"2x1": {**topo, "data_parallel": 2}}
    row = next(r for r in targets({**report, "topologies": replicated})
               if r["ratio"] == "restore_read_vs_unique")
    assert not row["met"] and row["threshold"] == 1.01
    assert rows["save_vs_orbax"]["met"] and rows["save_vs_orbax"]["margin"] == \
        pytest.approx(2.0 / 1.5 - 1)
    assert not rows["save_vs_raw"]["met"]
    assert rows["train_inflation"]["met"] and not rows["stall_vs_memcpy"]["met"]
    assert bench_report.margin_text(rows["save_vs_raw"]) == "1.60x short"
    assert bench_report.margin_text(rows["train_inflation"]) == "+2 points"
    policy = bench_figures.policy_summary({**report, "topologies": {"2x1": topo}}, mtbf_s=3600.0)
    assert policy["cost_s"] == pytest.approx(0.8)
    assert policy["interval_s"] == pytest.approx(math.sqrt(2 * 0.8 * 3600.0))
    assert policy["interval_steps"] == round(policy["interval_s"] / 1.0)


@pytest.mark.fast
def test_contenders_and_config_are_validated():
    assert parse_contender("distckpt") == ("distckpt", {})
    assert parse_contender("orbax:chunk=8MiB, ocdbt=0") == ("orbax",
                                                            {"chunk": "8MiB", "ocdbt": "0"})
    for bad in ("tensorflow", "orbax:ocdbt", "orbax:=1"):
        with pytest.raises(ValueError):
            parse_contender(bad)
    for bad in (dict(hosts=()), dict(reps=0), dict(contenders=("raw", "raw")),
                dict(hosts=(3,), data_parallel=2, devices_per_host=1), dict(extras_on="x")):
        with pytest.raises(ValueError):
            BenchConfig(**bad)
    c = BenchConfig(hosts=(2, 4), data_parallel=2)
    assert c.mesh(4) == "data=2,fsdp=4" and c.label(4) == "4x2"
    assert bench.job_hosts(c) == [(4, False), (2, True)]
    assert c.distinct_shape_list(4)[:2] == [(4, 8), (4, 9)] and \
        len(set(c.distinct_shape_list(4))) == c.distinct_shapes == 300
    for bad in (dict(platform="bogus"), dict(single_process=True),  # hosts (4, 2)
                dict(platform="gpu", hosts=(2,)), dict(distinct_shapes=-1),
                dict(data_parallel=0)):
        with pytest.raises(ValueError):
            BenchConfig(**bad)
    one = BenchConfig(hosts=(1,), single_process=True, data_parallel=2)
    assert one.platform == "cpu" and bench.with_local_devices(one) is one
    # An accelerator's device count is checked once known (with_local_devices).
    gpu = BenchConfig(platform="gpu", hosts=(1,), data_parallel=3)
    assert gpu.single_process
    with pytest.raises(ValueError, match="does not divide"):
        bench.dataclasses.replace(gpu, devices_per_host=8, device_kind="H200")


@pytest.mark.fast
def test_readme_section_is_replaced_between_the_markers():
    text = "# x\n\n## Benchmarks\n<!-- bench:begin -->\nold\n<!-- bench:end -->\ntail\n"
    out = bench_report.replace_section(text, "new | table")
    assert out == "# x\n\n## Benchmarks\n<!-- bench:begin -->\nnew | table\n" \
                  "<!-- bench:end -->\ntail\n"
    with pytest.raises(ValueError, match="markers"):
        bench_report.replace_section("no markers", "x")


@pytest.mark.fast
def test_bad_arguments_fail_fast(tmp_path):
    from distckpt.tools import cli

    assert cli.main(["bench", "--contenders", "nope", "--dir", str(tmp_path / "d")]) == 2
    assert cli.main(["bench", "--mtbf", "soon"]) == 2
    assert cli.main(["bench", "--dir", "gs://bucket/p"]) == 2  # only s3:// is benchmarked
    assert cli.main(["bench", "--s3-server", "local", "--dir", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()


@pytest.mark.fast
def test_s3_defaults_and_object_packing():
    assert BenchConfig().contenders == ("raw", "orbax", "distckpt")
    assert BenchConfig(directory="s3://bucket/p").contenders == ("raw", "distckpt")
    assert BenchConfig(directory="s3://bucket/p", contenders=("orbax",)).contenders == ("orbax",)
    assert [t["ratio"] for t in bench_figures.targets_for("s3")[:2]] == ["save_vs_raw",
                                                                         "restore_vs_raw"]
    views = [memoryview(bytes(range(n))) for n in (5, 0, 7, 3)]
    objects = [bytes(b) for b in bench_s3.pack(views, size=4)]
    assert [len(o) for o in objects] == [4, 4, 4, 3] == \
        [4] * (bench_s3.object_count(15, 4) - 1) + [3]
    out = [bytearray(len(v)) for v in views]
    bench_s3.unpack(objects, [memoryview(b) for b in out])
    assert [bytes(b) for b in out] == [bytes(v) for v in views]
    with pytest.raises(OSError, match="fewer"):
        bench_s3.unpack(objects[:-1], [memoryview(b) for b in out])
    with pytest.raises(OSError, match="more"):
        bench_s3.unpack([*objects, b"x"], [memoryview(b) for b in out])


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow  # whole bench runs; the figures' and report's unit tests stay
@pytest.mark.multiprocess
def test_bench_end_to_end_on_a_tiny_state(tmp_path):
    out, md = tmp_path / "out.json", tmp_path / "bench.md"
    cmd = [sys.executable, "-m", "distckpt.tools.cli", "bench", "--size", "256KiB",
           "--hosts", "2,1", "--reps", "2", "--warmup", "0", "--leaves", "2",
           "--rss-saves", "3", "--train-rounds", "1", "--train-steps", "1",
           "--train-model", TINY_MODEL, "--train-batch", "4", "--mtbf", "1h", "--shapes", "0",
           "--dir", str(tmp_path / "run"), "--json", str(out), "--markdown", str(md)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads(out.read_text())

    assert report["schema"] == bench.SCHEMA
    assert report["machine"]["cores"] >= 1 and report["machine"]["versions"]["jax"]
    assert report["command"].startswith("distckpt bench --size 256KiB") and "--dir" not in \
        report["command"]
    assert list(report["topologies"]) == ["2x2", "1x2"]
    names = ["raw", "orbax", "distckpt"]
    assert report["references"] == {"raw": "raw", "orbax": "orbax", "distckpt": "distckpt"}
    for label, topo in report["topologies"].items():
        assert topo["processes"] == int(label[0])
        assert topo["total_bytes"] == 2 * 32 * 1024 * 4  # 2 leaves of [32 rows, 1024] f32
        assert topo["shard_bytes_per_process"] == topo["total_bytes"] // topo["processes"]
        for name in names:
            fig = topo["contenders"][name]
            for key in FIGURES:
                assert fig[key] is not None and fig[key] >= 0, (label, name, key)
            assert len(fig["reps"]["stall_s"]) == 2  # timed repetitions only
            r = fig["ratios"]
            raw = topo["contenders"]["raw"]
            assert r["save_vs_raw"] == pytest.approx(fig["save_gibps"] / raw["save_gibps"])
            assert r["restore_vs_files"] == pytest.approx(
                fig["restore_gibps"] / fig["raw_read_files_gibps"])
            assert r["stall_vs_memcpy"] == pytest.approx(fig["stall_s"] / topo["memcpy_s"])
    first, last = report["topologies"]["2x2"], report["topologies"]["1x2"]
    # Cross-topology restore: the 1-host job restores what the 2-host job saved.
    assert last["cross_from"] == "2x2" and first["cross_from"] is None
    for name in ("orbax", "distckpt"):
        assert last["contenders"][name]["cross_restore_s"] > 0
        assert last["contenders"][name]["ratios"]["cross_vs_same"] > 0
        assert first["contenders"][name]["cross_restore_s"] is None
    assert last["contenders"]["raw"]["cross_restore_s"] is None  # raw cannot reshard
    # RSS growth and the training loop: measured by the last job only (extras_on=last).
    for name in names:
        assert last["contenders"][name]["rss_growth_bytes_per_save"] is not None
        assert len(last["contenders"][name]["rss_after_saves"][0]) == 3
        assert last["contenders"][name]["train_inflation"] is not None
        assert "train_inflation" not in first["contenders"][name]
    assert last["train_step_s_no_save"] > 0
    rows = report["targets"]
    assert {r["topology"] for r in rows} == {"2x2", "1x2"}
    assert all(set(r) >= {"target", "value", "threshold", "met", "margin"} for r in rows)
    assert any(r["ratio"] == "cross_vs_same" for r in rows)
    policy = report["policy"]
    assert policy["topology"] == "1x2" and policy["mtbf_s"] == 3600.0  # where train ran
    assert policy["interval_s"] == pytest.approx(math.sqrt(2 * policy["cost_s"] * 3600.0))
    assert 0 < policy["expected_loss_fraction"] < 1
    # Output: the table, the Markdown section, the chart (when matplotlib is installed).
    assert "targets (distckpt)" in res.stdout and "Young/Daly" in res.stdout
    text = md.read_text()
    assert "| figure | `raw` | `orbax` | `distckpt` |" in text and "Young/Daly" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert report["chart"] is None
    else:
        assert Path(report["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Checkpoints are removed afterwards; logs and per-process results stay.
    run = tmp_path / "run"
    assert not (run / "2x2").exists() and not (run / "1x2").exists()
    assert (run / "results" / "2x2.p1.json").exists() and (run / "2x2.log").exists()

    # The README section regenerates from the saved report without running anything.
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin -->\n<!-- bench:end -->\nrest\n")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_bench.py"),
                          "--from-json", str(out), "--readme", str(readme)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    updated = readme.read_text()
    assert updated.startswith("intro\n<!-- bench:begin -->\nMeasured by `distckpt bench")
    assert updated.endswith("<!-- bench:end -->\nrest\n")


def _bench(tmp_path, *flags: str) -> tuple[dict, str]:
    """Run `distckpt bench` on a tiny state with `flags`; (the JSON report, Markdown)."""
    out, md = tmp_path / "out.json", tmp_path / "bench.md"
    cmd = [sys.executable, "-m", "distckpt.tools.cli", "bench", "--size", "256KiB",
           "--reps", "1", "--warmup", "0", "--leaves", "2", "--rss-saves", "0",
           "--train-rounds", "0", "--shapes", "6", "--dir", str(tmp_path / "run"),
           "--json", str(out), "--markdown", str(md), *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return json.loads(out.read_text()), md.read_text()


def _assert_shapes_and_reads(topo: dict) -> None:
    assert topo["distinct_shapes"]["leaves"] == 6
    for name in ("raw", "orbax", "distckpt"):
        fig = topo["contenders"][name]
        for which in ("first", "second"):
            for key in ("stall_s", "commit_s", "restore_s"):
                assert fig[f"shapes_{which}_{key}"] > 0, (name, which, key)
        assert fig["unique_bytes"] > 0 and fig["restore_read_bytes"] > 0, name
        assert fig["restore_disk_read_bytes"] is not None, name
        assert fig["ratios"]["restore_read_vs_unique"] == pytest.approx(
            fig["restore_read_bytes"] / fig["unique_bytes"])


@pytest.mark.slow  # end to end, minutes on 2 cores; CI runs it in its slow pass
@pytest.mark.multiprocess
def test_bench_single_process_path_of_an_accelerator_run_on_cpu(tmp_path):
    """--platform cpu --single-process: the worker path of --platform gpu/tpu (one process,
    the mesh over this machine's devices of the platform), end to end on 2 CPU devices."""
    report, md = _bench(tmp_path, "--single-process", "--devices-per-host", "2")
    assert report["platform"] == {"name": "cpu", "single_process": True, "devices": 2,
                                  "kind": None}
    assert report["config"]["hosts"] == [1]
    assert list(report["topologies"]) == ["1x2"]
    topo = report["topologies"]["1x2"]
    assert topo["processes"] == 1 and topo["platform"] == "cpu"
    assert topo["total_bytes"] == 2 * 32 * 1024 * 4
    for name in ("raw", "orbax", "distckpt"):
        for key in FIGURES:
            assert topo["contenders"][name][key] is not None, (name, key)
    _assert_shapes_and_reads(topo)
    assert "| save() stall, distinct shapes: 1st / 2nd |" in md


@pytest.mark.slow  # end to end, minutes on 2 cores; CI runs it in its slow pass
@pytest.mark.multiprocess
def test_bench_replicated_state_reports_bytes_read_vs_unique_bytes(tmp_path):
    """--data-parallel 2 on 2 hosts: each host holds a whole replica; the bytes read on
    restore (summed over the processes), the unique bytes and the replicated target."""
    report, md = _bench(tmp_path, "--hosts", "2", "--data-parallel", "2")
    topo = report["topologies"]["2x2"]
    assert topo["mesh"] == "data=2,fsdp=2" and topo["data_parallel"] == 2
    _assert_shapes_and_reads(topo)
    raw = topo["contenders"]["raw"]
    assert raw["unique_bytes"] == topo["total_bytes"]  # its files: the unique shard bytes
    assert raw["restore_read_bytes"] >= raw["unique_bytes"]
    for name in ("orbax", "distckpt"):
        fig = topo["contenders"][name]
        # Every replica reads today (2x); a read-once restore may skip metadata no host
        # needs (plain Orbax in one process reads 0.99x of its files), hence the margin.
        assert fig["restore_read_bytes"] >= 0.95 * fig["unique_bytes"], name
    rows = [r for r in report["targets"] if r["ratio"] == "restore_read_vs_unique"]
    assert [r["topology"] for r in rows] == ["2x2"]
    assert rows[0]["value"] == topo["contenders"]["distckpt"]["ratios"][
        "restore_read_vs_unique"]
    assert "| bytes read on restore / unique bytes |" in md
    assert "| replicated state: bytes read from storage on restore / unique bytes | 2x2 |" in md


# --------------------------------------------------------------------------- s3://
def _objects(url: str) -> list[str]:
    return [k for k in small_files(url).list() if not k.endswith("/")]


def test_bench_refuses_a_non_empty_s3_prefix(s3_env, s3_url, capsys):
    from distckpt.tools import cli

    small_files(s3_url).write_bytes("old/checkpoint", b"keep me")
    assert cli.main(["bench", "--dir", s3_url, "--size", "64KiB", "--hosts", "1"]) == 1
    out = capsys.readouterr().out
    assert "is not empty" in " ".join(out.split()) and "old/checkpoint" in out
    assert _objects(s3_url) == ["old/checkpoint"]  # nothing written, nothing deleted


@pytest.mark.slow  # the local end-to-end bench stays
@pytest.mark.multiprocess
def test_bench_on_s3_against_raw_put_get(s3_env, s3_url, tmp_path):
    """2 processes on the real S3 server: raw PUT/GET and distckpt measured, their ratios in
    the JSON and the outputs, plain Orbax probed and reported as failing, nothing left."""
    out, md = tmp_path / "out.json", tmp_path / "bench.md"
    cmd = [sys.executable, "-m", "distckpt.tools.cli", "bench", "--dir", s3_url, "--size", "256KiB",
           "--hosts", "2", "--reps", "1", "--warmup", "0", "--leaves", "2", "--rss-saves",
           "0", "--train-rounds", "0", "--shapes", "0", "--contenders", "raw", "orbax", "distckpt",
           "--json", str(out), "--markdown", str(md), "--chart", str(tmp_path / "c.png")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads(out.read_text())

    assert report["storage"]["scheme"] == "s3" and report["directory"] == s3_url
    assert report["command"].startswith(f"distckpt bench --dir {s3_url} --size 256KiB")
    assert set(report["failed"]) == {"orbax"}  # orbax-checkpoint 0.12.8 cannot save on s3://
    assert report["references"] == {"raw": "raw", "orbax": None, "distckpt": "distckpt"}
    topo = report["topologies"]["2x2"]
    assert list(topo["contenders"]) == ["raw", "distckpt"]
    raw, ours = topo["contenders"]["raw"], topo["contenders"]["distckpt"]
    for fig in (raw, ours):
        for key in ("stall_s", "commit_s", "restore_s", "save_gibps", "restore_gibps",
                    "raw_read_files_gibps", "save_rss", "restore_rss"):
            assert fig[key] is not None and fig[key] > 0, key
    # raw: each process's 128 KiB as one object (under 4 MiB), every byte listed back.
    assert raw["files"] == 2 and raw["files_bytes"] == topo["total_bytes"]
    assert ours["files"] > 2 and ours["files_bytes"] >= topo["total_bytes"]
    ratios = ours["ratios"]
    assert ratios["save_vs_raw"] == pytest.approx(ours["save_gibps"] / raw["save_gibps"])
    assert ratios["restore_vs_raw"] == pytest.approx(ours["restore_gibps"] /
                                                     raw["restore_gibps"])
    rows = {r["ratio"]: r for r in report["targets"]}
    assert rows["save_vs_raw"]["target"] == "save throughput vs raw PUT of the same bytes"
    assert rows["restore_vs_raw"]["target"] == \
        "restore throughput vs raw GET of the same bytes"
    assert "save_vs_orbax" not in rows
    # The table, the Markdown: the ratio line, orbax shown as failing, the notes.
    for text in (" ".join(res.stdout.split()), md.read_text()):
        assert "vs raw PUT/GET of the same bytes on the same server" in text
        assert "`distckpt` save" in text and "fails" in text
        assert "Checkpoint path should be absolute" in text
    assert "| figure | `raw` | `orbax` | `distckpt` |" in md.read_text()
    assert "raw GET of its objects" in md.read_text()
    # Nothing left under the prefix; no secret in anything written.
    assert _objects(s3_url) == []
    secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in out.read_text() + md.read_text() + res.stdout + res.stderr
    assert not any(secret in p.read_text(errors="replace")
                   for p in Path(report["logs"]).rglob("*") if p.is_file())
    shutil.rmtree(report["logs"])  # the bench keeps them for the user (in $TMPDIR)
