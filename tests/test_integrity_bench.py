"""benchmarks/integrity_bench.py on a tiny array: every measurement is there and the
detection claims hold (a correctness check; no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location(
        "integrity_bench", ROOT / "benchmarks" / "integrity_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_integrity_bench_tiny(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "out.json"
    assert bench.main(["--size", "1MiB", "--chunk", "256KiB", "--reps", "1",
                       "--dir", str(tmp_path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "| `digest` |" in capsys.readouterr().out
    m = result["machine"]
    assert m["nproc"] >= 1 and m["cpu_model"] and len(m["loadavg_start"]) == 3
    assert set(result["dtypes"]) == {"float32", "bfloat16"}
    for name, r in result["dtypes"].items():
        assert r["bytes"] == 2**20, name
        assert r["digest_first_call_s"] > 0
        assert all(r["checks"].values()), r["checks"]
        for k in bench.MEASUREMENTS:
            entry = r["results"][k]
            if k.startswith("crc32c") and bench.google_crc32c is None:
                assert "skipped" in entry
                continue
            for field in ("seconds", "gbps", "x_memcpy", "x_raw_write", "x_raw_read"):
                assert entry[field] > 0, (name, k, field)
        det = r["detection"]
        for kv in ("file", "ocdbt"):
            # without the codec a flipped byte comes back as wrong data, and only the
            # digest notices; with it TensorStore refuses the read
            assert det[f"{kv}_plain"]["read"] == "silent", det
            assert det[f"{kv}_plain"]["digest_detects"] is True, det
            assert det[f"{kv}_crc32c"]["read"] == "error", det
            assert "DATA_LOSS" in det[f"{kv}_crc32c"]["error"], det
        # moved data: per-chunk CRCs do not notice, the digest does
        for codec in ("plain", "crc32c"):
            assert det[f"moved_chunks_file_{codec}"] == {"read": "silent",
                                                         "digest_detects": True}, det
    assert not list(tmp_path.glob("integrity-bench-*"))  # its files are removed

    both = tmp_path / "both.json"
    assert bench.main(["--combine", str(out), str(out), "--json", str(both)]) == 0
    combined = json.loads(both.read_text())
    assert combined["runs"] == 2
    for name, r in combined["dtypes"].items():
        assert r["results"]["digest"]["seconds"] == \
            result["dtypes"][name]["results"]["digest"]["seconds"]
        assert r["detection"]["file_crc32c"] == ["error"]


@pytest.mark.fast
@pytest.mark.parametrize("args, message", [
    (["--size", "lots"], "bad byte size"),
    (["--size", "1KiB"], "below 64KiB"),
    (["--chunk", "1"], "below 4096"),
    (["--reps", "0"], "at least 1"),
    (["--size", "1TiB"], "memory"),
])
def test_integrity_bench_bad_input(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        _bench().main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
