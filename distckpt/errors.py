"""distckpt's errors. Each message says what is wrong and what to do about it."""

from __future__ import annotations

import enum


class CheckpointError(RuntimeError):
    """Base class of distckpt's checkpoint errors."""


class StepExistsError(CheckpointError):
    """The step is already committed and overwrite=False."""


class StepOrderError(CheckpointError):
    """The step is below the newest committed step in the directory and
    allow_older_steps=False (see "Reusing a directory" in the README)."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """No committed (or no usable) step to restore, or no checkpoint directory."""


class TargetMismatchError(CheckpointError, ValueError):
    """The restore target does not match the saved leaves (paths, shapes, dtypes)."""


class SaveFailedError(CheckpointError):
    """A save failed on at least one process; nothing new was committed."""


class StepProblem(enum.StrEnum):
    """What is wrong with a committed step. A ``str``: ``kind == "corrupt"`` and JSON
    output keep working."""

    INCOMPLETE = "incomplete"
    """A file the commit record lists is missing or resized, or there is no record."""
    UNREADABLE = "unreadable"
    """The files are there but cannot be read (wrong topology, library, format)."""
    CORRUPT = "corrupt"
    """Contents changed since the commit (checksum or CRC-32 mismatch)."""


class StepUnusableError(CheckpointError):
    """A committed step cannot be restored: incomplete, unreadable or failing verification."""

    def __init__(self, step: int, reason: str, *,
                 kind: StepProblem | str = StepProblem.UNREADABLE):
        self.step = step
        self.reason = reason
        self.kind = StepProblem(kind)
        """Incomplete, unreadable or corrupt (checksum mismatch)."""
        super().__init__(f"step {step}: {reason}")


class FormatVersionError(CheckpointError):
    """The step was written by a newer distckpt; upgrade to read it."""


class StorageNotSharedError(CheckpointError):
    """Hosts do not see the same checkpoint directory."""
