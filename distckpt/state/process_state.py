"""Per-process state (e.g. a data iterator's position), one JSON file per process.

Orbax's JSON handler writes on the primary host only; a data loader's position
differs per host, so every process writes ``process_<i>.json`` into the step's
``process_state`` item. The same record carries the process's partial content
digests of the arrays it wrote (:mod:`distckpt.state.digest`), collected in the
background commit; the primary combines them into the step's commit record. Restoring onto the same process count hands each
process its own record. Onto a different count the records cannot be mapped
silently (torchtitan#811 dropped them): the caller passes a
:data:`ProcessStateRemap` hook, or restore raises.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import args as ocp_args
from orbax.checkpoint import future

from distckpt.state import digest, jsonio

MAX_BYTES = 16 * 1024 * 1024

ProcessStateRemap = Callable[[list[Any], int, int], Any]
"""remap(saved_states_by_process, new_process_index, new_process_count) -> this process's state."""


def _filename(process: int) -> str:
    return f"process_{process}.json"


class FaultPoint(enum.StrEnum):
    """The named points of a save where a fault hook runs. A ``str``: hooks that compare
    with plain strings (``point == "process_state:write"``) keep working."""

    SAVE_DECIDED = "save:decided"
    """save(), on every process, after the primary decided the step may be written and
    before Orbax starts (where a concurrent writer's step could appear)."""
    SAVE_STAGED = "save:staged"
    """Every process, after Orbax's save() call returned (it staged the arrays): in
    save(), or with save_in_background in the thread that makes that call."""
    PROCESS_STATE_WRITE = "process_state:write"
    """The background commit, on every process, before this process's record is written."""
    COMMIT_RENAMED = "commit:renamed"
    """The primary, after the rename and fsync, before the commit record."""
    COMMIT_RECORDED = "commit:recorded"
    """The primary, after the commit record, before retention."""
    LOCAL_STAGED = "local:staged"
    """A local-tier save, every process, in the background: shards staged and digested."""
    LOCAL_OFFERED = "local:offered"
    """A local-tier save: this host's shards offered to its peer, own copy not written."""
    LOCAL_FILE = "local:file"
    """Inside a local copy's write, after each shard file (the record not written)."""
    LOCAL_WRITTEN = "local:written"
    """A local-tier save: own copy committed, the peer's copy not pulled yet."""
    LOCAL_PULLED = "local:pulled"
    """A local-tier save: the peer's shards pulled and checked, not written yet."""
    LOCAL_PEER_WRITTEN = "local:peer-written"
    """A local-tier save: the peer copy committed, retention not run yet."""


FaultHook = Callable[[FaultPoint, int], None]
"""fault_hook(point, step): called at named points of a save; raising injects a failure."""


class ProcessStateHandler(ocp.handlers.AsyncCheckpointHandler):
    """Every process writes its own JSON record; restore reads all records."""

    def __init__(self, fault_hook: FaultHook | None = None,
                 on_failure: Callable[[int, BaseException], None] | None = None):
        self.fault_hook = fault_hook
        self.on_failure = on_failure
        self.step = -1  # set by the service before each save

    @staticmethod
    def _write_sync(directory: epath.Path, args: ProcessStateSave) -> None:
        record = {"process_index": jax.process_index(), "process_count": jax.process_count(),
                  "state": args.state}
        if args.digests is not None:
            partials = args.digests.result()
            record["checksums"] = {name: digest.to_hex(p)
                                   for name, p in zip(args.names, partials, strict=True)}
        (directory / _filename(jax.process_index())).write_text(json.dumps(record))

    async def _write(self, directory: epath.Path, args: ProcessStateSave) -> None:
        # Runs in the background commit, after save() has returned. Orbax logs a failure
        # here but may only raise it at its commit timeout, so report it straight away.
        try:
            if self.fault_hook is not None:
                self.fault_hook(FaultPoint.PROCESS_STATE_WRITE, self.step)
            self._write_sync(directory, args)
        except BaseException as e:
            if self.on_failure is not None:
                self.on_failure(self.step, e)
            raise

    async def async_save(self, directory: epath.Path, args: ProcessStateSave):
        return [future.CommitFutureAwaitingContractedSignals(
            self._write(directory, args), name="distckpt_process_state")]

    def save(self, directory: epath.Path, args: ProcessStateSave) -> None:
        self._write_sync(directory, args)

    def restore(self, directory: epath.Path, args: ProcessStateRestore | None = None) -> list[Any]:
        records = []
        index = 0
        while (path := directory / _filename(index)).exists():
            records.append(jsonio.read_limited(path, MAX_BYTES)["state"])
            index += 1
        return records

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


class _ReportingFuture:
    """A commit future that reports its failure the moment a waiter sees it."""

    def __init__(self, inner: future.Future, report: Callable[[BaseException], None]):
        self._inner = inner
        self._report = report

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._inner.result(timeout=timeout)
        except BaseException as e:
            self._report(e)
            raise

    def cancel(self) -> bool | None:
        cancel = getattr(self._inner, "cancel", None)
        return None if cancel is None else cancel()


class ReportingPyTreeHandler(ocp.PyTreeCheckpointHandler):
    """Orbax's PyTree handler, whose failed background array writes are reported at once.

    Orbax only logs a failed array write (disk full, an I/O error) in its commit thread;
    its own finalize thread then takes the error, its closing barrier can time out, and
    every process waits for a save that will never finish. `on_failure(error)` runs as
    soon as a write's future fails, on the failing process, so the service can tell
    every process at once (as ProcessStateHandler does for per-process records).
    """

    def __init__(self, on_failure: Callable[[BaseException], None] | None = None, **kwargs):
        super().__init__(**kwargs)
        self._on_failure = on_failure

    async def async_save(self, *args, **kwargs):
        futures = await super().async_save(*args, **kwargs)
        if self._on_failure is None or not futures:
            return futures
        return [_ReportingFuture(f, self._on_failure) for f in futures]


@ocp_args.register_with_handler(ReportingPyTreeHandler, for_save=True)
@dataclasses.dataclass
class ReportingPyTreeSave(ocp_args.PyTreeSave):
    """ocp.args.PyTreeSave, for ReportingPyTreeHandler (Orbax maps args types to handlers)."""


@ocp_args.register_with_handler(ReportingPyTreeHandler, for_restore=True)
@dataclasses.dataclass
class ReportingPyTreeRestore(ocp_args.PyTreeRestore):
    """ocp.args.PyTreeRestore, for ReportingPyTreeHandler."""


@ocp_args.register_with_handler(ProcessStateHandler, for_save=True)
@dataclasses.dataclass
class ProcessStateSave(ocp_args.CheckpointArgs):
    state: Any = None
    digests: digest.Pending | None = None
    """This process's partial digests of the saved arrays (computing on the devices)."""
    names: tuple[str, ...] = ()
    """The leaf names of those arrays, in the same order."""


@ocp_args.register_with_handler(ProcessStateHandler, for_restore=True)
@dataclasses.dataclass
class ProcessStateRestore(ocp_args.CheckpointArgs):
    pass


def read_checksums(directory: epath.Path, process_count: int) -> dict[str, str]:
    """Combine every process's partial digests (the step's `process_state` item directory)."""
    totals: dict[str, digest.Partial] = {}
    names: set[str] | None = None
    for index in range(process_count):
        path = directory / _filename(index)
        if not path.exists():
            raise ValueError(f"process {index} left no record ({path.name}) in {directory}")
        record = jsonio.read_limited(path, MAX_BYTES)
        partials = record.get("checksums")
        if not isinstance(partials, dict):
            raise ValueError(f"process {index}'s record has no checksums")
        if names is None:
            names = set(partials)
        elif set(partials) != names:
            raise ValueError(f"process {index} checksummed different arrays than process 0")
        for name, hexed in partials.items():
            totals[name] = digest.add(totals.get(name, digest.ZERO), digest.from_hex(hexed))
    return {name: digest.to_hex(p) for name, p in sorted(totals.items())}


def select(records: list[Any], saved_count: int, remap: ProcessStateRemap | None) -> Any:
    """This process's state from the saved records, or a clear error on a topology change."""
    index, count = jax.process_index(), jax.process_count()
    if len(records) != saved_count:
        raise ValueError(
            f"per-process state has {len(records)} records but the step was saved by "
            f"{saved_count} processes; the checkpoint is incomplete"
        )
    if all(r is None for r in records):
        return None
    if saved_count == count and remap is None:
        return records[index]
    if remap is None:
        raise ValueError(
            f"this step holds per-process state from {saved_count} processes but the job has "
            f"{count}; pass process_state_remap=fn(saved_states, process_index, process_count) "
            "to restore() to say how positions map onto the new hosts (or "
            "process_state_remap=distckpt.drop_process_state to discard them)"
        )
    return remap(records, index, count)


def drop_process_state(records: list[Any], index: int, count: int) -> None:
    """A remap hook that discards saved per-process state (start fresh on each host)."""
    return None
