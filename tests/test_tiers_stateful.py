"""The two tiers as a state machine: random saves, damage to the local tier and restores,
against a model of what each tier holds.

One service (8 CPU devices, one process) saves steps in order with a local interval and a
persistent interval drawn per run; between saves the local tier may lose its newest copy
to a flipped byte, or lose everything (a replaced machine); the service may be closed and
reopened. The invariants: ``restore()`` returns the newest step held intact by either
tier, with exactly the bits saved for it, from the tier the model says; local copies of
steps newer than the one restored are gone afterwards; a local tier keeps its
``local_max_to_keep`` newest copies.

Reproducing: the test prints ``DISTCKPT_HYPOTHESIS_SEED=<seed>``; set it to rerun the same
examples (the default seed is fixed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from jax.sharding import NamedSharding, PartitionSpec

import distckpt
from tests.local_copies import flip_a_shard_byte

pytestmark = pytest.mark.fast

SEED = int(os.environ.get("DISTCKPT_HYPOTHESIS_SEED", "20261130"))
KEEP = 2


def _payload(step: int, mesh) -> dict:
    x = np.arange(32, dtype=np.float32).reshape(8, 4) * step + 0.5
    return {"s": {"x": jax.device_put(x, NamedSharding(mesh, PartitionSpec("a"))),
                  "y": jax.device_put(jnp.full((4,), step, jnp.int32),
                                      NamedSharding(mesh, PartitionSpec()))}}


class Tiers(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="tiers-sm-"))
        self.mesh = jax.make_mesh((4, 2), ("a", "b"))
        self.step = 0
        self.persistent: set[int] = set()
        self.local: dict[int, bool] = {}  # step -> intact
        self.svc: distckpt.CheckpointService | None = None

    def _open(self) -> None:
        self.svc = distckpt.CheckpointService(str(self.base / "ckpt"), distckpt.CheckpointOptions(
            max_to_keep=None, save_interval_steps=self.every, local_interval_steps=self.local_every,
            local_max_to_keep=KEEP, local_directory=str(self.base / "local")))

    @initialize(every=st.integers(2, 5), local_every=st.integers(1, 2))
    def start(self, every, local_every):
        self.every, self.local_every = every, local_every
        print(f"run: persistent every {every}, local every {local_every}")
        self._open()

    @rule(n=st.integers(1, 3))
    def train_and_save(self, n):
        assert self.svc is not None
        for _ in range(n):
            self.step += 1
            saved = self.svc.save(self.step, _payload(self.step, self.mesh))
            persistent = self.step % self.every == 0
            local = persistent or self.step % self.local_every == 0
            assert saved == (persistent or local)
            if persistent:
                self.persistent.add(self.step)
            if local:
                self.local[self.step] = True
                for old in sorted(self.local)[:-KEEP]:
                    del self.local[old]
        self.svc.wait()

    @rule()
    def flip_a_byte_of_the_newest_local_copy(self):
        assert self.svc is not None
        self.svc.wait()
        if not self.local or not self.local[max(self.local)]:
            return  # (flipping the same byte again would repair it)
        newest = max(self.local)
        flip_a_shard_byte(self.base / "local" / str(newest) / "own", where=1 / 3, mask=0x10)
        self.local[newest] = False

    @rule()
    def replace_the_machine(self):
        assert self.svc is not None
        self.svc.close()
        shutil.rmtree(self.base / "local")
        self.local.clear()
        self._open()

    @rule()
    def reopen(self):
        assert self.svc is not None
        self.svc.close()
        self._open()

    @rule(reshard=st.booleans())
    def restore(self, reshard):
        assert self.svc is not None
        intact = [s for s, ok in self.local.items() if ok]
        candidates = set(self.persistent) | set(intact)
        spec = PartitionSpec() if reshard else PartitionSpec("a")
        target = {"s": {"x": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                                  sharding=NamedSharding(self.mesh, spec)),
                        "y": jax.ShapeDtypeStruct((4,), jnp.int32,
                                                  sharding=NamedSharding(self.mesh,
                                                                         PartitionSpec()))}}
        if not candidates:
            with pytest.raises(distckpt.NoCheckpointError):
                self.svc.restore(target)
            return
        want = max(candidates)
        restored = self.svc.restore(target)
        assert restored.step == want, (restored.step, want, self.local, self.persistent)
        newest_persistent = max(self.persistent, default=-1)
        local_wins = want in intact and want >= newest_persistent
        assert restored.tier == ("local" if local_wins else "persistent")
        expect = _payload(want, self.mesh)["s"]
        for k in ("x", "y"):
            np.testing.assert_array_equal(np.asarray(restored.items["s"][k]),
                                          np.asarray(expect[k]))
        # Copies of newer steps belong to an abandoned run and are gone; the run goes on.
        self.local = {s: ok for s, ok in self.local.items() if s <= want}
        self.step = want

    @invariant()
    def local_tier_holds_what_the_model_says(self):
        if self.svc is None:
            return
        self.svc.wait()
        on_disk = sorted(int(p.name) for p in (self.base / "local").iterdir()
                         if p.name.isdigit() and (p / "own" / "record.json").exists())
        assert on_disk == sorted(self.local), (on_disk, self.local)

    def teardown(self):
        if self.svc is not None:
            self.svc.close()
        shutil.rmtree(self.base, ignore_errors=True)


def test_tiers_state_machine():
    print(f"DISTCKPT_HYPOTHESIS_SEED={SEED}")
    run_state_machine_as_test(seed(SEED)(Tiers), settings=settings(
        max_examples=12, stateful_step_count=15, deadline=None, derandomize=True,
        database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]))
