"""The faults and tier choices ``distckpt drill`` offers (``--fault``, ``--tiers``).

Apart from :mod:`distckpt.tools.drill` so that building the CLI's parser (``--help``, an
argument error) imports no JAX; the drill re-exports every name.
"""

from __future__ import annotations

import enum


class Fault(enum.StrEnum):
    """A fault the drill injects (``--fault``; see :mod:`distckpt.tools.drill`)."""

    KILL_DURING_SAVE = "kill-during-save"
    """Every saving host SIGKILLed inside the last save's commit."""
    PREEMPT = "preempt"
    """SIGTERM to one saving host."""
    CORRUPT = "corrupt"
    """Flip bytes of the newest step's array data before the restore."""
    LOSE_HOST = "lose-host"
    """SIGKILL the last saving host after its last step's local copies are made, wipe its
    local tier (a replaced machine), restart."""


FAULTS = tuple(f.value for f in Fault)
TIERS = ("persistent", "local,persistent")
"""``--tiers``: the persistent directory alone, or a local tier in front of it."""
