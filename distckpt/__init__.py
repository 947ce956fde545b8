"""distckpt: distributed multi-host checkpoints for JAX and Flax NNX.

Save sharded NNX state from every host asynchronously, restore it onto any mesh
and any number of hosts, and prove it with restore drills.
"""

# The names below load on first use (PEP 562), so `import distckpt` and the CLI's
# `--help` and argument errors do not pay for importing JAX, Flax and Orbax (~1.5 s).
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distckpt.checkpoint.options import CheckpointOptions as CheckpointOptions
    from distckpt.checkpoint.options import Restored as Restored
    from distckpt.checkpoint.service import CheckpointError as CheckpointError
    from distckpt.checkpoint.service import CheckpointService as CheckpointService
    from distckpt.checkpoint.service import NoCheckpointError as NoCheckpointError
    from distckpt.checkpoint.service import SaveFailedError as SaveFailedError
    from distckpt.checkpoint.service import StepExistsError as StepExistsError
    from distckpt.checkpoint.service import StepOrderError as StepOrderError
    from distckpt.checkpoint.service import TargetMismatchError as TargetMismatchError
    from distckpt.errors import FormatVersionError as FormatVersionError
    from distckpt.errors import StepUnusableError as StepUnusableError
    from distckpt.errors import StorageNotSharedError as StorageNotSharedError
    from distckpt.multihost.coordinator import BarrierTimeoutError as BarrierTimeoutError
    from distckpt.multihost.coordinator import Topology as Topology
    from distckpt.multihost.coordinator import all_gather as all_gather
    from distckpt.multihost.coordinator import barrier as barrier
    from distckpt.multihost.coordinator import initialize as initialize
    from distckpt.multihost.coordinator import is_primary as is_primary
    from distckpt.multihost.coordinator import primary_decides as primary_decides
    from distckpt.multihost.preemption import PreemptionGuard as PreemptionGuard
    from distckpt.multihost.preemption import PreemptionTimeoutError as PreemptionTimeoutError
    from distckpt.state.mesh import DEFAULT_RULES as DEFAULT_RULES
    from distckpt.state.mesh import MeshSpec as MeshSpec
    from distckpt.state.mesh import Rules as Rules
    from distckpt.state.mesh import abstract_target as abstract_target
    from distckpt.state.mesh import init_sharded as init_sharded
    from distckpt.state.mesh import make_mesh as make_mesh
    from distckpt.state.process_state import drop_process_state as drop_process_state
    from distckpt.tools.importer import ImportReport as ImportReport
    from distckpt.tools.importer import ImportSourceError as ImportSourceError
    from distckpt.tools.importer import import_checkpoint as import_checkpoint
    from distckpt.tools.plan import RestorePlan as RestorePlan
    from distckpt.tools.plan import plan_restore as plan_restore

__version__ = "0.1.0"

# Each public name and its module, once; the TYPE_CHECKING imports above say the same for
# type checkers (tests/test_lazy_imports.py fails if the two drift).
_LAZY = {
    "CheckpointOptions": "distckpt.checkpoint.options",
    "Restored": "distckpt.checkpoint.options",
    "CheckpointError": "distckpt.checkpoint.service",
    "CheckpointService": "distckpt.checkpoint.service",
    "NoCheckpointError": "distckpt.checkpoint.service",
    "SaveFailedError": "distckpt.checkpoint.service",
    "StepExistsError": "distckpt.checkpoint.service",
    "StepOrderError": "distckpt.checkpoint.service",
    "TargetMismatchError": "distckpt.checkpoint.service",
    "FormatVersionError": "distckpt.errors",
    "StepUnusableError": "distckpt.errors",
    "StorageNotSharedError": "distckpt.errors",
    "BarrierTimeoutError": "distckpt.multihost.coordinator",
    "Topology": "distckpt.multihost.coordinator",
    "all_gather": "distckpt.multihost.coordinator",
    "barrier": "distckpt.multihost.coordinator",
    "initialize": "distckpt.multihost.coordinator",
    "is_primary": "distckpt.multihost.coordinator",
    "primary_decides": "distckpt.multihost.coordinator",
    "PreemptionGuard": "distckpt.multihost.preemption",
    "PreemptionTimeoutError": "distckpt.multihost.preemption",
    "DEFAULT_RULES": "distckpt.state.mesh",
    "MeshSpec": "distckpt.state.mesh",
    "Rules": "distckpt.state.mesh",
    "abstract_target": "distckpt.state.mesh",
    "init_sharded": "distckpt.state.mesh",
    "make_mesh": "distckpt.state.mesh",
    "drop_process_state": "distckpt.state.process_state",
    "ImportReport": "distckpt.tools.importer",
    "ImportSourceError": "distckpt.tools.importer",
    "import_checkpoint": "distckpt.tools.importer",
    "RestorePlan": "distckpt.tools.plan",
    "plan_restore": "distckpt.tools.plan",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and cache the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
