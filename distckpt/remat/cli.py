"""``distckpt remat-plan``: choose a remat plan for a layer shape, mesh and memory budget.

Thin on purpose: parse flags, call :mod:`distckpt.remat.choose`, print. Importing this
module does not import jax (the main CLI builds its parser eagerly).

    distckpt remat-plan --mesh data=2,fsdp=2,tensor=2 --budget 2GiB --d-model 1024 \\
        --heads 16 --kv-heads 8 --head-dim 64 --d-ff 4096 --layers 24 --batch 16 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``remat-plan`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "remat-plan", help="choose a remat (activation checkpointing) plan for a memory budget",
        description="Predict per-device activation bytes, recompute FLOPs and re-run "
        "collectives of every remat plan for a transformer layer on a mesh, and print the one "
        "that fits the budget at the least recompute cost. --verify compiles it on a "
        "simulated CPU mesh and prints predicted vs measured.")
    p.add_argument("--mesh", default="data=1",
                   help="mesh spec, e.g. data=2,fsdp=2,tensor=2 (default %(default)s); no "
                   "devices are needed unless --verify")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget", metavar="BYTES",
                        help="activation bytes per device, e.g. 2GiB, 512MiB or a byte count")
    budget.add_argument("--device-memory", metavar="BYTES",
                        help="device memory; the budget is what params, grads, optimizer state "
                        "and checkpoint staging leave (default: the device's own limit on "
                        "GPU/TPU)")
    p.add_argument("--staging", metavar="BYTES",
                   help="with --device-memory: bytes reserved for checkpoint staging "
                   "(default: one on-device snapshot of params + optimizer state)")
    p.add_argument("--reserve", type=float, default=0.1,
                   help="with --device-memory: fraction kept free (default %(default)s)")
    p.add_argument("--plan", help="explain this plan (e.g. minimal, 'save=qkv_proj;every=2') "
                   "instead of choosing one")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--verify", action="store_true",
                   help="compile the plan and 'none' on a simulated CPU mesh; print predicted "
                   "vs measured bytes per layer, extra FLOPs and collectives")
    g = p.add_argument_group("layer shape (defaults: the reference model's tiny block)")
    g.add_argument("--batch", type=int, default=8, help="global batch (default %(default)s)")
    g.add_argument("--seq", type=int, default=128, help="sequence length (default %(default)s)")
    g.add_argument("--d-model", type=int, default=64, help="model width (default %(default)s)")
    g.add_argument("--heads", type=int, default=4, help="query heads (default %(default)s)")
    g.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default %(default)s)")
    g.add_argument("--head-dim", type=int, default=16, help="head width (default %(default)s)")
    g.add_argument("--d-ff", type=int, default=128, help="MLP width (default %(default)s)")
    g.add_argument("--layers", type=int, default=2, help="layers (default %(default)s)")
    g.add_argument("--vocab", type=int, default=256,
                   help="vocabulary, for parameter bytes (default %(default)s)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="activation dtype (default %(default)s)")
    g.add_argument("--plain-mlp", action="store_true", help="non-gated MLP (one input "
                   "projection); modelled, not compile-checked")
    h = p.add_argument_group("cost model")
    h.add_argument("--peak-tflops", type=float, default=400.0,
                   help="device TFLOP/s for recompute (default %(default)s)")
    h.add_argument("--collective-gbps", type=float, default=100.0,
                   help="per-device collective GB/s (default %(default)s)")
    h.add_argument("--host-gbps", type=float, default=25.0,
                   help="device<->host GB/s for offload (default %(default)s)")
    h.add_argument("--offload", action="store_true",
                   help="the target backend can offload activations to host (GPU/TPU)")
    h.add_argument("--max-every", type=int, default=4,
                   help="largest remat group (layers per checkpoint) to try (default %(default)s)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Run ``remat-plan`` with parsed `args`; returns the exit code."""
    from distckpt.state.mesh import MeshSpec

    try:
        mesh = MeshSpec.parse(args.mesh)
    except ValueError as e:
        return _fail(e)
    if args.verify:
        if args.offload:
            return _fail("--verify compiles on CPU, where host and device memory are the same, "
                         "so offloaded plans cannot be checked; drop --offload or --verify")
        # Before anything starts jax's backend: simulate the mesh's devices in-process.
        from distckpt.remat.measure import request_host_devices

        request_host_devices(mesh.size)

    from distckpt.remat.budget import (
        derive_budget,
        device_memory_bytes,
        format_bytes,
        parse_bytes,
    )
    from distckpt.remat.choose import evaluate_plan, plan_remat
    from distckpt.remat.estimate import estimate_plan
    from distckpt.remat.graph import Hardware, LayerSpec
    from distckpt.remat.measure import measure_plans
    from distckpt.remat.plan import RematPlan

    try:
        spec = LayerSpec(batch=args.batch, seq=args.seq, d_model=args.d_model,
                         n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim,
                         d_ff=args.d_ff, gated=not args.plain_mlp, dtype=args.dtype,
                         n_layers=args.layers, vocab=args.vocab)
        hardware = Hardware(peak_flops=args.peak_tflops * 1e12,
                            collective_bandwidth=args.collective_gbps * 1e9,
                            host_bandwidth=args.host_gbps * 1e9, offload=args.offload)
        memory = None
        if args.budget is not None:
            budget = parse_bytes(args.budget)
            if budget < 1:  # input, not a verdict on the parameters' size
                return _fail(f"--budget {args.budget}: the activation budget must be at least "
                             "1 byte per device; give e.g. --budget 2GiB")
        else:
            device_bytes = (parse_bytes(args.device_memory) if args.device_memory
                            else device_memory_bytes())
            if args.device_memory and device_bytes is not None and device_bytes < 1:
                return _fail(f"--device-memory {args.device_memory}: device memory must be at "
                             "least 1 byte; give e.g. --device-memory 80GiB")
            if device_bytes is None:
                return _fail("give --budget BYTES (activations per device) or --device-memory "
                             "BYTES: this backend does not report its memory size")
            memory = derive_budget(device_bytes, spec, mesh, reserve_fraction=args.reserve,
                                   staging_bytes=parse_bytes(args.staging) if args.staging
                                   else None)
            budget = memory.activations
        if args.plan:
            choice = evaluate_plan(RematPlan.from_str(args.plan), spec, mesh, budget,
                                   hardware=hardware)
        else:
            choice = plan_remat(spec, mesh, budget, hardware=hardware, max_every=args.max_every)
    except ValueError as e:  # RematBudgetError included: it says what to change
        return _fail(e)

    report: dict[str, Any] = choice.to_json()
    if memory is not None:
        report["memory"] = {"breakdown": memory.describe(), "activations": memory.activations}
    verify_rows: list[dict[str, Any]] = []
    if args.verify:
        plans = [choice.plan] + ([] if choice.plan.is_no_remat else [RematPlan.preset("none")])
        try:
            measured = measure_plans(plans, spec, mesh)
        except (ValueError, RuntimeError) as e:
            return _fail(f"--verify failed: {e}")
        base = measured[-1]
        for plan, m in zip(plans, measured, strict=True):
            est = estimate_plan(plan, spec, mesh, hardware=hardware)
            extra = (m.flops_per_layer - base.flops_per_layer) / base.flops_per_layer
            verify_rows.append({
                "plan": str(plan), "predicted_bytes_per_layer": est.bytes_per_layer,
                "measured_bytes_per_layer": m.bytes_per_layer,
                "predicted_extra_flops_fraction": est.extra_flops_fraction,
                "measured_extra_flops_fraction": extra,
                "predicted_rerun_collectives": est.collective_counts(),
                "measured_collectives": dict(m.collectives),
                "measured_all_reduce_operands": m.all_reduce_operands,
                "measured_total_bytes": m.total_bytes, "compile_s": m.compile_s})
        report["verify"] = verify_rows

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if memory is not None:
        print(f"budget: {memory.describe()}\n")
    print(choice.explain())
    if verify_rows:
        print(f"\ncompiled on a simulated {mesh.size}-device CPU mesh ({mesh}), depths L and 2L:")
        print(f"  {'plan':<34} {'bytes/layer pred':>16} {'measured':>12} {'extra FLOPs pred':>16}"
              f" {'measured':>9}  all-reduce operands")
        for row in verify_rows:
            print(f"  {row['plan']:<34} {format_bytes(row['predicted_bytes_per_layer']):>16} "
                  f"{format_bytes(row['measured_bytes_per_layer']):>12} "
                  f"{100 * row['predicted_extra_flops_fraction']:>15.2f}% "
                  f"{100 * row['measured_extra_flops_fraction']:>8.2f}%  "
                  f"{row['measured_all_reduce_operands']}")
    return 0


def _fail(message: object) -> int:
    print(f"distckpt remat-plan: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m distckpt.remat.cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
