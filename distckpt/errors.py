"""distckpt's errors. Each message says what is wrong and what to do about it."""

from __future__ import annotations


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


class StepUnusableError(CheckpointError):
    """A committed step cannot be restored: incomplete, unreadable or failing verification."""

    def __init__(self, step: int, reason: str, *, kind: str = "unreadable"):
        self.step = step
        self.reason = reason
        self.kind = kind
        """'incomplete', 'unreadable' or 'corrupt' (checksum mismatch)."""
        super().__init__(f"step {step}: {reason}")


class FormatVersionError(CheckpointError):
    """The step was written by a newer distckpt; upgrade to read it."""


class StorageNotSharedError(CheckpointError):
    """Hosts do not see the same checkpoint directory."""
