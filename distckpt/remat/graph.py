"""The priced dataflow graph of one reference layer: what each value costs per device.

The model is a dataflow graph of one reference layer (:func:`layer_graph`). Each node is
a value the forward pass makes: the tagged activations, and the untagged intermediates
XLA keeps when nothing is rematerialised (norm statistics, rotated q/k, the f32
attention scores, the MLP activation). For each node it knows the global shape and
logical axes (so its bytes per device under the mesh's sharding rules), the FLOPs to
recompute it from its inputs, the collectives that recompute re-runs (the
tensor-parallel all-reduce after a row-parallel projection, the FSDP all-gather of the
projection's weight) and whether the backward pass reads it directly.

:class:`LayerSpec` is the layer's shape and batch, :class:`Hardware` the rates that price
recompute, collectives and offload. Plans are priced on this graph by
:mod:`distckpt.remat.estimate` and chosen by :mod:`distckpt.remat.choose`.

Checked (tests/test_remat.py, float32, meshes data=1 and data=2,fsdp=2,tensor=2): bytes
per layer exact for every preset and for remat groups of 2 layers; extra FLOPs within 1%
(relative); all-reduced arrays exactly as predicted. Known limits:

- FSDP all-gathers are an upper bound: XLA shares a recompute's gather with the one the
  backward pass does anyway for some projections (on CPU: the attention ones).
- The working set (one group's full residual set) is an upper bound on what XLA adds.
- bfloat16 is modelled as an accelerator runs it; XLA's CPU backend computes bf16 dots
  in f32 and keeps f32 copies of each layer's weights, so CPU measurements of bf16 steps
  are larger than the prediction.
- Dropout masks are not modelled (the planner assumes dropout off, as large runs do);
  the plain (non-gated) MLP is modelled but not compile-checked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from distckpt.state.mesh import DEFAULT_RULES, MeshSpec, Rules

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Shape of one transformer layer and of the batch it processes."""

    batch: int
    """Global batch (sequences per step)."""
    seq: int
    """Tokens per sequence."""
    d_model: int
    """Model width."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads; must divide n_heads."""
    head_dim: int
    """Width of one head."""
    d_ff: int
    """MLP hidden width."""
    gated: bool = True
    """Gated MLP (two input projections, mlpwi_0/mlpwi_1) or plain (one, mlpwi_0)."""
    dtype: str = "float32"
    """Activation dtype: float32, bfloat16 or float16 (attention softmax runs in f32)."""
    n_layers: int = 1
    """Layers in the stack."""
    vocab: int = 0
    """Vocabulary size, only for parameter bytes when deriving a budget (0: ignore)."""

    def __post_init__(self):
        for name in ("batch", "seq", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide "
                             f"n_heads={self.n_heads}")
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {self.dtype!r}")
        if self.vocab < 0:
            raise ValueError(f"vocab must be >= 0, got {self.vocab}")

    @classmethod
    def from_model_config(cls, cfg: Any, *, batch: int, seq: int) -> LayerSpec:
        """The spec of a :class:`distckpt.tools.model.ModelConfig` (its block is gated)."""
        return cls(batch=batch, seq=seq, d_model=cfg.d_model, n_heads=cfg.n_heads,
                   n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, d_ff=cfg.d_ff,
                   gated=True, dtype=cfg.dtype, n_layers=cfg.n_layers, vocab=cfg.vocab)

    def model_config(self, **overrides: Any):
        """The reference :class:`~distckpt.tools.model.ModelConfig` of this spec (dropout off)."""
        from distckpt.tools.model import ModelConfig

        if not self.gated:
            raise ValueError("the reference block has a gated MLP; it cannot build gated=False")
        fields = dict(vocab=max(self.vocab, 1), d_model=self.d_model, n_heads=self.n_heads,
                      n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, d_ff=self.d_ff,
                      n_layers=self.n_layers, dropout=0.0, dtype=self.dtype)
        return ModelConfig(**{**fields, **overrides})

    @property
    def itemsize(self) -> int:
        return _DTYPE_BYTES[self.dtype]


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Rates that price recomputation, collectives and host offload (per device)."""

    peak_flops: float = 400e12
    """FLOP/s a device sustains on the recomputed work."""
    collective_bandwidth: float = 100e9
    """Bytes/s one device moves in a collective (ring algorithm assumed)."""
    host_bandwidth: float = 25e9
    """Bytes/s between device and pinned host memory, each way (offload)."""
    offload: bool = False
    """Whether the backend can offload activations to host (GPU/TPU; never CPU)."""

    def __post_init__(self):
        for name in ("peak_flops", "collective_bandwidth", "host_bandwidth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective a recompute re-runs."""

    kind: str
    """'all-reduce' or 'all-gather'."""
    axes: tuple[str, ...]
    """Mesh axes it runs over."""
    bytes: int
    """Bytes of the result per device."""
    moved: float
    """Bytes one device sends (ring): 2(n-1)/n x bytes for an all-reduce, (n-1)/n x for a gather."""
    reason: str
    """What it is for, e.g. 'out_proj row-parallel sum'."""


@dataclasses.dataclass(frozen=True)
class Node:
    """One value of a layer's forward pass, priced per device."""

    name: str
    """Tag name, or a descriptive name for an untagged intermediate."""
    tag: str | None
    """The activation tag, or None for an untagged intermediate."""
    shape: tuple[int, ...]
    """Global shape of the (main) value."""
    axes: tuple[str | None, ...]
    """Logical axes of the value (sharded by the rules)."""
    bytes: int
    """Bytes per device stored when the value is saved (or, untagged, when nothing is remat)."""
    inputs: tuple[str, ...]
    """Nodes it is computed from."""
    flops: float
    """Forward FLOPs per device to compute it from its inputs."""
    recompute_flops: float
    """FLOPs per device the backward pass spends recomputing it (XLA's count)."""
    matmul_flops: float
    """The matrix-multiplication part of `flops`."""
    collectives: tuple[Collective, ...]
    """Collectives that recomputing it re-runs."""
    read_by_backward: bool
    """The backward pass reads this value itself (not only to recompute others)."""
    note: str = ""
    """What it is / what the stored bytes consist of."""


# Elementwise FLOPs per element, counted as XLA's cost analysis counts them (one per
# arithmetic op, transcendentals apart). Forward: from the ops themselves. Recompute:
# what the backward pass spends, measured on the CPU backend (tests/test_remat.py): it
# recomputes only the RMSNorm statistics, and duplicates the cheap rotary and MLP
# activation ops into the several fusions that consume them.
_FWD = {"norm": 4, "rotary": 3, "softmax": 6, "add": 1, "gated_act": 5, "act": 4}
_RECOMPUTE = {"norm": 2, "rotary": 7, "softmax": 5, "add": 1, "gated_act": 10, "act": 8}


class _Sharding:
    """Per-device sizes under the rules; works from a MeshSpec, no devices needed."""

    def __init__(self, mesh: Any, rules: Rules):
        spec = _mesh_spec(mesh)
        self.mesh_spec = spec
        self.shape = dict(spec.axes)
        self.rules = rules

    def factors(self, axes: Sequence[str | None], shape: Sequence[int], what: str
                ) -> tuple[tuple[str, ...], ...]:
        pspec = self.rules.spec(tuple(axes), tuple(shape), self, what)
        out = []
        for i in range(len(shape)):
            entry = pspec[i] if i < len(pspec) else None
            out.append(() if entry is None else (entry,) if isinstance(entry, str)
                       else tuple(entry))
        return tuple(out)

    def local_shape(self, axes, shape, what: str) -> tuple[int, ...]:
        return tuple(d // math.prod(self.shape[a] for a in names)
                     for d, names in zip(shape, self.factors(axes, shape, what), strict=True))

    def local_size(self, axes, shape, what: str) -> int:
        return math.prod(self.local_shape(axes, shape, what))

    def axes_of(self, logical: str, size: int, what: str) -> tuple[str, ...]:
        return self.factors((logical,), (size,), what)[0]


def _mesh_spec(mesh: Any) -> MeshSpec:
    if isinstance(mesh, MeshSpec):
        return mesh
    if isinstance(mesh, str):
        return MeshSpec.parse(mesh)
    return MeshSpec(tuple((str(n), int(s)) for n, s in mesh.shape.items()))


def layer_graph(spec: LayerSpec, mesh: Any, rules: Rules = DEFAULT_RULES) -> dict[str, Node]:
    """The priced dataflow graph of one reference layer on `mesh` (a Mesh, MeshSpec or str).

    Untagged values list what XLA keeps for them when nothing is rematerialised; the
    byte counts were checked against `memory_analysis` of compiled steps (see
    tests/test_remat.py).
    """
    sh = _Sharding(mesh, rules)
    B, S, D, H, K, hd, F = (spec.batch, spec.seq, spec.d_model, spec.n_heads, spec.n_kv_heads,
                            spec.head_dim, spec.d_ff)
    R = H // K
    it = spec.itemsize
    f32 = 4

    def local(axes, shape, what):
        return sh.local_size(axes, shape, what)

    bsd = ("batch", "seq", "embed")
    n_bsd = local(bsd, (B, S, D), "decoder_layer_input")
    n_bs = local(("batch", "seq", None), (B, S, 1), "norm statistics")
    n_q = local(("batch", "seq", "heads", "head_dim"), (B, S, H, hd), "query_proj")
    n_kv = local(("batch", "seq", "kv_heads", "head_dim"), (B, S, K, hd), "key_proj")
    score_axes = ("batch", "kv_heads", None, "seq", None)
    n_scores = local(score_axes, (B, K, R, S, S), "attention scores")
    n_rows = local(score_axes, (B, K, R, S, 1), "softmax statistics")
    n_ff = local(("batch", "seq", "mlp"), (B, S, F), "mlpwi_0")
    # Contraction lengths per device: the model width is gathered (FSDP) for projections;
    # heads and MLP width stay split over their axes (row-parallel partial sums).
    h_loc = H // math.prod(sh.shape[a] for a in sh.axes_of("heads", H, "heads"))
    f_loc = F // math.prod(sh.shape[a] for a in sh.axes_of("mlp", F, "mlp"))

    def weight_gather(name, axes, shape) -> tuple[Collective, ...]:
        """All-gather of a projection weight over the axes sharding its embed dim."""
        factors = sh.factors(axes, shape, name)
        gather_axes = tuple(a for names, logical in zip(factors, axes, strict=True)
                            if logical == "embed" for a in names)
        if not gather_axes:
            return ()
        n = math.prod(sh.shape[a] for a in gather_axes)
        full = math.prod(shape) // math.prod(
            math.prod(sh.shape[a] for a in names) for names, logical in
            zip(factors, axes, strict=True) if logical != "embed") * it
        return (Collective("all-gather", gather_axes, full, full * (n - 1) / n,
                           f"{name} weight (FSDP)"),)

    def row_parallel_sum(name, logical, size) -> tuple[Collective, ...]:
        axes = sh.axes_of(logical, size, name)
        if not axes:
            return ()
        n = math.prod(sh.shape[a] for a in axes)
        out = n_bsd * it
        return (Collective("all-reduce", axes, out, 2 * out * (n - 1) / n,
                           f"{name} row-parallel partial sums"),)

    def node(name, shape, axes, *, inputs=(), tag=False, stored=None, matmul=0, elem=None,
             per=0, read=True, collectives=(), note=""):
        """A Node; `elem` names the elementwise kind applied `per` times per element."""
        fwd = rec = matmul
        if elem is not None:
            fwd, rec = fwd + _FWD[elem] * per, rec + _RECOMPUTE[elem] * per
        return Node(name, name if tag else None, shape, axes,
                    local(axes, shape, name) * it if stored is None else stored, inputs,
                    fwd, rec, matmul, collectives, read, note)

    qa, kva, ffa = (("batch", "seq", "heads", "head_dim"), ("batch", "seq", "kv_heads", "head_dim"),
                    ("batch", "seq", "mlp"))
    norm_bytes = 3 * n_bsd * it + 2 * n_bs * it + D * it
    norm_note = "RMSNorm: 3 x [B,S,D] + 2 x [B,S,1] + scale"

    def norm(name, source):
        n = node(name, (B, S, D), bsd, inputs=(source,), stored=norm_bytes, elem="norm",
                 per=n_bsd, note=norm_note)
        return dataclasses.replace(n, flops=n.flops + n_bs, recompute_flops=n.recompute_flops
                                   + n_bs)

    nodes = [
        node("decoder_layer_input", (B, S, D), bsd, tag=True,
             note="layer input (a remat group's input is always stored)"),
        norm("attn_norm", "decoder_layer_input"),
        node("query_proj", (B, S, H, hd), qa, tag=True, inputs=("attn_norm",),
             matmul=2 * n_q * D, read=False, note="read only to rebuild the rotated queries",
             collectives=weight_gather("query_proj", ("embed", "heads", "head_dim"), (D, H, hd))),
        node("key_proj", (B, S, K, hd), kva, tag=True, inputs=("attn_norm",),
             matmul=2 * n_kv * D, read=False, note="read only to rebuild the rotated keys",
             collectives=weight_gather("key_proj", ("embed", "kv_heads", "head_dim"), (D, K, hd))),
        node("value_proj", (B, S, K, hd), kva, tag=True, inputs=("attn_norm",),
             matmul=2 * n_kv * D,
             collectives=weight_gather("value_proj", ("embed", "kv_heads", "head_dim"),
                                       (D, K, hd))),
        node("query_rotated", (B, S, H, hd), qa, inputs=("query_proj",), elem="rotary", per=n_q,
             note="rotary(q)"),
        node("key_rotated", (B, S, K, hd), kva, inputs=("key_proj",), elem="rotary", per=n_kv,
             note="rotary(k)"),
        node("attn_scores", (B, K, R, S, S), score_axes, inputs=("query_rotated", "key_rotated"),
             stored=2 * n_scores * f32 + 2 * n_rows * f32, matmul=2 * n_scores * hd,
             elem="softmax", per=n_scores, note="f32 softmax: 2 x [B,H,S,S] + 2 x [B,H,S,1]"),
        node("context", (B, S, H, hd), qa, tag=True, inputs=("attn_scores", "value_proj"),
             matmul=2 * n_scores * hd),
        node("out_proj", (B, S, D), bsd, tag=True, inputs=("context",),
             matmul=2 * n_bsd * h_loc * hd, read=False,
             note="read only to rebuild the residual stream",
             collectives=row_parallel_sum("out_proj", "heads", H)
             + weight_gather("out_proj", ("heads", "head_dim", "embed"), (H, hd, D))),
        node("attn_residual", (B, S, D), bsd, inputs=("decoder_layer_input", "out_proj"),
             elem="add", per=n_bsd, note="x + attention"),
        norm("mlp_norm", "attn_residual"),
        node("mlpwi_0", (B, S, F), ffa, tag=True, inputs=("mlp_norm",), matmul=2 * n_ff * D,
             collectives=weight_gather("mlpwi_0", ("embed", "mlp"), (D, F))),
    ]
    if spec.gated:
        nodes += [
            node("mlpwi_1", (B, S, F), ffa, tag=True, inputs=("mlp_norm",), matmul=2 * n_ff * D,
                 collectives=weight_gather("mlpwi_1", ("embed", "mlp"), (D, F))),
            node("mlp_hidden", (B, S, F), ffa, inputs=("mlpwi_0", "mlpwi_1"),
                 stored=4 * n_ff * it, elem="gated_act", per=n_ff,
                 note="silu(gate) * up: 4 x [B,S,F]"),
        ]
    else:
        nodes.append(node("mlp_hidden", (B, S, F), ffa, inputs=("mlpwi_0",),
                          stored=3 * n_ff * it, elem="act", per=n_ff,
                          note="silu(h): 3 x [B,S,F] (modelled, not compile-checked)"))
    nodes.append(node("mlpwo", (B, S, D), bsd, tag=True, inputs=("mlp_hidden",),
                      matmul=2 * n_bsd * f_loc, read=False,
                      note="read only to rebuild the next layer's input",
                      collectives=row_parallel_sum("mlpwo", "mlp", F)
                      + weight_gather("mlpwo", ("mlp", "embed"), (F, D))))
    return {n.name: n for n in nodes}
