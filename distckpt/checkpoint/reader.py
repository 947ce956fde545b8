"""Read one committed step, whatever topology saved it; never writes anything.

A :class:`StepReader` opens ``<dir>/<step>`` by its commit record
(:mod:`distckpt.checkpoint.committed`) and reads the step's items directly (arrays
streamed by :mod:`distckpt.checkpoint.streaming`, the rest with Orbax's handlers), not
through a ``CheckpointManager``: a reader must not create, clean up
or lock anything (a plain-Orbax reader with temporary-directory cleanup deleted a
live save), and must not pass through Orbax's restore barriers, whose names come
from per-process counters. Agreement between processes is the caller's job.

Every failure is a :class:`~distckpt.errors.StepUnusableError` (incomplete,
unreadable, corrupt) or :class:`~distckpt.errors.FormatVersionError`, with the
step and what to do; nothing leaks as a bare TensorStore traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from distckpt import storage
from distckpt.checkpoint import committed, streaming
from distckpt.errors import FormatVersionError, StepProblem, StepUnusableError
from distckpt.state import digest, jsonio, provenance
from distckpt.state import process_state as per_process

PROVENANCE_FILE = "provenance/provenance.json"
METADATA_FILE = "metadata/metadata.json"
STATE_ITEM = "state"
PROCESS_ITEM = "process_state"


def _short(e: BaseException, limit: int = 400) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."


class StepReader:
    """Read-only access to one committed step."""

    def __init__(self, directory: epath.PathLike | storage.Location, step: int):
        _, self.directory = storage.open_directory(directory)
        self.step = step
        self.path = committed.step_dir(self.directory, step)
        try:
            self.record = committed.read_record(self.path, step)
        except committed.CommitRecordError as e:
            raise StepUnusableError(step, f"not committed: {e}",
                                    kind=StepProblem.INCOMPLETE) from e
        self._provenance: dict[str, Any] | None = None

    # ------------------------------------------------------------------ small files
    def check_files(self) -> None:
        """Raise StepUnusableError if a file the commit record lists is missing or resized."""
        problems = committed.check_files(self.path, self.record)
        if problems:
            changed = all(p.problem is StepProblem.CORRUPT for p in problems)
            what = StepProblem.CORRUPT if changed else StepProblem.INCOMPLETE
            raise StepUnusableError(
                self.step, f"{what.value}: {len(problems)} file(s) differ from the commit "
                f"record: {'; '.join(map(str, problems[:5]))}"
                + (" ..." if len(problems) > 5 else ""),
                kind=what)

    def _json(self, rel: str) -> Any:
        try:
            return jsonio.read_limited(self.path / rel)
        except FileNotFoundError as e:
            raise StepUnusableError(self.step, f"{rel} is missing",
                                    kind=StepProblem.INCOMPLETE) from e
        except (OSError, ValueError) as e:
            raise StepUnusableError(self.step, f"{rel} is unreadable ({_short(e)})",
                                    kind=StepProblem.CORRUPT) from e

    @property
    def provenance(self) -> dict[str, Any]:
        if self._provenance is None:
            record = self._json(PROVENANCE_FILE)
            if not isinstance(record, dict) or record.get("format") != "distckpt":
                raise StepUnusableError(self.step, f"{PROVENANCE_FILE} is not a distckpt "
                                        "provenance record", kind=StepProblem.CORRUPT)
            version = record.get("format_version")
            if not isinstance(version, int):
                raise StepUnusableError(self.step, "provenance has no format version",
                                        kind=StepProblem.CORRUPT)
            if version > provenance.FORMAT_VERSION:
                raise FormatVersionError(
                    f"step {self.step} in {self.directory} was written by a newer distckpt "
                    f"(format {version} > {provenance.FORMAT_VERSION}); upgrade distckpt "
                    "(pip install -U distckpt) to read it. Nothing was changed.")
            if record.get("step") != self.step or not isinstance(record.get("leaves"), dict):
                raise StepUnusableError(self.step, "provenance does not describe this step",
                                        kind=StepProblem.CORRUPT)
            self._provenance = record
        return self._provenance

    def user_json(self) -> dict[str, Any]:
        """{'user': metadata, 'metrics': metrics} as saved."""
        value = self._json(METADATA_FILE)
        if not isinstance(value, dict):
            raise StepUnusableError(self.step, f"{METADATA_FILE} is not an object",
                                    kind=StepProblem.CORRUPT)
        return value

    def metrics(self) -> dict[str, Any] | None:
        return self.user_json().get("metrics") or None

    def process_records(self) -> list[Any]:
        try:
            return per_process.ProcessStateHandler().restore(self.path / PROCESS_ITEM)
        except (OSError, ValueError, KeyError) as e:
            raise StepUnusableError(self.step, f"per-process state is unreadable ({_short(e)})",
                                    kind=StepProblem.CORRUPT) from e

    @property
    def checksums(self) -> dict[str, str]:
        return dict(self.record["checksums"])

    # ------------------------------------------------------------------ arrays
    def read_arrays(self, requests: Sequence[streaming.Request], *, verify: bool,
                    memory_bytes: int | None = None,
                    read_once: bool = False,
                    agree: Callable[[Any], list[Any]] | None = None,
                    read_bytes: dict[str, int] | None = None,
                    ) -> tuple[dict[str, jax.Array], dict[str, digest.Partial] | None]:
        """The requested arrays in their targets' shardings, streamed through a host
        budget of `memory_bytes` beyond the shards (None: :func:`streaming.budget`'s);
        with `verify`, also this process's partial digest of each (by name). With
        `read_once`, a shard index several processes hold is read by one of them and
        sent to the others (every process must call this alike); `agree` all-gathers a
        small JSON value first (default: a JAX collective). Given `read_bytes`, it gets
        the bytes of each array this process read from storage (by name)."""
        try:
            return streaming.read(self.path / STATE_ITEM, requests,
                                  memory_bytes=memory_bytes, verify=verify,
                                  read_once=read_once, agree=agree, read_bytes=read_bytes)
        except Exception as e:  # TensorStore/Orbax errors: wrap with the step and a hint
            raise StepUnusableError(
                self.step, f"[process={jax.process_index()}] array data is unreadable "
                f"({_short(e)})", kind=StepProblem.UNREADABLE) from e

    def restore_arrays(self, tree: Mapping[str, Any], *,
                       memory_bytes: int | None = None) -> Any:
        """Restore the nested tree of ShapeDtypeStructs (with shardings) from the state item."""
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        requests = []
        for path, target in flat:
            keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            requests.append(streaming.Request("/".join(keys), keys, target))
        values, _ = self.read_arrays(requests, verify=False, memory_bytes=memory_bytes)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree),
                                            [values[r.name] for r in requests])

    def array_metadata(self) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
        """name -> (path, shape, dtype) of every array as stored (key leaves as key data)."""
        handler = ocp.PyTreeCheckpointHandler()
        try:
            tree = handler.metadata(self.path / STATE_ITEM).tree
        except Exception as e:
            raise StepUnusableError(self.step, f"array metadata is unreadable ({_short(e)})",
                                    kind=StepProblem.CORRUPT) from e
        finally:
            handler.close()
        out = {}
        for path, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            out["/".join(keys)] = (keys, tuple(meta.shape), str(meta.dtype))
        return out


def compare(step: int, expected: Mapping[str, str], gathered: Sequence[Mapping[str, str]],
            names: Sequence[str]) -> list[str]:
    """Mismatches between the record's digests and the sum of every process's partials."""
    problems = []
    for name in names:
        want = expected.get(name)
        if want is None:
            problems.append(f"{name}: no checksum in the commit record")
            continue
        got = digest.to_hex(digest.add(*(digest.from_hex(g[name]) for g in gathered)))
        if got != want:
            holders = [i for i, g in enumerate(gathered) if g[name] != digest.to_hex(digest.ZERO)]
            problems.append(f"{name}: checksum {got} restored, {want} saved (data read by "
                            f"process(es) {holders})")
    return problems
