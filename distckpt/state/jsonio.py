"""Small JSON files on checkpoint storage: reads with a size limit.

A checkpoint directory may hold files nobody vetted; reading one must not exhaust memory,
so every JSON read goes through :func:`read_limited`. Writes that must be atomic and
durable go through :func:`distckpt.checkpoint.committed.write_durable`.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath

DEFAULT_LIMIT = 16 * 1024 * 1024


def read_limited(path: epath.Path, limit: int = DEFAULT_LIMIT) -> Any:
    """Parse a small JSON file, refusing files larger than `limit` bytes."""
    if path.stat().length > limit:
        raise ValueError(f"{path} is larger than {limit} bytes; refusing to read it")
    return json.loads(path.read_text())
