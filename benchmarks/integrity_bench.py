"""Integrity options on the hot path: what each costs on this machine, and what it catches.

    python benchmarks/integrity_bench.py [--size 256MiB] [--chunk 8MiB] [--reps 5] [--json PATH]

For a random float32 array of the given size (and a bfloat16 one of the same bytes), in one
process on one CPU device, each option's median time over --reps runs, as GB/s (1e9 bytes/s)
and as a fraction of three baselines over the same bytes: a plain memcpy (``np.copyto``), a
raw file write + fsync, and a raw read of that file after dropping it from the page cache:

- ``digest``: today's topology-independent digest, ``digest.dispatch([x]).result()`` on a jax
  array (the first call, which compiles the kernel, is reported separately as
  ``first_call_s``); ``digest_host_view``: the same through ``dispatch(defer=True)``, the path
  a save on CPU takes (zero-copy host views, checksummed in ``result()``);
- ``digest_numpy``: the NumPy reference ``digest.numpy_digest`` (for scale; at most 3 runs);
- ``crc32_zlib``: ``zlib.crc32`` over the raw bytes; ``crc32c``: ``google_crc32c.value`` over
  the raw bytes, when the package is installed (its C API takes only ``bytes``: the copy into
  a ``bytes`` object is not timed, ``crc32c_with_copy`` times it, in --chunk pieces);
- ``ts_<kv>_<codec>_write`` / ``_read``: TensorStore writing (open + write, fsync'd by the file
  driver) and reading (files evicted first, fresh context) the array as zarr3 laid out as
  Orbax writes it (``sharding_indexed``, index with crc32c, no compression), one --chunk per
  zarr chunk, on a local ``file`` kvstore or on ``ocdbt`` over it with Orbax's OCDBT config,
  with (``crc32c``) or without (``plain``) a ``crc32c`` codec after the chunk's ``bytes``;
- ``digest_chunked``: the digest computed on --chunk pieces as a streamed read would deliver
  them (host views through ``digest._shard_lanes`` with each piece's global start, partial
  digests added), against ``digest_host_view`` on the whole array; ``ts_stream_read_digest``:
  a TensorStore read issued in --chunk pieces (two in flight) with each piece digested as it
  arrives, against ``ts_file_plain_read`` followed by ``digest_host_view``
  (``ts_read_then_digest``, the sum of the two medians).

Then, per TensorStore layout, a flipped byte in the middle of the stored chunk data is read
back (fresh context, files evicted): the read either fails (``error``), returns wrong data
(``silent``), or is unaffected; the digest of what was read is compared with the original's.
Two chunk files of the file layout swapped (moved data) are read back the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import tensorstore as ts  # noqa: E402
from etils import epath  # noqa: E402

from distckpt.bench import measure  # noqa: E402
from distckpt.checkpoint import committed  # noqa: E402
from distckpt.remat.budget import parse_bytes  # noqa: E402
from distckpt.state import digest  # noqa: E402

try:
    import google_crc32c
except ImportError:  # pragma: no cover - depends on the environment
    google_crc32c = None

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
ROW_BYTES = 4096  # every array is (rows, 4096 / itemsize): rows are the unit of a chunk
LAYOUTS = [(kv, codec) for kv in ("file", "ocdbt") for codec in ("plain", "crc32c")]
TS_NAMES = [f"ts_{kv}_{codec}_{op}" for kv, codec in LAYOUTS for op in ("write", "read")]
MEASUREMENTS = ("memcpy", "raw_write_fsync", "raw_read", "digest", "digest_host_view",
                "digest_numpy", "crc32_zlib", "crc32c", "crc32c_with_copy", "digest_chunked",
                *TS_NAMES, "ts_stream_read_digest", "ts_read_then_digest")
# Orbax 0.12.8's OCDBT settings (serialization/tensorstore_utils.py, _add_ocdbt_write_options)
# and TensorStore context (get_ts_context(use_ocdbt=True)).
OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100000000,
                "manifest_kind": "single"}
TS_CONTEXT = {"file_io_concurrency": {"limit": 128},
              "cache_pool#ocdbt": {"total_bytes_limit": 100000000}}
PROTECTION = {
    "digest": "every single flipped byte (a changed element changes both lanes: the hash is a "
              "bijection of the element's bits at fixed coordinates); many changes 2**-64 miss; "
              "topology independent (sums of partial digests over any split); catches moved "
              "data (global coordinates hashed)",
    "crc32_zlib / crc32c over raw bytes": "every single flipped byte, any burst <= 32 bits; "
              "depends on the C-order byte stream: a shard of a split on a non-leading axis is "
              "not a contiguous range, so another topology cannot combine its pieces without "
              "reassembling the array; catches moved data within the stream",
    "zarr3 crc32c codec": "every flipped byte in a stored chunk (checked by TensorStore on "
              "read, before the bytes reach the caller); per chunk of the checkpoint's own "
              "grid, so any reader of that chunk can check it (topology independent for "
              "reads), but it proves the chunk's bytes, not where they belong: a chunk's "
              "file swapped with another of the same size reads back without error; does not "
              "cover a bit flipped in host memory before the write or after the read",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="integrity_bench", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256MiB", help="bytes of each array (default %(default)s)")
    p.add_argument("--chunk", default="8MiB",
                   help="piece of a streamed read and zarr chunk (default %(default)s; at most "
                        "--size)")
    p.add_argument("--reps", type=int, default=5, help="timed runs of each (default 5)")
    p.add_argument("--dir", help="folder for the files (default: a temporary one, removed)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="print the table of the median over these runs' --json files "
                        "(measures nothing)")
    a = p.parse_args(argv)
    if a.combine:
        for f in a.combine:
            if not Path(f).is_file():
                p.error(f"--combine {f}: no such file")
        return a
    try:
        a.size_bytes, a.chunk_bytes = parse_bytes(a.size), parse_bytes(a.chunk)
    except ValueError as e:
        p.error(str(e))
    if a.size_bytes < 64 * 2**10:
        p.error(f"--size {a.size} is below 64KiB")
    if a.chunk_bytes < ROW_BYTES:
        p.error(f"--chunk {a.chunk} is below {ROW_BYTES} bytes")
    if a.reps < 1:
        p.error(f"--reps {a.reps} must be at least 1")
    avail = _meminfo().get("MemAvailable")
    if avail and a.size_bytes * 12 > avail:
        p.error(f"--size {a.size} needs about 12x its bytes of memory (the NumPy reference "
                f"and two dtypes); {avail / 2**30:.1f} GiB is available")
    if a.json and not Path(a.json).resolve().parent.is_dir():
        p.error(f"--json {a.json}: its folder does not exist")
    if a.dir and not Path(a.dir).is_dir():
        p.error(f"--dir {a.dir} is not a folder")
    return a


def _meminfo() -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


def machine() -> dict:
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                     model)
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "cpu_model": model, "loadavg_start": list(os.getloadavg()),
            "python": platform.python_version(), "jax": jax.__version__,
            "tensorstore": importlib.metadata.version("tensorstore"),
            "google_crc32c": None if google_crc32c is None else google_crc32c.implementation}


def _times(fn: Callable[[], object], reps: int,
           setup: Callable[[], object] | None = None) -> list[float]:
    out = []
    for _ in range(reps):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def evict(path: Path) -> None:
    """Drop `path` (a file or every file under a folder) from the page cache."""
    measure.evict([path] if path.is_file() else measure.files_under(path))


# ------------------------------------------------------------------------------ digests
def _lanes_host(host: np.ndarray, starts: tuple[int, ...]) -> digest.Partial:
    out = digest._shard_lanes(jax.device_put(host, jax.devices()[0]),
                              np.asarray(starts, np.uint32))
    a, b = (int(v) for v in np.asarray(out))
    return (a, b)


def digest_chunked(host: np.ndarray, rows: int) -> str:
    """The digest of `host` from pieces of `rows` rows, as a streamed read delivers them."""
    total = digest.ZERO
    for r0 in range(0, host.shape[0], rows):
        total = digest.add(total, _lanes_host(host[r0:r0 + rows], (r0, 0)))
    return digest.to_hex(total)


def digest_of(x: jax.Array, defer: bool = False) -> str:
    return digest.to_hex(digest.dispatch([x], defer=defer).result()[0])


# ------------------------------------------------------------------------------ TensorStore
def ts_spec(path: Path, kv: str, codec: str, dtype: np.dtype, shape: tuple[int, ...],
            chunk: tuple[int, ...]) -> dict:
    """zarr3 as Orbax 0.12.8 writes it (_build_zarr3_metadata, compression off), with a
    crc32c codec after the chunk's bytes when `codec` is "crc32c"."""
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec == "crc32c":
        inner.append({"name": "crc32c"})
    base = {"driver": "file", "path": str(path) + "/"}
    if kv == "ocdbt":
        kvstore = {"driver": "ocdbt", "base": base, "path": "a/", "config": OCDBT_CONFIG,
                   "assume_config": True, "target_data_file_size": 2**31}
    else:
        kvstore = {**base, "path": str(path / "a") + "/"}
    return {
        "driver": "zarr3", "kvstore": kvstore,
        "metadata": {
            "shape": list(shape), "data_type": np.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": list(chunk), "codecs": inner,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
                "index_location": "end"}}],
        },
    }


def ts_write(spec: dict, data: np.ndarray) -> None:
    store = ts.open(spec, create=True, delete_existing=True,
                    context=ts.Context(TS_CONTEXT)).result()
    store.write(data).result()


def ts_open(spec: dict) -> ts.TensorStore:
    read_spec = {k: v for k, v in spec.items() if k != "metadata"}
    return ts.open(read_spec, open=True, read=True, context=ts.Context(TS_CONTEXT)).result()


def ts_read(spec: dict) -> np.ndarray:
    return ts_open(spec).read().result()


def ts_stream_read_digest(spec: dict, rows: int, ahead: int = 2) -> str:
    """Read in pieces of `rows` rows, `ahead` in flight, digesting each piece on arrival."""
    store = ts_open(spec)
    n = store.shape[0]
    starts = list(range(0, n, rows))
    futures = {}
    total = digest.ZERO
    for i, r0 in enumerate(starts):
        for j in range(i, min(i + ahead, len(starts))):
            if j not in futures:
                futures[j] = store[starts[j]:starts[j] + rows].read()
        piece = futures.pop(i).result()
        total = digest.add(total, _lanes_host(piece, (r0, 0)))
    return digest.to_hex(total)


def _flip_target(root: Path, data: np.ndarray) -> tuple[Path, int]:
    """The file and offset of a byte of the stored chunk data: found by searching the files
    for 64 bytes of the array (at a third of its first row block), so the flip lands in
    array data whatever the layout puts around it."""
    raw = data.reshape(-1).view(np.uint8)
    at = raw.size // 3
    needle = raw[at:at + 64].tobytes()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        pos = f.read_bytes().find(needle)
        if pos >= 0:
            return f, pos + 32
    raise RuntimeError(f"array bytes not found under {root}")


def _flip(f: Path, offset: int) -> None:
    with open(f, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x10]))
        fh.flush()
        os.fsync(fh.fileno())


def _read_back(spec: dict, root: Path, original: np.ndarray, want: str) -> dict:
    evict(root)
    try:
        got = ts_read(spec)
    except Exception as e:  # noqa: BLE001 - any read failure counts as detection
        return {"read": "error", "error": f"{type(e).__name__}: {e}"[:300]}
    same = np.array_equal(got.view(np.uint8), original.view(np.uint8))
    return {"read": "unaffected" if same else "silent",
            "digest_detects": digest.numpy_digest(got) != want if not same else False}


def detection(root: Path, dtype: np.dtype, shape: tuple[int, ...], chunk: tuple[int, ...],
              seed: int = 7) -> dict:
    """Flipped byte per layout, and two swapped chunk files in the file layout."""
    data = np.random.default_rng(seed).standard_normal(shape, np.float32).astype(dtype)
    want = digest.numpy_digest(data)
    out: dict = {}
    for kv, codec in LAYOUTS:
        d = root / f"flip_{kv}_{codec}"
        spec = ts_spec(d, kv, codec, dtype, shape, chunk)
        ts_write(spec, data)
        f, offset = _flip_target(d, data)
        _flip(f, offset)
        out[f"{kv}_{codec}"] = {"file": str(f.relative_to(d)), "offset": offset,
                                **_read_back(spec, d, data, want)}
    for codec in ("plain", "crc32c"):
        d = root / f"move_{codec}"
        spec = ts_spec(d, "file", codec, dtype, shape, chunk)
        ts_write(spec, data)
        a, b = d / "a" / "c" / "0" / "0", d / "a" / "c" / "1" / "0"
        tmp = d / "swap"
        a.rename(tmp)
        b.rename(a)
        tmp.rename(b)
        out[f"moved_chunks_file_{codec}"] = _read_back(spec, d, data, want)
    return out


# ------------------------------------------------------------------------------ the runs
def run_dtype(name: str, dtype: np.dtype, a: argparse.Namespace, root: Path) -> dict:
    cols = ROW_BYTES // dtype.itemsize
    rows = max(2, a.size_bytes // ROW_BYTES)
    chunk_rows = max(1, min(rows, a.chunk_bytes // ROW_BYTES))
    shape, chunk = (rows, cols), (chunk_rows, cols)
    host = np.random.default_rng(0).standard_normal(shape, np.float32).astype(dtype)
    nbytes = host.nbytes
    reps = a.reps
    t: dict[str, list[float]] = {}
    extra: dict = {"shape": list(shape), "chunk_shape": list(chunk), "bytes": nbytes}

    dst = np.empty_like(host)
    np.copyto(dst, host)  # touch the pages
    t["memcpy"] = _times(lambda: np.copyto(dst, host), reps)

    raw = root / f"raw_{name}.bin"
    view = memoryview(host.reshape(-1).view(np.uint8))

    def raw_write():
        with open(raw, "wb") as f:
            f.write(view)
            f.flush()
            os.fsync(f.fileno())
        committed.fsync_path(epath.Path(root))

    t["raw_write_fsync"] = _times(raw_write, reps)
    buf = memoryview(dst.reshape(-1).view(np.uint8))

    def raw_read():
        with open(raw, "rb", buffering=0) as f:
            got = 0
            while got < nbytes:
                got += f.readinto(buf[got:])

    t["raw_read"] = _times(raw_read, reps, setup=lambda: evict(raw))
    assert np.array_equal(dst.view(np.uint8), host.view(np.uint8))
    raw.unlink()

    x = jax.device_put(host, jax.devices()[0])
    t0 = time.perf_counter()
    want = digest_of(x)
    extra["digest_first_call_s"] = time.perf_counter() - t0
    t["digest"] = _times(lambda: digest_of(x), reps)
    t0 = time.perf_counter()
    digest_of(x, defer=True)
    extra["digest_host_view_first_call_s"] = time.perf_counter() - t0
    t["digest_host_view"] = _times(lambda: digest_of(x, defer=True), reps)
    t["digest_numpy"] = _times(lambda: digest.numpy_digest(host), min(reps, 3))
    checks = {"numpy_matches_xla": digest.numpy_digest(host) == want,
              "host_view_matches": digest_of(x, defer=True) == want}

    t["crc32_zlib"] = _times(lambda: zlib.crc32(view), reps)
    if google_crc32c is not None:
        as_bytes = bytes(view)
        t["crc32c"] = _times(lambda: google_crc32c.value(as_bytes), reps)
        step = chunk_rows * ROW_BYTES

        def crc32c_with_copy():
            crc = 0
            for off in range(0, nbytes, step):
                crc = google_crc32c.extend(crc, bytes(view[off:off + step]))
            return crc

        checks["crc32c_chunked_matches"] = crc32c_with_copy() == google_crc32c.value(as_bytes)
        t["crc32c_with_copy"] = _times(crc32c_with_copy, reps)
        del as_bytes

    t0 = time.perf_counter()
    checks["chunked_matches_whole"] = digest_chunked(host, chunk_rows) == want
    extra["digest_chunked_first_call_s"] = time.perf_counter() - t0
    t["digest_chunked"] = _times(lambda: digest_chunked(host, chunk_rows), reps)

    for kv, codec in LAYOUTS:
        d = root / f"ts_{name}_{kv}_{codec}"
        spec = ts_spec(d, kv, codec, dtype, shape, chunk)
        t[f"ts_{kv}_{codec}_write"] = _times(lambda spec=spec: ts_write(spec, host), reps)
        t[f"ts_{kv}_{codec}_read"] = _times(lambda spec=spec: ts_read(spec), reps,
                                            setup=lambda d=d: evict(d))
        checks[f"ts_{kv}_{codec}_roundtrip"] = np.array_equal(
            ts_read(spec).view(np.uint8), host.view(np.uint8))
        if (kv, codec) == ("file", "plain"):
            checks["ts_stream_read_digest_matches"] = ts_stream_read_digest(spec, chunk_rows) \
                == want
            t["ts_stream_read_digest"] = _times(
                lambda spec=spec: ts_stream_read_digest(spec, chunk_rows), reps,
                setup=lambda d=d: evict(d))
        shutil.rmtree(d)

    med = {k: statistics.median(v) for k, v in t.items()}
    med["ts_read_then_digest"] = med["ts_file_plain_read"] + med["digest_host_view"]
    t["ts_read_then_digest"] = [med["ts_read_then_digest"]]
    results = {}
    for k in MEASUREMENTS:
        if k not in med:
            results[k] = {"skipped": "google-crc32c is not installed"}
            continue
        gbps = nbytes / med[k] / 1e9
        results[k] = {"seconds": med[k], "gbps": gbps, "runs": t[k],
                      "x_memcpy": med["memcpy"] / med[k],
                      "x_raw_write": med["raw_write_fsync"] / med[k],
                      "x_raw_read": med["raw_read"] / med[k]}
    return {**extra, "checks": checks, "results": results,
            "detection": detection(root, dtype, (max(2, 2 * chunk_rows), cols), chunk)}


def table(out: dict) -> str:
    """A markdown table of the medians: GB/s and throughput as a fraction of the baselines."""
    names = list(out["dtypes"])
    head = "| option | " + " | ".join(
        f"{n} GB/s | x memcpy | x raw write | x raw read" for n in names) + " |"
    lines = [head, "|---" * (1 + 4 * len(names)) + "|"]
    for k in MEASUREMENTS:
        cells = []
        for n in names:
            r = out["dtypes"][n]["results"][k]
            if "skipped" in r:
                cells += ["-"] * 4
            else:
                cells += [f"{r['gbps']:.2f}", f"{r['x_memcpy']:.2f}", f"{r['x_raw_write']:.2f}",
                          f"{r['x_raw_read']:.2f}"]
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def combine(runs: list[dict]) -> dict:
    """One result from several runs: per measurement, the median of the runs' medians (the
    baseline fractions recomputed from those); load averages and checks of every run."""
    out = {**runs[0], "runs": len(runs), "dtypes": {},
           "machine": {**runs[0]["machine"],
                       "loadavg_start": [r["machine"]["loadavg_start"] for r in runs],
                       "loadavg_end": [r["machine"]["loadavg_end"] for r in runs]}}
    for name, first in runs[0]["dtypes"].items():
        per = [r["dtypes"][name] for r in runs]
        sec = {k: statistics.median(p["results"][k]["seconds"] for p in per)
               for k in MEASUREMENTS if "seconds" in first["results"][k]}
        results = {k: {"skipped": first["results"][k]["skipped"]} for k in MEASUREMENTS
                   if k not in sec}
        for k, v in sec.items():
            results[k] = {"seconds": v, "gbps": first["bytes"] / v / 1e9,
                          "runs": [p["results"][k]["seconds"] for p in per],
                          "x_memcpy": sec["memcpy"] / v, "x_raw_write": sec["raw_write_fsync"] / v,
                          "x_raw_read": sec["raw_read"] / v}
        firsts = {k: statistics.median(p[k] for p in per) for k in first if k.endswith("_first_call_s")}
        out["dtypes"][name] = {**first, **firsts, "results": results,
                               "checks": {k: all(p["checks"][k] for p in per) for k in first["checks"]},
                               "detection": {k: sorted({p["detection"][k]["read"] for p in per})
                                             for k in first["detection"]}}
    return out


def main(argv: list[str] | None = None) -> int:
    a = _parse_args(argv)
    if a.combine:
        out = combine([json.loads(Path(f).read_text()) for f in a.combine])
        print(table(out))
        for name, r in out["dtypes"].items():
            print(f"{name}: first calls (compile) digest {r['digest_first_call_s']:.3f} s, "
                  f"host view {r['digest_host_view_first_call_s']:.3f} s, chunked "
                  f"{r['digest_chunked_first_call_s']:.3f} s; all checks pass in every run: "
                  f"{all(r['checks'].values())}; flipped/moved reads: {r['detection']}")
        print(f"load average at start/end of each run: {out['machine']['loadavg_start']} / "
              f"{out['machine']['loadavg_end']}")
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
        return 0
    out = {"command": "python benchmarks/integrity_bench.py " + " ".join(
               sys.argv[1:] if argv is None else argv),
           "machine": machine(), "size_bytes": a.size_bytes, "chunk_bytes": a.chunk_bytes,
           "reps": a.reps, "protection": PROTECTION, "dtypes": {}}
    root = Path(tempfile.mkdtemp(prefix="integrity-bench-", dir=a.dir))
    try:
        for name, dtype in DTYPES.items():
            out["dtypes"][name] = run_dtype(name, dtype, a, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    print(table(out))
    for name, r in out["dtypes"].items():
        print(f"{name}: first calls (compile) digest {r['digest_first_call_s']:.3f} s, "
              f"chunked {r['digest_chunked_first_call_s']:.3f} s; checks {r['checks']}")
        for k, v in r["detection"].items():
            print(f"  {k}: {v['read']}" + (f", digest detects: {v['digest_detects']}"
                                           if "digest_detects" in v else ""))
    print(f"load average {out['machine']['loadavg_start']} -> {out['machine']['loadavg_end']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
