"""The one path a failed background save takes, from where it happens to every host.

Each save is a *scope*, named alike on every process (``save:<nonce>:<n>``). Whatever
fails inside a save's background work (a shard write, the per-process record, the commit
record, Orbax's own threads) is handed to :meth:`SaveFailures.report`, which remembers it
for the scope and posts it on the coordination service. From there:

* the scope's commit barriers (:class:`distckpt.multihost.coordinator.ScopedBarriers`,
  Orbax's ``barrier_sync_fn``) stop waiting on every process (:meth:`abort_reason`);
* the next ``save()``, ``wait()`` or ``close()`` reads it with :meth:`failure` and every
  process raises it together (:meth:`distckpt.checkpoint.saving.Saver.agree`).

Nothing else carries a background failure.
"""

from __future__ import annotations

import errno

from distckpt.checkpoint.primary import Primary
from distckpt.errors import SaveFailedError
from distckpt.multihost import coordinator

__all__ = ["SaveFailures", "out_of_space"]


def out_of_space(error: BaseException) -> bool:
    """Whether `error`, or an exception it was raised from, is ENOSPC (filesystem full)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        # TensorStore (Orbax's array writes) raises ValueError with the OS error only in
        # its text, no errno: the one place the message is read.
        if not isinstance(e, OSError) and "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _note(scope: str) -> str:
    return f"save-failed:{scope}"


class SaveFailures:
    """Failures of this service's saves, by scope, and the barriers they stop."""

    def __init__(self, nonce: str, primary: Primary):
        self._nonce = nonce
        self._primary = primary
        self._seq = 0
        self._local: tuple[str, BaseException] | None = None  # (scope, this process's error)
        self._open: list[str] = []  # scopes whose coordination keys are not cleared
        self.barriers = coordinator.ScopedBarriers(self.abort_reason)

    @property
    def scope(self) -> str:
        """The scope of the newest save."""
        return self.barriers.scope

    def begin(self) -> str:
        """Start the next save's scope (every process, in the same order)."""
        self._seq += 1
        scope = f"save:{self._nonce}:{self._seq}"
        self.barriers.begin(scope)
        self._open.append(scope)
        return scope

    def report(self, error: BaseException, step: int | None = None) -> None:
        """A save of the current scope failed on this process (any thread): remember the
        first error and tell the peers now."""
        scope = self.barriers.scope
        if self._local is None or self._local[0] != scope:
            self._local = (scope, error)
        prefix = "" if step is None else f"step {step}: "
        coordinator.publish(_note(scope), f"{prefix}{type(error).__name__}: {error}")

    def failure(self, step: int | None) -> BaseException | None:
        """The current scope's failure: this process's own, else a peer's, else None."""
        scope = self.barriers.scope
        if self._local is not None and self._local[0] == scope:
            return self._local[1]
        peer = coordinator.read_note(_note(scope))
        if peer is None:
            return None
        return SaveFailedError(f"a peer's background save of step {step} failed: {peer}")

    def failed_here(self) -> bool:
        """Whether this process reported a failure of the current scope (no coordination
        call: for the path after a save that committed)."""
        return self._local is not None and self._local[0] == self.barriers.scope

    def abort_reason(self, scope: str) -> str | None:
        """Why the commit barriers of `scope` should stop waiting (None: keep waiting)."""
        local = self._local
        if local is not None and local[0] == scope:
            return f"this process's save failed: {type(local[1]).__name__}: {local[1]}"
        note = coordinator.read_note(_note(scope))
        return None if note is None else f"a peer's save failed ({note})"

    def forget(self) -> None:
        """The failure was raised on every process: the next save starts clean."""
        self._local = None

    def clear_finished(self) -> None:
        """Every process finished its saves: delete their barriers and notes."""
        if self._primary.is_me():
            for scope in self._open:
                self.barriers.clear(scope)
                coordinator.clear_note(_note(scope))
        self._open = []
