"""Map a restored (or unpickled) checkpoint tree onto distckpt items.

A distckpt save of ``{"model": model, "optimizer": optimizer}`` writes each NNX
variable at ``<item>/<module path>`` (``model/l1/kernel``,
``optimizer/opt_state/0/mu/l1/kernel``, ``optimizer/step``; see
:mod:`distckpt.state.nnx_state`). Orbax (0.12.8, with Flax 0.12.8) writes the
``nnx.State`` of a model as nested dicts keyed by the same module path whose
leaves are ``{"value": array}`` (the Variable's one field); a tree saved after
``State.to_pure_dict()`` has plain arrays there. So the mapping is:

1. :func:`plain`: nested dicts with string keys; ``{"value": array}`` becomes the
   array; an ``nnx.Variable`` its value; tuples, lists and named tuples (optax
   states) are keyed by index or field name, as NNX keys them.
2. :func:`split_items`: which subtree is which item.

   * ``nnx.split(model)`` saved as is: ``(graphdef, state)``; Orbax keeps no
     graphdef (``None``), the state becomes the model item.
   * A dict with a ``model`` or ``params`` key (the seeds' ``{'model':
     nnx.state(model), 'optimizer': nnx.state(optimizer), 'epoch': ...}`` and
     ``{'params': ..., 'opt_state': ..., 'step': ...}``): that subtree is the model
     item; ``optimizer`` / ``opt_state`` the ``optimizer`` item (a bare optax state
     under ``opt_state`` is placed at ``optimizer/opt_state`` as ``nnx.Optimizer``
     holds it); other values that are not arrays (``step``, ``epoch``,
     ``val_loss``, ``metrics``) are kept as metadata; other arrays are *unmapped*.
   * Anything else is one model's state: the model item.

Nothing here touches arrays' contents; leaves pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from flax import nnx

SEP = "/"
MODEL_KEYS = ("model", "params")
OPTIMIZER_KEYS = ("optimizer", "opt_state")
OPTIMIZER_ITEM = "optimizer"


def is_array(x: Any) -> bool:
    """An array leaf (jax, numpy, or Orbax's restore target), as opposed to a Python value."""
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, np.generic)


def plain(obj: Any) -> Any:
    """`obj` as nested dicts with string keys (see the module docstring)."""
    if isinstance(obj, nnx.Variable):
        return plain(obj.get_value())
    if isinstance(obj, Mapping):
        out = {str(k): plain(v) for k, v in obj.items()}
        if set(out) == {"value"} and not isinstance(out["value"], dict):
            return out["value"]  # a Variable as Orbax wrote it
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple (optax state)
        return {f: plain(getattr(obj, f)) for f in obj._fields}
    if isinstance(obj, list | tuple):
        return {str(i): plain(v) for i, v in enumerate(obj)}
    return obj


def leaves(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, leaf) pairs of a :func:`plain` tree, in key order."""
    if isinstance(tree, dict):
        for k in tree:
            yield from leaves(tree[k], (*prefix, k))
    else:
        yield prefix, tree


def has_arrays(tree: Any) -> bool:
    return any(is_array(v) for _, v in leaves(tree))


def _json_value(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if is_array(x) and getattr(x, "shape", None) == ():
        return np.asarray(x).item()
    return x if isinstance(x, str | int | float | bool) or x is None else repr(x)


@dataclasses.dataclass
class Mapped:
    """A source tree split into distckpt items, kept values and unmapped paths."""

    items: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Item name -> plain tree of arrays."""
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Source path -> a Python value that is not an array (step, epoch, metrics, ...)."""
    unmapped: list[str] = dataclasses.field(default_factory=list)
    """Source paths of arrays that map to no item (not written)."""
    kinds: dict[str, str] = dataclasses.field(default_factory=dict)
    """Item name -> what the source held there, in words."""

    def add_item(self, name: str, tree: Any, kind: str, where: str) -> None:
        if name in self.items:
            raise ValueError(f"two parts of the source map to item {name!r} (the second is "
                             f"{where or 'the whole tree'}); give --item another name")
        arrays = {}
        for path, value in leaves(tree):
            if is_array(value):
                arrays[path] = value
            elif value is not None:
                self.values[SEP.join((where, *path)) if where else SEP.join(path)] = \
                    _json_value(value)
        if not arrays:
            return
        nested: dict[str, Any] = {}
        for path, value in arrays.items():
            node = nested
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
        self.items[name] = nested
        self.kinds[name] = kind

    def keep_rest(self, tree: Any, where: str) -> None:
        """Values of `tree` become metadata; its arrays are unmapped."""
        for path, value in leaves(tree):
            name = SEP.join((where, *path)) if where else SEP.join(path)
            if is_array(value) and value.shape != ():
                self.unmapped.append(name)
            elif value is not None:
                self.values[name] = _json_value(value)


def _is_split(tree: Any) -> bool:
    """nnx.split(model) saved as is: (graphdef, state), the graphdef gone (Orbax) or opaque."""
    if not isinstance(tree, dict) or "1" not in tree or not set(tree) <= {"0", "1"}:
        return False
    return isinstance(tree["1"], dict) and not has_arrays(tree.get("0"))


def split_items(tree: Any, item: str, out: Mapped | None = None, where: str = "") -> Mapped:
    """Add `tree`'s items to `out` (a new :class:`Mapped` by default) and return it."""
    out = Mapped() if out is None else out
    if _is_split(tree):
        out.add_item(item, tree["1"], "nnx.split(model) state", SEP.join(filter(None, (where,
                                                                                       "1"))))
        return out
    if not isinstance(tree, dict) or not any(k in tree for k in MODEL_KEYS):
        out.add_item(item, tree, "one model's state", where)
        return out
    model_key = next(k for k in MODEL_KEYS if k in tree)
    out.add_item(item, tree[model_key], f"'{model_key}'", _join(where, model_key))
    opt_key = next((k for k in OPTIMIZER_KEYS if k in tree), None)
    if opt_key is not None:
        add_optimizer(out, tree[opt_key], _join(where, opt_key))
    for key, value in tree.items():
        if key not in (model_key, opt_key):
            out.keep_rest(value, _join(where, key))
    return out


def add_optimizer(out: Mapped, tree: Any, where: str) -> None:
    """An ``nnx.state(optimizer)`` as is; a bare optax state under ``opt_state``."""
    if isinstance(tree, dict) and "opt_state" in tree:
        out.add_item(OPTIMIZER_ITEM, tree, "nnx.state(optimizer)", where)
    else:
        out.add_item(OPTIMIZER_ITEM, {"opt_state": tree}, "optax state", where)


def _join(where: str, key: str) -> str:
    return f"{where}{SEP}{key}" if where else key


def array_paths(items: Mapping[str, Any]) -> list[str]:
    return [SEP.join((name, *p)) for name, tree in items.items() for p, _ in leaves(tree)]
