"""Choose a remat plan from the layer shape, the mesh and the per-device memory budget.

:func:`plan_remat` predicts, for every candidate :class:`~distckpt.remat.plan.RematPlan`, the
activation bytes one layer keeps per device and the work its backward pass redoes, and
returns the plan that fits the budget at the least recompute cost.

The model is a dataflow graph of one reference layer (:func:`layer_graph`). Each node is
a value the forward pass makes: the tagged activations, and the untagged intermediates
XLA keeps when nothing is rematerialised (norm statistics, rotated q/k, the f32
attention scores, the MLP activation). For each node it knows the global shape and
logical axes (so its bytes per device under the mesh's sharding rules), the FLOPs to
recompute it from its inputs, the collectives that recompute re-runs (the
tensor-parallel all-reduce after a row-parallel projection, the FSDP all-gather of the
projection's weight) and whether the backward pass reads it directly.

A plan is then evaluated the way `jax.checkpoint` partial evaluation works: start from
the values the backward reads; a saved (or offloaded) tag is stored, anything else is
recomputed from its inputs, recursively, down to the remat group's input, which is
always stored. ``query_proj``/``key_proj`` are read only to rebuild the rotated q/k,
``out_proj`` only to rebuild the residual stream, and ``mlpwo`` not at all unless a group
spans several layers, which is why saving them costs bytes only when it saves work.

Cost of a plan per layer: ``recompute FLOPs / peak FLOP/s + re-run collective bytes /
collective bandwidth + offloaded bytes x 2 / host bandwidth`` (seconds, from
:class:`Hardware`). The FLOPs follow XLA's `cost_analysis` conventions (a matmul is
2*M*N*K, an elementwise op one FLOP per element, transcendentals not counted) so they
can be checked against the compiler; see :mod:`distckpt.remat.measure`.

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
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from distckpt.remat.plan import PRESETS, TAGS, Action, RematPlan
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


# ---------------------------------------------------------------------- evaluating a plan
@dataclasses.dataclass(frozen=True)
class TagRow:
    """One row of :meth:`RematChoice.explain`: a tag (or untagged value) under a plan."""

    name: str
    """Tag, or untagged intermediate."""
    shape: tuple[int, ...]
    """Global shape."""
    bytes_per_device: int
    """Bytes per device per layer if stored."""
    action: str
    """save, offload, recompute, 'stored (group input)', 'not needed', or 'save (never read)'
    for a saved tag nothing reads (XLA drops it: it costs no bytes)."""
    read_by_backward: bool
    """Whether the backward pass reads it directly."""
    recompute_flops: float
    """FLOPs per device per layer saving it avoids (its own recompute, 0 if not needed)."""
    collectives: tuple[str, ...]
    """Collectives its recompute re-runs."""
    note: str = ""
    """What it is, or what the backward reads it for."""


@dataclasses.dataclass(frozen=True)
class PlanEstimate:
    """What a plan costs on one spec and mesh, per device."""

    plan: RematPlan
    """The plan."""
    bytes_per_layer: float
    """Activation bytes kept on device per layer (group storage / group size)."""
    host_bytes_per_layer: float
    """Bytes per layer offloaded to host memory."""
    working_bytes: int
    """Peak extra bytes while one group's backward runs (its layers' full residual set)."""
    activation_bytes: float
    """n_layers x bytes_per_layer + working_bytes: what must fit the budget."""
    recompute_flops: float
    """Extra FLOPs per layer the backward pass spends recomputing."""
    baseline_flops: float
    """FLOPs per layer of forward + backward without remat."""
    collectives: tuple[Collective, ...]
    """Collectives re-run per layer."""
    cost_s: float
    """Predicted extra time per layer: recompute + re-run collectives + offload traffic."""
    rows: tuple[TagRow, ...]
    """Per-value breakdown (tags first)."""

    @property
    def extra_flops_fraction(self) -> float:
        return self.recompute_flops / self.baseline_flops

    def fits(self, budget: float) -> bool:
        return self.activation_bytes <= budget

    def collective_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.collectives:
            out[c.kind] = out.get(c.kind, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": str(self.plan), "name": self.plan.name, "every": self.plan.every,
            "bytes_per_layer": self.bytes_per_layer,
            "host_bytes_per_layer": self.host_bytes_per_layer,
            "working_bytes": self.working_bytes, "activation_bytes": self.activation_bytes,
            "recompute_flops_per_layer": self.recompute_flops,
            "baseline_flops_per_layer": self.baseline_flops,
            "extra_flops_fraction": self.extra_flops_fraction,
            "rerun_collectives": [dataclasses.asdict(c) for c in self.collectives],
            "cost_s_per_layer": self.cost_s,
            "tags": [dataclasses.asdict(r) for r in self.rows],
        }


# Backward elementwise work relative to the forward's (norm, softmax, rotary and MLP
# activation gradients); only in the no-remat baseline, where it is ~1% of the total.
_BACKWARD_ELEMENTWISE = 2.5


def estimate_plan(plan: RematPlan, spec: LayerSpec, mesh: Any, rules: Rules = DEFAULT_RULES,
                  hardware: Hardware = Hardware(), *, graph: Mapping[str, Node] | None = None
                  ) -> PlanEstimate:
    """Predict `plan`'s per-device activation bytes, recompute FLOPs and collectives."""
    if spec.n_layers % plan.every:
        raise ValueError(f"plan {plan} groups every={plan.every} layers, which does not divide "
                         f"n_layers={spec.n_layers}")
    if plan.offloads and not hardware.offload:
        raise ValueError(f"plan {plan} offloads activations but Hardware(offload=False): the "
                         "backend has no separate host memory (CPU), or offload was not enabled")
    graph = graph if graph is not None else layer_graph(spec, mesh, rules)
    fwd = sum(n.flops for n in graph.values()) + _add_flops(graph)
    fwd_mm = sum(n.matmul_flops for n in graph.values())
    baseline = 3 * fwd_mm + (1 + _BACKWARD_ELEMENTWISE) * (fwd - fwd_mm)
    none_bytes = sum(n.bytes for n in graph.values() if n.read_by_backward)

    if plan.is_no_remat:
        rows = tuple(TagRow(n.name, n.shape, n.bytes, "save" if n.read_by_backward
                            else "not needed", n.read_by_backward, 0.0, ())
                     for n in _rows_order(graph))
        return PlanEstimate(plan, float(none_bytes), 0.0, 0, spec.n_layers * none_bytes, 0.0,
                            baseline, (), 0.0, rows)

    every = plan.every
    stored: dict[tuple[int, str], str] = {(0, "decoder_layer_input"): "input"}
    recomputed: set[tuple[int, str]] = set()
    actions = dict(plan.actions)

    def inputs(layer: int, name: str) -> list[tuple[int, str]]:
        if name == "decoder_layer_input":
            # The next layer's input is attn_residual + mlpwo of the previous layer.
            return [] if layer == 0 else [(layer - 1, "attn_residual"), (layer - 1, "mlpwo")]
        return [(layer, i) for i in graph[name].inputs]

    def require(layer: int, name: str) -> None:
        key = (layer, name)
        if key in stored or key in recomputed:
            return
        node = graph[name]
        if node.tag is not None and actions[node.tag] is not Action.RECOMPUTE:
            stored[key] = actions[node.tag].value
            return
        recomputed.add(key)
        for dep in inputs(layer, name):
            require(*dep)

    for layer in range(every):
        for node in graph.values():
            if node.read_by_backward:
                require(layer, node.name)

    def node_bytes(key):
        return graph[key[1]].bytes

    device = sum(node_bytes(k) for k, how in stored.items() if how != "offload")
    host = sum(node_bytes(k) for k, how in stored.items() if how == "offload")
    flops = sum(graph[n].recompute_flops if n != "decoder_layer_input" else _add_flops(graph)
                for _, n in recomputed)
    collectives = tuple(c for _, n in sorted(recomputed) for c in graph[n].collectives)
    moved = sum(c.moved for c in collectives)
    cost = (flops / hardware.peak_flops + moved / hardware.collective_bandwidth
            + 2 * host / hardware.host_bandwidth) / every
    group_working = every * none_bytes

    def row(node: Node) -> TagRow:
        keys = [(i, node.name) for i in range(every)]
        if node.tag is not None and any(k in stored for k in keys):
            how = {stored[k] for k in keys if k in stored}
            action = "stored (group input)" if how == {"input"} else sorted(how)[-1]
        elif any(k in recomputed for k in keys):
            action = "recompute"
        elif node.tag == "decoder_layer_input":
            action = "stored (group input)"
        elif node.tag is not None and actions[node.tag] is not Action.RECOMPUTE:
            action = f"{actions[node.tag].value} (never read)"
        else:
            action = "not needed"
        return TagRow(node.name, node.shape, node.bytes, action, node.read_by_backward,
                      node.recompute_flops if action == "recompute" else 0.0,
                      tuple(f"{c.kind}({','.join(c.axes)})" for c in node.collectives),
                      node.note)

    rows = tuple(row(n) for n in _rows_order(graph))
    per_layer = device / every
    return PlanEstimate(
        plan, per_layer, host / every, group_working,
        spec.n_layers * per_layer + group_working, flops / every, baseline, collectives,
        cost, rows)


def _add_flops(graph: Mapping[str, Node]) -> float:
    """FLOPs of the residual add that makes the next layer's input (one per element)."""
    return graph["attn_residual"].flops


def _rows_order(graph: Mapping[str, Node]) -> list[Node]:
    tagged = [n for n in graph.values() if n.tag is not None]
    return tagged + [n for n in graph.values() if n.tag is None]


# ---------------------------------------------------------------------- choosing a plan
class RematBudgetError(ValueError):
    """No candidate plan fits the activation budget."""


def candidate_plans(spec: LayerSpec, *, offload: bool = False, max_every: int = 4
                    ) -> list[RematPlan]:
    """The catalog presets, then every per-tag custom plan, for every group size tried.

    Group sizes are the divisors of ``spec.n_layers`` up to `max_every`. Tags that no
    backward pass reads at group size 1 (``decoder_layer_input``, ``mlpwo``) are varied only
    for larger groups, where they rebuild the inner layers' inputs. Offload variants are
    added only with `offload` (a GPU/TPU backend).
    """
    presets = [RematPlan.preset(name) for name in PRESETS]
    tags = [t for t in TAGS if spec.gated or t != "mlpwi_1"]
    inner = [t for t in tags if t not in ("decoder_layer_input", "mlpwo")]
    out = list(presets)
    everies = [e for e in range(1, max_every + 1) if spec.n_layers % e == 0]
    for every in everies:
        varied = inner if every == 1 else tags
        choices = (Action.SAVE, Action.OFFLOAD, Action.RECOMPUTE) if offload and every == 1 \
            else (Action.SAVE, Action.RECOMPUTE)
        if every > 1:
            out += [dataclasses.replace(p, every=every) for p in presets if not p.is_no_remat]
        for combo in itertools.product(choices, repeat=len(varied)):
            chosen = dict(zip(varied, combo, strict=True))
            save = [t for t, a in chosen.items() if a is Action.SAVE]
            off = [t for t, a in chosen.items() if a is Action.OFFLOAD]
            out.append(RematPlan.custom(save, off, every=every))
    return out


@dataclasses.dataclass(frozen=True)
class RematChoice:
    """The plan :func:`plan_remat` chose, with the numbers behind the choice."""

    spec: LayerSpec
    """The layer spec planned for."""
    mesh: str
    """The mesh spec planned for."""
    budget: float
    """Per-device activation budget in bytes."""
    estimate: PlanEstimate
    """The chosen plan's estimate."""
    catalog: tuple[PlanEstimate, ...]
    """Estimates of the catalog presets (group size 1), for comparison."""
    candidates: int
    """Distinct candidate plans evaluated."""
    hardware: Hardware
    """Rates used to price recompute, collectives and offload."""
    notes: tuple[str, ...] = ()
    """Caveats to print with the choice (e.g. offload unavailable)."""

    @property
    def plan(self) -> RematPlan:
        return self.estimate.plan

    def explain(self) -> str:
        """A text table: tag, shape, bytes per device, action; then the plan's totals."""
        est, spec = self.estimate, self.spec
        lines = [f"remat plan for {spec.n_layers} layers of d_model={spec.d_model} "
                 f"heads={spec.n_heads}/{spec.n_kv_heads}x{spec.head_dim} d_ff={spec.d_ff} "
                 f"({'gated' if spec.gated else 'plain'} MLP, {spec.dtype}), batch {spec.batch}"
                 f" x seq {spec.seq} on mesh {self.mesh}; budget {format_bytes(self.budget)} "
                 "activations per device",
                 f"chosen: {est.plan}  ({self.candidates} candidate plans; cost = recompute "
                 "+ re-run collectives + offload traffic)", ""]
        header = (f"{'value':<21} {'shape (global)':<17} {'bytes/device':>12}  "
                  f"{'bwd reads':<9}  {'action':<20} {'recompute FLOPs':>15}  re-runs")
        lines += [header, "-" * len(header)]
        for row in est.rows:
            mark = "" if row.name in TAGS else " *"
            reruns = ", ".join(row.collectives) if row.action == "recompute" else ""
            reads = "yes" if row.read_by_backward else "rebuild" if row.action == "recompute" \
                or row.action in ("save", "offload") else "no"
            lines.append(f"{row.name + mark:<21} {'x'.join(map(str, row.shape)):<17} "
                         f"{format_bytes(row.bytes_per_device):>12}  {reads:<9}  "
                         f"{row.action:<20} {_fmt_flops(row.recompute_flops):>15}  {reruns}")
        lines += ["(* untagged intermediate: saved only by 'none', otherwise recomputed; "
                  "'rebuild': read only to recompute other values)", ""]
        counts = est.collective_counts()
        lines += [
            f"activations per layer:  {format_bytes(est.bytes_per_layer)} on device"
            + (f", {format_bytes(est.host_bytes_per_layer)} offloaded" if
               est.host_bytes_per_layer else ""),
            f"total activations:      {format_bytes(est.activation_bytes)} = {spec.n_layers} x "
            f"{format_bytes(est.bytes_per_layer)} + {format_bytes(est.working_bytes)} working "
            f"set of one {est.plan.every}-layer group"
            f" ({'fits' if est.fits(self.budget) else 'DOES NOT FIT'})",
            f"extra FLOPs per layer:  {_fmt_flops(est.recompute_flops)} = "
            f"{100 * est.extra_flops_fraction:.1f}% of forward+backward "
            f"({_fmt_flops(est.baseline_flops)})",
            "re-run collectives:     " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                                          + " per layer" if counts else "none"),
            f"predicted extra time:   {est.cost_s * 1e6:.1f} us per layer "
            f"({self.hardware.peak_flops / 1e12:g} TFLOP/s, "
            f"{self.hardware.collective_bandwidth / 1e9:g} GB/s collectives)",
            "", "catalog presets on this mesh:",
            f"  {'preset':<22} {'bytes/layer':>12} {'total':>12} {'extra FLOPs':>11} "
            f"{'re-run collectives':<20} fits",
        ]
        for c in self.catalog:
            counts = c.collective_counts()
            lines.append(f"  {c.plan.name:<22} {format_bytes(c.bytes_per_layer):>12} "
                         f"{format_bytes(c.activation_bytes):>12} "
                         f"{100 * c.extra_flops_fraction:>10.1f}% "
                         f"{', '.join(f'{n} {k}' for k, n in sorted(counts.items())) or '-':<20} "
                         f"{'yes' if c.fits(self.budget) else 'no'}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"spec": dataclasses.asdict(self.spec), "mesh": self.mesh, "budget": self.budget,
                "chosen": self.estimate.to_json(), "candidates": self.candidates,
                "hardware": dataclasses.asdict(self.hardware),
                "catalog": [c.to_json() for c in self.catalog], "notes": list(self.notes)}


def plan_remat(spec: LayerSpec, mesh: Any, budget: float | MemoryBudget, *,
               rules: Rules = DEFAULT_RULES, hardware: Hardware = Hardware(),
               candidates: Sequence[RematPlan] | None = None, max_every: int = 4
               ) -> RematChoice:
    """The plan that fits `budget` per device at the least predicted recompute cost.

    `mesh` is a Mesh, MeshSpec or spec string such as ``'data=2,fsdp=2,tensor=2'`` (no
    devices needed). `budget` is bytes of activations per device, or a
    :class:`MemoryBudget` derived from device memory. Ties go to fewer bytes, then to
    catalog presets. Raises :class:`RematBudgetError` when nothing fits.
    """
    if isinstance(budget, MemoryBudget):
        budget = budget.activations
    if budget <= 0:
        raise RematBudgetError(f"the activation budget is {format_bytes(budget)}: parameters, "
                               "gradients, optimizer state and checkpoint staging already use "
                               "the device memory; shard them further (fsdp) or use a larger "
                               "device")
    graph = layer_graph(spec, mesh, rules)
    notes = []
    if not hardware.offload:
        notes.append("offload not considered (Hardware.offload=False; on CPU host and device "
                     "memory are the same, so offloading frees nothing)")
    plans = list(candidates) if candidates is not None else candidate_plans(
        spec, offload=hardware.offload, max_every=max_every)
    seen: dict[Any, PlanEstimate] = {}
    order: list[PlanEstimate] = []
    for plan in plans:
        if spec.n_layers % plan.every or (plan.offloads and not hardware.offload):
            continue
        est = estimate_plan(plan, spec, mesh, rules, hardware, graph=graph)
        key = (plan.every, plan.is_no_remat, est.bytes_per_layer, est.host_bytes_per_layer,
               est.recompute_flops, est.cost_s)
        if key not in seen:
            seen[key] = est
            order.append(est)
    fitting = [e for e in order if e.fits(budget)]
    mesh_str = str(_mesh_spec(mesh))
    if not fitting:
        smallest = min(order, key=lambda e: e.activation_bytes)
        raise RematBudgetError(
            f"no remat plan fits {format_bytes(budget)} of activations per device for "
            f"{spec.n_layers} layers on mesh {mesh_str}: the smallest, {smallest.plan}, needs "
            f"{format_bytes(smallest.activation_bytes)} ({format_bytes(smallest.bytes_per_layer)}"
            f" per layer + {format_bytes(smallest.working_bytes)} working set); shard the batch "
            "over more devices (data/fsdp), shrink the batch or sequence, or raise the budget")
    best = min(fitting, key=lambda e: (e.cost_s, e.activation_bytes))
    return RematChoice(spec, mesh_str, float(budget), best,
                       _catalog(spec, mesh, rules, hardware, graph), len(order), hardware,
                       tuple(notes))


def evaluate_plan(plan: RematPlan, spec: LayerSpec, mesh: Any, budget: float, *,
                  rules: Rules = DEFAULT_RULES, hardware: Hardware = Hardware()
                  ) -> RematChoice:
    """A :class:`RematChoice` for a given plan, fitting `budget` or not (for explain())."""
    graph = layer_graph(spec, mesh, rules)
    est = estimate_plan(plan, spec, mesh, rules, hardware, graph=graph)
    notes = () if est.fits(budget) else (
        f"{plan} needs {format_bytes(est.activation_bytes)}, over the budget",)
    return RematChoice(spec, str(_mesh_spec(mesh)), float(budget), est,
                       _catalog(spec, mesh, rules, hardware, graph), 1, hardware, notes)


def _catalog(spec, mesh, rules, hardware, graph) -> tuple[PlanEstimate, ...]:
    return tuple(estimate_plan(RematPlan.preset(n), spec, mesh, rules, hardware, graph=graph)
                 for n in PRESETS)


# ---------------------------------------------------------------------- budgets
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


def _fmt_flops(f: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(f) >= size:
            return f"{f / size:.2f} {unit}"
    return f"{f:.0f}"
