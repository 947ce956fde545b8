"""Remat plans, the planner and its predictions checked against the compiler.

Everything is compiled from abstract inputs (`jax.jit(...).lower(ShapeDtypeStruct).compile()`)
on simulated CPU meshes: nothing large is allocated. Predictions are compared with
`memory_analysis()` (temp bytes at depths L and 2L: the growth is what one layer keeps for
the backward pass) and `cost_analysis()['flops']` (the scanned layer body counts once, so
a step's FLOPs are one layer's forward + backward). The 8-device mesh needs
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/conftest.py sets it); with
fewer devices the measurements run in a subprocess that sets it (never skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distckpt.remat.budget import (
    derive_budget,
    format_bytes,
    param_bytes_per_device,
    parse_bytes,
)
from distckpt.remat.choose import RematBudgetError, plan_remat
from distckpt.remat.estimate import estimate_plan
from distckpt.remat.graph import Hardware, LayerSpec
from distckpt.remat.measure import (
    FAST_COMPILE_OPTIONS,
    activation_sharding,
    measure_plans,
)
from distckpt.remat.plan import (
    PRESETS,
    TAGS,
    Action,
    OffloadUnsupportedError,
    RematPlan,
    RematTransformer,
    ScannedBlocks,
)
from distckpt.state.mesh import DEFAULT_RULES, make_mesh, state_shardings
from distckpt.tools.model import ModelConfig, Transformer, next_token_loss

TP_MESH = "data=2,fsdp=2,tensor=2"
MESHES = ("data=1", TP_MESH)
# A block big enough that the matmuls dominate, small enough to compile in seconds.
SPEC = LayerSpec(batch=8, seq=256, d_model=256, n_heads=8, n_kv_heads=4, head_dim=32,
                 d_ff=1024, n_layers=4)
TOLERANCE = 0.05


@pytest.fixture(scope="module")
def measured():
    """{mesh: {preset: Measurement}} for every catalog preset on both meshes."""
    plans = [RematPlan.preset(n) for n in PRESETS]
    out = {mesh: dict(zip(PRESETS, measure_plans(plans, SPEC, mesh), strict=True))
           for mesh in MESHES}
    for mesh, rows in out.items():
        print(f"\n{mesh}: preset, measured bytes/layer, predicted, FLOPs/layer, collectives")
        for name, m in rows.items():
            est = estimate_plan(RematPlan.preset(name), SPEC, mesh)
            print(f"  {name:<22} {m.bytes_per_layer:>12.0f} {est.bytes_per_layer:>12.0f} "
                  f"{m.flops_per_layer:>14.0f} {dict(m.collectives)} ({m.compile_s:.1f}s)")
    return out


def _extra(m, base) -> float:
    return (m.flops_per_layer - base.flops_per_layer) / base.flops_per_layer


# ---------------------------------------------------------------------- plans and policies
@pytest.mark.fast
def test_presets_round_trip_and_build_policies_from_constructors():
    cp = jax.checkpoint_policies
    for name, saved in PRESETS.items():
        plan = RematPlan.preset(name)
        assert plan.name == name and RematPlan.from_str(str(plan)) == plan
        policy = plan.policy()
        if saved is None:
            assert policy is cp.everything_saveable and plan.is_no_remat
        elif not saved:
            assert policy is cp.nothing_saveable
        else:
            assert policy == cp.save_only_these_names(*saved)
            assert plan.tags_with(Action.SAVE) == tuple(t for t in TAGS if t in saved)


@pytest.mark.fast
def test_from_str_clauses_aliases_and_every():
    plan = RematPlan.from_str("save=qkv_proj,out_proj;every=2")
    assert plan.name == "save_dot_except_mlp" and plan.every == 2
    assert str(plan) == "save_dot_except_mlp;every=2"
    custom = RematPlan.from_str("minimal;recompute=mlpwi;save=context")
    assert custom.name == "custom"
    assert custom.action("mlpwi") is Action.RECOMPUTE and custom.action("context") is Action.SAVE
    assert RematPlan.from_str(str(custom)) == custom
    assert RematPlan.from_str("save=query_proj,key_proj,value_proj") == RematPlan.preset(
        "save_qkv_proj")


@pytest.mark.fast
@pytest.mark.parametrize("text, message", [
    ("", "empty remat plan"),
    ("fastest", "unknown remat preset"),
    ("save=qkv", "unknown activation tag 'qkv'"),
    ("none;recompute=context", "'none' saves every intermediate"),
    ("full;every=0", "every must be >= 1"),
    ("full;keep=context", "the key must be save, offload, recompute or every"),
])
def test_from_str_errors_say_what_to_do(text, message):
    with pytest.raises(ValueError, match=message):
        RematPlan.from_str(text)


@pytest.mark.fast
def test_plan_validation_rejects_partial_save_untagged():
    plan = RematPlan.preset("minimal")
    with pytest.raises(ValueError, match="save_anything_except_these_names"):
        RematPlan(plan.actions, save_untagged=True)


@pytest.mark.fast
def test_offload_on_cpu_is_a_clear_error_not_a_silent_no_op():
    plan = RematPlan.from_str("minimal;offload=context")
    with pytest.raises(OffloadUnsupportedError, match="cpu backend") as err:
        plan.policy()
    assert "with_offload_as" in str(err.value)
    assert plan.with_offload_as(Action.SAVE).name == "minimal_with_context"
    assert plan.with_offload_as(Action.RECOMPUTE).name == "minimal"
    cfg = ModelConfig(n_layers=2, dropout=0.0)
    with nnx.use_eager_sharding(False):
        blocks = nnx.eval_shape(lambda: ScannedBlocks(cfg, nnx.Rngs(0), plan=plan))
    with pytest.raises(OffloadUnsupportedError):
        nnx.eval_shape(lambda m, x: m(x), blocks,
                       jax.ShapeDtypeStruct((2, 8, cfg.d_model), jnp.float32))
    # The planner does not offer offload unless the hardware says it can.
    est = estimate_plan(RematPlan.preset("full"), SPEC, "data=1")
    choice = plan_remat(SPEC, "data=1", est.activation_bytes * 1.01)
    assert not choice.plan.offloads and any("offload" in n for n in choice.notes)


@pytest.mark.fast
def test_offload_policy_on_a_backend_with_host_memory():
    class Memory:
        def __init__(self, kind):
            self.kind = kind

    class Gpu:
        platform, id = "gpu", 0

        def addressable_memories(self):
            return [Memory("device"), Memory("pinned_host")]

    from jax._src.ad_checkpoint import name_p
    from jax._src.interpreters import partial_eval as pe

    policy = RematPlan.from_str("save=qkv_proj;offload=context").policy(Gpu())
    assert isinstance(policy(name_p, name="context"), pe.Offloadable)
    assert policy(name_p, name="query_proj") == pe.Saveable
    assert policy(name_p, name="mlpwo") == pe.Recompute
    # With offload enabled (and a host link fast enough to pay), a budget that leaves only
    # heavy recompute on device is met by offloading instead; offloaded bytes are off-device.
    spec = dataclasses.replace(SPEC, n_layers=32)
    hw = Hardware(offload=True, host_bandwidth=1e15)
    full = estimate_plan(RematPlan.preset("full"), spec, "data=1", hardware=hw)
    budget = full.activation_bytes * 1.05
    on_device = plan_remat(spec, "data=1", budget).estimate
    offloaded = plan_remat(spec, "data=1", budget, hardware=hw).estimate
    assert offloaded.plan.offloads and offloaded.host_bytes_per_layer > 0
    assert offloaded.activation_bytes <= budget
    assert offloaded.recompute_flops < on_device.recompute_flops


# ---------------------------------------------------------------------- planner vs compiler
@pytest.mark.slow  # compiles every preset on two meshes (~45 s); CI's slow pass runs it
@pytest.mark.parametrize("mesh", MESHES)
def test_every_preset_bytes_and_flops_match_the_compiler(measured, mesh):
    base = measured[mesh]["none"]
    rows = []
    for name, m in measured[mesh].items():
        est = estimate_plan(RematPlan.preset(name), SPEC, mesh)
        byte_err = abs(est.bytes_per_layer - m.bytes_per_layer) / m.bytes_per_layer
        extra = _extra(m, base)
        flop_err = 0.0 if name == "none" else abs(est.extra_flops_fraction - extra) / extra
        rows.append((name, byte_err, est.extra_flops_fraction, extra, flop_err))
        assert byte_err <= TOLERANCE, (name, est.bytes_per_layer, m.bytes_per_layer)
        assert flop_err <= TOLERANCE, (name, est.extra_flops_fraction, extra)
        # Depth L and 2L are both compiled: the total memory is a real step's.
        assert m.total_bytes > m.temp_bytes[0]
    print("\n".join(f"{mesh} {n:<22} bytes err {b:.4f}  extra FLOPs pred {p:.4f} meas {x:.4f} "
                    f"(err {e:.4f})" for n, b, p, x, e in rows))
    # The recompute working set the planner budgets for bounds what the compiler adds.
    for name, m in measured[mesh].items():
        est = estimate_plan(RematPlan.preset(name), SPEC, mesh)
        fixed = m.temp_bytes[0] - m.layers[0] * m.bytes_per_layer
        base_fixed = base.temp_bytes[0] - base.layers[0] * base.bytes_per_layer
        assert fixed - base_fixed <= est.working_bytes, name


@pytest.mark.slow  # compiles every preset on two meshes (~45 s); CI's slow pass runs it
def test_every_n_layers_groups_match_the_compiler(measured):
    plans = [RematPlan.from_str("full;every=2"), RematPlan.from_str("save=out_proj,mlpwo;every=2")]
    none, ms = measured[TP_MESH]["none"], measure_plans(plans, SPEC, TP_MESH)
    for plan, m in zip(plans, ms, strict=True):
        est = estimate_plan(plan, SPEC, TP_MESH)
        assert abs(est.bytes_per_layer - m.bytes_per_layer) <= TOLERANCE * m.bytes_per_layer
        extra = _extra(m, none)
        assert abs(est.extra_flops_fraction - extra) <= TOLERANCE * extra, (plan, extra)
    full = estimate_plan(RematPlan.preset("full"), SPEC, TP_MESH)
    # Half the stored layer inputs, paid for with the inner layer's output projection.
    assert ms[0].bytes_per_layer == pytest.approx(full.bytes_per_layer / 2)
    assert estimate_plan(plans[0], SPEC, TP_MESH).recompute_flops > full.recompute_flops


@pytest.mark.slow  # compiles every preset on two meshes (~45 s); CI's slow pass runs it
def test_recomputing_row_parallel_projections_re_runs_their_all_reduce(measured):
    rows = measured[TP_MESH]
    none, full, out = rows["none"], rows["full"], rows["save_out_proj"]
    # HLO ops: saving out_proj adds no all-reduce; full recompute re-runs out_proj's.
    assert out.collectives["all-reduce"] <= none.collectives["all-reduce"]
    assert full.collectives["all-reduce"] > none.collectives["all-reduce"]
    for name, m in rows.items():
        est = estimate_plan(RematPlan.preset(name), SPEC, TP_MESH)
        counts = est.collective_counts()
        # The all-reduced arrays (independent of XLA's combiner) rise by what was predicted.
        assert m.all_reduce_operands - none.all_reduce_operands == counts.get("all-reduce", 0), name
        # FSDP weight gathers: predicted once per recomputed projection; XLA may share one
        # with the backward pass's own gather, never more.
        extra_gathers = m.collectives.get("all-gather", 0) - none.collectives.get("all-gather", 0)
        assert 0 <= extra_gathers <= counts.get("all-gather", 0), name
    # ... and the planner's cost counts them: same bytes, the all-reduce-free plan wins.
    qkv = estimate_plan(RematPlan.preset("save_qkv_proj"), SPEC, TP_MESH)
    assert "all-reduce" in qkv.collective_counts()
    assert "all-reduce" not in estimate_plan(RematPlan.preset("save_out_proj"), SPEC,
                                             TP_MESH).collective_counts()
    assert any(c.kind == "all-reduce" and c.axes == ("tensor",) for c in estimate_plan(
        RematPlan.preset("full"), SPEC, TP_MESH).collectives)
    choice = plan_remat(SPEC, TP_MESH, qkv.activation_bytes,
                        candidates=[RematPlan.preset("save_qkv_proj"),
                                    RematPlan.preset("save_out_proj")])
    assert choice.plan.name == "save_out_proj"


@pytest.mark.slow  # compiles every preset on two meshes (~45 s); CI's slow pass runs it
@pytest.mark.slow  # the default suite stays under 15 minutes; CI runs it
def test_selector_sweep_picks_a_fitting_plan_with_the_least_flops(measured):
    """Budgets between adjacent presets' measured bytes; recompute priced by FLOPs alone.

    On the tensor-parallel mesh, with collectives priced at zero (with them priced, the
    planner may pay FLOPs to avoid a re-run all-reduce, which
    test_recomputing_row_parallel_projections_re_runs_their_all_reduce checks).
    """
    mesh = TP_MESH
    flops_only = Hardware(collective_bandwidth=float("inf"))
    catalog = measured[mesh]
    working = estimate_plan(RematPlan.preset("full"), SPEC, mesh).working_bytes
    levels = sorted({m.bytes_per_layer for m in catalog.values()})
    budgets = [SPEC.n_layers * (lo + f * (hi - lo)) + working
               for lo, hi in zip(levels, levels[1:], strict=False) for f in (0.3, 0.7)]
    budgets.append(SPEC.n_layers * levels[-1] * 1.5)
    assert len(budgets) >= 10
    choices = [plan_remat(SPEC, mesh, b, hardware=flops_only) for b in budgets]
    customs = sorted({str(c.plan) for c in choices} - {str(RematPlan.preset(n)) for n in PRESETS})
    extra = dict(zip(customs, measure_plans([RematPlan.from_str(p) for p in customs], SPEC,
                                            mesh), strict=True))
    base = catalog["none"]
    lines = []
    for budget, choice in zip(budgets, choices, strict=True):
        m = catalog.get(choice.plan.name) if choice.plan.name in catalog else extra[
            str(choice.plan)]

        def fits(m, est, budget=budget):
            return SPEC.n_layers * m.bytes_per_layer + est.working_bytes <= budget

        assert fits(m, choice.estimate), (budget, str(choice.plan))
        fitting = [_extra(c, base) for n, c in catalog.items()
                   if fits(c, estimate_plan(RematPlan.preset(n), SPEC, mesh))]
        best_catalog = min(fitting)
        lines.append(f"{format_bytes(budget):>12} {str(choice.plan):<60} "
                     f"{_extra(m, base):.4f} <= {best_catalog:.4f}")
        # No higher than any catalog plan that fits (0.1% of a layer's FLOPs for XLA noise).
        assert _extra(m, base) <= best_catalog + 1e-3, lines[-1]
    print("\n" + "\n".join(lines))


# ---------------------------------------------------------------------- training with a plan
def _train_equality_body() -> None:
    mesh = make_mesh(TP_MESH, jax.devices()[:8])
    cfg = ModelConfig(vocab=64, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                      n_layers=4, dropout=0.1)
    spec = LayerSpec.from_model_config(cfg, batch=8, seq=16)
    none_bytes = estimate_plan(RematPlan.preset("none"), spec, mesh).activation_bytes
    chosen = plan_remat(spec, mesh, none_bytes / 3).plan
    assert not chosen.is_no_remat
    tokens = jax.device_put(
        np.random.default_rng(0).integers(0, cfg.vocab, (8, 17), dtype=np.int32),
        jax.sharding.NamedSharding(mesh, DEFAULT_RULES.spec(("batch", None), (8, 17), mesh)))

    def make(plan):
        return lambda: RematTransformer(cfg, nnx.Rngs(params=0, dropout=1), plan=plan)

    # One sharded initialisation; every plan gets the same parameters and dropout keys.
    with nnx.use_eager_sharding(False):
        init = make(RematPlan.preset("none"))
        shardings = state_shardings(nnx.state(nnx.eval_shape(init)), mesh)
        state = jax.jit(lambda: nnx.state(init()), out_shardings=shardings).lower().compile(
            FAST_COMPILE_OPTIONS)()

    def loss_and_grads(plan):
        with nnx.use_eager_sharding(False):
            graphdef = nnx.graphdef(nnx.eval_shape(make(plan)))

        def step(state, tokens):
            model = nnx.merge(graphdef, state)
            return nnx.value_and_grad(next_token_loss)(model, tokens)

        with activation_sharding(mesh):
            compiled = jax.jit(step).lower(state, tokens).compile(FAST_COMPILE_OPTIONS)
        loss, grads = compiled(state, tokens)
        return loss, jax.tree.leaves(grads)

    ref_loss, ref_grads = loss_and_grads(RematPlan.preset("none"))
    for plan in (chosen, RematPlan.from_str("save_out_proj;every=2")):
        loss, grads = loss_and_grads(plan)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=str(plan))
        for g, r in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=str(plan))


def test_training_step_with_the_planned_plan_matches_no_remat():
    if jax.device_count() >= 8:
        _train_equality_body()
        return
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.path[:0] = ['tests', '.']; "
                           "import test_remat; test_remat._train_equality_body()"],
                          cwd=root, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_scanned_stack_computes_the_same_function_as_the_reference_transformer():
    cfg = ModelConfig(vocab=64, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                      n_layers=3, dropout=0.0)

    @jax.jit
    def both(tokens):
        ref = Transformer(cfg, nnx.Rngs(0))
        scanned = RematTransformer(cfg, nnx.Rngs(1), plan="minimal")
        stacked = jax.tree.map(lambda *a: jnp.stack(a),
                               *[nnx.state(b, nnx.Param) for b in ref.blocks])
        nnx.update(scanned.layers.blocks, stacked)
        scanned.embed_VxD[...] = ref.embed_VxD[...]
        scanned.unembed_DxV[...] = ref.unembed_DxV[...]
        return scanned(tokens), ref(tokens)

    tokens = jnp.arange(2 * 9).reshape(2, 9) % cfg.vocab
    with nnx.use_eager_sharding(False):
        got, want = both.lower(tokens).compile(FAST_COMPILE_OPTIONS)(tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.fast
def test_every_must_divide_the_layers():
    with pytest.raises(ValueError, match="does not divide"):
        with nnx.use_eager_sharding(False):
            ScannedBlocks(ModelConfig(n_layers=3), nnx.Rngs(0), plan="full;every=2")


# ---------------------------------------------------------------------- budgets and CLI
@pytest.mark.fast
def test_budget_from_device_memory():
    cfg = ModelConfig(vocab=256, d_model=64, n_layers=2)
    spec = LayerSpec.from_model_config(cfg, batch=8, seq=32)
    assert param_bytes_per_device(spec, "data=1") == cfg.param_count() * 4
    sharded = param_bytes_per_device(spec, TP_MESH)
    assert sharded < cfg.param_count() * 4
    memory = derive_budget(parse_bytes("1GiB"), spec, "data=1", staging_bytes=0)
    assert memory.activations == (2**30 - 4 * cfg.param_count() * 4 - int(0.1 * 2**30))
    assert "for activations" in memory.describe()
    assert plan_remat(spec, "data=1", memory).budget == memory.activations
    with pytest.raises(RematBudgetError, match="shard the batch"):
        plan_remat(SPEC, "data=1", 1024)


@pytest.mark.fast
@pytest.mark.parametrize("text, expected", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20),
                                            ("1.5GB", 1_500_000_000), ("4096", 4096)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.fast
def test_parse_bytes_rejects_garbage():
    with pytest.raises(ValueError, match="e.g. 2GiB"):
        parse_bytes("two gigs")


def _cli(*argv):
    from distckpt.remat import cli as remat_cli

    parser = argparse.ArgumentParser()
    remat_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["remat-plan", *argv])
    return args.func(args)


@pytest.mark.fast
def test_cli_prints_table_and_json(capsys):
    assert _cli("--mesh", TP_MESH, "--budget", "2MiB", "--layers", "4") == 0
    out = capsys.readouterr().out
    assert "chosen:" in out and "out_proj" in out and "extra FLOPs per layer" in out
    assert _cli("--mesh", TP_MESH, "--budget", "2MiB", "--layers", "4", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mesh"] == TP_MESH and report["chosen"]["activation_bytes"] <= 2 * 2**20
    assert _cli("--mesh", TP_MESH, "--budget", "1KiB") == 2
    assert "no remat plan fits" in capsys.readouterr().err
    assert _cli("--mesh", "data=x", "--budget", "1GiB") == 2
    assert _cli("--device-memory", "64MiB", "--layers", "4") == 0
    assert "for activations" in capsys.readouterr().out


def test_cli_verify_compiles_and_reports_predicted_vs_measured(capsys):
    assert _cli("--mesh", TP_MESH, "--budget", "2MiB", "--layers", "2", "--seq", "64",
                "--verify", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    for row in report["verify"]:
        assert row["measured_bytes_per_layer"] == pytest.approx(
            row["predicted_bytes_per_layer"], rel=TOLERANCE)


@pytest.mark.slow  # a re-exec of the remat CLI
def test_measuring_a_mesh_larger_than_this_process_re_execs_with_the_flag():
    spec = LayerSpec(batch=16, seq=32, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                     d_ff=64, n_layers=2)
    mesh = "data=2,fsdp=4,tensor=2"  # 16 devices: more than this process has
    assert jax.device_count() < 16
    (m,) = measure_plans([RematPlan.preset("full")], spec, mesh)
    assert m.mesh == mesh
    assert m.bytes_per_layer == estimate_plan(RematPlan.preset("full"), spec, mesh).bytes_per_layer
