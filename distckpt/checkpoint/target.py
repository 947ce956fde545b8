"""Matching a restore target against a saved step: strict by default (every path, shape and
dtype must match), or partial (the shared paths)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from distckpt.errors import TargetMismatchError
from distckpt.state import nnx_state

__all__ = ["check_target", "target_problems"]


def check_target(saved: Mapping[str, Any], leaves: Sequence[nnx_state.Leaf], step: int, *,
                 partial: bool) -> tuple[list[nnx_state.Leaf], list[str]]:
    """Compare the target's leaves with the saved ones; return (to restore, untouched).

    Strict mode raises one TargetMismatchError listing every missing, extra, reshaped
    or re-typed path. Partial mode still refuses shape/dtype changes of shared paths.
    """
    by_name = {leaf.name: leaf for leaf in leaves}
    missing = sorted(set(by_name) - set(saved))  # in target, not in step
    problems = target_problems(saved, leaves, step, partial=partial)
    if problems:
        hint = ("" if partial else
                "\nIf the model changed on purpose, restore with partial=True to load the "
                "paths both share and keep the rest as initialised.")
        raise TargetMismatchError(
            f"restore target does not match step {step} ({len(problems)} problem(s)):\n"
            + "\n".join(problems) + hint)
    wanted = [by_name[n] for n in by_name if n in saved]
    return wanted, missing


def target_problems(saved: Mapping[str, Any], leaves: Sequence[nnx_state.Leaf], step: int, *,
                    partial: bool) -> list[str]:
    """What :func:`check_target` refuses, one indented line per path (none: it matches)."""
    by_name = {leaf.name: leaf for leaf in leaves}
    missing = sorted(set(by_name) - set(saved))  # in target, not in step
    extra = sorted(set(saved) - set(by_name))  # in step, not in target
    problems = []
    for name in sorted(set(by_name) & set(saved)):
        leaf, rec = by_name[name], saved[name]
        if list(leaf.shape) != list(rec["shape"]):
            problems.append(f"  {name}: shape {tuple(rec['shape'])} saved, "
                            f"{leaf.shape} in target")
        if leaf.dtype != rec["dtype"]:
            problems.append(f"  {name}: dtype {rec['dtype']} saved, {leaf.dtype} in target "
                            "(distckpt never casts; convert after restoring if you mean to)")
    if not partial:
        problems += [f"  {n}: in the target but not in step {step}" for n in missing]
        problems += [f"  {n}: in step {step} but not in the target" for n in extra]
    return problems
