"""Mesh specs (``data=2,fsdp=4``): parsed and checked without importing JAX.

:class:`MeshSpec` lives apart from :mod:`distckpt.state.mesh` (which re-exports it) so that
the CLI can reject a bad ``--from``/``--to``/``--mesh`` in a fraction of a second, before
JAX, Flax and Orbax load.
"""

from __future__ import annotations

import dataclasses
import math
import re

_AXIS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """An ordered list of mesh axes and sizes, e.g. ``data=2,fsdp=4``."""

    axes: tuple[tuple[str, int], ...]
    """(name, size) pairs in mesh order."""

    def __post_init__(self):
        if not self.axes:
            raise ValueError("a mesh needs at least one axis, e.g. 'data=2'")
        names = [n for n, _ in self.axes]
        if len(set(names)) != len(names):
            raise ValueError(f"mesh axis names must be unique, got {names}")
        for name, size in self.axes:
            if not _AXIS.match(name):
                raise ValueError(f"mesh axis name {name!r} is not an identifier")
            if size < 1:
                raise ValueError(f"mesh axis {name}={size}: sizes must be >= 1")

    @classmethod
    def parse(cls, text: str) -> MeshSpec:
        """Parse ``'data=2,fsdp=4'``. Sizes must be positive integers."""
        axes = []
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            name, sep, size = part.partition("=")
            if not sep or not size.isdigit():
                raise ValueError(
                    f"bad mesh spec {text!r}: expected AXIS=SIZE[,AXIS=SIZE...], "
                    "e.g. 'data=2,fsdp=4'"
                )
            axes.append((name, int(size)))
        return cls(tuple(axes))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s for _, s in self.axes)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return ",".join(f"{n}={s}" for n, s in self.axes)
