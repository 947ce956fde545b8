"""Files a command writes where its flags say (``--json``, ``--png``, ``--chart``,
``--markdown``).

A report path is checked when the arguments are parsed, before any work starts, so a long
run (a drill, a bench, a goodput hour) never ends in a traceback over its last write: a
path that is a directory, lies under a file or in a directory this user cannot write is
one line and exit 2, nothing written. Missing parent directories are not a mistake: they
are made when the file is written (``--json runs/today/report.json`` works in an empty
directory, as ``--dir`` does).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["output_file", "prepare", "unwritable", "write_text"]


def unwritable(path: str) -> str | None:
    """Why `path` cannot be written as a file, or None when it can (missing parents are
    made by :func:`prepare`)."""
    if not path:
        return "an empty path; give a file name"
    p = Path(path)
    if p.is_dir():
        return f"{path} is a directory; give a file name, e.g. {p / 'report.json'}"
    if p.exists():
        return None if os.access(p, os.W_OK) else f"{path} exists and is not writable"
    parent = p.parent  # as given: relative paths stay relative in the message
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{path} is inside {parent}, which is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: {parent} is not writable"
    return None


def output_file(text: str) -> str:
    """argparse ``type=`` for a report path: the path as given, or a one-line error."""
    problem = unwritable(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def prepare(path: str | os.PathLike[str]) -> Path:
    """`path` with its missing parent directories made (call just before writing)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def write_text(path: str | os.PathLike[str], text: str) -> None:
    prepare(path).write_text(text)
