"""Test helpers for local-tier copies on disk."""

from __future__ import annotations

import json
from pathlib import Path


def flip_a_shard_byte(copy_dir: Path, where: float = 0.5, mask: int = 0xFF) -> None:
    """Flip `mask` in one byte of the copy's largest shard (at `where` of its length):
    a byte of array data, never the padding between shards."""
    record = json.loads((copy_dir / "record.json").read_text())
    shard = max((s for leaf in record["leaves"] for s in leaf["shards"]),
                key=lambda s: s["nbytes"])
    path = copy_dir / shard["file"]
    data = bytearray(path.read_bytes())
    data[shard.get("offset", 0) + int(shard["nbytes"] * where)] ^= mask
    path.write_bytes(bytes(data))
