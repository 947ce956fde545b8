"""Check remat predictions against the compiler: compile, then read XLA's own numbers.

:func:`measure_plan` / :func:`measure_plans` compile a layer-stack training step with
`jax.jit(...).lower(ShapeDtypeStruct args with shardings).compile()` on a (simulated)
mesh, allocating nothing, and read `memory_analysis()` (argument + output + temp -
alias; on CPU `peak_memory_in_bytes` omits temp), `cost_analysis()['flops']` and the
HLO's collectives. Per-layer figures come from compiling two depths (a scanned body is
counted once). When the process has too few devices, measurement runs in a subprocess
with ``--xla_force_host_platform_device_count`` set:
``python -m distckpt.remat.measure --measure`` (request JSON on stdin).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distckpt.remat.graph import LayerSpec, _mesh_spec
from distckpt.remat.plan import RematPlan
from distckpt.state.mesh import DEFAULT_RULES, MeshSpec, Rules


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What XLA reports for a layer-stack training step under one plan (per device)."""

    plan: str
    """The plan, as :meth:`RematPlan.__str__` writes it."""
    mesh: str
    """The mesh spec it was compiled for."""
    layers: tuple[int, int]
    """The two depths compiled (L and 2L)."""
    temp_bytes: tuple[int, int]
    """memory_analysis temp bytes at those depths."""
    total_bytes: int
    """argument + output + temp - alias bytes at depth L."""
    flops: float
    """cost_analysis FLOPs of the step at depth L (the scanned group body counts once)."""
    collectives: Mapping[str, int]
    """Collective ops in the optimised HLO at depth L, by kind."""
    all_reduce_operands: int
    """Arrays all-reduced (tuple all-reduces counted per element; independent of combining)."""
    compile_s: float
    """Seconds spent lowering and compiling both depths."""

    @property
    def bytes_per_layer(self) -> float:
        """Temp bytes added per added layer: the activations a layer keeps for backward."""
        return (self.temp_bytes[1] - self.temp_bytes[0]) / (self.layers[1] - self.layers[0])

    @property
    def flops_per_layer(self) -> float:
        """FLOPs of one layer's forward + backward (the group body divided by its size)."""
        every = RematPlan.from_str(self.plan).every
        return self.flops / every

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["collectives"] = dict(self.collectives)
        out["bytes_per_layer"] = self.bytes_per_layer
        out["flops_per_layer"] = self.flops_per_layer
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Measurement:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        kw["layers"], kw["temp_bytes"] = tuple(kw["layers"]), tuple(kw["temp_bytes"])
        return cls(**kw)


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def hlo_collectives(hlo_text: str) -> tuple[dict[str, int], int]:
    """Collective op counts by kind in optimised HLO text, and all-reduce operand count."""
    counts: dict[str, int] = {}
    operands = 0
    for line in hlo_text.splitlines():
        for kind in _COLLECTIVES:
            m = re.search(rf"=\s*(\(.*?\)|\S+)\s+{kind}(-start)?\(", line)
            if m:
                counts[kind] = counts.get(kind, 0) + 1
                if kind == "all-reduce":
                    result = m.group(1)
                    operands += result.count("[") if result.startswith("(") else 1
    return counts, operands


def stack_step(spec: LayerSpec, mesh: Any, plan: RematPlan, n_layers: int,
               rules: Rules = DEFAULT_RULES):
    """A training step over `n_layers` scanned reference blocks, and its abstract inputs.

    Returns ``(step, (params, rest, x))``: ``step(params, rest, x) -> (loss, (param_grads,
    x_grad))`` is jitted (call it inside :func:`activation_sharding`), the inputs are
    `jax.ShapeDtypeStruct`s carrying their shardings. The loss is mean(y**2), so the
    gradient flows back through every layer as in a real step.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from distckpt.remat.plan import ScannedBlocks, scan_layers
    from distckpt.state.mesh import abstract_target

    cfg = spec.model_config(n_layers=n_layers)
    abstract = abstract_target(lambda: ScannedBlocks(cfg, nnx.Rngs(0), plan=plan), mesh, rules)
    graphdef, params, rest = nnx.split(abstract.blocks, nnx.Param, ...)  # type: ignore[misc]  # flax stub: variadic tuple
    shape = (spec.batch, spec.seq, spec.d_model)
    x_sharding = NamedSharding(mesh, rules.spec(("batch", "seq", "embed"), shape, mesh, "x"))
    x = jax.ShapeDtypeStruct(shape, jnp.dtype(spec.dtype), sharding=x_sharding)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)

    def loss(blocks, x_BxLxD):
        y_BxLxD = scan_layers(blocks, x_BxLxD, plan)
        return jnp.mean(jnp.square(y_BxLxD.astype(jnp.float32)))

    def step(params, rest, x_BxLxD):
        blocks = nnx.merge(graphdef, params, rest)
        return nnx.value_and_grad(loss, argnums=(0, 1))(blocks, x_BxLxD)

    jitted = jax.jit(step, out_shardings=(NamedSharding(mesh, PartitionSpec()),
                                          (param_shardings, x_sharding)))
    return jitted, (params, rest, x)


@contextlib.contextmanager
def activation_sharding(mesh: Any, rules: Rules = DEFAULT_RULES):
    """Constrain the reference model's activations to `rules` on `mesh` while tracing."""
    from distckpt.tools.model import set_activation_sharding

    set_activation_sharding(mesh, rules)
    try:
        yield
    finally:
        set_activation_sharding(None, None)


def _stack_step(spec: LayerSpec, mesh: Any, plan: RematPlan, n_layers: int, rules: Rules):
    """The lowered :func:`stack_step` (abstract inputs; nothing is allocated)."""
    step, args = stack_step(spec, mesh, plan, n_layers, rules)
    with activation_sharding(mesh, rules):
        return step.lower(*args)


FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}
"""XLA compiler options for compile-only analysis: no LLVM optimisation (same HLO)."""


def measure_plan(plan: RematPlan, spec: LayerSpec, mesh: Any, rules: Rules = DEFAULT_RULES,
                 *, base_layers: int | None = None) -> Measurement:
    """Compile the layer-stack step at depths L and 2L on `mesh` (nothing is allocated).

    L defaults to 8 groups: XLA packs all temporaries into one heap-simulated slab, so at
    a few layers the slab's growth also carries packing slack (up to +-12% per layer at
    2 -> 4 layers on CPU); from 8 layers on, it is the stacked residuals alone.
    """
    return _measure([plan], spec, mesh, rules, base_layers, threads=1)[0]


def _measure(plans: Sequence[RematPlan], spec: LayerSpec, mesh: Any, rules: Rules,
             base_layers: int | None, threads: int) -> list[Measurement]:
    """Lower every (plan, depth) in turn, then compile them on `threads` threads."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    for plan in plans:
        depth = base_layers or 8 * plan.every
        if depth % plan.every:
            raise ValueError(f"base_layers={depth} must be a multiple of every={plan.every}")
        for n in (depth, 2 * depth):
            t0 = time.perf_counter()
            lowered = _stack_step(spec, mesh, plan, n, rules)
            jobs.append((plan, n, lowered, time.perf_counter() - t0))

    def compile_one(job):
        plan, n, lowered, lower_s = job
        t0 = time.perf_counter()
        # LLVM's optimisation level changes the machine code, not the HLO that memory and
        # cost analysis read (checked identical); dropping it makes compiles ~40% faster.
        compiled = lowered.compile(compiler_options=FAST_COMPILE_OPTIONS)
        ma = compiled.memory_analysis()
        out = {"temp": int(ma.temp_size_in_bytes),
               "total": int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                            + ma.temp_size_in_bytes - ma.alias_size_in_bytes)}
        if n == (base_layers or 8 * plan.every):
            out["flops"] = float(compiled.cost_analysis()["flops"])
            out["collectives"] = hlo_collectives(compiled.as_text())
        out["seconds"] = lower_s + time.perf_counter() - t0
        return out

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        results = list(pool.map(compile_one, jobs))
    measurements = []
    for i, plan in enumerate(plans):
        small, large = results[2 * i], results[2 * i + 1]
        depth = jobs[2 * i][1]
        counts, operands = small["collectives"]
        measurements.append(Measurement(
            str(plan), str(_mesh_spec(mesh)), (depth, 2 * depth),
            (small["temp"], large["temp"]), small["total"], small["flops"], counts, operands,
            small["seconds"] + large["seconds"]))
    return measurements


def measure_plans(plans: Sequence[RematPlan], spec: LayerSpec, mesh: str | MeshSpec,
                  rules: Rules = DEFAULT_RULES, *, base_layers: int | None = None
                  ) -> list[Measurement]:
    """:func:`measure_plan` for each plan on a simulated CPU mesh of that many devices.

    Needs ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before jax starts its
    backend; when this process already has fewer CPU devices, the measurement runs in a
    fresh ``python -m distckpt.remat.measure`` subprocess with the flag set. Compiles run
    on two threads (XLA compiles outside the GIL).
    """
    import jax

    from distckpt.state.mesh import make_mesh

    mesh_spec = _mesh_spec(mesh)
    cpus = jax.devices("cpu")
    if len(cpus) >= mesh_spec.size:
        cpu_mesh = make_mesh(mesh_spec, cpus[:mesh_spec.size])
        return _measure(plans, spec, cpu_mesh, rules, base_layers,
                        threads=min(2, os.cpu_count() or 1))
    request = {"plans": [str(p) for p in plans], "spec": dataclasses.asdict(spec),
               "mesh": str(mesh_spec), "rules": [[k, v] for k, v in rules.table],
               "base_layers": base_layers}
    env = {**os.environ, "XLA_FLAGS": with_host_device_count(os.environ.get("XLA_FLAGS", ""),
                                                             mesh_spec.size),
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(
               [str(Path(__file__).resolve().parent.parent)]
               + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "-m", "distckpt.remat.measure", "--measure"],
                          input=json.dumps(request), capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring on a simulated {mesh_spec.size}-device CPU mesh in a "
                           f"subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [Measurement.from_json(m) for m in json.loads(proc.stdout.strip().splitlines()[-1])]


def with_host_device_count(xla_flags: str, n: int) -> str:
    """`xla_flags` with ``--xla_force_host_platform_device_count`` set to `n`."""
    kept = [f for f in xla_flags.split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])


def request_host_devices(n: int) -> bool:
    """Ask for `n` simulated CPU devices if jax has not started its backends yet.

    Returns False when it is too late (the backend is up); :func:`measure_plans` then
    measures in a subprocess instead.
    """
    try:
        from distckpt import compat

        started = compat.jax_backends_initialized()
    except (ImportError, AttributeError):
        started = "jax" in sys.modules
    if started:
        return False
    os.environ["XLA_FLAGS"] = with_host_device_count(os.environ.get("XLA_FLAGS", ""), n)
    return True


def _measure_main() -> int:
    """Subprocess entry: read a request on stdin, print the measurements as one JSON line."""
    request = json.loads(sys.stdin.read())
    rules = Rules.of([(k, tuple(v) if isinstance(v, list) else v) for k, v in request["rules"]])
    spec = LayerSpec(**request["spec"])
    plans = [RematPlan.from_str(p) for p in request["plans"]]
    result = measure_plans(plans, spec, request["mesh"], rules,
                           base_layers=request.get("base_layers"))
    print(json.dumps([m.to_json() for m in result]))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--measure"]:
        sys.exit("usage: python -m distckpt.remat.measure --measure  (request JSON on stdin)")
    sys.exit(_measure_main())
