"""A small decoder-only NNX transformer with logical partitioning annotations.

It is the model the drill, the training example and the benchmarks use: token
embedding, ``layers`` pre-norm blocks (grouped-query attention with rotary
positions, a gated MLP, RMSNorm, dropout) and an untied output projection.
Every parameter names its logical axes (``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``vocab``) so :mod:`distckpt.state.mesh` rules can shard it on
any mesh.

Activations are tagged with `jax.ad_checkpoint.checkpoint_name` *after* their
sharding constraint, using MaxText's names where they exist
(``decoder_layer_input``, ``query_proj``, ``key_proj``, ``value_proj``,
``context``, ``out_proj``, ``mlpwi_0``, ``mlpwi_1``, ``mlpwo``), so remat
policies can save or recompute them by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

LogicalAxes = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the reference transformer."""

    vocab: int = 256
    """Vocabulary size."""
    d_model: int = 64
    """Model (embedding) width."""
    n_heads: int = 4
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide n_heads."""
    head_dim: int = 16
    """Width of one head."""
    d_ff: int = 128
    """MLP hidden width."""
    n_layers: int = 2
    """Transformer blocks."""
    dropout: float = 0.1
    """Dropout rate on the residual branches (uses the model's 'dropout' RNG stream)."""
    dtype: str = "float32"
    """Parameter and activation dtype."""

    def __post_init__(self):
        for name in ("vocab", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def param_count(self) -> int:
        d, h, k, hd, f, v = (self.d_model, self.n_heads, self.n_kv_heads, self.head_dim,
                             self.d_ff, self.vocab)
        per_layer = d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f + 2 * d
        return 2 * v * d + self.n_layers * per_layer + d

    @classmethod
    def for_bytes(cls, total_state_bytes: int, **overrides) -> ModelConfig:
        """A config (more layers) whose params + AdamW moments are about this many bytes."""
        base = cls(**overrides)
        one = dataclasses.replace(base, n_layers=1).param_count()
        per_layer = dataclasses.replace(base, n_layers=2).param_count() - one
        fixed = one - per_layer
        bytes_per_param = 3 * jnp.dtype(base.dtype).itemsize  # param, mu, nu
        layers = (total_state_bytes // bytes_per_param - fixed) // per_layer
        return dataclasses.replace(base, n_layers=max(1, int(layers)))


def _init(axes: LogicalAxes, scale: float | None = None) -> Callable:
    init = nnx.initializers.normal(stddev=scale) if scale else nnx.initializers.lecun_normal()
    return nnx.with_partitioning(init, axes)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Shard an activation by logical axes when a mesh context with rules is active."""
    ctx = _ACTIVATION_SHARDING.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = rules.spec(axes, tuple(x.shape), mesh)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


class _Ctx:
    """The mesh and rules activations are constrained with (set by the training step)."""

    def __init__(self):
        self.value = None

    def get(self):
        return self.value


_ACTIVATION_SHARDING = _Ctx()


def set_activation_sharding(mesh, rules) -> None:
    """Constrain activations to `rules` on `mesh` in traced model code (None to disable)."""
    _ACTIVATION_SHARDING.value = None if mesh is None else (mesh, rules)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, dtype, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), dtype), out_sharding=("norm",))
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        var = jnp.mean(jnp.square(x_BxLxD), axis=-1, keepdims=True)
        return x_BxLxD * jax.lax.rsqrt(var + self.eps) * self.scale[...]


def rotary(x_BxLxHxK: jax.Array) -> jax.Array:
    _, length, _, k = x_BxLxHxK.shape
    half = k // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle_LxK2 = jnp.arange(length, dtype=jnp.float32)[:, None] * freq[None, :]
    sin, cos = jnp.sin(angle_LxK2)[None, :, None, :], jnp.cos(angle_LxK2)[None, :, None, :]
    x1, x2 = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:2 * half]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return jnp.concatenate([rotated, x_BxLxHxK[..., 2 * half:]], axis=-1).astype(x_BxLxHxK.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.wq_DxHxK = nnx.Param(_init(("embed", "heads", "head_dim"))(rngs.params(), (d, h, hd), dt))
        self.wk_DxGxK = nnx.Param(_init(("embed", "kv_heads", "head_dim"))(rngs.params(), (d, k, hd), dt))
        self.wv_DxGxK = nnx.Param(_init(("embed", "kv_heads", "head_dim"))(rngs.params(), (d, k, hd), dt))
        self.wo_HxKxD = nnx.Param(_init(("heads", "head_dim", "embed"))(rngs.params(), (h, hd, d), dt))

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        q = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.wq_DxHxK[...])
        q = checkpoint_name(constrain(q, ("batch", "seq", "heads", "head_dim")), "query_proj")
        kk = jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wk_DxGxK[...])
        kk = checkpoint_name(constrain(kk, ("batch", "seq", "kv_heads", "head_dim")), "key_proj")
        v = jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wv_DxGxK[...])
        v = checkpoint_name(constrain(v, ("batch", "seq", "kv_heads", "head_dim")), "value_proj")
        q, kk = rotary(q), rotary(kk)
        group = cfg.n_heads // cfg.n_kv_heads
        b, length = q.shape[0], q.shape[1]
        q_BxLxGxRxK = q.reshape(b, length, cfg.n_kv_heads, group, cfg.head_dim)
        logits = jnp.einsum("blgrk,bmgk->bgrlm", q_BxLxGxRxK, kk) / jnp.sqrt(
            jnp.asarray(cfg.head_dim, q.dtype))
        causal_LxL = jnp.tril(jnp.ones((length, length), dtype=bool))
        logits = jnp.where(causal_LxL, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
        ctx = jnp.einsum("bgrlm,bmgk->blgrk", probs, v).reshape(b, length, cfg.n_heads,
                                                                  cfg.head_dim)
        ctx = checkpoint_name(constrain(ctx, ("batch", "seq", "heads", "head_dim")), "context")
        out = jnp.einsum("blhk,hkd->bld", ctx, self.wo_HxKxD[...])
        return checkpoint_name(constrain(out, ("batch", "seq", "embed")), "out_proj")


class GatedMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        d, f = cfg.d_model, cfg.d_ff
        self.wi_0_DxF = nnx.Param(_init(("embed", "mlp"))(rngs.params(), (d, f), dt))
        self.wi_1_DxF = nnx.Param(_init(("embed", "mlp"))(rngs.params(), (d, f), dt))
        self.wo_FxD = nnx.Param(_init(("mlp", "embed"))(rngs.params(), (f, d), dt))

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        gate = x_BxLxD @ self.wi_0_DxF[...]
        gate = checkpoint_name(constrain(gate, ("batch", "seq", "mlp")), "mlpwi_0")
        up = x_BxLxD @ self.wi_1_DxF[...]
        up = checkpoint_name(constrain(up, ("batch", "seq", "mlp")), "mlpwi_1")
        out = (jax.nn.silu(gate) * up) @ self.wo_FxD[...]
        return checkpoint_name(constrain(out, ("batch", "seq", "embed")), "mlpwo")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.attn_norm = RMSNorm(cfg.d_model, dtype=dt)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, dtype=dt)
        self.mlp = GatedMLP(cfg, rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x_BxLxD = checkpoint_name(constrain(x_BxLxD, ("batch", "seq", "embed")),
                                  "decoder_layer_input")
        x_BxLxD = x_BxLxD + self.dropout(self.attn(self.attn_norm(x_BxLxD)))
        return x_BxLxD + self.dropout(self.mlp(self.mlp_norm(x_BxLxD)))


class Transformer(nnx.Module):
    """Decoder-only language model over integer tokens."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.embed_VxD = nnx.Param(_init(("vocab", "embed"), 1.0)(rngs.params(),
                                                                  (cfg.vocab, cfg.d_model), dt))
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, dtype=dt)
        self.unembed_DxV = nnx.Param(_init(("embed", "vocab"))(rngs.params(),
                                                               (cfg.d_model, cfg.vocab), dt))

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        # A one-hot matmul rather than a gather: it shards cleanly over a vocab- and
        # embed-sharded table (a gather there makes XLA replicate the table).
        onehot_BxLxV = jax.nn.one_hot(tokens_BxL, self.cfg.vocab, dtype=self.embed_VxD.dtype)
        x_BxLxD = onehot_BxLxV @ self.embed_VxD[...]
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD)
        logits_BxLxV = self.final_norm(x_BxLxD) @ self.unembed_DxV[...]
        return constrain(logits_BxLxV, ("batch", "seq", "vocab"))


def next_token_loss(model: Transformer, tokens_BxL: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting token t+1 from tokens <= t (float32)."""
    logits_BxLxV = model(tokens_BxL[:, :-1]).astype(jnp.float32)
    targets_BxL = tokens_BxL[:, 1:]
    logp = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    nll_BxL = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
    return jnp.mean(nll_BxL)

