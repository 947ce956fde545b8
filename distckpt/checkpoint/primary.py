"""The primary host of one checkpoint service: the process that decides and writes alone.

Decisions that read the directory (does this step exist? which step is the newest? is
this step usable?) are taken by the primary host and handed to the others
(:func:`distckpt.multihost.coordinator.primary_decides`): hosts of a shared filesystem do
not see its changes at the same moment. The setting is per service
(``CheckpointOptions.primary_host``), never read from a module global.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax

from distckpt.errors import CheckpointError
from distckpt.multihost import coordinator

_T = TypeVar("_T")

__all__ = ["Primary"]


class Primary:
    """Decisions and writes of a service's primary host, with the service's timeout."""

    def __init__(self, host: int, timeout_s: float):
        self.host = host
        self.timeout_s = timeout_s

    def is_me(self) -> bool:
        """Whether this process is the primary host."""
        return coordinator.is_primary(self.host)

    def decide(self, name: str, decide: Callable[[], _T]) -> _T:
        """The primary computes `decide()`; every process returns its value (or raises
        DecisionFailedError if it raised on the primary)."""
        return coordinator.primary_decides(name, decide, self.timeout_s,
                                           primary_host=self.host)

    def writes(self, name: str, write: Callable[[], Any], directory: str) -> Any:
        """The primary writes to `directory`; a failure there fails every host at once
        (not at the next barrier, after the timeout) with a message naming the cause."""
        try:
            return self.decide(name, write)
        # OSError: a single process gets `write`'s own error (primary_decides has no peer).
        except (OSError, coordinator.DecisionFailedError) as e:
            cause = e.error if isinstance(e, coordinator.DecisionFailedError) \
                else f"{type(e).__name__}: {e}"
            raise CheckpointError(
                f"[process={jax.process_index()}] the primary host (process {self.host}) "
                f"cannot write to the checkpoint directory {directory}: {cause}. Give every "
                "host write access there (file permissions, or object-store credentials "
                "allowed to write), point at a writable directory, or pass "
                "CheckpointOptions(read_only=True) to only restore. Nothing was saved.") from e
