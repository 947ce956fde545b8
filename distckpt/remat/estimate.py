"""Price one remat plan on a layer graph: activation bytes, recompute FLOPs, collectives.

:func:`estimate_plan` evaluates a plan the way `jax.checkpoint` partial evaluation works:
start from the values the backward reads; a saved (or offloaded) tag is stored, anything
else is recomputed from its inputs, recursively, down to the remat group's input, which
is always stored. ``query_proj``/``key_proj`` are read only to rebuild the rotated q/k,
``out_proj`` only to rebuild the residual stream, and ``mlpwo`` not at all unless a group
spans several layers, which is why saving them costs bytes only when it saves work.

Cost of a plan per layer: ``recompute FLOPs / peak FLOP/s + re-run collective bytes /
collective bandwidth + offloaded bytes x 2 / host bandwidth`` (seconds, from
:class:`~distckpt.remat.graph.Hardware`). The FLOPs follow XLA's `cost_analysis`
conventions (a matmul is 2*M*N*K, an elementwise op one FLOP per element,
transcendentals not counted) so they can be checked against the compiler; see
:mod:`distckpt.remat.measure`. The graph and its known limits: :mod:`distckpt.remat.graph`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from distckpt.remat.graph import Collective, Hardware, LayerSpec, Node, layer_graph
from distckpt.remat.plan import Action, RematPlan
from distckpt.state.mesh import DEFAULT_RULES, Rules


@dataclasses.dataclass(frozen=True)
class TagRow:
    """One row of :meth:`~distckpt.remat.choose.RematChoice.explain`: a tag (or untagged
    value) under a plan."""

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
                  hardware: Hardware = Hardware(),  # noqa: B008 (frozen dataclass)
                  *, graph: Mapping[str, Node] | None = None
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
