"""The reference training loop: AdamW on synthetic tokens, checkpointed, resumable.

Data is a pure function of the step (a NumPy generator seeded with
``seed + step``), built directly as a global array sharded over the batch axes,
so a run is reproducible bit for bit on the same topology and the same batch
reaches the model whatever the mesh. Each process records in its per-process
state the next step its data stream will read, as a real loader would.

The loop runs inside a :class:`distckpt.multihost.preemption.PreemptionGuard`: a SIGTERM to
any process (or to all) makes every process save the same step, wait for its
commit and return normally, so the job exits 0 and a restart resumes from that
step. The guard is entered before the restore, so a signal during it is not lost.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from distckpt.checkpoint.options import Restored
from distckpt.checkpoint.service import CheckpointOptions, CheckpointService
from distckpt.errors import NoCheckpointError
from distckpt.multihost import coordinator
from distckpt.multihost.preemption import PreemptionGuard
from distckpt.state.mesh import DEFAULT_RULES, MeshSpec, Rules, abstract_target, init_sharded
from distckpt.tools.model import ModelConfig, Transformer, next_token_loss, set_activation_sharding

logger = logging.getLogger(__name__)

PROGRESS_PREFIX = "TRAIN"
"""``distckpt train --progress`` prints each event as ``TRAIN {json}`` (primary host)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run's numbers."""

    model: ModelConfig = ModelConfig()
    """The transformer's shape."""
    batch: int = 8
    """Global batch size (sequences per step)."""
    seq_len: int = 33
    """Tokens per sequence (the model sees seq_len - 1 and predicts the next)."""
    learning_rate: float = 3e-3
    """AdamW learning rate."""
    seed: int = 0
    """Seeds parameters, dropout and data."""

    def __post_init__(self):
        if self.batch < 1 or self.seq_len < 2:
            raise ValueError(f"need batch >= 1 and seq_len >= 2, got {self.batch}, "
                             f"{self.seq_len}")


def factory(cfg: TrainConfig) -> Callable[[], dict[str, Any]]:
    """Builds {'model', 'optimizer'}; the optimizer shares the model's parameters."""

    def make() -> dict[str, Any]:
        model = Transformer(cfg.model, nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1))
        optimizer = nnx.Optimizer(model, optax.adamw(cfg.learning_rate), wrt=nnx.Param)
        return {"model": model, "optimizer": optimizer}

    return make


def tokens_for_step(step: int, cfg: TrainConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES
                    ) -> jax.Array:
    """The global [batch, seq_len] token array for `step`, sharded over the batch axes."""
    shape = (cfg.batch, cfg.seq_len)
    sharding = NamedSharding(mesh, rules.spec(("batch", None), shape, mesh, "tokens"))
    full = np.random.default_rng(cfg.seed * 1_000_003 + step).integers(
        0, cfg.model.vocab, size=shape, dtype=np.int32)
    return jax.make_array_from_callback(shape, sharding, lambda index: full[index])


def remap_data_position(records: list[Any], index: int, count: int) -> dict[str, int]:
    """Per-process state remap for this loop: every host's stream is at the same step.

    The reference data is a function of the global step, so a position carries over to
    any number of hosts; hosts that disagree mean the checkpoint is inconsistent.
    """
    positions = {r["next_step"] for r in records}
    if len(positions) != 1:
        raise ValueError(f"saved hosts disagree on the data position: {sorted(positions)}")
    return {"next_step": positions.pop()}


def _update(model: Transformer, optimizer: nnx.Optimizer, tokens_BxL: jax.Array) -> jax.Array:
    """One training step on (model, optimizer), updated in place; returns the loss."""
    loss, grads = nnx.value_and_grad(next_token_loss)(model, tokens_BxL)
    optimizer.update(model, grads)
    return loss


def make_train_step(mesh: Mesh, rules: Rules = DEFAULT_RULES, *,
                    executable_cache: str | os.PathLike[str] | None = None):
    """A jitted update: (model, optimizer, tokens) -> loss; model/optimizer updated in place.

    `executable_cache`: a directory where each process keeps its compiled step
    (:class:`CachedStep`); without it, ``nnx.jit`` compiles at the first call."""
    if executable_cache is not None:
        return CachedStep(mesh, rules, Path(executable_cache))
    step = nnx.jit(_update)

    def run(model, optimizer, tokens):
        set_activation_sharding(mesh, rules)
        try:
            return step(model, optimizer, tokens)
        finally:
            set_activation_sharding(None, None)

    return run


class CachedStep:
    """The training step compiled ahead of time, each process's executable kept in a
    directory and loaded by the next attempt instead of compiled again.

    JAX's persistent compilation cache does this for process 0 only: it writes entries from
    process 0 alone, and on CPU each process's key differs (it hashes the local devices'
    topology), so on a simulated cluster processes 1..N-1 compiled the step again at every
    restart (docs/goodput.md measured ~6 s of a ~10 s restart). Here every process writes
    and reads its own file, keyed by a SHA-256 of the lowered program (StableHLO: model,
    shapes, shardings), the JAX version, the process index and count and the local
    devices; a file that fails to load is compiled again and replaced.

    Each process keeps its :data:`KEEP_EXECUTABLES` most recently used files (a load
    touches its file; older ones are deleted after a compile), so a directory reused
    across model or mesh changes stops growing.

    The files are JAX serialized executables, which are pickles (``jax.experimental.
    serialize_executable``; loading one can run code): pass only a directory this job
    alone writes. ``distckpt goodput`` uses one inside its own work directory.
    The outputs keep the inputs' shardings, so saves see the same layout as with nnx.jit.
    """

    def __init__(self, mesh: Mesh, rules: Rules, directory: Path):
        self.mesh, self.rules, self.directory = mesh, rules, directory
        self._compiled: Any = None
        self.source: str | None = None
        """'loaded' or 'compiled', once the first call built the step."""
        self.build_s: float | None = None

    def __call__(self, model: Transformer, optimizer: nnx.Optimizer,
                 tokens_BxL: jax.Array) -> jax.Array:
        graphdef, state = nnx.split((model, optimizer))
        if self._compiled is None:
            t0 = time.perf_counter()
            self._compiled = self._build(graphdef, state, tokens_BxL)
            self.build_s = time.perf_counter() - t0
            logger.info("[process=%d] training step %s in %.2fs", jax.process_index(),
                        self.source, self.build_s)
        loss, new = self._compiled(state, tokens_BxL)
        nnx.update((model, optimizer), new)
        return loss

    def _build(self, graphdef: Any, state: Any, tokens_BxL: jax.Array) -> Any:
        import hashlib

        from jax.experimental import serialize_executable

        def pure(state: Any, tokens_BxL: jax.Array) -> tuple[jax.Array, Any]:
            model, optimizer = nnx.merge(graphdef, state)
            loss = _update(model, optimizer, tokens_BxL)
            return loss, nnx.state((model, optimizer))

        shardings = jax.tree.map(lambda x: x.sharding, state)
        jitted = jax.jit(pure, out_shardings=(NamedSharding(self.mesh, PartitionSpec()),
                                              shardings))
        set_activation_sharding(self.mesh, self.rules)
        try:
            lowered = jitted.lower(state, tokens_BxL)
        finally:
            set_activation_sharding(None, None)
        key = hashlib.sha256()
        for part in (lowered.as_text(), jax.__version__, jax.lib.__version__,
                     jax.process_index(), jax.process_count(),
                     [(d.platform, d.id) for d in jax.local_devices()]):
            key.update(repr(part).encode())
        path = self.directory / EXECUTABLE_NAME.format(key=key.hexdigest()[:32],
                                                        process=jax.process_index())
        if path.is_file():
            try:
                compiled = serialize_executable.deserialize_and_load(
                    path.read_bytes(), lowered.in_tree, lowered.out_tree)
                self.source = "loaded"
                path.touch()  # most recently used: pruning keeps it
                return compiled
            except Exception as e:  # a torn or foreign file: compile it again
                logger.warning("[process=%d] could not load the compiled step %s (%s: %s); "
                               "compiling it", jax.process_index(), path, type(e).__name__, e)
        compiled = lowered.compile()
        self.source = "compiled"
        try:
            blob, _, _ = serialize_executable.serialize(compiled)
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            prune_executables(self.directory, jax.process_index())
        except Exception as e:  # the cache is an optimisation: training goes on
            logger.warning("[process=%d] could not keep the compiled step in %s (%s: %s)",
                           jax.process_index(), self.directory, type(e).__name__, e)
        return compiled


KEEP_EXECUTABLES = 4
"""Compiled steps :class:`CachedStep` keeps per process (most recently used first)."""
EXECUTABLE_NAME = "train-step-{key}-p{process}.bin"
"""File name of a compiled step in the executable cache: `key` hashes the lowered program,
the JAX version and the process's devices. :func:`prune_executables` globs the same name."""


def prune_executables(directory: Path, process: int, keep: int = KEEP_EXECUTABLES
                      ) -> list[Path]:
    """Delete process `process`'s compiled steps in `directory` beyond its `keep` most
    recently used (by modification time; a load touches its file); other processes'
    files and anything not named like a compiled step are left alone. Returns what was
    deleted."""
    pattern = EXECUTABLE_NAME.format(key="*", process=process)
    mine = [p for p in directory.glob(pattern) if p.is_file()]
    mine.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    gone = []
    for old in mine[keep:]:
        old.unlink(missing_ok=True)
        gone.append(old)
    return gone


def new_state(cfg: TrainConfig, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict[str, Any]:
    return init_sharded(factory(cfg), mesh, rules)


def target(cfg: TrainConfig, mesh: Mesh | AbstractMesh, rules: Rules = DEFAULT_RULES
           ) -> dict[str, Any]:
    return abstract_target(factory(cfg), mesh, rules)


def check_fits(cfg: TrainConfig, mesh: MeshSpec, rules: Rules = DEFAULT_RULES) -> None:
    """Raise ValueError unless the batch and every parameter and optimizer leaf shard onto
    `mesh` by `rules` (each sharded dimension divisible by its mesh axes).

    Needs no devices (an abstract mesh) and allocates nothing, so a launcher can check a
    slice before starting a process on it. The activations add no condition of their own
    under the default rules: they shard the batch, heads and MLP dimensions the same way.
    """
    abstract = AbstractMesh(mesh.shape, mesh.names)
    try:
        rules.spec(("batch", None), (cfg.batch, cfg.seq_len), abstract, "batch")
        target(cfg, abstract, rules)
    except ValueError as e:
        raise ValueError(f"the model does not fit mesh {mesh}: {e}") from e


@dataclasses.dataclass
class RunResult:
    start_step: int
    """The step training resumed from (0 for a fresh start)."""
    last_step: int
    losses: dict[int, float]
    """Loss of each update this run made, by step number."""
    saved_steps: list[int]
    preempted_at: int | None = None
    """The step every process saved on a preemption notice (None if not preempted)."""


Progress = Callable[[dict[str, Any]], None]
"""Receives run()'s events (every process): ``{"event": "resumed", "t", "step", "restore_s",
"tier"}`` once after a restore, and ``{"event": "step", "t", "step", "train_s", "save_s",
"saved", "committed", "local_written"}`` after each step: `t` is time.time() when the step
(its save call included) is done, `train_s` the update plus on_step, `save_s` the save()
call, `committed` [[step, commit_s], ...] the saves seen committed since the last event,
`local_written` [[step, seconds], ...] the local-tier saves whose own and peer copies were
written since (seconds from their save() call; this host's)."""


def run(directory: str, steps: int, save_every: int, mesh: Mesh, cfg: TrainConfig,
        *, rules: Rules = DEFAULT_RULES, max_to_keep: int | None = 3,
        on_step: Callable[[int, float], None] | None = None,
        crash_after: int | None = None, local_directory: str | None = None,
        local_every: int | None = None, progress: Progress | None = None,
        executable_cache: str | os.PathLike[str] | None = None) -> RunResult:
    """Train to `steps`, saving every `save_every`; resume from the newest committed step.

    On SIGTERM to any process, every process saves the same step, waits for its commit
    and returns early with `preempted_at` set (see distckpt.multihost.preemption).

    `crash_after` (for tests and drills) waits until the in-flight save is committed
    after that step, then kills this process with SIGKILL, as a hardware failure would.

    `local_directory` (may contain ``{host}``) adds the host-local tier, saved every
    `local_every` steps with a copy on a peer (CheckpointOptions.local_directory); a
    restore then takes the newest step any tier holds. `progress` gets the events
    described at :data:`Progress`. `executable_cache`: keep and reuse each process's
    compiled step there (:class:`CachedStep`; a directory only this job writes).
    """
    options = CheckpointOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                local_directory=local_directory,
                                local_interval_steps=local_every or 1, local_max_to_keep=2,
                                peer_copies=True)
    preempted_at: int | None = None
    with PreemptionGuard("train", timeout_s=options.timeout_s) as guard, \
            CheckpointService(directory, options) as ckpt:
        start = 0
        t0 = time.perf_counter()
        restored = _restore(ckpt, cfg, mesh, rules, local=local_directory is not None)
        if restored is not None:
            state, start = restored.items, restored.step
            expect = restored.process_state
            if expect is not None and expect.get("next_step") != start + 1:
                raise RuntimeError(f"data position {expect} does not follow step {start}")
            logger.info("[process=%d] resumed from step %d", jax.process_index(), start)
            if progress is not None:
                progress({"event": "resumed", "t": time.time(), "step": start,
                          "restore_s": time.perf_counter() - t0, "tier": restored.tier})
        else:
            state = new_state(cfg, mesh, rules)
        model, optimizer = state["model"], state["optimizer"]
        train_step = make_train_step(mesh, rules, executable_cache=executable_cache)
        losses: dict[int, float] = {}
        saved: list[int] = []
        reported: set[int] = set()
        local_reported = 0
        for step in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            loss = float(train_step(model, optimizer, tokens_for_step(step, cfg, mesh, rules)))
            losses[step] = loss
            if coordinator.is_primary():
                logger.info("step %d loss %.6f (%.3fs)", step, loss, time.perf_counter() - t0)
            if on_step is not None:
                on_step(step, loss)
            t1 = time.perf_counter()
            preempted = guard.reached_sync_point(step, final=step == steps)
            # A forced save first waits for a save still in flight.
            did_save = ckpt.save(step, state, metrics={"loss": loss},
                                 process_state={"next_step": step + 1}, force=preempted)
            if did_save:
                saved.append(step)
            if progress is not None and step == start + 1 and isinstance(train_step, CachedStep):
                progress({"event": "program", "t": time.time(), "source": train_step.source,
                          "build_s": train_step.build_s})
            if progress is not None:
                done = [(s.step, s.commit_s) for s in ckpt.save_stats
                        if s.commit_s is not None and s.step not in reported]
                reported.update(saved_step for saved_step, _ in done)
                local = [] if ckpt.local is None else ckpt.local.saved[local_reported:]
                local_reported += len(local)
                progress({"event": "step", "t": time.time(), "step": step,
                          "train_s": t1 - t0, "save_s": time.perf_counter() - t1,
                          "saved": did_save, "committed": done, "local_written": local})
            if preempted:
                ckpt.wait()
                preempted_at = step
                logger.warning("[process=%d] preempted: saved step %d, committed; stopping",
                               jax.process_index(), step)
                break
            if crash_after is not None and step >= crash_after:
                ckpt.wait()
                logger.warning("[process=%d] crashing on purpose after step %d",
                               jax.process_index(), step)
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.wait()
    return RunResult(start_step=start, last_step=max(losses, default=start), losses=losses,
                     saved_steps=saved, preempted_at=preempted_at)


def _restore(ckpt: CheckpointService, cfg: TrainConfig, mesh: Mesh, rules: Rules, *,
             local: bool) -> Restored | None:
    """The newest usable step restored, or None for a fresh start.

    With the local tier a step may live there only (no persistent step yet), so the
    restore is tried and "nothing anywhere" means a fresh start; without it an empty
    directory means a fresh start and a restore that finds nothing usable raises.
    """
    if not (local or ckpt.all_steps()):  # local first: all_steps() lists the directory
        return None
    try:
        return ckpt.restore(target(cfg, mesh, rules), process_state_remap=remap_data_position)
    except NoCheckpointError:
        if not local or ckpt.all_steps():
            raise
        return None
