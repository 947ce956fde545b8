"""Restoring from the local tier: the hosts' own copies, a peer's copy for a replaced host.

:func:`restore_local` runs on every process before the persistent tier is read:

1. Every host lists what its local directory holds (:meth:`LocalDir.inventory`: its own
   copies by step and role, the peer copies it keeps) and all hosts gather the lists.
2. Every host computes the same plan (:func:`choose`): the newest step, not older than
   the newest persistent step, that this job can rebuild from local copies. That needs
   the same job shape as the save (process count, devices per process, the job id
   of the persistent directory) and, for every *role* (process index at save time),
   either a host holding its own copy or a peer copy that a host with no copy of its
   own can fetch. Roles are matched by what the hosts hold, not by their process ids: process
   ids change between restarts on real clusters.
3. A host that holds its copy reads it (``local``); a host that has none (a replaced
   machine) pulls its role's shards from the peer holding them (``peer``), over JAX's
   transfer server. Every shard is checked against its recorded digest, so a torn or
   corrupted copy is never used.
4. The arrays are assembled where the shards are: on a mesh whose devices are permuted so
   each host's devices take the positions its role held, then moved onto the target
   mesh with one ``jax.device_put`` (JAX's collectives move the bytes between hosts).
   With stable process ids the permutation is the identity and nothing moves.

Any host's failure (a missing box, a checksum mismatch, a peer that does not answer) is
gathered and every host gives up on that step together, then tries the next older local
step the plan allows, then the persistent tier. A topology change always goes to the
persistent tier.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distckpt.checkpoint import peers
from distckpt.checkpoint.local_save import LocalTier, pull_copy
from distckpt.checkpoint.local_tier import Copy, box_of
from distckpt.checkpoint.target import check_target
from distckpt.multihost import coordinator
from distckpt.state import nnx_state

logger = logging.getLogger(__name__)

__all__ = ["LocalRead", "choose", "restore_local"]


def _matches(entry: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    return entry.get("job") == dict(job)


def choose(inventories: Sequence[Mapping[str, Any]], job: Mapping[str, Any], *,
           newest_persistent: int | None, step: int | None = None,
           skip: set[int] | frozenset[int] = frozenset()) -> dict[str, Any] | None:
    """The local plan every host computes alike, or None (read the persistent tier).

    Returns ``{"step", "roles": [role per process], "sources": [["own"] | ["peer-here",
    name] | ["fetch", holder, name] per process]}``.
    """
    n = len(inventories)
    steps: set[int] = set()
    for inv in inventories:
        steps |= {int(s) for s in inv["own"]} | {int(s) for s in inv["peer"]}
    for s in sorted(steps, reverse=True):
        if (step is not None and s != step) or s in skip:
            continue
        if newest_persistent is not None and s < newest_persistent:
            break  # the persistent tier holds a newer step
        holder: dict[int, int] = {}
        for c, inv in enumerate(inventories):
            own = inv["own"].get(str(s))
            if own and _matches(own, job) and 0 <= own["role"] < n and own["role"] not in holder:
                holder[own["role"]] = c
        roles: list[int | None] = [None] * n
        sources: list[list[Any]] = [["own"] for _ in range(n)]
        for q, c in holder.items():
            roles[c] = q
        free = [c for c in range(n) if roles[c] is None]
        ok = True
        for q in (q for q in range(n) if q not in holder):
            copies = [(h, e["name"]) for h, inv in enumerate(inventories)
                      for e in inv["peer"].get(str(s), ()) if e["role"] == q and _matches(e, job)]
            if not copies or not free:
                ok = False
                break
            here = [f for f in free for h, _ in copies if h == f]
            f = here[0] if here else (q if q in free else free[0])
            free.remove(f)
            roles[f] = q
            if here:
                sources[f] = ["peer-here", next(name for h, name in copies if h == f)]
            else:
                h, name = copies[0]
                sources[f] = ["fetch", h, name]
        if ok:
            return {"step": s, "roles": roles, "sources": sources}
    return None


class LocalRead:
    """What a local restore produced on this process."""

    def __init__(self, step: int, values: dict[str, Any], extra: dict[str, Any],
                 process_states: list[Any], tiers: list[str], untouched: list[str],
                 read_bytes: int):
        self.step, self.values, self.extra = step, values, extra
        self.process_states, self.tiers, self.untouched = process_states, tiers, untouched
        self.read_bytes = read_bytes
        """Bytes this process read from its local directory or pulled from a peer."""


def restore_local(tier: LocalTier, leaves: list[nnx_state.Leaf], *, partial: bool,
                  newest_persistent: int | None, step: int | None, seq: int
                  ) -> tuple[LocalRead | None, list[tuple[int, str]]]:
    """Restore from the local tier on every process, or return None on every process;
    with the (step, reason) of local steps that were tried and failed."""
    inventory = tier.dir.inventory()
    inventories = coordinator.all_gather(f"restore:local:{seq}:inventory", inventory,
                                         tier.options.timeout_s)
    failed: list[tuple[int, str]] = []
    while True:
        plan = choose(inventories, tier.job, newest_persistent=newest_persistent, step=step,
                      skip={s for s, _ in failed})
        if plan is None:
            logger.info("[process=%d] local tier: no step this job can rebuild from local "
                        "copies (newest persistent step: %s)", jax.process_index(),
                        newest_persistent)
            return None, failed
        read = _attempt(tier, plan, leaves, partial=partial, key=f"{seq}:{len(failed)}")
        if isinstance(read, LocalRead):
            return read, failed
        failed.append((plan["step"], read))


def _attempt(tier: LocalTier, plan: Mapping[str, Any], leaves: list[nnx_state.Leaf], *,
             partial: bool, key: str) -> LocalRead | str:
    """Rebuild one planned step on every process: the LocalRead, or why not (on all)."""
    marks = [("start", time.perf_counter())]
    s, roles, sources = plan["step"], plan["roles"], plan["sources"]
    me = jax.process_index()
    outcome: dict[str, Any] = {}
    copy: Copy | None = None
    wanted: list[nnx_state.Leaf] = []
    untouched: list[str] = []
    read_bytes = 0
    try:
        # Offer first (every copy someone must fetch from this host), then read or pull.
        for f, src in enumerate(sources):
            if src[0] == "fetch" and src[1] == me:
                held = tier.dir.read_copy(s, src[2], check=False)  # the receiver checks
                read_bytes += held.nbytes
                arrays = [sh.data for leaf in held.leaves.values() for sh in leaf["shards"]]
                tier.link.offer(_key(tier, key, f), arrays, meta=held.offer_record())
                marks.append(("offered", time.perf_counter()))
        src = sources[me]
        if src[0] == "fetch":
            note = tier.link.note(_key(tier, key, me))
            marks.append(("noted", time.perf_counter()))
            copy = pull_copy(tier.link, note)
            marks.append(("pulled and checked", time.perf_counter()))
            coordinator.clear_note(_key(tier, key, me))
            tier.link.confirm(_key(tier, key, me))
        else:
            copy = tier.dir.read_copy(s, "own" if src[0] == "own" else src[1])
        read_bytes += copy.nbytes
        marks.append(("read", time.perf_counter()))
        provenance = copy.extra.get("provenance") or {}
        wanted, untouched = check_target(provenance.get("leaves", {}), leaves, s, partial=partial)
        buffers = {leaf.name: _buffers(leaf, copy, roles) for leaf in wanted}
        outcome = {"ok": True, "process_state": copy.extra.get("process_state"),
                   "role": copy.role}
    except (OSError, ValueError, KeyError, TypeError, TimeoutError, RuntimeError) as e:
        if type(e).__name__ == "TargetMismatchError":
            raise
        outcome = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    marks.append(("buffers", time.perf_counter()))
    gathered = coordinator.all_gather(f"restore:local:{key}:outcome", outcome,
                                      tier.options.timeout_s)
    marks.append(("agreed", time.perf_counter()))
    bad = [(i, g["error"]) for i, g in enumerate(gathered) if not g["ok"]]
    if bad:
        why = "; ".join(f"process {i}: {e}" for i, e in bad[:4])
        logger.warning("[process=%d] local tier: step %d cannot be rebuilt locally (%s)",
                       me, s, why)
        return f"local copies: {why}"
    assert copy is not None
    values = {leaf.name: nnx_state.rebuild_value(leaf, _assemble(leaf, *buffers[leaf.name]))
              for leaf in wanted}
    jax.block_until_ready(list(values.values()))
    marks.append(("assembled", time.perf_counter()))
    logger.info("[process=%d] local restore of step %d: %s", me, s, ", ".join(
        f"{name} {t - marks[i][1]:.3f}s" for i, (name, t) in enumerate(marks[1:])))
    states: list[Any] = [None] * len(roles)
    for g in gathered:
        states[g["role"]] = g["process_state"]
    tiers = ["peer" if src[0] == "fetch" else "local" for src in sources]
    return LocalRead(s, values, copy.extra, states, tiers, untouched, read_bytes)


def _key(tier: LocalTier, attempt: str, process: int) -> str:
    return peers.exchange_key(tier.nonce, "restore", attempt, process)


def _devices_by_process() -> dict[int, list[jax.Device]]:
    by_process: dict[int, list[jax.Device]] = {}
    for d in sorted(jax.devices(), key=lambda d: d.id):
        by_process.setdefault(d.process_index, []).append(d)
    return by_process


def _source(saved: Mapping[str, Any], target: jax.sharding.Sharding,
            roles: Sequence[int | None]) -> jax.sharding.Sharding:
    """The sharding the local copies fit: the saved one, each position's device replaced by
    the device with the same local index on the host now holding that role's shards."""
    rec = saved.get("sharding")
    by_process = _devices_by_process()
    holder = {q: c for c, q in enumerate(roles)}
    if rec is None:
        if list(roles) == list(range(len(roles))):
            return target
        raise ValueError("process ids changed since the save and the saved sharding was not "
                         "a NamedSharding")
    devices = [by_process[holder[q]][i] for q, i in rec["mesh"]]
    mesh = Mesh(np.array(devices, dtype=object).reshape(rec["mesh_shape"]), tuple(rec["axes"]))
    spec = PartitionSpec(*[tuple(a) if isinstance(a, list) else a for a in rec["spec"]])
    return NamedSharding(mesh, spec)


def _find(by_box: Mapping[tuple[tuple[int, int], ...], np.ndarray],
          box: tuple[tuple[int, int], ...]) -> np.ndarray | None:
    """The data of `box`: a held shard with that box, or a slice of one that contains it."""
    if box in by_box:
        return by_box[box]
    for held, data in by_box.items():
        if all(a <= s and t <= b for (a, b), (s, t) in zip(held, box, strict=True)):
            return data[tuple(slice(s - a, t - a) for (a, _), (s, t) in zip(held, box,
                                                                              strict=True))]
    return None


def _buffers(leaf: nnx_state.Leaf, copy: Copy, roles: Sequence[int | None]
             ) -> tuple[jax.sharding.Sharding, list[tuple[jax.Device, np.ndarray]]]:
    """The source sharding, and (device, host data) for each of this process's devices in
    it."""
    target = nnx_state.target_of(leaf)
    saved = copy.leaves[leaf.name]
    if tuple(saved["shape"]) != tuple(target.shape):
        raise ValueError(f"{leaf.name}: local copy has shape {saved['shape']}")
    sharding = _source(saved, target.sharding, roles)
    by_box = {s.box: s.data for s in saved["shards"]}
    out = []
    for device, index in sharding.addressable_devices_indices_map(target.shape).items():
        assert index is not None
        box = box_of(index, target.shape)
        data = _find(by_box, box)
        if data is None:
            raise ValueError(f"{leaf.name}: the local copy has no shard {[list(b) for b in box]}")
        out.append((device, data))
    return sharding, out


def _assemble(leaf: nnx_state.Leaf, sharding: jax.sharding.Sharding,
              buffers: list[tuple[jax.Device, np.ndarray]]) -> jax.Array:
    target = nnx_state.target_of(leaf)
    arrays = [jax.device_put(data, device) for device, data in buffers]
    array = jax.make_array_from_single_device_arrays(target.shape, sharding, arrays)
    if sharding != target.sharding:
        array = jax.device_put(array, target.sharding)  # on every process: collectives
    return array
