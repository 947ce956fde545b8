"""Remat presets on a simulated CPU mesh: measured bytes, FLOPs, collectives, step time.

For one transformer block shape it compiles the layer-stack training step under every
catalog preset (depths L and 2L, from abstract inputs) and reports, per device:

- activation bytes per layer (growth of XLA's temp bytes per added layer) vs the planner,
- the FLOPs multiplier over no remat (cost_analysis; the scanned body counts once),
- collectives in the optimised HLO (all-reduce ops / all-reduced arrays, all-gathers),
- CPU step time (median of --reps runs on the simulated devices: a sanity number only),

then the planner's choice for a sweep of budgets (from below 'full' to above 'none'), for
this block and, predicted only, for a large block (--big).

    python benchmarks/remat_bench.py --mesh data=2,fsdp=2,tensor=2 --json remat.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mesh", default="data=2,fsdp=2,tensor=2", help="default %(default)s")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4, help="layers in the timed step")
    p.add_argument("--reps", type=int, default=3, help="timed steps per preset")
    p.add_argument("--no-time", action="store_true", help="skip executing steps")
    p.add_argument("--big", default="batch=16,seq=4096,d_model=4096,n_heads=32,n_kv_heads=8,"
                   "head_dim=128,d_ff=14336,n_layers=32,dtype=bfloat16",
                   help="large block for the predicted-only sweep (LayerSpec fields); "
                   "'' to skip")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args()


def main() -> int:
    args = _parse()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from distckpt.remat.measure import request_host_devices
    from distckpt.state.mesh import MeshSpec

    mesh_spec = MeshSpec.parse(args.mesh)
    request_host_devices(mesh_spec.size)  # before jax starts its backend

    import jax
    import numpy as np
    from flax import nnx

    from distckpt.remat.budget import format_bytes
    from distckpt.remat.estimate import estimate_plan
    from distckpt.remat.graph import LayerSpec
    from distckpt.remat.measure import (
        activation_sharding,
        measure_plans,
        stack_step,
    )
    from distckpt.remat.plan import PRESETS, RematPlan, ScannedBlocks
    from distckpt.state.mesh import init_sharded, make_mesh

    spec = LayerSpec(batch=args.batch, seq=args.seq, d_model=args.d_model, n_heads=args.heads,
                     n_kv_heads=args.kv_heads, head_dim=args.head_dim, d_ff=args.d_ff,
                     n_layers=args.layers)
    devices = jax.devices("cpu")
    if len(devices) < mesh_spec.size:
        print(f"error: {args.mesh} needs {mesh_spec.size} CPU devices, this process has "
              f"{len(devices)}: run with XLA_FLAGS=--xla_force_host_platform_device_count="
              f"{mesh_spec.size}", file=sys.stderr)
        return 2
    mesh = make_mesh(mesh_spec, devices[:mesh_spec.size])
    plans = [RematPlan.preset(n) for n in PRESETS]
    print(f"# remat presets, {spec.n_layers}-layer stack: batch {spec.batch} x seq {spec.seq}, "
          f"d_model {spec.d_model}, heads {spec.n_heads}/{spec.n_kv_heads}x{spec.head_dim}, "
          f"d_ff {spec.d_ff} (gated), float32, mesh {mesh_spec} ({jax.device_count()} CPU "
          f"devices, {os.cpu_count()} cores)\n")
    t0 = time.perf_counter()
    measured = dict(zip(PRESETS, measure_plans(plans, spec, mesh_spec), strict=True))
    print(f"(compiled {2 * len(plans)} steps in {time.perf_counter() - t0:.0f}s)\n")

    step_times: dict[str, float | None] = {n: None for n in PRESETS}
    if not args.no_time:
        cfg = spec.model_config()
        model = init_sharded(lambda: ScannedBlocks(cfg, nnx.Rngs(0), plan="none"), mesh)
        _, params, rest = nnx.split(model.blocks, nnx.Param, ...)
        x = jax.device_put(np.random.default_rng(0).standard_normal(
            (spec.batch, spec.seq, spec.d_model), dtype=np.float32),
            stack_step(spec, mesh, plans[0], spec.n_layers)[1][2].sharding)
        for plan in plans:
            step, _ = stack_step(spec, mesh, plan, spec.n_layers)
            with activation_sharding(mesh):
                jax.block_until_ready(step(params, rest, x))  # compile + warm up
                times = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    jax.block_until_ready(step(params, rest, x))
                    times.append(time.perf_counter() - t)
            step_times[plan.name] = statistics.median(times)

    base = measured["none"]
    rows = []
    header = (f"| {'preset':<21} | {'bytes/layer/device':>18} | {'predicted':>10} | "
              f"{'FLOPs x':>7} | {'pred x':>6} | {'all-reduce (arrays)':>19} | "
              f"{'all-gather':>10} | {'CPU step':>8} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, m in measured.items():
        est = estimate_plan(RematPlan.preset(name), spec, mesh_spec)
        mult = m.flops_per_layer / base.flops_per_layer
        row = {"preset": name, "measured_bytes_per_layer": m.bytes_per_layer,
               "predicted_bytes_per_layer": est.bytes_per_layer,
               "flops_multiplier": mult, "predicted_flops_multiplier":
                   1 + est.extra_flops_fraction,
               "collectives": dict(m.collectives), "all_reduce_arrays": m.all_reduce_operands,
               "predicted_rerun_collectives": est.collective_counts(),
               "cpu_step_s": step_times[name], "compile_s": m.compile_s}
        rows.append(row)
        st = "-" if step_times[name] is None else f"{step_times[name]:.2f}s"
        print(f"| {name:<21} | {format_bytes(m.bytes_per_layer):>18} | "
              f"{format_bytes(est.bytes_per_layer):>10} | {mult:>7.3f} | "
              f"{1 + est.extra_flops_fraction:>6.3f} | "
              f"{m.collectives.get('all-reduce', 0):>13} ({m.all_reduce_operands:>3}) | "
              f"{m.collectives.get('all-gather', 0):>10} | {st:>8} |")
    none_bytes = base.bytes_per_layer
    print(f"\nagainst none: minimal_with_context keeps "
          f"{100 * (1 - measured['minimal_with_context'].bytes_per_layer / none_bytes):.0f}% "
          f"less per layer for {100 * (rows[2]['flops_multiplier'] - 1):.1f}% extra FLOPs; full "
          f"{100 * (1 - measured['full'].bytes_per_layer / none_bytes):.0f}% less for "
          f"{100 * (rows[-1]['flops_multiplier'] - 1):.1f}%")

    sweeps = {"measured_block": _sweep(spec, mesh_spec)}
    if args.big:
        fields = {}
        for part in args.big.split(","):
            key, _, value = part.partition("=")
            fields[key] = value if key == "dtype" else int(value)
        sweeps["big_block"] = _sweep(LayerSpec(**fields), mesh_spec)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"spec": dataclasses.asdict(spec),
             "mesh": str(mesh_spec), "presets": rows, "sweeps": sweeps}, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


def _sweep(spec, mesh_spec) -> list[dict]:
    """The planner's choice for 10 budgets, geometric from 90% of 'full' to 105% of 'none'."""
    from distckpt.remat.budget import format_bytes
    from distckpt.remat.choose import RematBudgetError, plan_remat
    from distckpt.remat.estimate import estimate_plan
    from distckpt.remat.plan import RematPlan

    none = estimate_plan(RematPlan.preset("none"), spec, mesh_spec)
    full = estimate_plan(RematPlan.preset("full"), spec, mesh_spec)
    lo, hi = 0.9 * full.activation_bytes, 1.05 * none.activation_bytes
    print(f"\n# planner's choice, {spec.n_layers} x d_model {spec.d_model} d_ff {spec.d_ff} "
          f"{spec.dtype}, batch {spec.batch} x seq {spec.seq}, mesh {mesh_spec} "
          f"(none needs {format_bytes(none.activation_bytes)}/device)\n")
    print(f"| {'budget':>10} | {'plan':<55} | {'bytes/layer':>11} | {'total':>10} | "
          f"{'extra FLOPs':>11} | re-run collectives |")
    print(f"|{'-' * 12}|{'-' * 57}|{'-' * 13}|{'-' * 12}|{'-' * 13}|{'-' * 20}|")
    out = []
    for i in range(10):
        budget = lo * (hi / lo) ** (i / 9)
        try:
            est = plan_remat(spec, mesh_spec, budget).estimate
        except RematBudgetError:
            print(f"| {format_bytes(budget):>10} | {'(nothing fits)':<55} | {'':>11} | "
                  f"{'':>10} | {'':>11} | |")
            out.append({"budget": budget, "plan": None})
            continue
        counts = est.collective_counts()
        print(f"| {format_bytes(budget):>10} | {str(est.plan):<55} | "
              f"{format_bytes(est.bytes_per_layer):>11} | {format_bytes(est.activation_bytes):>10}"
              f" | {100 * est.extra_flops_fraction:>10.1f}% | "
              f"{', '.join(f'{n} {k}' for k, n in sorted(counts.items())) or '-'} |")
        out.append({"budget": budget, "plan": str(est.plan), **est.to_json()})
    return out


if __name__ == "__main__":
    sys.exit(main())
