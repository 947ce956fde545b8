"""Remat plans: which tagged activations a transformer layer saves, offloads or recomputes.

A :class:`RematPlan` holds one :class:`Action` per activation tag (the names the
reference block puts on with `jax.ad_checkpoint.checkpoint_name` after each sharding
constraint, MaxText-compatible, see :data:`TAGS`) plus the layer grouping, and turns
itself into a `jax.checkpoint` policy with :meth:`RematPlan.policy`, built only from
`jax.checkpoint_policies` constructors:

==========================  ===========================================================
plan                        policy
==========================  ===========================================================
saves everything (``none``) ``everything_saveable`` (and :func:`scan_layers` skips remat)
saves nothing (``full``)    ``nothing_saveable``
saves some tags             ``save_only_these_names(*saved)``
offloads some tags          ``save_and_offload_only_these_names(saved, offloaded,
                            "device", "pinned_host")``
==========================  ===========================================================

``save_anything_except_these_names`` is never used: in jax 0.10 it ignores its argument
and saves everything.

Untagged intermediates (norm statistics, rotary outputs, attention scores, the MLP
activation) are saved only by ``none``; every other plan recomputes them from the saved
tags. A user block tagged with the same names works with the same plans.

Layers are applied with the scan-over-remat pattern (:func:`scan_layers`,
:class:`ScannedBlocks`): the stacked per-layer state is scanned with `nnx.scan` over an
`nnx.remat` of a group of ``plan.every`` layers, so a group stores its input plus the
saved tags of its layers, and everything else is recomputed in the backward pass.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from distckpt.tools.model import Block, ModelConfig, RMSNorm, constrain

TAGS: tuple[str, ...] = (
    "decoder_layer_input", "query_proj", "key_proj", "value_proj", "context", "out_proj",
    "mlpwi_0", "mlpwi_1", "mlpwo",
)
"""Activation tags of the reference block, in forward order (MaxText names)."""

ALIASES: Mapping[str, tuple[str, ...]] = {
    # MaxText blocks with a fused QKV projection tag it `qkv_proj`; the reference block
    # projects separately, so in a plan the name stands for all three.
    "qkv_proj": ("query_proj", "key_proj", "value_proj"),
    # Both input projections of the gated MLP.
    "mlpwi": ("mlpwi_0", "mlpwi_1"),
}
"""Group names accepted wherever a tag is: each expands to the tags it lists."""


class Action(enum.Enum):
    """What the forward pass does with a tagged activation for the backward pass."""

    SAVE = "save"
    """Keep it in device memory."""
    OFFLOAD = "offload"
    """Copy it to pinned host memory and back (GPU/TPU only)."""
    RECOMPUTE = "recompute"
    """Drop it and recompute it from saved values in the backward pass."""


class OffloadUnsupportedError(ValueError):
    """A plan offloads activations but the backend has no separate host memory."""


_MAXTEXT_MINIMAL = ("query_proj", "key_proj", "value_proj", "out_proj", "mlpwi_0", "mlpwi_1",
                    "mlpwo")

PRESETS: Mapping[str, tuple[str, ...] | None] = {
    "none": None,  # save everything, tagged or not: no remat at all
    "minimal": _MAXTEXT_MINIMAL,
    "minimal_with_context": _MAXTEXT_MINIMAL + ("context",),
    "save_dot_except_mlp": ("query_proj", "key_proj", "value_proj", "out_proj"),
    "save_qkv_proj": ("query_proj", "key_proj", "value_proj"),
    "save_out_proj": ("out_proj",),
    "full": (),
}
"""Catalog: preset name -> tags it saves (None: everything, untagged values included)."""

PRESET_DOCS: Mapping[str, str] = {
    "none": "no remat: every intermediate is saved (most memory, no recompute)",
    "minimal": "save every projection output; recompute the attention core and elementwise ops",
    "minimal_with_context": "as minimal, and save the attention context too",
    "save_dot_except_mlp": "save the attention projections (q, k, v, out); recompute the MLP",
    "save_qkv_proj": "save q, k, v; recompute attention core, out projection and MLP",
    "save_out_proj": "save the attention output projection (no re-run all-reduce); "
                     "recompute the rest",
    "full": "save only each layer's input; recompute the whole layer",
}


def expand_tags(names: Iterable[str]) -> tuple[str, ...]:
    """Tags named by `names` (aliases expanded), in :data:`TAGS` order; unknown names raise."""
    out: set[str] = set()
    for name in names:
        name = name.strip()
        if name in ALIASES:
            out.update(ALIASES[name])
        elif name in TAGS:
            out.add(name)
        else:
            aliases = ", ".join(f"{a}={'+'.join(t)}" for a, t in ALIASES.items())
            raise ValueError(f"unknown activation tag {name!r}; known tags: {', '.join(TAGS)} "
                             f"(aliases: {aliases})")
    return tuple(t for t in TAGS if t in out)


@dataclasses.dataclass(frozen=True)
class RematPlan:
    """An action for every activation tag, the untagged rule and the remat group size.

    Build one with :meth:`preset`, :meth:`from_str` or :meth:`custom`; apply it with
    :func:`scan_layers` / :class:`ScannedBlocks`, or pass :meth:`policy` to `jax.checkpoint`.
    """

    actions: tuple[tuple[str, Action], ...]
    """(tag, action) for every tag in :data:`TAGS`, in that order."""
    save_untagged: bool = False
    """Save untagged intermediates too; only with every tag saved (that is: no remat)."""
    every: int = 1
    """Layers per remat group: the group's input is stored, its insides are recomputed."""
    name: str = "custom"
    """The preset this plan is, or 'custom'."""

    def __post_init__(self):
        tags = tuple(t for t, _ in self.actions)
        if tags != TAGS:
            raise ValueError(f"a plan needs one action per tag in order {TAGS}, got {tags}")
        for tag, action in self.actions:
            if not isinstance(action, Action):
                raise ValueError(f"action for {tag!r} must be an Action, got {action!r}")
        if self.save_untagged and any(a is not Action.SAVE for _, a in self.actions):
            raise ValueError(
                "save_untagged=True saves every intermediate and needs every tag saved; "
                "jax has no working policy for 'everything except these names' "
                "(save_anything_except_these_names ignores its argument in jax 0.10): "
                "start from 'minimal' and list the tags to save instead")
        if self.every < 1:
            raise ValueError(f"every must be >= 1 layer, got {self.every}")
        if self.name != "custom":
            if self.name not in PRESETS:
                raise ValueError(f"name must be a preset ({', '.join(PRESETS)}) or 'custom', "
                                 f"got {self.name!r}")
            saved = PRESETS[self.name]
            if self.actions != _actions(TAGS if saved is None else saved) or (
                    self.save_untagged != (saved is None)):
                raise ValueError(f"actions differ from preset {self.name!r}; name it 'custom'")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def custom(cls, save: Iterable[str] = (), offload: Iterable[str] = (), *, every: int = 1
               ) -> RematPlan:
        """Save `save`, offload `offload` (tags or aliases), recompute every other tag."""
        saved, offloaded = set(expand_tags(save)), set(expand_tags(offload))
        if saved & offloaded:
            raise ValueError(f"tags both saved and offloaded: {sorted(saved & offloaded)}")
        return cls(_actions(saved, offloaded), every=every)._named()

    @classmethod
    def preset(cls, name: str, *, every: int = 1) -> RematPlan:
        """A catalog plan (:data:`PRESETS`); `every` groups that many layers per remat."""
        if name not in PRESETS:
            raise ValueError(f"unknown remat preset {name!r}; presets: {', '.join(PRESETS)} "
                             "(or a custom plan such as 'save=qkv_proj,out_proj')")
        saved = PRESETS[name]
        return cls(_actions(TAGS if saved is None else saved), save_untagged=saved is None,
                   every=every, name=name)

    @classmethod
    def from_str(cls, text: str) -> RematPlan:
        """Parse a plan; :meth:`__str__` writes the same syntax back.

        Clauses are separated by ``;``:

        - ``PRESET``: start from a catalog plan: ``none`` (save everything, no remat),
          ``minimal``, ``minimal_with_context``, ``save_dot_except_mlp``,
          ``save_qkv_proj``, ``save_out_proj`` or ``full`` (save only layer inputs).
          Without a preset, a plan starts from ``full``.
        - ``save=T1,T2``, ``offload=T1``, ``recompute=T1``: set the action of those tags
          (names in :data:`TAGS`, or the aliases ``qkv_proj`` and ``mlpwi``).
        - ``every=N``: one remat group per N layers (N must divide the layer count).

        >>> str(RematPlan.from_str("save=qkv_proj;every=2"))
        'save_qkv_proj;every=2'
        >>> RematPlan.from_str("minimal;recompute=mlpwo").name
        'custom'
        """
        clauses = [c.strip() for c in text.split(";") if c.strip()]
        if not clauses:
            raise ValueError("empty remat plan; give a preset such as 'minimal' or clauses "
                             "such as 'save=qkv_proj,out_proj;every=2'")
        base, every = "full", 1
        if "=" not in clauses[0]:
            base = clauses.pop(0)
        plan = cls.preset(base)
        actions = dict(plan.actions)
        overrides = False
        for clause in clauses:
            key, sep, value = clause.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(f"bad remat clause {clause!r} in {text!r}: a preset comes "
                                 "first, then KEY=VALUE clauses (save, offload, recompute, "
                                 "every)")
            if key == "every":
                if not value.strip().isdigit():
                    raise ValueError(f"every=N needs a positive integer, got {value!r}")
                every = int(value)
                continue
            try:
                action = Action(key)
            except ValueError:
                raise ValueError(f"bad remat clause {clause!r}: the key must be save, "
                                 "offload, recompute or every") from None
            for tag in expand_tags(value.split(",")):
                actions[tag] = action
            overrides = True
        if not overrides:
            return dataclasses.replace(plan, every=every)
        if plan.save_untagged and any(a is not Action.SAVE for a in actions.values()):
            raise ValueError(
                f"{text!r}: 'none' saves every intermediate, so nothing can be recomputed "
                "or offloaded on top of it; start from 'minimal' (or list tags with save=)")
        new = cls(tuple((t, actions[t]) for t in TAGS), save_untagged=plan.save_untagged,
                  every=every)
        return new._named()

    def _named(self) -> RematPlan:
        """This plan, named after the preset with the same actions (else 'custom')."""
        for name, saved in PRESETS.items():
            if (saved is None) == self.save_untagged and self.actions == _actions(
                    TAGS if saved is None else saved):
                return dataclasses.replace(self, name=name)
        return dataclasses.replace(self, name="custom")

    # ------------------------------------------------------------------ queries
    def action(self, tag: str) -> Action:
        """The action for `tag` (an alias must have one action for all its tags)."""
        tags = expand_tags([tag])
        actions = {a for t, a in self.actions if t in tags}
        if len(actions) != 1:
            raise ValueError(f"{tag!r} expands to tags with different actions in this plan")
        return actions.pop()

    def tags_with(self, action: Action) -> tuple[str, ...]:
        return tuple(t for t, a in self.actions if a is action)

    @property
    def is_no_remat(self) -> bool:
        """True for the plan that saves everything (applying it skips `jax.checkpoint`)."""
        return self.save_untagged

    @property
    def offloads(self) -> bool:
        return any(a is Action.OFFLOAD for _, a in self.actions)

    def with_offload_as(self, action: Action) -> RematPlan:
        """This plan with every offloaded tag saved on device or recomputed instead."""
        if action is Action.OFFLOAD:
            raise ValueError("with_offload_as needs Action.SAVE or Action.RECOMPUTE")
        actions = tuple((t, action if a is Action.OFFLOAD else a) for t, a in self.actions)
        return dataclasses.replace(self, actions=actions, name="custom")._named()

    def __str__(self) -> str:
        suffix = f";every={self.every}" if self.every != 1 else ""
        if self.name != "custom":
            return self.name + suffix
        parts = [f"{a.value}={','.join(self.tags_with(a))}" for a in (Action.SAVE, Action.OFFLOAD)
                 if self.tags_with(a)]
        return ";".join(parts or ["full"]) + suffix

    # ------------------------------------------------------------------ policy
    def policy(self, device: jax.Device | None = None) -> Callable[..., bool]:
        """The `jax.checkpoint` policy for this plan, from `jax.checkpoint_policies` only.

        Offloading needs a backend with host memory separate from device memory (GPU,
        TPU). On CPU the two are the same memory, so an offload would silently do
        nothing: that raises :class:`OffloadUnsupportedError` saying what to do instead.
        """
        cp = jax.checkpoint_policies
        if self.save_untagged:
            return cp.everything_saveable
        saved, offloaded = self.tags_with(Action.SAVE), self.tags_with(Action.OFFLOAD)
        if offloaded:
            reason = offload_unsupported_reason(device)
            if reason is not None:
                raise OffloadUnsupportedError(
                    f"remat plan {self} offloads {', '.join(offloaded)} but {reason}; "
                    "use plan.with_offload_as(Action.SAVE) to keep them on device or "
                    "plan.with_offload_as(Action.RECOMPUTE) to recompute them")
            return cp.save_and_offload_only_these_names(
                names_which_can_be_saved=saved, names_which_can_be_offloaded=offloaded,
                offload_src="device", offload_dst="pinned_host")
        if saved:
            return cp.save_only_these_names(*saved)
        return cp.nothing_saveable


def _actions(saved: Iterable[str], offloaded: Iterable[str] = ()
             ) -> tuple[tuple[str, Action], ...]:
    saved, offloaded = set(saved), set(offloaded)
    return tuple((t, Action.SAVE if t in saved else Action.OFFLOAD if t in offloaded
                  else Action.RECOMPUTE) for t in TAGS)


def offload_unsupported_reason(device: jax.Device | None = None) -> str | None:
    """Why activations cannot be offloaded to host on `device` (default: first device), or None."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return ("the cpu backend's 'pinned_host' memory is the same RAM as its device memory, "
                "so offloading would free nothing")
    kinds = {m.kind for m in device.addressable_memories()}
    if "pinned_host" not in kinds:
        return f"{device.platform} device {device.id} has no 'pinned_host' memory ({sorted(kinds)})"
    return None


# ---------------------------------------------------------------------- applying a plan
def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """`cfg.n_layers` reference blocks as one Block whose state has a leading layer axis.

    The new axis is named ``layers`` in the sharding metadata (replicated by the default
    rules); each layer gets its own parameter and dropout keys.
    """

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs)

    return make(rngs)


def scan_layers(blocks: nnx.Module, x_BxLxD: jax.Array, plan: RematPlan) -> jax.Array:
    """Apply stacked `blocks` (leading layer axis) to `x` with the scan-over-remat pattern.

    `nnx.scan` runs over groups of ``plan.every`` layers; each group is one `nnx.remat`
    with ``plan.policy()`` (none for the save-everything plan). Non-parameter state the
    blocks update (dropout RNG counters) is written back to `blocks`.
    """
    # The stacked state goes in as the scan's xs: the backward pass then reads each layer's
    # weights in place. (Slicing a stacked array inside a non-remat body instead makes the
    # slice a residual: one copy of the layer's weights stored per layer.)
    graphdef, params, rest = nnx.split(blocks, nnx.Param, ...)  # type: ignore[misc]  # flax stub: variadic tuple
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("scan_layers needs blocks with parameters stacked on a layer axis")
    n_layers = leaves[0].shape[0]
    every = plan.every
    if n_layers % every:
        raise ValueError(f"remat every={every} layers does not divide the {n_layers} layers; "
                         "pick a divisor of the layer count")
    groups = n_layers // every

    def layer(x, state):
        block = nnx.merge(graphdef, *state)
        x = block(x)
        return x, nnx.state(block, nnx.Not(nnx.Param))

    def to_groups(tree):
        return jax.tree.map(lambda a: a.reshape(groups, every, *a.shape[1:]), tree)

    def from_groups(tree):
        return jax.tree.map(lambda a: a.reshape(n_layers, *a.shape[2:]), tree)

    def group(x, state):
        # Unrolled: each layer's slice is taken inside the remat, so it is recomputed, not
        # stored, and the inner layer inputs follow the plan's decoder_layer_input action.
        new_rest = []
        for i in range(every):
            x, r = layer(x, jax.tree.map(lambda a, i=i: a[i], state))
            new_rest.append(r)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *new_rest)

    body, xs = (layer, (params, rest)) if every == 1 else (group, to_groups((params, rest)))
    if not plan.is_no_remat:
        body = nnx.remat(body, policy=plan.policy(), prevent_cse=False)
    scan = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    x_BxLxD, new_rest = scan(x_BxLxD, xs)
    if every != 1:
        new_rest = from_groups(new_rest)
    nnx.update(blocks, new_rest)
    return x_BxLxD


class ScannedBlocks(nnx.Module):
    """`cfg.n_layers` reference blocks stacked on a layer axis and applied under a remat plan."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, plan: RematPlan | str = "full"):
        self.plan = RematPlan.from_str(plan) if isinstance(plan, str) else plan
        if cfg.n_layers % self.plan.every:
            raise ValueError(f"remat every={self.plan.every} does not divide n_layers="
                             f"{cfg.n_layers}")
        self.blocks = stacked_blocks(cfg, rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return scan_layers(self.blocks, x_BxLxD, self.plan)


class RematTransformer(nnx.Module):
    """The reference transformer (:class:`distckpt.tools.model.Transformer`) with scanned layers.

    Same embedding, blocks, final norm and unembedding; the blocks are stacked and run
    under `plan`, so :func:`distckpt.tools.model.next_token_loss` works with it unchanged.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, plan: RematPlan | str = "full"):
        dt = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        self.embed_VxD = nnx.Param(nnx.with_partitioning(
            nnx.initializers.normal(stddev=1.0), ("vocab", "embed"))(
                rngs.params(), (cfg.vocab, cfg.d_model), dt))
        self.layers = ScannedBlocks(cfg, rngs, plan=plan)
        self.final_norm = RMSNorm(cfg.d_model, dtype=dt)
        self.unembed_DxV = nnx.Param(nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("embed", "vocab"))(
                rngs.params(), (cfg.d_model, cfg.vocab), dt))

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        onehot_BxLxV = jax.nn.one_hot(tokens_BxL, self.cfg.vocab, dtype=self.embed_VxD.dtype)
        x_BxLxD = self.layers(onehot_BxLxV @ self.embed_VxD[...])
        logits_BxLxV = self.final_norm(x_BxLxD) @ self.unembed_DxV[...]
        return constrain(logits_BxLxV, ("batch", "seq", "vocab"))
