"""One process of the two-process state-machine test (tests/test_service_stateful.py).

    python tests/stateful_worker.py --dir DIR --seed SEED --ops N --out OUT_JSON
    python tests/stateful_worker.py --dir DIR --seed 0 --documented-errors --out OUT_JSON

Every process draws the same pseudo-random operations from SEED (what is drawn depends
only on the seed and the model, which every process keeps alike), runs them on one
CheckpointService in DIR through the same Harness as the in-process test, and checks the
same invariants on its own view: the listing, the bits of the shards it holds after a
restore, and the type and message of every error. The first broken invariant ends the
process with the operations so far; the launcher then stops the others. At the end the
primary writes what every process saw to OUT_JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import traceback
from pathlib import Path

import jax

import distckpt
from distckpt.multihost import coordinator

sys.path.insert(0, str(Path(__file__).parent.parent))  # run as a script: find tests/
from tests.test_service_stateful import PATH_FORMS, Harness, Settings  # noqa: E402


def draw_settings(rng: random.Random) -> Settings:
    return Settings(
        max_to_keep=rng.choice([None, 1, 2, 3]), keep_period=rng.choice([None, None, 2, 5]),
        best=rng.choice([None, ("loss", "min"), ("acc", "max")]), best_n=rng.choice([1, 2, None]),
        save_interval_steps=rng.choice([1, 1, 2, None]),
        allow_older_steps=rng.random() < 0.5, async_save=rng.random() < 0.5)


def draw_metrics(rng: random.Random) -> dict[str, float] | None:
    if rng.random() < 0.3:
        return None
    metrics = {"loss": rng.choice([0.25, 0.5, 1.0, 2.0]), "acc": rng.choice([0.1, 0.7, 0.9])}
    if rng.random() < 0.2:  # without the best_metric of one of the services
        del metrics[rng.choice(["loss", "acc"])]
    return metrics


def draw_step(rng: random.Random, h: Harness, ahead: bool) -> int:
    newest = max(h.saved, default=-1)
    if ahead:
        return rng.randint(newest + 1, newest + 4)
    if h.saved and rng.random() < 0.5:
        return rng.choice(sorted(h.saved))
    return rng.randint(0, newest + 3)


def run(h: Harness, rng: random.Random, ops: int) -> None:
    h.open(draw_settings(rng), rng.choice(PATH_FORMS))
    kinds = ["save_next"] * 3 + ["save_run"] * 2 + ["save_any"] * 2 + [
        "keep_forever", "reopen", "restore", "restore", "reader", "chdir"]
    for _ in range(ops):
        kind = rng.choice(kinds)
        if kind == "save_next":
            h.save(draw_step(rng, h, True), rng.getrandbits(32), draw_metrics(rng),
                   force=rng.random() < 0.3, overwrite=False)
        elif kind == "save_run":
            first = draw_step(rng, h, True)
            for i in range(rng.randint(2, 4)):
                h.save(first + i, rng.getrandbits(32), draw_metrics(rng), force=False,
                       overwrite=False)
        elif kind == "save_any":
            h.save(draw_step(rng, h, False), rng.getrandbits(32), draw_metrics(rng),
                   force=rng.random() < 0.5, overwrite=rng.random() < 0.5)
        elif kind == "keep_forever":
            h.mark(draw_step(rng, h, False))
        elif kind == "reopen":
            h.open(draw_settings(rng), rng.choice(PATH_FORMS))
        elif kind == "restore":
            which = rng.choice([None, "latest", "best", "step"])
            h.restore(draw_step(rng, h, False) if which == "step" else which,
                      replicated=rng.random() < 0.5)
        elif kind == "reader":
            h.reader(rng.choice(PATH_FORMS))
        else:
            h.wander(rng.choice([".", "sub", "elsewhere"]))
        h.check_listing()
    h.settle()
    h.check_listing()


def documented_errors(h: Harness) -> None:
    """Every documented error once, on every process alike: the same type and message."""
    h.open(Settings(max_to_keep=2), "relative")
    h.restore(None, replicated=False)  # NoCheckpointError: nothing committed
    h.save(10, 1, None, force=False, overwrite=False)
    h.save(5, 2, None, force=True, overwrite=False)  # StepOrderError
    h.save(10, 3, None, force=False, overwrite=False)  # StepExistsError
    h.save(10, 4, None, force=False, overwrite=True)
    h.mark(7)  # ValueError: not committed
    h.restore(7, replicated=True)  # NoCheckpointError: not a committed step
    h.restore("best", replicated=False)  # ValueError: no best_metric
    h.reader("absolute")  # CheckpointError: read_only
    h.open(Settings(max_to_keep=2, best=("loss", "min")), "absolute")  # old one: closed
    h.restore("best", replicated=False)  # NoCheckpointError: no metrics to rank by
    h.check_listing()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True, help="shared, empty directory for the run")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--ops", type=int, default=30)
    p.add_argument("--documented-errors", action="store_true",
                   help="run the fixed sequence of documented errors instead")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    distckpt.initialize()
    me = jax.process_index()
    root = Path(a.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)  # relative paths are relative to the run directory on every process
    mesh = distckpt.make_mesh(f"fsdp={jax.device_count()}")
    h = Harness(root, mesh, log=lambda line: print(f"[process={me}] {line}", flush=True))
    print(f"[process={me}] seed {a.seed}, {a.ops} operations, {jax.process_count()} "
          f"processes x {jax.local_device_count()} devices", flush=True)
    try:
        if a.documented_errors:
            documented_errors(h)
        else:
            run(h, random.Random(a.seed), a.ops)
    except Exception:
        traceback.print_exc()
        print(f"[process={me}] FAILED with seed {a.seed} (rerun: DISTCKPT_HYPOTHESIS_SEED="
              f"{a.seed})", file=sys.stderr, flush=True)
        # Now, not at JAX's shutdown barrier, which would wait for peers that went on to
        # the next operation: the launcher stops them once this process is gone.
        os._exit(1)
    steps = sorted(h.saved)
    h.shutdown()
    seen = coordinator.all_gather("stateful:seen", {"steps": steps, "ops": len(h.history)})
    if distckpt.is_primary():
        Path(a.out).write_text(json.dumps({"seed": a.seed, "seen": seen,
                                           "history": h.history}))


if __name__ == "__main__":
    main()
