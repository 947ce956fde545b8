"""distckpt: distributed multi-host checkpoints for JAX and Flax NNX.

Save sharded NNX state from every host asynchronously, restore it onto any mesh
and any number of hosts, and prove it with restore drills.
"""

from distckpt.coordinator import BarrierTimeoutError as BarrierTimeoutError
from distckpt.coordinator import Topology as Topology
from distckpt.coordinator import all_gather as all_gather
from distckpt.coordinator import barrier as barrier
from distckpt.coordinator import initialize as initialize
from distckpt.coordinator import is_primary as is_primary
from distckpt.coordinator import primary_decides as primary_decides
from distckpt.errors import FormatVersionError as FormatVersionError
from distckpt.errors import StepUnusableError as StepUnusableError
from distckpt.errors import StorageNotSharedError as StorageNotSharedError
from distckpt.mesh import DEFAULT_RULES as DEFAULT_RULES
from distckpt.mesh import MeshSpec as MeshSpec
from distckpt.mesh import Rules as Rules
from distckpt.mesh import abstract_target as abstract_target
from distckpt.mesh import init_sharded as init_sharded
from distckpt.mesh import make_mesh as make_mesh
from distckpt.preemption import PreemptionGuard as PreemptionGuard
from distckpt.preemption import PreemptionTimeoutError as PreemptionTimeoutError
from distckpt.process_state import drop_process_state as drop_process_state
from distckpt.service import CheckpointError as CheckpointError
from distckpt.service import CheckpointOptions as CheckpointOptions
from distckpt.service import CheckpointService as CheckpointService
from distckpt.service import NoCheckpointError as NoCheckpointError
from distckpt.service import Restored as Restored
from distckpt.service import SaveFailedError as SaveFailedError
from distckpt.service import StepExistsError as StepExistsError
from distckpt.service import StepOrderError as StepOrderError
from distckpt.service import TargetMismatchError as TargetMismatchError

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RULES",
    "BarrierTimeoutError",
    "CheckpointError",
    "CheckpointOptions",
    "CheckpointService",
    "FormatVersionError",
    "MeshSpec",
    "NoCheckpointError",
    "PreemptionGuard",
    "PreemptionTimeoutError",
    "Restored",
    "Rules",
    "SaveFailedError",
    "StepExistsError",
    "StepOrderError",
    "StepUnusableError",
    "StorageNotSharedError",
    "TargetMismatchError",
    "Topology",
    "abstract_target",
    "all_gather",
    "barrier",
    "drop_process_state",
    "init_sharded",
    "initialize",
    "is_primary",
    "make_mesh",
    "primary_decides",
]
