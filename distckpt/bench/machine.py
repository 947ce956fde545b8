"""What a `distckpt bench` report was measured on: the machine (cores, CPU, memory, platform,
package versions) and the filesystem holding its directory."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    from importlib import metadata

    info["versions"] = {}
    for pkg in ("jax", "jaxlib", "flax", "orbax-checkpoint", "tensorstore", "numpy"):
        try:
            info["versions"][pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info["versions"][pkg] = None
    return info


def filesystem_of(path: Path) -> dict[str, str]:
    """Device and type of the filesystem holding `path` (from /proc/mounts)."""
    best = ("", {"device": "?", "type": "?"})
    try:
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (resolved == mnt or resolved.startswith(mnt.rstrip("/") + "/")) and \
                    len(mnt) >= len(best[0]):
                best = (mnt, {"device": dev, "type": fstype, "mount": mnt})
    except OSError:
        pass
    return best[1]
