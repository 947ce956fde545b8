"""How distckpt configures Orbax and TensorStore for speed, from measurements.

Every choice here was measured with ``distckpt bench`` (see the table in docs/benchmarks.md and
``benchmarks/checkpoint_bench.py``) on 2-4 simulated hosts; each keeps checkpoints
reshardable (plain OCDBT + zarr, readable by stock Orbax onto any mesh).

* **Non-primary hosts no longer wait in 250 ms steps.** Orbax 0.12.8's
  ``array_metadata_store.Store`` lets the primary create the ``array_metadatas``
  folder while every other host polls for it with ``asyncio.sleep(0.25)``. When the
  primary is a few milliseconds late (it usually is: it also creates the step's
  folders) every non-primary host's write, and so the commit barrier of every host,
  ends up to 250 ms late. On 2 hosts x 2 devices with 16 MiB this made Orbax's commit
  bimodal, ~0.12 s or ~0.32 s (``benchmarks/fixed_costs.py`` shows the spread);
  :class:`FastPollStore` polls every 5 ms, backing off to 50 ms, with the same deadline.
* **No compression by default.** Orbax compresses chunks with zstd (zarr3) or blosc
  (zarr2). Float weights, optimizer moments and random test states barely compress
  (measured 1.12:1 on random float32), while compressing and decompressing costs CPU
  on the critical path: uncompressed restore was 1.1-2.0x faster and save up to 1.6x
  faster at 256 MiB. ``CheckpointOptions(compression=True)`` turns it back on, e.g.
  for states with large sparse or constant parts.
* **OCDBT on, zarr2** (Orbax's defaults): OCDBT packs a step into a few files per
  process (fewer fsyncs and opens; matters on object storage).
* **Replica-parallel writes** (Orbax's default, made explicit): data-parallel replicas
  split the writes of a replicated array instead of replica 0 writing it all.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers as th

from distckpt.compat import ArrayMetadataStore, FastPollStore, PlaceholderHandler

__all__ = ["FastPollStore", "pytree_handler_kwargs", "type_handler_registry"]


def type_handler_registry(*, replica_parallel: bool = True,
                          array_metadata_store: ArrayMetadataStore | None = None) -> Any:
    """A private registry like Orbax's default one (same handler types, new instances,
    so Orbax's global registry and other users of it are untouched), whose jax.Array
    handler has the given replica-parallel setting and metadata store (default: a new
    :class:`FastPollStore`)."""
    store = FastPollStore() if array_metadata_store is None else array_metadata_store
    return th.create_type_handler_registry(
        (int, th.ScalarHandler()),
        (float, th.ScalarHandler()),
        (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()),
        (jax.Array, th.ArrayHandler(array_metadata_store=store,
                                    use_replica_parallel=replica_parallel)),
        (str, th.StringHandler()),
        (type(ocp.PLACEHOLDER), PlaceholderHandler()),
    )


def pytree_handler_kwargs(*, compression: bool, use_ocdbt: bool, use_zarr3: bool,
                          replica_parallel: bool, save_concurrent_gb: float | None,
                          restore_concurrent_gb: float | None) -> dict[str, Any]:
    """Keyword arguments of ``ocp.PyTreeCheckpointHandler`` for these settings."""
    kwargs: dict[str, Any] = {
        "use_ocdbt": use_ocdbt,
        "use_zarr3": use_zarr3,
        "use_compression": compression,
        "type_handler_registry": type_handler_registry(replica_parallel=replica_parallel),
    }
    if save_concurrent_gb is not None:
        kwargs["save_concurrent_gb"] = save_concurrent_gb
    if restore_concurrent_gb is not None:
        kwargs["restore_concurrent_gb"] = restore_concurrent_gb
    return kwargs
