"""One process of an object-storage test job (tests/test_s3_service.py).

    python tests/s3_worker.py kill URL POINT STEP OUT_JSON
    python tests/s3_worker.py explicit CONFIG_JSON OUT_JSON
    python tests/s3_worker.py probe CONFIG_JSON OUT_PREFIX
    python tests/s3_worker.py reader URL ARRAYS_DIR DONE_FILE OUT_JSON

``kill`` (via the launcher): save step 1, then step STEP with a fault hook that SIGKILLs
this process at the save point POINT ('commit:renamed' runs on the primary only,
'process_state:write' on every process). Never returns normally once STEP's save
reaches POINT.

``explicit`` (via the launcher, one process, no ``AWS_*`` variables): save and restore
through a :class:`distckpt.storage.Location` built with explicit endpoint and
credentials read from CONFIG_JSON (a private file, so the secret is in neither the
environment nor the command line), with every Python logger at DEBUG on stderr.

``probe`` (via the launcher): for each attempt in CONFIG_JSON, construct a writable
CheckpointService on ``attempt["urls"][process index]``, and record whether the storage
probe refused it; an attempt with ``"save": true`` then saves and lists a step.
``CONFIG_JSON["endpoints"][process index]``, when given, is this process's
``AWS_ENDPOINT_URL`` (one S3 configuration per process). Writes OUT_PREFIX.<index>.

``reader`` (a plain process, while a writer saves with retention): until DONE_FILE
exists, list the committed steps and restore the newest listed one (every other round
the oldest) read-only; compare
what came back with ARRAYS_DIR/<step>.npz (written by the writer before each save).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

import distckpt  # noqa: E402
from tests.mp_worker import factory, train_step  # noqa: E402


def arrays(items) -> dict:
    """name -> numpy copy of every leaf (key leaves as their key data); one process."""
    import jax
    import numpy as np

    from distckpt.state import nnx_state

    out = {}
    for leaf in nnx_state.flatten_items(items):
        value = jax.random.key_data(leaf.value) if leaf.is_key else leaf.value
        out[leaf.name] = np.asarray(value)
    return out


def differences(got: dict, want: dict) -> list[str]:
    """Leaves whose dtype or bytes differ (bit-exact: NaNs and -0.0 included)."""
    if got.keys() != want.keys():
        return [f"leaves differ: {sorted(set(got) ^ set(want))}"]
    return [name for name in want if got[name].dtype != want[name].dtype
            or got[name].shape != want[name].shape
            or got[name].tobytes() != want[name].tobytes()]


def scenario_kill(url: str, point: str, step: int, out: str) -> None:
    distckpt.initialize()
    import jax

    mesh = distckpt.make_mesh(f"fsdp={jax.device_count()}")
    items = distckpt.init_sharded(factory(), mesh)

    def fault_hook(where: str, at: int) -> None:
        if where == point and at == step:
            os.kill(os.getpid(), signal.SIGKILL)

    opts = distckpt.CheckpointOptions(max_to_keep=None, fault_hook=fault_hook)
    with distckpt.CheckpointService(url, opts) as ckpt:
        ckpt.save(1, items)
        ckpt.wait()
        if distckpt.is_primary():
            Path(out).write_text(json.dumps({"steps": ckpt.all_steps()}))
        ckpt.save(step, items)
        ckpt.wait()
    raise SystemExit(f"the fault hook at {point} never fired")


def scenario_explicit(config: str, out: str) -> None:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, force=True,
                        format="%(levelname)s %(name)s: %(message)s")
    cfg = json.loads(Path(config).read_text())
    aws_env = sorted(k for k in os.environ if k.startswith("AWS_"))
    distckpt.initialize()
    import jax
    import jax.numpy as jnp

    from distckpt import storage
    from distckpt.tools.inspection import inspect_directory

    creds = storage.S3Credentials(cfg["access_key_id"], cfg["secret_access_key"])
    loc = storage.Location.parse(cfg["url"], endpoint=cfg["endpoint"], credentials=creds)
    items = distckpt.init_sharded(factory(), distckpt.make_mesh("data=2,fsdp=2"))
    saved, texts = {}, []
    logging.getLogger("distckpt.test").debug("explicit location %r (%s)", loc, loc)
    with distckpt.CheckpointService(loc, distckpt.CheckpointOptions(max_to_keep=2)) as ckpt:
        for step in (1, 2, 3):
            train_step(items["model"], items["optimizer"],
                       jnp.ones((4, 8), jnp.float32) * step)
            ckpt.save(step, items, metrics={"loss": 1.0 / step},
                      metadata={"where": loc.describe()})
            saved[step] = arrays(items)
        ckpt.wait()
        steps = ckpt.all_steps()
        texts += [repr(ckpt), str(ckpt), repr(ckpt.location), str(ckpt.location),
                  repr(ckpt.options), str(ckpt.directory), repr(ckpt.directory),
                  json.dumps(ckpt.location.describe()), repr(vars(ckpt))]
    read_only = distckpt.CheckpointOptions(read_only=True)
    with distckpt.CheckpointService(loc, read_only) as ckpt:
        target = distckpt.abstract_target(factory(), distckpt.make_mesh(
            f"fsdp={jax.device_count()}"))
        restored = ckpt.restore(target)
        metadata = ckpt.metadata(restored.step)
    report = inspect_directory(loc)
    Path(out).write_text(json.dumps({
        "aws_env": aws_env, "steps": steps, "restored_step": restored.step,
        "verified": restored.verified, "metadata": metadata,
        "mismatches": differences(arrays(restored.items), saved[restored.step]),
        "texts": texts, "inspect": report,
        "profile_file": loc.kvstore_spec()["aws_credentials"]["credentials_file"]}))


def scenario_probe(config: str, out: str) -> None:
    cfg = json.loads(Path(config).read_text())
    me = int(os.environ["JAX_PROCESS_ID"])
    if cfg.get("endpoints"):  # before anything configures S3 in this process
        os.environ["AWS_ENDPOINT_URL"] = cfg["endpoints"][me]
    distckpt.initialize()
    results = []
    for attempt in cfg["attempts"]:
        url = attempt["urls"][me]
        got: dict = {"name": attempt["name"], "url": url}
        t0 = time.monotonic()
        try:
            ckpt = distckpt.CheckpointService(url, distckpt.CheckpointOptions(
                probe_timeout_s=2.0, timeout_s=60, max_to_keep=None))
        except distckpt.CheckpointError as e:
            got.update(error_type=type(e).__name__, error=str(e))
        else:
            got["error_type"] = None
            if attempt.get("save"):
                import jax

                items = distckpt.init_sharded(factory(), distckpt.make_mesh(
                    f"fsdp={jax.device_count()}"))
                ckpt.save(1, items)
                ckpt.wait()
                got["steps"] = ckpt.all_steps()
            ckpt.close()
        got["seconds"] = time.monotonic() - t0
        results.append(got)
    Path(f"{out}.{me}").write_text(json.dumps(results))


def scenario_reader(url: str, arrays_dir: str, done: str, out: str) -> None:
    """Restore listed steps over and over while a writer deletes old ones."""
    import jax
    import numpy as np

    from distckpt.errors import NoCheckpointError, StepUnusableError

    mesh = distckpt.make_mesh(f"fsdp={jax.device_count()}")
    target = distckpt.abstract_target(factory(), mesh)
    results: dict = {"iterations": [], "unexpected": None}
    deadline = time.monotonic() + 120
    ready = Path(out + ".ready")
    try:
        with distckpt.CheckpointService(url, distckpt.CheckpointOptions(read_only=True)) \
                as ckpt:
            last = False
            while not last and time.monotonic() < deadline:
                last = Path(done).exists()  # one more round after the writer is done
                listed = ckpt.all_steps()
                ready.touch()
                if not listed:
                    continue
                # The newest listed step, and every other round the oldest: the next one
                # retention deletes, so deletes land in the middle of restores.
                step = listed[-1] if last or len(results["iterations"]) % 2 == 0 else listed[0]
                entry: dict = {"listed": listed, "step": step}
                t0 = time.monotonic()
                try:
                    restored = ckpt.restore(target, step=step)
                except (StepUnusableError, NoCheckpointError) as e:
                    entry.update(outcome=type(e).__name__, reason=str(e)[:300])
                else:
                    with np.load(Path(arrays_dir) / f"{restored.step}.npz") as f:
                        want = {name: f[name] for name in f.files}
                    entry.update(outcome="restored", restored_step=restored.step,
                                 verified=restored.verified,
                                 mismatches=differences(arrays(restored.items), want))
                entry["seconds"] = time.monotonic() - t0
                entry["steps_after"] = ckpt.all_steps()
                results["iterations"].append(entry)
    except BaseException as e:  # anything else is the failure this test looks for
        results["unexpected"] = "".join(traceback.format_exception(e))
    Path(out).write_text(json.dumps(results))


def main() -> None:
    scenario, *args = sys.argv[1:]
    if scenario == "kill":
        url, point, step, out = args
        scenario_kill(url, point, int(step), out)
    elif scenario == "explicit":
        scenario_explicit(*args)
    elif scenario == "probe":
        scenario_probe(*args)
    elif scenario == "reader":
        scenario_reader(*args)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main()
