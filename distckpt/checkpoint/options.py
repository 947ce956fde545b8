"""How a :class:`~distckpt.checkpoint.service.CheckpointService` saves, keeps and restores
steps (:class:`CheckpointOptions`), and what it reports: :class:`SaveStats` per save,
:class:`Restored` per restore."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

from distckpt.checkpoint import tuning
from distckpt.checkpoint.policy import SavePolicy
from distckpt.state import process_state as per_process

__all__ = ["CheckpointOptions", "Restored", "SaveStats"]


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """How a CheckpointService saves, keeps and restores steps."""

    max_to_keep: int | None = 3
    """Keep the N highest step numbers (None keeps all); ranked by step, never save order."""
    keep_period: int | None = None
    """Also keep every step that is a multiple of this."""
    best_metric: str | None = None
    """Metric name (a key of save(metrics=...)) that ranks steps for best-N retention."""
    best_fn: Callable[[Mapping[str, Any]], float] | None = None
    """Alternative to best_metric: metrics dict -> score."""
    best_mode: Literal["min", "max"] = "min"
    """Whether a lower ('min', e.g. loss) or higher ('max', e.g. accuracy) score is better."""
    best_n: int | None = 1
    """With best_metric/best_fn: also keep the best N steps saved with metrics (None: all)."""
    save_interval_steps: int | None = 1
    """save() writes steps that are multiples of this (None: only save_on_steps/force)."""
    save_on_steps: tuple[int, ...] = ()
    """save() also writes these steps."""
    save_policy: SavePolicy | None = None
    """A save-decision policy from :mod:`distckpt.checkpoint.policy` (YoungDalyPolicy: save every
    sqrt(2 x cost x MTBF) seconds; LossAdaptivePolicy: save more often while the loss is
    unstable), or any object with its ``should_save(step, metrics=)`` /
    ``observe(save_stats)`` methods. When given it replaces save_interval_steps (which
    is then ignored); save_on_steps and force=True still save. The service feeds it the
    measured cost of every committed save and the metrics passed to save(); the primary
    host decides and every host follows."""
    async_save: bool = True
    """Commit in the background; save() returns once arrays are staged."""
    save_in_background: bool = True
    """With async_save: save() copies the arrays to host memory itself (``pinned_host``,
    the same sharding) and hands that copy to Orbax in a background thread, so Orbax's
    per-save work (its items, threads and barriers) is not part of the stall. An error
    there surfaces at the next save(), wait() or close(), like a failed write. Data-parallel
    replicas then do not split the writes of a replicated array (see replica_parallel).
    False: save() calls Orbax and returns after Orbax staged the arrays (on an
    accelerator, one host copy less at a time)."""
    timeout_s: float = 600.0
    """Limit for barriers, decisions and a background commit."""
    primary_host: int = 0
    """The process that writes shared metadata and takes filesystem decisions."""
    read_only: bool = False
    """Never write, move or delete anything (evaluation, inspection, a drill's restore side),
    in the checkpoint directory or the local tier."""
    allow_older_steps: bool = False
    """Let save() write a step below the newest committed one (else StepOrderError)."""
    verify: bool = True
    """Check every restored array against the content digests in the commit record."""
    require_shared_storage: bool = True
    """Probe at start-up that every host sees the same directory, and fail fast if not.
    False is per-host local mode: each host writes its own shards into its own directory
    and the primary writes the shared files; restoring needs the directories merged."""
    probe_timeout_s: float = 15.0
    """How long the storage probe waits for the primary's probe file to become visible
    (network filesystems can be slow to show a new file to other hosts)."""
    compression: bool = False
    """Compress array chunks (zstd/blosc). Off: weights and optimizer moments barely
    compress and it costs CPU on save and restore (measured; see distckpt.checkpoint.tuning).
    Either way checkpoints restore with stock Orbax onto any mesh."""
    use_ocdbt: bool = True
    """Pack each step's arrays into a few OCDBT files per process (Orbax's default)."""
    use_zarr3: bool = False
    """Write zarr v3 instead of v2 (Orbax's default is v2)."""
    replica_parallel: bool = True
    """Data-parallel replicas split the writes of a replicated array. Not with
    save_in_background (the default): then the hosts of replica 0 write it, since the
    split runs JAX ops that, from the background thread, deadlocked against training's
    collectives."""
    save_concurrent_gb: float | None = None
    """Cap on bytes (GB, 1e9) being written at once per process; None: Orbax's default."""
    restore_concurrent_gb: float | None = None
    """Orbax's cap on bytes (GB) being read at once per process (None: Orbax's default).
    distckpt's own restores stream within restore_memory_mb instead; this only reaches
    Orbax's handler (plain-Orbax reads of the same steps)."""
    restore_memory_mb: int | None = None
    """Host memory (MiB) a restore may use beyond the restored shards: arrays are
    streamed into their device buffers in pieces of at most an eighth of the budget,
    with a quarter of it in reads in flight (see distckpt.checkpoint.streaming). None
    (default): 256 MiB, or a sixteenth of the bytes the process restores when that is
    less, never below 8 MiB (a 256 MiB restore streams within 16 MiB), with pieces of at
    least 4 MiB (smaller ones made a fresh process's restore slower). A step saved
    with compression=True is read a whole saved chunk (one saved shard) at a time."""
    restore_read_once: bool = False
    """Read each shard index once per replica group: where the target mesh gives several
    processes the same shard index (a data axis across hosts), one of them reads it from
    storage and sends it to the others over a JAX collective (an all-gather of its bits,
    in slabs within restore_memory_mb), the reading spread over the processes; storage
    then serves the step's unique bytes once. Verification is the same (each index is
    digested by the process that read it). Off by default: on the machine measured (one
    host simulating 2, a shared page cache, gloo over loopback) it was slower than every
    host reading (see distckpt.checkpoint.streaming); it can pay where storage is slower
    than the interconnect. Every process must use the same value."""
    local_directory: str | None = None
    """A host-local directory for the local tier (None: off): every host keeps its own
    shards of recent steps there, plus a copy of one peer host's, and a restore reads them
    instead of the persistent directory when it can (see docs/tiers.md). ``"auto"`` is
    ``/dev/shm/distckpt-<job>/{host}`` (RAM-backed); ``{host}`` becomes ``DISTCKPT_HOST``
    or the hostname. Each host needs its own directory."""
    local_interval_steps: int = 1
    """With a local tier, save() also writes a local step at multiples of this (and at every
    persistent save); keep it much shorter than the persistent interval."""
    local_max_to_keep: int = 2
    """Local copies kept per host, of its own shards and of each peer's."""
    peer_copies: bool = True
    """Keep each host's local step on its ring successor too (process p+1 mod N), so losing
    one machine loses no local step. Copied over JAX's transfer server."""
    peer_bind_address: str | None = None
    """Address the transfer server binds (None: the interface this host reaches the
    coordinator on; never all interfaces)."""
    local_timeout_s: float = 120.0
    """Limit for a peer exchange (the background copy, or a replaced host's fetch)."""
    fault_hook: per_process.FaultHook | None = None
    """Tests and drills: fault_hook(point, step) runs at named save points; raising there
    injects a failure, os.kill there simulates a crash. Points: a
    :class:`~distckpt.state.process_state.FaultPoint` (a ``str``): 'save:staged' (after
    Orbax's save() call returned: in save(), or in its background thread), 'process_state:write' (background, every process),
    'commit:renamed' (primary, after the rename and fsync, before the commit record),
    'commit:recorded' (primary, after the commit record, before retention)."""

    def __post_init__(self):
        if self.max_to_keep is not None and self.max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {self.max_to_keep}")
        if self.keep_period is not None and self.keep_period < 1:
            raise ValueError(f"keep_period must be None or >= 1, got {self.keep_period}")
        if self.best_metric is not None and self.best_fn is not None:
            raise ValueError("give best_metric or best_fn, not both")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.best_n is not None and self.best_n < 1:
            raise ValueError(f"best_n must be None or >= 1, got {self.best_n}")
        if self.save_interval_steps is not None and self.save_interval_steps < 1:
            raise ValueError(
                f"save_interval_steps must be None or >= 1, got {self.save_interval_steps}")
        if any(s < 0 for s in self.save_on_steps):
            raise ValueError(f"save_on_steps must be non-negative, got {self.save_on_steps}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.probe_timeout_s < 0:
            raise ValueError(f"probe_timeout_s must be >= 0, got {self.probe_timeout_s}")
        if self.save_policy is not None and not all(
                callable(getattr(self.save_policy, m, None)) for m in ("should_save", "observe")):
            raise TypeError(
                f"save_policy must have should_save(step, metrics=) and observe(stats) "
                f"methods (e.g. distckpt.checkpoint.policy.YoungDalyPolicy), got {self.save_policy!r}")
        for name in ("save_concurrent_gb", "restore_concurrent_gb"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or > 0, got {value}")

        if not isinstance(self.restore_read_once, bool):
            raise TypeError(f"restore_read_once must be a bool, got {self.restore_read_once!r}")
        if self.restore_memory_mb is not None and (
                isinstance(self.restore_memory_mb, bool)
                or not isinstance(self.restore_memory_mb, int) or self.restore_memory_mb < 1):
            raise ValueError(f"restore_memory_mb must be None or an int >= 1 (MiB), got "
                             f"{self.restore_memory_mb!r}")
        self._check_local()

    def _check_local(self) -> None:
        if self.local_directory is not None and (
                not isinstance(self.local_directory, str) or not self.local_directory):
            raise ValueError(f"local_directory must be a non-empty path string, 'auto' or None, "
                             f"got {self.local_directory!r}")
        for name in ("local_interval_steps", "local_max_to_keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.local_timeout_s > 0:
            raise ValueError(f"local_timeout_s must be positive, got {self.local_timeout_s!r}")

    def handler_kwargs(self) -> dict[str, Any]:
        """ocp.PyTreeCheckpointHandler keyword arguments for the array item."""
        return tuning.pytree_handler_kwargs(
            compression=self.compression, use_ocdbt=self.use_ocdbt, use_zarr3=self.use_zarr3,
            # Orbax splits a replicated array between replicas by slicing it with JAX ops;
            # from save_in_background's thread those deadlocked against the training
            # step's collectives (2 hosts, data=2 across them: the save never committed).
            replica_parallel=self.replica_parallel and not (self.async_save
                                                            and self.save_in_background),
            save_concurrent_gb=self.save_concurrent_gb,
            restore_concurrent_gb=self.restore_concurrent_gb)

    def score_fn(self) -> Callable[[Mapping[str, Any]], float] | None:
        if self.best_fn is not None:
            return self.best_fn
        if self.best_metric is not None:
            metric = self.best_metric

            def score(metrics: Mapping[str, Any]) -> float:
                if metric not in metrics:
                    raise KeyError(f"best_metric {metric!r} missing from metrics {sorted(metrics)}")
                return float(metrics[metric])

            return score
        return None


@dataclasses.dataclass
class SaveStats:
    """Timings of one save, in seconds."""

    step: int
    stall_s: float
    """How long save() blocked the caller."""
    commit_s: float | None = None
    """From the start of save() until the step was committed (None while in flight)."""
    started: float = dataclasses.field(default=0.0, repr=False)
    """time.perf_counter() when save() began."""
    digest_s: float = 0.0
    """Of the stall: enqueueing the content checksums (compiling them on a first save)."""


@dataclasses.dataclass
class Restored:
    """What restore() returns."""

    step: int
    items: dict[str, Any]
    """The target items holding the restored values (NNX objects are updated in place)."""
    metadata: dict[str, Any]
    metrics: dict[str, Any] | None
    process_state: Any
    provenance: dict[str, Any]
    untouched: tuple[str, ...] = ()
    """Target leaves a partial restore did not find in the step (left as they were)."""
    seconds: float = 0.0
    """Wall time of the restore, verification included."""
    verify_seconds: float = 0.0
    """Of which: comparing the digests with the commit record (the digests themselves are
    computed as the data streams in, inside the read)."""
    verified: bool = False
    """Whether every restored array matched its saved digest."""
    skipped: tuple[tuple[int, str], ...] = ()
    """(step, reason) of newer steps the fallback passed over."""
    tier: str = "persistent"
    """Where the step came from: 'local' (every host read its own copy), 'peer' (some host
    fetched its shards from a peer's copy) or 'persistent'."""
    restored_from: tuple[str, ...] = ()
    """Per process index: 'local', 'peer' or 'persistent'."""
    read_bytes: int = 0
    """Array bytes this process read from storage for the restored step: the byte ranges
    of the saved chunks (what :func:`distckpt.plan_restore` predicts per host). From the
    local tier: the bytes of the copies it read (its own, and one it sent to a peer), or
    pulled from a peer."""
