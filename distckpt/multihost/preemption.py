"""Coordinated preemption: on SIGTERM every process saves the same step, then exits cleanly.

A scheduler that preempts a job sends SIGTERM to one, some or all of its
processes and kills them after a grace period. The save must be one collective
step taken by every process, so the processes must first agree on *which* step;
each deciding from its own notice is how jobs deadlock (ray PR 65183).

Usage: every process enters a :class:`PreemptionGuard` and calls
``guard.reached_sync_point(step)`` once per training step, after the step. It
returns True on every process at the same step; save that step (``force=True``),
wait for the commit and return normally, so the process exits 0::

    with PreemptionGuard("train") as guard, CheckpointService(directory) as ckpt:
        for step in range(start + 1, steps + 1):
            train_step(...)
            preempted = guard.reached_sync_point(step)
            ckpt.save(step, state, force=preempted)
            if preempted:
                ckpt.wait()
                break

Protocol (the one TSL's ``PreemptionSyncManager`` runs, on distckpt's keys)
---------------------------------------------------------------------------
1. *Detection.* The guard installs a Python SIGTERM handler that only sets a
   flag (nothing that takes a lock: a second signal may interrupt the first
   handler) and then calls the handler that was installed before it, if that was
   a Python callable.
2. *Notice.* A daemon thread per process polls, independently of training: its
   own flag, the job-wide notice key ``distckpt/preempt/<name>#<n>/notice`` and,
   when JAX's preemption service is running, JAX's own notice key. On its own
   flag it posts the job-wide notice, so a signal to any one process reaches all.
3. *Counters.* On noticing, the thread marks the notice known and posts this
   process's counter (the last step given to ``reached_sync_point``, or null
   before the first) under the lock that ``reached_sync_point`` takes to record
   steps, so no step can slip between posting and marking. A process leaving the
   guard posts its last counter too (it passes no more steps), so peers that
   notice later never wait for it.
4. *Decision.* Every thread reads all N counters (polling; it never calls a
   collective such as ``get_live_nodes``) and computes the same sync step:
   ``max(counters) + 1``, or "the first step each process reaches" if no
   process had passed a step yet (every process starts from the same step).
5. *Training thread.* ``reached_sync_point(step)`` records the step and returns
   False while no notice is known. Once one is, it waits (bounded by
   ``timeout_s``, then :class:`PreemptionTimeoutError` naming the processes that
   posted no counter) for the decision and returns ``step == sync_step``.
   A process posted its counter c before it could record c + 1, and
   sync_step >= c + 1, so no process can be past the sync step: ``step >
   sync_step`` is a protocol violation (steps not in lockstep) and raises.

Agreement runs on the watcher threads, never on the training thread, so it
cannot deadlock with training collectives: a process blocked in a collective
still posts its counter, and the decision only holds processes back to the
slowest one's next step, where the collective was going anyway. Polling uses
``key_value_try_get`` (one cheap RPC per ``poll_s``): a blocking get with a short
timeout would leave one pending callback per poll on the coordination service,
which keeps them until the key is set.

JAX's preemption service
------------------------
``jax.distributed.initialize`` starts one by default (``jax_enable_preemption_service``;
``JAX_ENABLE_PREEMPTION_SERVICE=false`` turns it off). Its C++ notifier catches
SIGTERM with a native handler that Python cannot see (``signal.getsignal``
answers SIG_DFL) nor call, and installing any Python handler replaces it
silently: that is how user handlers lose JAX's detection. The guard therefore
takes SIGTERM over for as long as it is active, so detection does not depend on
whether JAX's service is enabled, and never calls
``multihost_utils.reached_preemption_sync_point`` (it raises when the service is
off, orbax#3406). What the guard does with JAX's service when it is present:

* it also treats JAX's job-wide notice (the ``RECEIVED_PREEMPTION_NOTICE`` key
  of XLA's preemption_sync_manager.cc) as a notice. That key is one value in the
  coordination service, so every process reads the same thing and the step is
  still decided by this protocol alone: the two sources cannot disagree. It
  matters for a SIGTERM that JAX's handler swallowed before the guard was
  entered (e.g. during a restore): without it the job would train on, unaware.
* on exit it restores the handler that was there before, native ones included
  (the raw ``sigaction`` is saved and written back through ctypes), so JAX's
  detection is back after the guard.

While the guard is active, a SIGTERM does not reach JAX's notifier, so JAX's
``reached_preemption_sync_point`` (and Orbax's ``reached_preemption``) stay
False; use the guard's answer.

Handlers installed after the guard
----------------------------------
Python handlers cannot be chained from below: ``signal.signal`` replaces. At
every ``reached_sync_point`` the guard checks that its handler is still
installed; if user code replaced it, the guard re-installs itself in front of
the user's handler (which keeps running on every signal) and logs a WARNING.
A native handler installed over it (seen through the raw ``sigaction``) cannot
be called from Python: the guard re-installs itself and logs a WARNING saying
that handler will not run. A signal that arrives between the replacement and the
next step goes to the replacement alone: a window of at most one step.

Failure windows
---------------
* SIGTERM before the guard is entered: with JAX's service on, JAX's handler
  swallows it and the guard picks up its notice; with it off, the default
  action ends the process (nothing was trained yet in the reference loop).
* SIGTERM after the guard exits: the previous handler's behaviour.
* SIGTERM in the last steps, when the agreed step would be past the end: a loop
  that passes ``final=True`` on its last step saves that step on every process
  (the reference loops do); one that does not ends without a save and the guard
  logs that the agreed step was not reached.
* SIGTERM after the last step's ``reached_sync_point``: the loop ends normally.
* A process that dies during the agreement: the others raise
  PreemptionTimeoutError after ``timeout_s``, naming it.
* One preemption per guard; keys are namespaced by the guard's name and its
  sequence number in this process, so guards must be entered in the same order
  on every process (like any collective). Keys are left in the coordination
  service (a few bytes each): a peer may still be reading them.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from distckpt import compat
from distckpt.multihost import coordinator

logger = logging.getLogger(__name__)

_JAX_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"  # XLA preemption_sync_manager.cc
_FIRST_STEP = "first"  # decision when no process had passed a step yet
_FLAG_POLL_S = 0.05

_sequence_lock = threading.Lock()
_sequence: dict[str, int] = {}
_active_signals: set[int] = set()  # one active guard per signal: two would fight over it


class PreemptionTimeoutError(TimeoutError):
    """The processes did not agree on a preemption step in time."""


# ------------------------------------------------------------------ native handlers
# Python's signal module sees only handlers installed from Python; a native one (JAX's
# preemption notifier) reads as SIG_DFL and is lost when Python installs over it. The
# raw struct sigaction is saved and written back unread; only its first field, the
# handler's address on Linux and macOS, is compared.
_SIGACTION_BYTES = 512  # larger than struct sigaction on every libc we know (152 on glibc)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        libc.sigaction.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):  # not a POSIX libc
        return None


_libc = _load_libc()


def _read_action(signum: int) -> bytes | None:
    if _libc is None:
        return None
    buf = ctypes.create_string_buffer(_SIGACTION_BYTES)
    if _libc.sigaction(signum, None, buf) != 0:
        return None
    return buf.raw


def _write_action(signum: int, raw: bytes) -> None:
    if _libc is not None:
        _libc.sigaction(signum, ctypes.create_string_buffer(raw, len(raw)), None)


def _address(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    return int.from_bytes(raw[:ctypes.sizeof(ctypes.c_void_p)], sys.byteorder)


def _describe(handler: Any) -> str:
    if handler in (signal.SIG_DFL, signal.SIG_IGN, None):
        return {signal.SIG_DFL: "SIG_DFL", signal.SIG_IGN: "SIG_IGN", None: "native"}[handler]
    return getattr(handler, "__qualname__", repr(handler))


class PreemptionGuard:
    """Turns SIGTERM on any process into the same save step on every process.

    Enter it in the main thread of every process, in the same order, after
    :func:`distckpt.initialize`; call :meth:`reached_sync_point` once per step.
    See the module docstring for the protocol and how it treats JAX's service.
    """

    def __init__(self, name: str = "train", *, timeout_s: float = coordinator.DEFAULT_TIMEOUT_S,
                 poll_s: float = 0.25, signum: int = signal.SIGTERM):
        if timeout_s <= 0 or poll_s <= 0:
            raise ValueError(f"timeout_s and poll_s must be positive, got {timeout_s}, {poll_s}")
        self.name = name
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.signum = signum
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._decided = threading.Event()
        self._signalled = False  # set by the handler; a plain bool, no lock in handlers
        self._last_step: int | None = None
        self._notice: str | None = None
        self._sync_step: int | str | None = None
        self._error: BaseException | None = None
        self._reached = False
        self._posted = False
        self._previous: Any = None  # the Python handler we chain to
        self._saved_action: bytes | None = None
        self._own_address: int | None = None
        self._handler: Callable[[int, Any], None] = self._on_signal
        self._thread: threading.Thread | None = None
        self._active = False
        self._prefix = ""
        self._seq = ""
        self._finals = 0

    # ------------------------------------------------------------------ public
    @property
    def notice(self) -> str | None:
        """Where the preemption notice came from, once one is known."""
        return self._notice

    @property
    def sync_step(self) -> int | None:
        """The agreed step to save, once decided (None before)."""
        return self._sync_step if isinstance(self._sync_step, int) else None

    def reached_sync_point(self, step: int, *, final: bool = False) -> bool:
        """Call once per step on every process, after the step: True at the agreed save step.

        Pass ``final=True`` on the loop's last step (on every process, at the same step):
        a notice known to any process by then is honoured at that step, even when the
        agreed step would have been past the end of the run, so every process saves the
        same, last step. It costs one small all-gather."""
        if not self._active:
            raise RuntimeError("PreemptionGuard.reached_sync_point() outside the guard's "
                               "`with` block")
        self._keep_handler()
        self._raise_if_failed()
        if self._reached:
            return False  # one preemption per guard
        if final:
            return self._final_step(step)
        if self._thread is None:  # single process: decide here
            with self._lock:
                if self._notice is None and self._signalled:
                    self._notice = f"signal {self._signame()} on this process"
                    self._sync_step = (self._last_step + 1 if self._last_step is not None
                                       else _FIRST_STEP)
                    self._decided.set()
        with self._lock:
            if self._notice is None:
                self._last_step = step
                return False
        self._wait_decided(step)
        self._raise_if_failed()
        with self._lock:
            if self._sync_step == _FIRST_STEP:
                self._sync_step = step
            sync = self._sync_step
        assert isinstance(sync, int)
        if step > sync:
            raise RuntimeError(
                f"[process={jax.process_index()}] preemption: step {step} is past the agreed "
                f"save step {sync}; reached_sync_point() must be called at every step, by "
                "every process, starting from the same step")
        if step < sync:
            return False
        self._reached = True
        logger.warning("[process=%d] preemption (%s): reached the agreed save step %d",
                       jax.process_index(), self._notice, step)
        return True

    def _final_step(self, step: int) -> bool:
        """The last step: every process says whether it knows of a notice, and all save if
        any does. The all-gather gives every process the same answer, whatever each
        watcher has seen so far (a notice that arrives after it is the 'after the last
        step' window of the module docstring)."""
        with self._lock:
            noticed = self._signalled or self._notice is not None
            self._last_step = step
        self._finals += 1
        flags = coordinator.all_gather(f"preempt-{self._seq}-{self._finals}-final",
                                       bool(noticed), self.timeout_s)
        if not any(flags):
            return False
        with self._lock:
            if self._notice is None:
                self._notice = f"{self._signame()} on process {flags.index(True)}"
            self._reached = True
        logger.warning("[process=%d] preemption (%s): saving the run's last step %d (the "
                       "agreed step %s is past the end)", jax.process_index(), self._notice,
                       step, self.sync_step if self.sync_step is not None else "not yet known")
        return True

    # ------------------------------------------------------------------ context
    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread: Python runs "
                               "signal handlers only there")
        if self._prefix:
            raise RuntimeError("a PreemptionGuard can be entered once; make a new one")
        multi = jax.process_count() > 1
        client = coordinator._distributed_client()
        if multi and client is None:
            raise RuntimeError("PreemptionGuard needs distckpt.initialize() in a multi-process "
                               "job")
        with _sequence_lock:
            if self.signum in _active_signals:
                raise RuntimeError(f"another PreemptionGuard for {self._signame()} is active in "
                                   "this process; use one guard per training loop")
            _active_signals.add(self.signum)
            seq = _sequence.get(self.name, 0)
            _sequence[self.name] = seq + 1
        self._prefix = f"{coordinator._KV_PREFIX}/preempt/{self.name}#{seq}/"
        self._seq = f"{self.name}#{seq}".replace("/", "_")
        self._saved_action = _read_action(self.signum)
        try:
            self._previous = signal.signal(self.signum, self._handler)
        except (OSError, ValueError):  # a signal that cannot be caught, e.g. SIGKILL
            with _sequence_lock:
                _active_signals.discard(self.signum)
            raise
        self._own_address = _address(_read_action(self.signum))
        self._active = True
        if self._previous in (signal.SIG_DFL, None) and \
                _address(self._saved_action) not in (None, 0, 1):  # 0, 1: SIG_DFL, SIG_IGN
            logger.info("[process=%d] preemption guard took %s over from a native handler "
                        "(e.g. JAX's preemption notifier); restored on exit",
                        jax.process_index(), self._signame())
        if multi:
            self._thread = threading.Thread(target=self._watch, args=(client,), daemon=True,
                                            name=f"distckpt-preemption-{self.name}")
            self._thread.start()
        atexit.register(self._stop_watcher)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop_watcher()
        atexit.unregister(self._stop_watcher)
        self._active = False
        if self._thread is not None:
            # This process passes no more steps. A notice that its watcher did not see in
            # time still gets its counter, so peers do not wait for it until timeout_s.
            client = coordinator._distributed_client()
            try:
                with self._lock:
                    if client is not None:
                        self._post_counter(client)
            except Exception as e:
                logger.warning("[process=%d] could not post the final step counter of the "
                               "preemption guard: %s", jax.process_index(), e)
        self._restore_handler()
        with _sequence_lock:
            _active_signals.discard(self.signum)
        if self._signalled and not self._reached and exc_type is None:
            logger.warning("[process=%d] %s was received but the guard exited before the agreed "
                           "save step (%s); nothing was saved for it",
                           jax.process_index(), self._signame(), self.sync_step)

    # ------------------------------------------------------------------ signals
    def _signame(self) -> str:
        return signal.Signals(self.signum).name

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True
        previous = self._previous
        if callable(previous):
            previous(signum, frame)

    def _keep_handler(self) -> None:
        """Re-install the handler if something replaced it; warn, never lose detection."""
        current = signal.getsignal(self.signum)
        if current is not self._handler:
            self._previous = signal.signal(self.signum, self._handler)
            self._own_address = _address(_read_action(self.signum))
            logger.warning(
                "[process=%d] the %s handler of the preemption guard was replaced by %s; "
                "re-installed it in front (%s). Install handlers before entering the guard "
                "to avoid this.", jax.process_index(), self._signame(), _describe(current),
                "the replacement still runs on every signal, after the guard"
                if callable(current) else "the replacement no longer takes effect")
            return
        address = _address(_read_action(self.signum))
        if address is not None and address != self._own_address:
            signal.signal(self.signum, self._handler)
            self._own_address = _address(_read_action(self.signum))
            logger.warning(
                "[process=%d] a native %s handler (at %#x) replaced the preemption guard's; "
                "re-installed the guard's. That native handler cannot be chained from Python "
                "and will not run while the guard is active.",
                jax.process_index(), self._signame(), address)

    def _restore_handler(self) -> None:
        if signal.getsignal(self.signum) is not self._handler:
            logger.warning("[process=%d] leaving the %s handler installed after the preemption "
                           "guard (%s) in place", jax.process_index(), self._signame(),
                           _describe(signal.getsignal(self.signum)))
            return
        previous = self._previous if self._previous is not None else signal.SIG_DFL
        signal.signal(self.signum, previous)
        if self._saved_action is not None and \
                _address(_read_action(self.signum)) != _address(self._saved_action):
            _write_action(self.signum, self._saved_action)  # a native handler, e.g. JAX's

    # ------------------------------------------------------------------ agreement
    def _raise_if_failed(self) -> None:
        """A failed watcher is raised on the training thread: never lose detection silently."""
        if self._error is not None:
            raise RuntimeError(
                f"[process={jax.process_index()}] the preemption watcher failed, so preemption "
                f"notices are not detected or agreed on: {self._error}") from self._error

    def _wait_decided(self, step: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self._decided.wait(0.05):
            if time.monotonic() > deadline:
                missing = self._missing_counters()
                raise PreemptionTimeoutError(
                    f"[process={jax.process_index()}] preemption: no agreed save step within "
                    f"{self.timeout_s:g}s at step {step}; processes that posted no step "
                    f"counter: {missing or 'unknown'}. Check those processes' logs.")

    def _missing_counters(self) -> list[int]:
        client = coordinator._distributed_client()
        if client is None:
            return []
        try:
            posted = {key.rsplit("/", 1)[1] for key, _ in
                      client.key_value_dir_get(self._prefix + "step/")}
        except Exception:  # the service itself is unreachable
            return []
        return [p for p in range(jax.process_count()) if str(p) not in posted]

    def _stop_watcher(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 4 * self.poll_s))
            if self._thread.is_alive():
                logger.warning("[process=%d] preemption watcher thread did not stop",
                               jax.process_index())

    def _watch(self, client: Any) -> None:
        try:
            source = self._wait_for_notice(client)
            if source is not None:
                self._agree(client, source)
        except Exception as e:  # handed to the training thread at its next sync point
            if self._stop.is_set():
                return  # shutting down; the client may already be gone
            logger.error("[process=%d] preemption watcher failed: %s", jax.process_index(), e)
            self._error = e
            self._decided.set()

    def _try_get(self, client: Any, key: str) -> str | None:
        try:
            return client.key_value_try_get(key)
        except Exception:  # NOT_FOUND
            return None

    def _wait_for_notice(self, client: Any) -> str | None:
        me = jax.process_index()
        notice_key = self._prefix + "notice"
        watch_jax = compat.jax_preemption_sync_manager() is not None
        next_poll = 0.0
        while not self._stop.wait(_FLAG_POLL_S):
            if self._signalled:
                client.key_value_set(notice_key, json.dumps({"process": me}),
                                     allow_overwrite=True)
                return f"{self._signame()} on process {me}"
            now = time.monotonic()
            if now < next_poll:
                continue
            next_poll = now + self.poll_s
            text = self._try_get(client, notice_key)
            if text is not None:
                return f"{self._signame()} on process {json.loads(text)['process']}"
            if watch_jax and self._try_get(client, _JAX_NOTICE_KEY) is not None:
                return "JAX preemption service notice"
        return None

    def _post_counter(self, client: Any) -> None:
        """Post this process's counter, once; the caller holds the lock."""
        if not self._posted:
            client.key_value_set(f"{self._prefix}step/{jax.process_index()}",
                                 json.dumps(self._last_step), allow_overwrite=True)
            self._posted = True

    def _agree(self, client: Any, source: str) -> None:
        me, count = jax.process_index(), jax.process_count()
        with self._lock:
            self._notice = source
            mine = self._last_step
            self._post_counter(client)
        logger.warning("[process=%d] preemption notice (%s) at step %s; agreeing on a save step",
                       me, source, mine)
        deadline = time.monotonic() + self.timeout_s
        counters: dict[int, int | None] = {}
        while len(counters) < count:
            entries = client.key_value_dir_get(self._prefix + "step/")
            counters = {int(key.rsplit("/", 1)[1]): json.loads(value) for key, value in entries}
            if len(counters) >= count:
                break
            if time.monotonic() > deadline:
                return  # the training thread times out and names who is missing
            if self._stop.wait(0.05):
                return
        steps = [c for c in counters.values() if c is not None]
        with self._lock:
            self._sync_step = max(steps) + 1 if steps else _FIRST_STEP
        logger.warning("[process=%d] preemption: step counters %s -> save at step %s", me,
                       [counters[p] for p in sorted(counters)],
                       self._sync_step if steps else "the first step every process reaches")
        self._decided.set()
