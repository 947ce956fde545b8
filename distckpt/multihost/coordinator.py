"""Starting a multi-host job and making its hosts agree.

Everything here runs on JAX's *coordination service* (the gRPC service that
`jax.distributed.initialize` starts on process 0), never on device
collectives: a barrier or a decision must work even when the devices are busy,
and it must be able to time out and say who is missing.

* :func:`initialize` picks the cluster parameters in this order: explicit
  arguments, then ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID``, then the auto-detection `jax.distributed.initialize`
  already does (SLURM, Open MPI, Cloud TPU, Kubernetes), then a single process.
* :func:`barrier` is a named barrier with a timeout. Names come from the
  operation (``save:step=12:commit``), never from a per-process counter that can
  drift between hosts. The coordination service counts uses of a name itself, so
  the same name may be used again once every process has passed it. On timeout
  every waiting process raises :class:`BarrierTimeoutError` naming the processes
  that did not arrive (and whether the service still sees them alive).
* :func:`primary_decides` lets the primary host compute a small JSON value (a
  step, a bool, a short string) and hands the same value to every process.
  Anything that depends on clocks or the filesystem is decided this way: hosts'
  clocks are skewed and shared filesystems are not instantly consistent. Every
  call is its own decision (the name plus how often this process asked it
  before), so a decision can never be answered by an earlier one of the same name.
* :class:`ScopedBarriers` are barriers that stop waiting as soon as a failure is
  reported (Orbax's background-commit barriers: the service's cannot be cancelled,
  so a failed write elsewhere would keep every peer waiting for the whole timeout).
* :func:`is_primary` is the one place that answers "am I the primary host?";
  the primary is a setting (:func:`set_primary_host`, default process 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax

from distckpt import compat

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 300.0
_KV_PREFIX = "distckpt"
_MAX_DECISION_BYTES = 1024 * 1024

_primary_host: int = 0
_decision_uses: dict[str, int] = {}  # name -> calls so far (the same on every host)
_decision_lock = threading.Lock()


class BarrierTimeoutError(TimeoutError):
    """A named barrier timed out; `missing` lists the processes that never arrived."""

    def __init__(self, name: str, timeout_s: float, missing: Sequence[int], detail: str):
        self.name = name
        self.timeout_s = timeout_s
        self.missing = tuple(missing)
        who = ", ".join(str(p) for p in self.missing) if self.missing else "unknown"
        super().__init__(
            f"[process={jax.process_index()}] barrier {name!r} timed out after {timeout_s:g}s; "
            f"processes that did not arrive: {who}. {detail}Check those processes' logs: "
            "a process that is stuck (I/O, a deadlock) or died never reaches the barrier."
        )


class DecisionFailedError(RuntimeError):
    """The primary host's decision raised; `error` is its ``"Type: message"``."""

    def __init__(self, name: str, error: str, primary_host: int | None = None):
        self.name = name
        self.error = error
        primary = _primary_host if primary_host is None else primary_host
        super().__init__(f"[process={jax.process_index()}] primary host {primary} "
                         f"failed deciding {name!r}: {error}")


@dataclasses.dataclass(frozen=True)
class Topology:
    """What this process sees of the job."""

    process_index: int
    """This process's id, 0..process_count-1."""
    process_count: int
    """Number of processes (hosts) in the job."""
    local_devices: int
    """Devices attached to this process."""
    global_devices: int
    """Devices across all processes."""
    platform: str
    """Backend platform, e.g. 'cpu', 'gpu', 'tpu'."""
    device_kind: str
    """Device kind string of the first device, e.g. 'cpu' or 'TPU v5 lite'."""

    def describe(self) -> str:
        return (
            f"process {self.process_index}/{self.process_count}, "
            f"{self.local_devices} local / {self.global_devices} global {self.platform} devices "
            f"({self.device_kind})"
        )


def topology() -> Topology:
    devices = jax.devices()
    return Topology(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=len(devices),
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
    )


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from e


def _distributed_client():
    return compat.jax_distributed_client()


def is_initialized() -> bool:
    return _distributed_client() is not None


@dataclasses.dataclass(frozen=True)
class ClusterParams:
    """Where the job's parameters came from, resolved before JAX is started."""

    coordinator_address: str | None
    """host:port of process 0's coordination service (None for a single process)."""
    num_processes: int
    """Number of processes in the job."""
    process_id: int
    """This process's id."""
    source: str
    """'arguments', 'environment', the detected cluster's name, or 'single process'."""


def detect_cluster() -> str | None:
    """Name of the cluster environment JAX would auto-detect here (SLURM, ...), or None."""
    for env in compat.cluster_env_types():  # jax's own registry of detectors
        if env.opt_in_only_method:
            continue
        try:
            present = env.is_env_present()
        except Exception as e:  # e.g. a metadata server that does not answer
            logger.warning("cluster detector %s failed: %s", env.__name__, e)
            continue
        if present:
            return env.__name__
    return None


# Launchers that start N ranks which JAX may not detect (Open MPI 5/PRRTE, MPICH/PMI).
_WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def _undetected_world_size() -> tuple[str, int] | None:
    for name in _WORLD_SIZE_VARS:
        value = _env_int(name)
        if value is not None and value > 1:
            return name, value
    return None


def resolve_cluster(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto_detect: bool = True,
    timeout_s: int = 300,
) -> ClusterParams:
    """Resolve the job parameters with the precedence `initialize` documents; starts nothing."""
    explicit = (coordinator_address, num_processes, process_id)
    env = (os.environ.get("JAX_COORDINATOR_ADDRESS") or None, _env_int("JAX_NUM_PROCESSES"),
           _env_int("JAX_PROCESS_ID"))
    values: list[Any] = [a if a is not None else b for a, b in zip(explicit, env, strict=True)]
    from_args = any(v is not None for v in explicit)
    from_env = any(e is not None and a is None for a, e in zip(explicit, env, strict=True))
    source = " + ".join(n for n, used in (("arguments", from_args), ("environment", from_env))
                        if used) or "single process"
    if None in values and auto_detect and (cluster := detect_cluster()) is not None:
        address, count, pid, _ = compat.auto_detect_unset_distributed_params(
            values[0], values[1], values[2], None, None, timeout_s)
        values = [address, count, pid]
        source = cluster if source == "single process" else f"{source} + {cluster}"
    if source == "single process":
        if (world := _undetected_world_size()) is not None:
            raise ValueError(
                f"{world[0]}={world[1]} says this is one of {world[1]} ranks, but JAX detected "
                "no cluster it can bootstrap from; every rank would run as its own "
                "single-process job and write the same checkpoints. Set "
                "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (see launch/).")
        if (_env_int("SLURM_NTASKS") or 1) > 1:
            logger.warning("SLURM_NTASKS>1 but no SLURM job step was detected: run under "
                           "`srun` to start one process per task; continuing as one process")
        return ClusterParams(None, 1, 0, source)
    address, count, pid = values
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    missing = [n for n, v in zip(names, values, strict=True) if v is None]
    if missing:
        raise ValueError(
            f"incomplete multi-process configuration from {source}: {', '.join(missing)} not "
            "set. Set all three (or pass coordinator_address=, num_processes=, process_id=), "
            "or run under a cluster JAX detects (SLURM, Open MPI, Cloud TPU, Kubernetes)."
        )
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator address {address!r} must be HOST:PORT, e.g. 10.0.0.1:1234")
    if count < 1 or not 0 <= pid < count:
        raise ValueError(f"process id {pid} is outside 0..{count - 1} (num_processes={count})")
    return ClusterParams(address, count, pid, source)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout_s: int = 300,
    heartbeat_timeout_s: int | None = None,
    primary_host: int = 0,
    auto_detect: bool = True,
) -> Topology:
    """Start (or join) the multi-host job and return what this process sees.

    Precedence: explicit arguments, then ``JAX_COORDINATOR_ADDRESS`` /
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, then JAX's cluster
    auto-detection (SLURM, Open MPI, Cloud TPU, Kubernetes), then a single
    process. On CPU, cross-process collectives use gloo. Safe to call twice.

    `heartbeat_timeout_s` is how long the coordination service waits for a silent
    process before declaring it dead and failing every survivor (default
    ``DISTCKPT_HEARTBEAT_TIMEOUT_S`` from the environment, else JAX's 100 s).
    """
    set_primary_host(primary_host)
    if heartbeat_timeout_s is None:
        env_value = _env_int("DISTCKPT_HEARTBEAT_TIMEOUT_S")
        heartbeat_timeout_s = 100 if env_value is None else env_value
    if heartbeat_timeout_s < 1:
        raise ValueError(f"heartbeat_timeout_s must be >= 1 second, got {heartbeat_timeout_s}")
    if is_initialized():
        return topology()
    params = resolve_cluster(coordinator_address, num_processes, process_id,
                             auto_detect=auto_detect, timeout_s=initialization_timeout_s)
    # gloo is jax's default CPU collectives implementation today; set it explicitly so a
    # changed default cannot silently turn cross-process CPU arrays into errors.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if params.num_processes > 1:
        timeout_s = initialization_timeout_s
        if params.process_id != 0:
            assert params.coordinator_address is not None
            started = time.monotonic()
            await_coordinator(params.coordinator_address, initialization_timeout_s)
            # One deadline for both waits: a process 0 that never comes up is reported
            # by JAX after initialization_timeout_s, as before, not twice that.
            timeout_s = max(1, round(initialization_timeout_s - (time.monotonic() - started)))
        jax.distributed.initialize(
            coordinator_address=params.coordinator_address,
            num_processes=params.num_processes,
            process_id=params.process_id,
            local_device_ids=list(local_device_ids) if local_device_ids is not None else None,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )
    topo = topology()
    if not 0 <= _primary_host < topo.process_count:
        raise ValueError(
            f"primary_host={_primary_host} but the job has {topo.process_count} processes"
        )
    logger.info("[process=%d] distckpt initialized (%s): %s", topo.process_index,
                params.source, topo.describe())
    return topo


AWAIT_POLL_S = 0.02
"""How often :func:`await_coordinator` tries the coordinator's port."""


def await_coordinator(address: str, timeout_s: float) -> bool:
    """Wait until process 0's coordination service accepts TCP connections at `address`
    (``host:port``), trying every :data:`AWAIT_POLL_S`; True once it does, False after
    `timeout_s` or at once for a host name that does not resolve (JAX's own connect then
    says what is wrong, as it always has).

    Why: a process whose ``jax.distributed.initialize`` runs before process 0's has
    started the service fails its first gRPC connect and retries after gRPC's reconnect
    backoff (1 s, then longer). Processes start unevenly (process 0 was the slowest to
    import on a 4-host job here), so every restart lost that second; measured on a 4x2
    job on 2 cores: ``initialize`` took 0.87 s, nearly all of it waiting.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            with socket.create_connection((host, int(port)), timeout=min(1.0, left)):
                return True
        except socket.gaierror:
            return False
        except OSError:  # refused (not listening yet), unreachable for now, timed out
            time.sleep(min(AWAIT_POLL_S, max(0.0, deadline - time.monotonic())))


def set_primary_host(process: int) -> None:
    """Choose which process writes shared metadata and takes decisions (default 0)."""
    global _primary_host
    if process < 0:
        raise ValueError(f"primary host must be a process index >= 0, got {process}")
    _primary_host = process


def primary_host() -> int:
    return _primary_host


def is_primary(primary_host: int | None = None) -> bool:
    """True on the primary host. The only place that answers this question.

    `primary_host` is the caller's own setting (a service's ``CheckpointOptions``);
    None: the process-wide one (:func:`set_primary_host`).
    """
    return jax.process_index() == (_primary_host if primary_host is None else primary_host)


def _timeout_ms(timeout_s: float) -> int:
    if timeout_s <= 0:
        raise ValueError(f"timeout must be positive, got {timeout_s}")
    return max(1, int(timeout_s * 1000))


_TASK_LIST = re.compile(r"timed out task names:\s*\n((?:\s*\S+\s*\n?)+)", re.IGNORECASE)


def _missing_from_error(message: str, count: int) -> list[int]:
    """Parse the coordination service's list of tasks that did not reach a barrier."""
    match = _TASK_LIST.search(message)
    if not match:
        return []
    found: list[int] = []
    for token in match.group(1).split():
        number = re.search(r"(?:task:)?(\d+)$", token)
        if number is None:
            break
        value = int(number.group(1))
        if value < count and value not in found:
            found.append(value)
    return sorted(found)


def barrier(name: str, timeout_s: float = DEFAULT_TIMEOUT_S,
            processes: Sequence[int] | None = None) -> None:
    """Wait until every process (or `processes`) reaches the barrier `name`.

    Raises BarrierTimeoutError naming the processes that never arrived.
    A no-op in a single-process job.
    """
    if jax.process_count() == 1:
        return
    client = _distributed_client()
    if client is None:
        raise RuntimeError("barrier() needs distckpt.initialize() in a multi-process job")
    try:
        client.wait_at_barrier(
            f"{_KV_PREFIX}:{name}", _timeout_ms(timeout_s),
            list(processes) if processes is not None else None,
        )
    except Exception as e:  # jax raises JaxRuntimeError(DEADLINE_EXCEEDED...)
        message = str(e)
        if "DEADLINE_EXCEEDED" not in message and "timed out" not in message.lower():
            raise RuntimeError(
                f"[process={jax.process_index()}] barrier {name!r} failed: {message}"
            ) from e
        missing = _missing_from_error(message, jax.process_count())
        # Do not ask the service which tasks are alive here: GetAliveTasks is itself a
        # collective that waits for every live task, so it would hang on the missing one.
        detail = "" if missing else f"Service message: {message.splitlines()[0]} "
        raise BarrierTimeoutError(name, timeout_s, missing, detail) from e


def encode_json(value: Any, name: str) -> str:
    """JSON text of a small value, or a TypeError/ValueError naming `name`."""
    try:
        text = json.dumps(value)
    except TypeError as e:
        raise TypeError(f"decision {name!r} must be JSON-serializable, got {value!r}") from e
    if len(text) > _MAX_DECISION_BYTES:
        raise ValueError(
            f"decision {name!r} is {len(text)} bytes; decisions are for small values "
            f"(<= {_MAX_DECISION_BYTES} bytes): steps, flags, short strings"
        )
    return text


def _decision_key(name: str) -> str:
    """`name` plus how many times this process asked it before: every host asks the same
    decisions in the same order, so every host computes the same key, and a key is never
    used twice (a peer late to read use n can never be handed use n+1, or the reverse)."""
    with _decision_lock:
        n = _decision_uses.get(name, 0)
        _decision_uses[name] = n + 1
    return f"{name}#{n}"


def primary_decides(name: str, decide: Callable[[], T], timeout_s: float = DEFAULT_TIMEOUT_S,
                    *, primary_host: int | None = None) -> T:
    """Run `decide` on the primary host only and return its value on every process.

    `name` identifies the decision (e.g. ``"restore:step"``) and may be used again; each
    call is a decision of its own (see :func:`_decision_key`), so every process must make
    the same calls in the same order. If `decide` raises on the primary, every process
    raises a :class:`DecisionFailedError` carrying its ``"Type: message"`` (on the
    primary chained ``from`` the original), so one ``except`` works on every host. With
    a single process there is no peer to tell: `decide`'s own exception propagates.
    `primary_host` as in :func:`is_primary`; every process must pass the same.
    """
    if jax.process_count() == 1:  # same checks as with many processes, so code ports
        value = decide()
        encode_json({"ok": True, "value": value}, name)
        return value
    client = _distributed_client()
    name = _decision_key(name)
    key = f"{_KV_PREFIX}/decision/{name}"
    primary = _primary_host if primary_host is None else primary_host
    if is_primary(primary):
        try:
            payload = {"ok": True, "value": decide()}
            text = encode_json(payload, name)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            client.key_value_set(key, json.dumps({"ok": False, "error": error}),
                                 allow_overwrite=True)
            barrier(f"decision:{name}:read", timeout_s)
            client.key_value_delete(key)
            raise DecisionFailedError(name, error, primary) from e
        client.key_value_set(key, text, allow_overwrite=True)
    else:
        try:
            text = client.blocking_key_value_get(key, _timeout_ms(timeout_s))
        except Exception as e:
            raise TimeoutError(
                f"[process={jax.process_index()}] no decision {name!r} from primary host "
                f"{primary} within {timeout_s:g}s: {e}"
            ) from e
    # Everyone has read the value before the primary removes it.
    barrier(f"decision:{name}:read", timeout_s)
    if is_primary(primary):
        client.key_value_delete(key)
    payload = json.loads(text)
    if not payload["ok"]:
        raise DecisionFailedError(name, payload["error"], primary)
    return payload["value"]


_gathers = threading.local()
"""``key``: the value this thread wrote in its last all_gather, not deleted yet."""


def all_gather(name: str, value: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Every process contributes a small JSON value; every process gets the list by index."""
    if jax.process_count() == 1:
        encode_json(value, name)
        return [value]
    client = _distributed_client()
    # Each use of a name is a gather of its own: a fast process's next value under the
    # same name never overwrites one a slow process has not read yet.
    name = _decision_key(f"gather:{name}")
    prefix = f"{_KV_PREFIX}/gather/{name}/"
    mine = prefix + str(jax.process_index())
    client.key_value_set(mine, encode_json(value, name), allow_overwrite=True)
    barrier(f"{name}:written", timeout_s)
    entries = dict(client.key_value_dir_get(prefix))
    # No second barrier before deleting: this process's value is deleted at its next
    # gather (of this thread), whose barrier shows that every process is past reading it.
    previous, _gathers.key = getattr(_gathers, "key", None), mine
    if previous is not None:  # never `mine`: every use of a name has its own keys
        client.key_value_delete(previous)
    out = []
    for p in range(jax.process_count()):
        text = entries.get(prefix + str(p))
        if text is None:
            raise RuntimeError(f"all_gather {name!r}: process {p} wrote no value")
        out.append(json.loads(text))
    return out


def publish(name: str, value: str) -> None:
    """Post a short note every process can read at once (e.g. 'my save failed')."""
    client = _distributed_client()
    if jax.process_count() > 1 and client is not None:
        client.key_value_set(f"{_KV_PREFIX}/note/{name}", value, allow_overwrite=True)


def read_note(name: str) -> str | None:
    """A note some process published under `name`, or None; never blocks."""
    client = _distributed_client()
    if jax.process_count() == 1 or client is None:
        return None
    try:
        return client.key_value_try_get(f"{_KV_PREFIX}/note/{name}")
    except Exception:  # NOT_FOUND
        return None


def wait_note(name: str, timeout_s: float) -> str:
    """Block until some process has published `name` (see :func:`publish`); raise
    TimeoutError naming it after `timeout_s`."""
    client = _distributed_client()
    if client is None:
        raise RuntimeError(f"wait_note({name!r}) needs jax.distributed to be initialized")
    try:
        return client.blocking_key_value_get(f"{_KV_PREFIX}/note/{name}", _timeout_ms(timeout_s))
    except Exception as e:  # DEADLINE_EXCEEDED (or the service went away)
        raise TimeoutError(f"no process published {name!r} within {timeout_s:g}s: {e}") from e


def clear_note(name: str) -> None:
    """Remove a note (and any notes below `name/`) once every process is done with it."""
    client = _distributed_client()
    if jax.process_count() > 1 and client is not None:
        client.key_value_delete(f"{_KV_PREFIX}/note/{name}")


class BarrierAbortedError(RuntimeError):
    """A :class:`ScopedBarriers` barrier stopped waiting because a failure was reported."""


class ScopedBarriers:
    """Barriers for Orbax's background commit (``AsyncOptions(barrier_sync_fn=...)``) that
    stop waiting as soon as `abort(scope)` reports a failure.

    Orbax waits at the coordination service's barriers in its commit threads; a process
    whose write failed never arrives, and the service's barriers cannot be cancelled, so
    every peer (and its ``close()``, and the interpreter's exit, which joins those
    threads) waited for the whole timeout. These barriers are built on the key-value
    store instead: each process posts ``<scope>/<key>#<n>/arrived/<i>``; the process
    that sees all of them posts ``.../done``; the others wait for that key in short
    slices and ask `abort` in between, raising :class:`BarrierAbortedError` with its
    reason, or :class:`BarrierTimeoutError` naming the processes that never arrived.

    A scope is one save (:meth:`begin`); ``#<n>`` counts uses of Orbax's key within it
    (Orbax reuses keys), the same on every process. :meth:`clear` deletes a scope's
    keys once every process has left its barriers.
    """

    def __init__(self, abort: Callable[[str], str | None], poll_s: float = 0.2):
        self._abort = abort
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._scope = "init"
        self._uses: dict[str, int] = {}

    @property
    def scope(self) -> str:
        return self._scope

    def begin(self, scope: str) -> None:
        """Barriers from now on belong to `scope` (every process calls it alike)."""
        with self._lock:
            self._scope = scope
            self._uses = {}

    def clear(self, scope: str) -> None:
        """Delete `scope`'s keys (call on one process, after all have left its barriers)."""
        client = _distributed_client()
        if jax.process_count() > 1 and client is not None:
            client.key_value_delete(f"{_KV_PREFIX}/scoped/{scope}")

    def __call__(self, *, key: str, timeout_ms: int) -> None:
        if jax.process_count() == 1:
            return
        client = _distributed_client()
        with self._lock:
            scope = self._scope
            n = self._uses.get(key, 0)
            self._uses[key] = n + 1
        name = f"{scope}/{key}#{n}"
        base = f"{_KV_PREFIX}/scoped/{name}"
        count = jax.process_count()
        client.key_value_set(f"{base}/arrived/{jax.process_index()}", "1", allow_overwrite=True)
        if len(client.key_value_dir_get(f"{base}/arrived/")) >= count:
            client.key_value_set(f"{base}/done", "1", allow_overwrite=True)  # we were last
        timeout_s = timeout_ms / 1000
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                client.blocking_key_value_get(f"{base}/done",
                                              _timeout_ms(max(0.001, min(self._poll_s, left))))
                return
            except Exception as e:  # jax raises JaxRuntimeError(DEADLINE_EXCEEDED...)
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
            reason = self._abort(scope)
            if reason is not None:
                raise BarrierAbortedError(
                    f"[process={jax.process_index()}] stopped waiting at barrier {name!r}: "
                    f"{reason}")
            if time.monotonic() >= deadline:
                arrived = {k.rsplit("/", 1)[-1] for k, _ in
                           client.key_value_dir_get(f"{base}/arrived/")}
                missing = [p for p in range(count) if str(p) not in arrived]
                raise BarrierTimeoutError(name, timeout_s, missing, "")
