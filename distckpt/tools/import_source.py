"""What a checkpoint to import is: its layout, found from its small files, reading no arrays.

The layouts people write (see ``docs/import.md``):

``orbax-manager``       an ``ocp.CheckpointManager`` directory: ``<dir>/<step>/<item>/``,
                        the item ``default`` (``checkpointers=ocp.PyTreeCheckpointer()``)
                        or named items (``ocp.args.Composite(model=..., optimizer=...)``,
                        ``{'state': ..., 'metadata': ...}``);
``orbax-manager-step``  one ``<dir>/<step>/`` of such a directory, given directly;
``orbax-single``        one ``ocp.StandardCheckpointer`` / ``PyTreeCheckpointer`` save of a
                        tree (``nnx.state(model)``, ``nnx.split(model)``, a dict of them);
``pickle``              a file written with ``pickle.dump`` (the seeds' legacy
                        ``checkpoint_<step>.pkl``). Unpickling runs code from the file, so
                        it is read only when the caller allows it.

:func:`detect` never writes and never unpickles; a source it cannot place raises
:class:`ImportSourceError` with one line saying what it found and what to do.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from typing import Any

from etils import epath

from distckpt.checkpoint import committed
from distckpt.errors import CheckpointError

CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
TREE_METADATA = "_METADATA"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_STEP_IN_NAME = re.compile(r"(\d+)$")
# Pickle protocols 2-5 start with PROTO (0x80) and the protocol number.
_PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))


class ImportSourceError(CheckpointError, ValueError):
    """The source cannot be imported as given (the message says why and what to do)."""


class Layout(enum.StrEnum):
    MANAGER = "orbax-manager"
    MANAGER_STEP = "orbax-manager-step"
    SINGLE = "orbax-single"
    PICKLE = "pickle"


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint to import, as found on disk."""

    path: epath.Path
    """The absolute path the user named."""
    layout: Layout
    step: int | None
    """The source's own step number (None when it has none: a single save, a pickle
    without one)."""
    items: dict[str, epath.Path]
    """Orbax item name -> its directory (``{"": path}`` for a single save; empty for pickle)."""
    handlers: dict[str, str]
    """Orbax item name -> the handler class that wrote it (its last dotted name)."""
    metrics: dict[str, float]
    """Metrics the CheckpointManager recorded with the step (empty if none)."""
    steps: tuple[int, ...] = ()
    """Every step of a CheckpointManager directory."""

    def describe(self) -> str:
        names = ", ".join(sorted(n for n in self.items if n)) or "-"
        if self.layout is Layout.MANAGER:
            return (f"an Orbax CheckpointManager directory, step {self.step} "
                    f"(of {list(self.steps)}), items {names}")
        if self.layout is Layout.MANAGER_STEP:
            return f"step {self.step} of an Orbax CheckpointManager directory, items {names}"
        if self.layout is Layout.SINGLE:
            return f"a single Orbax {self.handlers.get('', 'checkpointer')} save"
        return "a pickle file"


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ImportSourceError(f"{path} is unreadable or not JSON ({type(e).__name__}); the "
                                "checkpoint is truncated or damaged") from e


def _short(name: Any) -> str:
    return str(name).rsplit(".", 1)[-1]


def is_pickle_file(path: epath.Path) -> bool:
    try:
        with open(os.fspath(path), "rb") as f:
            return f.read(2) in _PICKLE_MAGIC
    except OSError:
        return False


def is_orbax_save(path: epath.Path) -> bool:
    """A directory holding one Orbax pytree save (its tree metadata file)."""
    return (path / TREE_METADATA).is_file()


def orbax_steps(path: epath.Path) -> dict[int, epath.Path]:
    """Finished step directories of a CheckpointManager directory (temporary ones left out)."""
    out = {}
    for step, entry in committed.step_names(path):
        if entry.is_dir() and (entry / CHECKPOINT_METADATA).is_file():
            out[step] = entry
    return dict(sorted(out.items()))


def _step_items(step_dir: epath.Path) -> tuple[dict[str, epath.Path], dict[str, str],
                                                dict[str, float]]:
    meta = _read_json(step_dir / CHECKPOINT_METADATA)
    handlers = meta.get("item_handlers") if isinstance(meta, dict) else None
    items: dict[str, epath.Path] = {}
    names: dict[str, str] = {}
    if isinstance(handlers, dict):
        for name, handler in handlers.items():
            items[str(name)] = step_dir / str(name)
            names[str(name)] = _short(handler)
    else:  # older Orbax wrote no handler names: every subdirectory is an item
        for entry in sorted(step_dir.iterdir(), key=lambda p: p.name):
            if entry.is_dir() and _TMP_MARKER not in entry.name:
                items[entry.name] = entry
                names[entry.name] = "unknown"
    for name, item in items.items():
        if not item.is_dir():
            raise ImportSourceError(
                f"{step_dir} lists item {name!r} but {item} is missing; the step is "
                "incomplete: import another step with --step N")
    raw = meta.get("metrics") if isinstance(meta, dict) else None
    metrics = {str(k): float(v) for k, v in (raw or {}).items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    return items, names, metrics


def step_from_name(path: epath.Path) -> int | None:
    """The step in a name like ``checkpoint_1200.pkl`` or ``train_state_5``, if any."""
    match = _STEP_IN_NAME.search(path.name.split(".", 1)[0])
    return int(match.group(1)) if match else None


def detect(src: epath.PathLike, step: int | None = None) -> Source:
    """Find what `src` is. `step` picks a CheckpointManager step (default: the newest)."""
    path = epath.Path(os.path.abspath(os.fspath(src)))
    if not path.exists():
        raise ImportSourceError(f"{src} does not exist; check the path")
    if path.is_file():
        if is_pickle_file(path):
            return Source(path, Layout.PICKLE, step_from_name(path), {}, {}, {})
        raise ImportSourceError(
            f"{src} is a file but not a pickle file or an Orbax checkpoint directory; give "
            "the directory Orbax saved into, or the .pkl file pickle.dump wrote")
    if (path / CHECKPOINT_METADATA).is_file() or is_orbax_save(path):
        if is_orbax_save(path):  # a single StandardCheckpointer / PyTreeCheckpointer save
            handler = "checkpointer"
            if (path / CHECKPOINT_METADATA).is_file():
                meta = _read_json(path / CHECKPOINT_METADATA)
                handler = _short(meta.get("item_handlers") or handler) \
                    if isinstance(meta, dict) else handler
            own = step_from_name(path)
            return Source(path, Layout.SINGLE, own, {"": path}, {"": handler}, {})
        items, handlers, metrics = _step_items(path)
        own = int(path.name) if committed.is_step_name(path.name) else None
        if step is not None and own is not None and step != own:
            raise ImportSourceError(f"{src} is step {own} of a CheckpointManager directory, "
                                    f"not step {step}; leave out --step or give {path.parent}")
        return Source(path, Layout.MANAGER_STEP, own, items, handlers, metrics)
    if (path / committed.COMMIT_FILE).exists() or committed.committed_steps(path):
        raise ImportSourceError(f"{src} is already a distckpt checkpoint directory; restore it "
                                "with CheckpointService, nothing to import")
    steps = orbax_steps(path)
    if not steps:
        raise ImportSourceError(
            f"{src} is not an Orbax checkpoint: no {CHECKPOINT_METADATA} or {TREE_METADATA} "
            "and no finished step directories; give a CheckpointManager directory, one of "
            "its steps, a StandardCheckpointer save or a .pkl file")
    chosen = max(steps) if step is None else step
    if chosen not in steps:
        raise ImportSourceError(f"{src} has no finished step {step}; its steps: {list(steps)}")
    items, handlers, metrics = _step_items(steps[chosen])
    return Source(path, Layout.MANAGER, chosen, items, handlers, metrics, tuple(steps))


def command_for(path: str, layout: Layout) -> str:
    """The import command a user would type for `path` (for `distckpt inspect`)."""
    flag = " --allow-pickle" if layout is Layout.PICKLE else ""
    return f"distckpt import {path} NEW_DIR{flag}"
