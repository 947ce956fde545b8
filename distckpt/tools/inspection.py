"""What is in a checkpoint directory, read from one CPU process, even when it is broken.

:func:`inspect_directory` never raises for a bad checkpoint: every problem (a
missing path, an empty or foreign directory, a step without a commit record,
garbage or truncated metadata, truncated or missing files, a newer format) is
reported in the result, next to whatever could still be read. It reads only small
files and file sizes, not array contents (``distckpt verify`` does that), and it
changes nothing on disk.
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath

from distckpt import storage
from distckpt.checkpoint import commit, committed
from distckpt.checkpoint.reader import StepReader
from distckpt.errors import CheckpointError, StepUnusableError

_TMP_MARKER = ".orbax-checkpoint-tmp"


def _entries(path: epath.Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"temporary": [], "other": []}
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        name = entry.name
        if committed.is_step_name(name):
            continue
        if _TMP_MARKER in name:
            out["temporary"].append(name)
        elif name not in (commit.QUARANTINE_DIR, commit.TRASH_DIR):
            out["other"].append(name)
    return out


def _importable(directory: epath.PathLike) -> str | None:
    """What a plain Orbax checkpoint or a pickle file is, and the command importing it."""
    from distckpt.tools import import_source

    if not isinstance(directory, str | os.PathLike) or "://" in str(os.fspath(directory)):
        return None  # importing reads local paths only
    try:
        source = import_source.detect(directory)
    except import_source.ImportSourceError:
        return None
    command = import_source.command_for(str(directory), source.layout)
    if source.layout is import_source.Layout.PICKLE:
        return (f"{directory} is a pickle file, not a distckpt checkpoint; unpickling executes "
                f"code stored in the file, so if you trust it, import it with: {command}")
    return (f"{directory} is {source.describe()}, not a distckpt checkpoint; import it "
            f"with: {command}")


def describe_step(directory: epath.Path, step: int) -> dict[str, Any]:
    """Everything readable about one step, with a list of problems."""
    info: dict[str, Any] = {"step": step, "committed": False, "problems": []}
    try:
        reader = StepReader(directory, step)
    except StepUnusableError as e:
        info["problems"].append(e.reason)
        return info
    info["committed"] = True
    info["committed_at"] = reader.record.get("committed_at")
    info["files"] = len(reader.record["files"])
    info["bytes"] = sum(reader.record["files"].values())
    try:
        reader.check_files()
    except StepUnusableError as e:
        info["problems"].append(e.reason)
    try:
        prov = reader.provenance
    except (StepUnusableError, CheckpointError) as e:
        info["problems"].append(str(e))
    else:
        info["topology"] = {k: prov.get(k) for k in (
            "process_count", "device_count", "local_device_count", "platform", "device_kind",
            "mesh")}
        info["versions"] = prov.get("versions")
        info["leaves"] = {name: {"shape": leaf.get("shape"), "dtype": leaf.get("dtype"),
                                 "spec": leaf.get("spec"),
                                 **({"key_impl": leaf["key_impl"]} if "key_impl" in leaf
                                    else {})}
                          for name, leaf in prov["leaves"].items()}
    try:
        saved = reader.user_json()
    except StepUnusableError as e:
        info["problems"].append(e.reason)
    else:
        info["metadata"] = saved.get("user") or {}
        info["metrics"] = saved.get("metrics") or None
    return info


def inspect_directory(directory: epath.PathLike, step: int | None = None) -> dict[str, Any]:
    """A JSON-friendly report of `directory`; `problems` says what is wrong, if anything."""
    report: dict[str, Any] = {"directory": str(directory), "found": False, "problems": [],
                              "steps": []}
    try:
        _, path = storage.open_directory(directory)
    except (storage.StorageConfigError, ImportError) as e:
        report["problems"].append(f"{directory}: {e}")
        return report
    if not path.exists():
        report["problems"].append(f"{directory} does not exist; check the path"
                                  + ("" if committed.is_local(path) else
                                     " (an object store prefix with no objects)"))
        return report
    if not path.is_dir():
        foreign = _importable(directory)
        report["problems"].append(foreign or f"{directory} is a file, not a checkpoint directory")
        report["importable"] = bool(foreign)
        return report
    report["found"] = True  # a directory (local), or a prefix with objects (object store)
    scanned = committed.scan(path)
    for s, rec in scanned.items():
        report["steps"].append({"step": s, "committed": isinstance(rec, dict),
                                **({} if isinstance(rec, dict) else {"reason": str(rec)})})
    extra = _entries(path)
    report["temporary"] = extra["temporary"]
    quarantine = path / commit.QUARANTINE_DIR
    report["quarantined"] = sorted(p.name for p in quarantine.iterdir()) \
        if quarantine.exists() else []
    done = [s for s, rec in scanned.items() if isinstance(rec, dict)]
    foreign = None if done else _importable(directory)
    if foreign:
        report["problems"].append(foreign)
        report["steps"] = []
        report["importable"] = True
        return report
    if not scanned:
        report["problems"].append(
            "no step directories: this is " + ("an empty directory" if not extra["other"]
                                               and not extra["temporary"] else
                                               "not a distckpt checkpoint directory")
            + "; point at the directory you gave CheckpointService or distckpt drill --dir")
    elif not done:
        report["problems"].append("no committed step: every step-named entry lacks a valid "
                                  "commit record (see each step's reason)")
    if step is None and done:
        step = done[-1]
    if step is not None:
        if step not in scanned:
            report["problems"].append(f"no step {step}; committed steps: {done}")
        else:
            detail = describe_step(path, step)
            report["detail"] = detail
            report["problems"] += [f"step {step}: {p}" for p in detail["problems"]]
    return report

