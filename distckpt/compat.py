"""Every use of Orbax's and JAX's private internals, in one place.

distckpt needs a few things neither library makes public. Each is wrapped here once, by
one small function or name, with a comment naming the public API it stands in for (or
saying why there is none). No other module under ``distckpt/`` touches ``_src`` modules
or private attributes (``tests/test_compat.py`` checks the source).

Private internals change without notice between releases, so at import this module
checks the installed versions against those distckpt was tested with
(:data:`TESTED_JAX`, :data:`TESTED_ORBAX`, the pins in ``pyproject.toml``) and raises
ImportError on a mismatch, unless ``DISTCKPT_ALLOW_UNTESTED_VERSIONS=1`` is set, which
only logs a warning.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import orbax.checkpoint as ocp
from jax._src import clusters as _clusters
from jax._src import distributed as _distributed
from orbax.checkpoint._src.metadata import array_metadata_store as _ams
from orbax.checkpoint._src.path import async_path as _async_path
from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils
from orbax.checkpoint._src.serialization import type_handlers as _th

from distckpt.errors import CheckpointError

logger = logging.getLogger(__name__)

TESTED_JAX = "0.10.2"
"""The jax version distckpt was tested with (pyproject.toml pins it)."""
TESTED_ORBAX = "0.12.8"
"""The orbax-checkpoint version distckpt was tested with (pyproject.toml pins it)."""
ALLOW_UNTESTED_ENV = "DISTCKPT_ALLOW_UNTESTED_VERSIONS"
"""Set to 1 to run with other versions anyway (a warning is logged instead)."""


class UntestedVersionError(ImportError):
    """The installed jax or orbax-checkpoint is not the version distckpt was tested with."""


def check_versions(jax_version: str, orbax_version: str,
                   env: Mapping[str, str] | None = None) -> None:
    """Raise :class:`UntestedVersionError` unless the versions are the tested ones.

    With ``DISTCKPT_ALLOW_UNTESTED_VERSIONS=1`` in `env` (default: ``os.environ``) a
    mismatch only logs a warning.
    """
    found = {"jax": jax_version, "orbax-checkpoint": orbax_version}
    tested = {"jax": TESTED_JAX, "orbax-checkpoint": TESTED_ORBAX}
    wrong = [f"{name} {found[name]} (tested: {tested[name]})"
             for name in found if found[name] != tested[name]]
    if not wrong:
        return
    env = os.environ if env is None else env
    message = (f"distckpt uses private internals of jax {TESTED_JAX} and orbax-checkpoint "
               f"{TESTED_ORBAX}, but found {', '.join(wrong)}; install the pinned versions "
               f"(pip install jax=={TESTED_JAX} jaxlib=={TESTED_JAX} "
               f"orbax-checkpoint=={TESTED_ORBAX}), or set {ALLOW_UNTESTED_ENV}=1 to try "
               "anyway")
    if env.get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning("%s (%s=1: trying anyway)", message.split("; ")[0], ALLOW_UNTESTED_ENV)
        return
    raise UntestedVersionError(message)


check_versions(importlib.metadata.version("jax"),
               importlib.metadata.version("orbax-checkpoint"))


# ------------------------------------------------------------------------------- JAX
def jax_distributed_client() -> Any:
    """JAX's distributed-runtime client (key-value store, barriers), or None.

    Public stand-in: none for the client itself; ``jax.distributed.is_initialized()``
    answers only whether it exists, and ``ocp.multihost.get_jax_distributed_client()``
    reads this same private attribute (and raises instead of returning None).
    """
    return _distributed.global_state.client


def private_cpu_device() -> Any:
    """A CPU device of a PJRT client of its own, not one of JAX's backends.

    For the transfer server of peer copies (:mod:`distckpt.checkpoint.peers`): an array
    offered or pulled on a device that training uses waits behind the computations queued
    there, and a training step's collective can wait for the very host that waits for the
    pull (a deadlock across hosts; ``tests/test_tiers.py``). This client runs nothing
    else. Public stand-in: none (``jax.local_devices(backend="cpu")`` are the training
    devices when the job trains on CPU).
    """
    from jax._src.lib import xla_client

    client: Any = xla_client.make_cpu_client(asynchronous=True, num_devices=1)
    return client.devices()[0]


def jax_coordinator_address() -> str | None:
    """The coordinator's ``host:port`` this process connected to (None before
    ``jax.distributed.initialize``). Public stand-in: none."""
    return getattr(_distributed.global_state, "coordinator_address", None)


def jax_preemption_sync_manager() -> Any:
    """JAX's preemption sync manager, or None when JAX's preemption service is off.

    Public stand-in: ``jax.experimental.multihost_utils.reached_preemption_sync_point``
    uses it, but nothing public says whether it is running.
    """
    return _distributed.global_state.preemption_sync_manager


def cluster_env_types() -> list[type[_clusters.ClusterEnv]]:
    """JAX's registry of cluster detectors (SLURM, Open MPI, TPU, ...).

    Public stand-in: ``jax.distributed.initialize()`` runs them, but also starts the
    runtime; nothing public only detects.
    """
    return list(_clusters.ClusterEnv._cluster_types)


def auto_detect_unset_distributed_params(*args: Any) -> tuple[Any, ...]:
    """``jax._src.clusters.ClusterEnv.auto_detect_unset_distributed_params``.

    Public stand-in: ``jax.distributed.initialize()`` fills the same parameters, but
    starts the runtime; distckpt resolves them first to log and check them.
    """
    return _clusters.ClusterEnv.auto_detect_unset_distributed_params(*args)


def jax_backends_initialized() -> bool:
    """Whether JAX has started its backends (too late to set XLA_FLAGS).

    Public stand-in: none; ``jax.devices()`` and ``jax.extend.backend.backends()`` would
    start them. Imported lazily so that asking does not import more of jax than needed.
    """
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def key_impl_name(dtype: Any) -> str:
    """Name of the PRNG implementation of a typed-key dtype (e.g. 'threefry2x32').

    Public stand-in: ``jax.random.key_impl(keys)``, which takes a key array only (not the
    ShapeDtypeStruct of a restore target) and returns a PRNGSpec for custom impls.
    """
    return dtype._impl.name


# ---------------------------------------------------------------------------- Orbax
ArrayMetadataStore = _ams.Store
"""Orbax's store of per-array metadata (``array_metadatas/``); no public name exists."""

PlaceholderHandler = _th.PlaceholderHandler
"""Orbax's handler for ``ocp.PLACEHOLDER`` leaves; ``ocp.type_handlers`` lacks it, but
Orbax's default registry has it, and distckpt's registry mirrors that one."""


class FastPollStore(_ams.Store):
    """Orbax's ArrayMetadata store; non-primary hosts poll for the primary's folder
    every 5 ms (backing off to 50 ms) instead of every 250 ms.

    Overrides the private ``Store._maybe_create_base_dir`` (no public option sets the
    poll interval; see :mod:`distckpt.checkpoint.tuning`).
    """

    async def _maybe_create_base_dir(self, base_dir) -> None:
        if ocp.multihost.is_primary_host(self._primary_host):
            return await _async_path.mkdir(base_dir, parents=True, exist_ok=True)
        deadline = time.monotonic() + self._write_timeout_secs
        delay = 0.005
        while not await _async_path.exists(base_dir):
            if time.monotonic() > deadline:
                raise ValueError(
                    f"[process_index={ocp.multihost.process_index()}] timed out after "
                    f"{self._write_timeout_secs} s waiting for the primary host "
                    f"({self._primary_host}) to create {base_dir}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return None


def kvstore_tspec_builder() -> Callable[..., Any]:
    """Orbax's ``tensorstore_utils.build_kvstore_tspec`` as Orbax's callers now see it.

    Public stand-in: none; every Orbax caller reads this private module attribute, and
    no handler option or registry reaches it (see :mod:`distckpt.storage.orbax_adapter`).
    """
    return _ts_utils.build_kvstore_tspec


def set_kvstore_tspec_builder(fn: Callable[..., Any]) -> None:
    """Replace Orbax's ``tensorstore_utils.build_kvstore_tspec`` (a monkeypatch)."""
    _ts_utils.build_kvstore_tspec = fn


def set_checkpoint_deleter(manager: ocp.CheckpointManager, deleter: Any) -> None:
    """Make `manager` delete old steps with `deleter`.

    Public stand-in: none; ``CheckpointManager`` 0.12.8 takes no deleter argument, so
    this replaces its private ``_checkpoint_deleter``.
    """
    if not hasattr(manager, "_checkpoint_deleter"):
        raise CheckpointError(
            f"orbax-checkpoint {ocp.__version__} has no CheckpointManager."
            "_checkpoint_deleter; distckpt's object-storage retention supports "
            f"orbax-checkpoint {TESTED_ORBAX}")
    manager._checkpoint_deleter = deleter


def checkpoint_deleter(manager: ocp.CheckpointManager) -> Any:
    """The object `manager` deletes old steps with (see set_checkpoint_deleter)."""
    return getattr(manager, "_checkpoint_deleter", None)


def finalize_thread_ended(manager: ocp.CheckpointManager) -> bool:
    """Whether `manager`'s background finalize thread exists and has ended.

    Public stand-in: ``manager.is_saving_in_progress()``, which can stay True for good
    when Orbax's closing barrier times out; only the private ``_finalize_thread`` tells.
    """
    ref = getattr(manager, "_finalize_thread", None)
    if ref is None:
        return False
    # No thread at all also counts: Orbax marks a save in progress before its own
    # synchronous checks (e.g. StepAlreadyExistsError), and a save that raised there never
    # starts a finalize thread nor clears the mark, so nothing is in flight.
    return bool(ref.map(lambda t: t is None or not t.is_alive()))


def use_coordination_barriers() -> None:
    """Make Orbax's own barriers (the start of each save, directory creation, old steps
    to remove, ...) barriers of JAX's coordination service instead of device all-gathers.

    Public stand-in: none. Orbax 0.12.8 has the absl flag
    ``experimental_orbax_use_distributed_barrier`` (default False: its barriers are
    ``multihost_utils.sync_global_devices``, an XLA computation over every device per
    barrier, eight per save, which never times out when a peer is gone). The
    coordination service's barrier has a timeout and runs no device computation. The
    flag is set as if given on the command line (``present``), so that reading it does
    not require the application's absl flags to be parsed; it applies to the whole
    process, as the flag would.
    """
    from absl import flags

    holder = flags.FLAGS["experimental_orbax_use_distributed_barrier"]
    holder.value = True
    holder.present = 1
