"""Orbax array data on ``s3://`` through TensorStore's own ``s3`` kvstore driver.

Orbax 0.12.8 turns a checkpoint directory into a TensorStore kvstore spec in one function,
``orbax.checkpoint._src.serialization.tensorstore_utils.build_kvstore_tspec`` (lines
476-513), which knows two kinds of directory:

* ``gs://bucket/path``: ``_build_ocdbt_kvstore_tspec`` (lines 328-453) and
  ``_build_non_ocdbt_kvstore_tspec`` (456-473) take the base spec from
  ``gcs_utils.get_kvstore_for_gcs`` (``path/gcs_utils.py`` lines 111-126:
  ``{'driver': 'gcs', 'bucket': B, 'path': P}``) and add the object-store settings: no
  local-file locking or manifest override, a 400 MiB OCDBT target data file size
  (``_get_backend_ocdbt_target_data_file_size``, 516-543) and read coalescing
  (``is_remote_storage``, 914-950);
* an absolute local path: a ``file`` driver base.

Anything else fails: ``_normalize_path`` (218-222) turns ``s3://b/p`` into ``s3:/b/p`` and
line 355-356 raises "Checkpoint path should be absolute". Every caller reaches the
function through the module attribute: ``ArrayReadSpec``/``ArrayWriteSpec`` (757, 821),
``get_sharding_tensorstore_spec`` (956), the OCDBT merge and temporary-metadata commit in
``ocdbt_utils.py`` (179, 194, 242, 253, 337), ``type_handlers.py`` (303) and v1's
``string_leaf_handler.py`` (68). No handler option or registry reaches it, so the hook is
that attribute.

The adapter (:func:`install`) wraps it. For a directory ``s3://bucket/key`` it asks the
original function for the spec of ``gs://bucket/key`` (so OCDBT, per-process
sub-databases, the merge and every write option are built by Orbax's own object-store
branch) and replaces each ``gcs`` base node with an ``s3`` node for the same bucket and
key prefix, adding the endpoint, region and credentials of the registered
:class:`distckpt.storage.Location` (or of the environment). Local and ``gs://``
directories get exactly Orbax's spec. If the original stops producing ``gcs`` base nodes
for ``gs://`` input, the adapter raises instead of writing somewhere unexpected, and
``tests/test_storage.py`` pins the shapes it relies on.

Directories and Orbax's metadata files do not go through here: epath handles ``s3://``
with s3fs (configured by :func:`distckpt.storage.prepare`).
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

import orbax.checkpoint as ocp

from distckpt import compat
from distckpt.storage import Location

logger = logging.getLogger(__name__)

SUPPORTED_ORBAX = compat.TESTED_ORBAX
_EXPECTED_PARAMETERS = ("directory", "name", "use_ocdbt", "ocdbt_process_spec",
                        "ocdbt_write_options", "ocdbt_temporary_metadata_context")
_GCS_DRIVERS = ("gcs", "gcs_grpc")

_lock = threading.Lock()
_original = None
_locations: dict[str, Location] = {}  # s3 URL prefix -> location


class OrbaxAdapterError(RuntimeError):
    """Orbax's kvstore spec builder is not what this adapter was written for."""


def _check_original(fn) -> None:
    params = tuple(inspect.signature(fn).parameters)
    if params != _EXPECTED_PARAMETERS:
        raise OrbaxAdapterError(
            f"orbax-checkpoint {ocp.__version__}: tensorstore_utils.build_kvstore_tspec takes "
            f"{params}, expected {_EXPECTED_PARAMETERS} (orbax-checkpoint {SUPPORTED_ORBAX}); "
            "distckpt's s3:// adapter must be updated for this Orbax version")


def register(location: Location) -> None:
    """Use `location`'s endpoint, region and credentials for directories below it."""
    if location.scheme != "s3":
        raise ValueError(f"only s3:// locations are registered, got {location}")
    with _lock:
        _locations[location.url.rstrip("/") + "/"] = location


def location_for(directory: str) -> Location:
    """The registered location that holds `directory` (longest prefix), else one parsed
    from `directory` and the environment."""
    key = directory.rstrip("/") + "/"
    with _lock:
        matches = [p for p in _locations if key.startswith(p)]
        if matches:
            return _locations[max(matches, key=len)]
    return Location.parse(directory)


def _to_s3(node: Any, location: Location, swapped: list[int]) -> Any:
    if isinstance(node, dict):
        if node.get("driver") in _GCS_DRIVERS:
            if set(node) != {"driver", "bucket", "path"} or node["bucket"] != location.bucket:
                raise OrbaxAdapterError(
                    f"orbax-checkpoint {ocp.__version__} built an unexpected gcs base node "
                    f"{node!r} for bucket {location.bucket!r}; distckpt's s3:// adapter "
                    f"supports orbax-checkpoint {SUPPORTED_ORBAX}")
            swapped.append(1)
            return {"driver": "s3", "bucket": node["bucket"], "path": node["path"],
                    **location.s3_driver_fields()}
        return {k: _to_s3(v, location, swapped) for k, v in node.items()}
    if isinstance(node, list):
        return [_to_s3(v, location, swapped) for v in node]
    if isinstance(node, str) and node.startswith(("gs://", "gcs://")):
        raise OrbaxAdapterError(f"orbax-checkpoint {ocp.__version__} built a gs:// URL "
                                f"{node!r} for an s3:// directory; the adapter cannot map it")
    return node


def s3_kvstore_tspec(directory: str, name: str | None = None, **kwargs) -> dict[str, Any]:
    """Orbax's kvstore spec for an ``s3://`` directory (see the module docstring)."""
    if _original is None:
        raise OrbaxAdapterError("distckpt.storage.orbax_adapter.install() has not been called")
    location = location_for(directory)
    spec = _original("gs://" + directory[len("s3://"):], name, **kwargs)
    swapped: list[int] = []
    out = _to_s3(spec, location, swapped)
    if not swapped:
        raise OrbaxAdapterError(
            f"orbax-checkpoint {ocp.__version__} built no gcs base node for a gs:// "
            f"directory ({spec!r}); distckpt's s3:// adapter supports orbax-checkpoint "
            f"{SUPPORTED_ORBAX}")
    return out


def _build_kvstore_tspec(directory, name=None, **kwargs):
    if isinstance(directory, str) and directory.startswith("s3://"):
        return s3_kvstore_tspec(directory, name, **kwargs)
    return _original(directory, name, **kwargs)


def install() -> None:
    """Route Orbax's ``s3://`` directories to TensorStore's s3 driver (idempotent)."""
    global _original
    with _lock:
        current = compat.kvstore_tspec_builder()
        if current is _build_kvstore_tspec:
            return
        _check_original(current)
        if ocp.__version__ != SUPPORTED_ORBAX:
            logger.warning("distckpt's s3:// adapter was written for orbax-checkpoint %s; "
                           "running with %s", SUPPORTED_ORBAX, ocp.__version__)
        _original = current
        compat.set_kvstore_tspec_builder(_build_kvstore_tspec)


def installed() -> bool:
    return compat.kvstore_tspec_builder() is _build_kvstore_tspec


def uninstall() -> None:
    """Restore Orbax's own function (tests)."""
    global _original
    with _lock:
        if _original is not None and compat.kvstore_tspec_builder() is _build_kvstore_tspec:
            compat.set_kvstore_tspec_builder(_original)
        _original = None
