"""Choose a remat plan from the layer shape, the mesh and the per-device memory budget.

:func:`plan_remat` predicts, for every candidate :class:`~distckpt.remat.plan.RematPlan`
(:func:`candidate_plans`), the activation bytes one layer keeps per device and the work
its backward pass redoes (:func:`~distckpt.remat.estimate.estimate_plan`, on the graph of
:mod:`distckpt.remat.graph`), and returns the plan that fits the budget at the least
recompute cost as a :class:`RematChoice`. Budgets: :mod:`distckpt.remat.budget`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from distckpt.remat.budget import MemoryBudget, format_bytes
from distckpt.remat.estimate import PlanEstimate, estimate_plan
from distckpt.remat.graph import Hardware, LayerSpec, _mesh_spec, layer_graph
from distckpt.remat.plan import PRESETS, TAGS, Action, RematPlan
from distckpt.state.mesh import DEFAULT_RULES, Rules


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
               rules: Rules = DEFAULT_RULES,
               hardware: Hardware = Hardware(),  # noqa: B008 (frozen dataclass)
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
                  rules: Rules = DEFAULT_RULES,
                  hardware: Hardware = Hardware()  # noqa: B008 (frozen dataclass)
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



def _fmt_flops(f: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(f) >= size:
            return f"{f / size:.2f} {unit}"
    return f"{f:.0f}"
