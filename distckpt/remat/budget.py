"""Per-device memory budgets: device memory minus model state and checkpoint staging.

:func:`derive_budget` splits a device's memory (:func:`device_memory_bytes`) into
parameters, gradients, optimizer state, checkpoint staging and a reserve; what is left
(:attr:`MemoryBudget.activations`) is the activation budget
:func:`~distckpt.remat.choose.plan_remat` plans for. :func:`parse_bytes` and
:func:`format_bytes` read and print byte sizes ('2GiB').
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from distckpt.remat.graph import _DTYPE_BYTES, LayerSpec, _Sharding
from distckpt.state.mesh import DEFAULT_RULES, Rules


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """Device memory split into model state, checkpoint staging and activations (per device)."""

    device_bytes: int
    """Memory of one device."""
    params: int
    """Parameter bytes per device (sharded by the rules)."""
    grads: int
    """Gradient bytes per device (same layout as the parameters)."""
    optimizer: int
    """Optimizer state bytes per device."""
    staging: int
    """Bytes reserved for checkpoint staging (an on-device snapshot being saved)."""
    reserve: int
    """Headroom kept free for XLA temporaries, fragmentation and the non-layer activations."""

    @property
    def activations(self) -> int:
        return (self.device_bytes - self.params - self.grads - self.optimizer - self.staging
                - self.reserve)

    def describe(self) -> str:
        parts = [("device", self.device_bytes), ("params", -self.params),
                 ("grads", -self.grads), ("optimizer", -self.optimizer),
                 ("checkpoint staging", -self.staging), ("reserve", -self.reserve)]
        return ", ".join(f"{n} {'-' if v < 0 else ''}{format_bytes(abs(v))}" for n, v in parts) \
            + f" = {format_bytes(self.activations)} for activations"


def param_bytes_per_device(spec: LayerSpec, mesh: Any, rules: Rules = DEFAULT_RULES,
                           param_dtype: str | None = None) -> int:
    """Parameter bytes per device of the reference model with this spec, sharded by `rules`."""
    sh = _Sharding(mesh, rules)
    it = _DTYPE_BYTES[param_dtype or spec.dtype]
    D, H, K, hd, F, V = (spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.d_ff,
                         spec.vocab)
    layer = [(("embed", "heads", "head_dim"), (D, H, hd)),
             (("embed", "kv_heads", "head_dim"), (D, K, hd)),
             (("embed", "kv_heads", "head_dim"), (D, K, hd)),
             (("heads", "head_dim", "embed"), (H, hd, D)),
             (("embed", "mlp"), (D, F)), (("mlp", "embed"), (F, D)),
             (("norm",), (D,)), (("norm",), (D,))]
    if spec.gated:
        layer.append((("embed", "mlp"), (D, F)))
    total = spec.n_layers * sum(sh.local_size(a, s, "param") for a, s in layer)
    if V:
        total += sh.local_size(("vocab", "embed"), (V, D), "embed") * 2 + D
    return total * it


def derive_budget(device_bytes: int, spec: LayerSpec, mesh: Any, *,
                  rules: Rules = DEFAULT_RULES, optimizer_slots: int = 2,
                  staging_bytes: int | None = None, reserve_fraction: float = 0.1
                  ) -> MemoryBudget:
    """Per-device activation budget: memory minus params, grads, optimizer and staging.

    `optimizer_slots` is state arrays per parameter (AdamW: 2). `staging_bytes` defaults to
    one on-device snapshot of params + optimizer state (what an async checkpoint holds
    while it copies to host); `reserve_fraction` of the memory is kept free.
    """
    if device_bytes <= 0:
        raise ValueError(f"device_bytes must be > 0, got {device_bytes}")
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    params = param_bytes_per_device(spec, mesh, rules)
    optimizer = optimizer_slots * params
    staging = params + optimizer if staging_bytes is None else int(staging_bytes)
    return MemoryBudget(int(device_bytes), params, params, optimizer, staging,
                        int(reserve_fraction * device_bytes))


def device_memory_bytes(device: Any = None) -> int | None:
    """The device's memory limit as the runtime reports it (None on CPU / unknown)."""
    import jax

    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """'2GiB', '512MiB', '1.5GB', '1e9' or a plain byte count -> bytes.

    >>> parse_bytes("2GiB"), parse_bytes("512MiB"), parse_bytes("1000")
    (2147483648, 536870912, 1000)
    """
    if isinstance(text, int | float):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"bad byte size {text!r}: use a number with an optional unit "
                         "(B, KB, MB, GB, KiB, MiB, GiB, TiB), e.g. 2GiB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """Bytes in binary units: '1.50 GiB'."""
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
