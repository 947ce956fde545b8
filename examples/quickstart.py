"""Quickstart: shard an NNX model + optimizer, save asynchronously, restore onto another mesh.

Run on one machine with 8 simulated devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/quickstart.py /tmp/qs
or as 2 simulated hosts x 4 devices (the same code, multi-host):
    distckpt launch --hosts 2 --devices-per-host 4 -- python examples/quickstart.py /tmp/qs2
Run it again with the same directory and it resumes after the newest step saved there.
"""

import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import distckpt


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        # Logical axis names; distckpt.Rules maps them onto whatever mesh you run on.
        self.up = nnx.Linear(64, 256, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                             rngs=rngs)
        self.down = nnx.Linear(256, 64, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")),
                               rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        return self.down(self.drop(jax.nn.gelu(self.up(x))))


def make():  # model + optimizer, built together so they share parameters
    model = MLP(nnx.Rngs(params=0, dropout=1))
    return {"model": model, "optimizer": nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)}


def main(directory: str) -> None:
    distckpt.initialize()  # no-op for one process; reads JAX_* / SLURM / TPU / k8s otherwise
    rules = distckpt.Rules.of({"embed": "fsdp", "mlp": "tensor"})

    # Train on one mesh ...
    mesh = distckpt.make_mesh(f"fsdp={jax.device_count() // 2},tensor=2")

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    options = distckpt.CheckpointOptions(max_to_keep=2, save_interval_steps=10,
                                         best_metric="loss", best_mode="min")
    with distckpt.CheckpointService(directory, options) as ckpt:
        try:  # a used directory resumes from its newest step (steps only go up there)
            restored = ckpt.restore(distckpt.abstract_target(make, mesh, rules))
            state, start = restored.items, restored.step + 1
            print("resuming after step", restored.step)
        except distckpt.NoCheckpointError:  # a new one starts from scratch
            state, start = distckpt.init_sharded(make, mesh, rules), 1  # in its shardings
        for i in range(start, start + 30):
            x = jax.random.normal(jax.random.key(i), (16, 64))
            loss = step(state["model"], state["optimizer"], x)
            ckpt.save(i, state, metrics={"loss": float(loss)})  # async; skips non-multiples of 10
        ckpt.wait()
        print("committed steps:", ckpt.all_steps(), "best:", ckpt.best_step())

    # ... restore onto a different mesh, without materialising the initial parameters.
    other = distckpt.make_mesh(f"fsdp={jax.device_count()}")
    target = distckpt.abstract_target(make, other, rules)
    with distckpt.CheckpointService(directory, distckpt.CheckpointOptions(read_only=True)) as ckpt:
        restored = ckpt.restore(target)  # newest step; strict: shapes and dtypes must match
    kernel = nnx.state(restored.items["model"])["up"]["kernel"]
    print("restored step", restored.step, "kernel sharding", kernel.get_value().sharding.spec)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/distckpt-quickstart")
