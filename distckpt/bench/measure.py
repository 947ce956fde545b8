"""What a bench process measures of itself: peak memory, bytes read, the page cache.

Linux only (``/proc/self/status``, ``/proc/self/io``, ``posix_fadvise``), like the bench.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from pathlib import Path


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's resident set size now (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def release_free_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc's malloc_trim), so that
    RSS counts live memory rather than what the allocator kept from earlier phases."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident set size over a block: ``with PeakRSS() as m: ...; m.peak, m.base``.

    Resets the kernel's high-water mark (VmHWM) by writing 5 to /proc/self/clear_refs
    (Linux >= 4.0, own process, no root) and reads it afterwards, so short peaks in any
    thread are caught. Where that is not possible it samples VmRSS every 2 ms in a thread.
    """

    def __init__(self):
        self.base = 0
        self.peak = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._hwm = False

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self.base = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm = _status_kib("VmHWM") is not None
        except OSError:
            self._hwm = False
        if not self._hwm:
            self.peak = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self._hwm:
            self.peak = max(self.base, (_status_kib("VmHWM") or 0) * 1024)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())


def io_counters() -> dict[str, int]:
    """This process's Linux I/O counters (/proc/self/io): ``rchar`` (bytes returned by read
    calls, page-cache hits included) and ``read_bytes`` (bytes this process caused to be
    fetched from the storage layer); {} where the file is missing."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}
    return {k: int(fields[k]) for k in ("rchar", "read_bytes") if k in fields}


class ReadBytes:
    """Bytes this process read during a block: ``with ReadBytes() as r: ...``, then
    ``r.calls`` (through read calls: rchar) and ``r.disk`` (from the storage layer:
    read_bytes); None where /proc/self/io is missing."""

    def __init__(self):
        self.calls: int | None = None
        self.disk: int | None = None
        self._start: dict[str, int] = {}

    def __enter__(self) -> ReadBytes:
        self._start = io_counters()
        return self

    def __exit__(self, *exc) -> None:
        end = io_counters()
        if "rchar" in end and "rchar" in self._start:
            self.calls = end["rchar"] - self._start["rchar"]
        if "read_bytes" in end and "read_bytes" in self._start:
            self.disk = end["read_bytes"] - self._start["read_bytes"]


# --------------------------------------------------------------------------- files
def files_under(path: Path) -> list[Path]:
    """Regular files below `path`, sorted (symlinks are not followed)."""
    out: list[Path] = []
    for root, _dirs, names in os.walk(path):
        out.extend(Path(root) / n for n in names)
    return sorted(p for p in out if p.is_file() and not p.is_symlink())


def evict(paths: list[Path]) -> int:
    """Write back and drop `paths` from the page cache; returns the bytes they hold."""
    total = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue  # deleted meanwhile (e.g. retention)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def read_files(paths: list[Path], chunk: int = 8 << 20) -> int:
    """Read `paths` with plain reads into one reused buffer; returns bytes read."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


# --------------------------------------------------------------------------- the state
