"""Verify a checkpoint directory from one CPU process, whatever topology saved it.

For each committed step (or the one asked for): the commit record is consistent,
every file it lists is present with its committed size, the provenance is
readable and describes the arrays on disk, and every array's content digest
(:mod:`distckpt.state.digest`) equals the one the saving job recorded. Arrays are read
onto a single CPU device in batches of at most ``batch_bytes``, so verifying
needs about that much memory beyond the largest single array, not the whole
checkpoint. Nothing is written, moved or deleted.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.sharding import SingleDeviceSharding

from distckpt import storage
from distckpt.checkpoint import committed
from distckpt.checkpoint.reader import StepReader
from distckpt.errors import CheckpointError, StepUnusableError
from distckpt.state import digest, nnx_state

DEFAULT_BATCH_BYTES = 1 << 30


@dataclasses.dataclass
class StepVerdict:
    step: int
    ok: bool
    problems: list[str] = dataclasses.field(default_factory=list)
    arrays: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verify_step(directory: epath.PathLike, step: int, *,
                batch_bytes: int = DEFAULT_BATCH_BYTES) -> StepVerdict:
    """Check one step; never raises for a bad step (the verdict lists the problems)."""
    if batch_bytes < 1:
        raise ValueError(f"batch_bytes must be >= 1, got {batch_bytes}")
    t0 = time.perf_counter()
    verdict = StepVerdict(step=step, ok=False)
    try:
        reader = StepReader(directory, step)
        reader.check_files()
        record = reader.provenance
        stored = reader.array_metadata()
    except (StepUnusableError, CheckpointError) as e:
        verdict.problems.append(str(e))
        verdict.seconds = time.perf_counter() - t0
        return verdict
    expected = reader.checksums
    missing = sorted(set(record["leaves"]) - set(stored))
    verdict.problems += [f"{n}: in the provenance but not in the array data" for n in missing]
    verdict.problems += [f"{n}: no checksum in the commit record" for n in sorted(stored)
                         if n not in expected]
    device = jax.devices("cpu")[0]
    sharding = SingleDeviceSharding(device)
    names = [n for n in sorted(stored) if n in expected]
    batch: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if not batch:
            return
        tree = nnx_state.nest([(stored[n][0], jax.ShapeDtypeStruct(
            stored[n][1], np.dtype(stored[n][2]), sharding=sharding)) for n in batch])
        try:
            out = reader.restore_arrays(tree)
        except StepUnusableError as e:
            verdict.problems.append(f"reading {len(batch)} array(s) from {batch[0]} on: "
                                    f"{e.reason}")
        else:
            arrays = [nnx_state.lookup(out, stored[n][0]) for n in batch]
            for n, p in zip(batch, digest.dispatch(arrays).result(), strict=True):
                got = digest.to_hex(p)
                if got != expected[n]:
                    verdict.problems.append(f"{n}: checksum {got} read, {expected[n]} saved "
                                            "(the data changed after it was committed)")
            verdict.arrays += len(batch)
            verdict.bytes += sum(int(np.prod(stored[n][1], dtype=np.int64))
                                 * np.dtype(stored[n][2]).itemsize for n in batch)
            del out, arrays
        batch.clear()
        size = 0

    for n in names:
        nbytes = int(np.prod(stored[n][1], dtype=np.int64)) * np.dtype(stored[n][2]).itemsize
        if batch and size + nbytes > batch_bytes:
            flush()
        batch.append(n)
        size += nbytes
    flush()
    verdict.ok = not verdict.problems
    verdict.seconds = time.perf_counter() - t0
    return verdict


def verify_directory(directory: epath.PathLike, step: int | None = None, *,
                     batch_bytes: int = DEFAULT_BATCH_BYTES) -> dict[str, Any]:
    """Verify every committed step (or `step`); JSON-friendly report with 'ok'."""
    try:
        _, path = storage.open_directory(directory)
    except (storage.StorageConfigError, ImportError) as e:
        raise CheckpointError(f"{directory}: {e}") from e
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; check the path")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    scanned = committed.scan(path)
    done = [s for s, r in scanned.items() if isinstance(r, dict)]
    if step is not None:
        if step not in scanned:
            raise CheckpointError(f"no step {step} in {path}; committed steps: {done}")
        steps = [step]
    else:
        steps = done
    if not steps:
        raise CheckpointError(
            f"no committed step in {path}"
            + (f" (step-named entries without a valid commit record: {sorted(scanned)})"
               if scanned else "; is this a distckpt checkpoint directory?"))
    verdicts = [verify_step(path, s, batch_bytes=batch_bytes) for s in steps]
    return {"directory": str(path), "ok": all(v.ok for v in verdicts),
            "steps": [v.to_json() for v in verdicts]}
