"""`distckpt import` / `distckpt.import_checkpoint`: existing checkpoints, written here by plain
Orbax (and pickle) exactly as the seeds' code writes them, become distckpt steps that restore
strictly, bit-exact, onto another mesh, and train on with the same loss.

Each source is saved on one device; the import and the restore run on 8 (fsdp=8). The
source tree's files are hashed before and after: the import never changes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import distckpt
from distckpt.tools.importer import PickleRefusedError
from tests.mp_worker import train_step
from tests.test_cli_input import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "distckpt.tools.cli"]
WIDTH = 16


class Net(nnx.Module):
    """Params with logical axes, batch statistics and an nnx.List (integer keys)."""

    def __init__(self, rngs: nnx.Rngs, width: int = WIDTH):
        part = nnx.with_partitioning
        init = nnx.initializers.lecun_normal()
        self.l1 = nnx.Linear(8, width, kernel_init=part(init, ("embed", "mlp")), rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(width, width, kernel_init=part(init, ("mlp", "embed")),
                                           rngs=rngs)])
        self.out = nnx.Linear(width, 8, rngs=rngs)

    def __call__(self, x):
        return self.out(self.layers[0](nnx.relu(self.bn(self.l1(x)))))


def make(seed: int = 0, width: int = WIDTH) -> tuple[Net, nnx.Optimizer]:
    with nnx.use_eager_sharding(False):  # a plain, single-device model, as the seeds make it
        model = Net(nnx.Rngs(params=seed), width)
    return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


X = jnp.linspace(-1.0, 1.0, 4 * 8, dtype=jnp.float32).reshape(4, 8)


def trained(width: int = WIDTH) -> tuple[Net, nnx.Optimizer]:
    model, optimizer = make(0, width)
    train_step(model, optimizer, X)  # optimizer moments and batch stats that are not zeros
    return model, optimizer


def tree_hash(root: Path) -> dict[str, str]:
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


# --------------------------------------------------------------------------- the seeds' writers
def seed_manager_model_only(directory: Path, model, optimizer, step: int) -> None:
    """Seed 002: CheckpointManager, Composite(model=StandardSave(nnx.state(model)))."""
    checkpoint_manager = ocp.CheckpointManager(directory.absolute())
    model_state = nnx.state(model)
    save_args = ocp.args.Composite(model=ocp.args.StandardSave(model_state))
    checkpoint_manager.save(step, args=save_args)
    checkpoint_manager.wait_until_finished()
    checkpoint_manager.close()


def seed_manager_model_and_optimizer(directory: Path, model, optimizer, step: int) -> None:
    """Seed 002's save_model_and_optimizer: named Composite items model + optimizer."""
    checkpoint_manager = ocp.CheckpointManager(directory.absolute())
    model_state = nnx.state(model)
    optimizer_state = nnx.state(optimizer)
    save_args = ocp.args.Composite(
        model=ocp.args.StandardSave(model_state),
        optimizer=ocp.args.StandardSave(optimizer_state),
    )
    checkpoint_manager.save(step, args=save_args)
    checkpoint_manager.wait_until_finished()
    checkpoint_manager.close()


def seed_manager_pytree_items(directory: Path, model, optimizer, step: int) -> None:
    """Seed 001's "combined approach": PyTreeCheckpointer manager, best_fn, items dict."""
    manager = ocp.CheckpointManager(
        directory=directory.absolute(),
        checkpointers=ocp.PyTreeCheckpointer(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=3, best_fn=lambda x: x['val_loss'], best_mode='min'),
    )
    val_loss = 0.25
    checkpoint = {
        'model': nnx.state(model),
        'optimizer': nnx.state(optimizer),
        'epoch': step,
        'val_loss': val_loss,
    }
    manager.save(step=step, items=checkpoint, metrics={'val_loss': val_loss})
    manager.wait_until_finished()
    manager.close()


def seed_standard_checkpointer(directory: Path, model, optimizer, step: int) -> None:
    """A single ocp.StandardCheckpointer save of nnx.state(model)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory.absolute(), nnx.state(model))
    checkpointer.wait_until_finished()


def seed_pytree_checkpointer_training(directory: Path, model, optimizer, step: int) -> None:
    """Seed 001's save_training_checkpoint: a PyTreeCheckpointer save of a dict."""
    checkpoint = {
        'model': nnx.state(model),
        'optimizer': nnx.state(optimizer),
        'epoch': step,
        'best_val_loss': 0.5,
    }
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(directory.absolute(), checkpoint)


def seed_split(directory: Path, model, optimizer, step: int) -> None:
    """nnx.split(model) saved as is: (graphdef, state)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory.absolute(), nnx.split(model))
    checkpointer.wait_until_finished()


def save_checkpoint_legacy(state, checkpoint_dir, step):
    """Seed 000's legacy function, verbatim (print included)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    checkpoint_path = os.path.join(checkpoint_dir, f'checkpoint_{step}.pkl')

    with open(checkpoint_path, 'wb') as f:
        pickle.dump({
            'params': state.params,
            'opt_state': state.opt_state,
            'step': step,
        }, f)

    print(f'Saved checkpoint to {checkpoint_path}')


def legacy_pickle(tmp_path: Path, model, optimizer, step: int) -> Path:
    state = SimpleNamespace(params=nnx.state(model), opt_state=nnx.state(optimizer))
    save_checkpoint_legacy(state, str(tmp_path / "legacy"), step)
    return tmp_path / "legacy" / f"checkpoint_{step}.pkl"


# --------------------------------------------------------------------------- checks
def restore(dst: Path, with_optimizer: bool, width: int = WIDTH):
    mesh = distckpt.make_mesh("fsdp=8")

    def factory():
        model = Net(nnx.Rngs(params=1), width)
        if not with_optimizer:
            return {"model": model}
        return {"model": model, "optimizer": nnx.Optimizer(model, optax.adam(1e-3),
                                                           wrt=nnx.Param)}

    target = distckpt.abstract_target(factory, mesh)
    with distckpt.CheckpointService(str(dst), distckpt.CheckpointOptions(read_only=True)) as s:
        return s.restore(target)


def assert_bit_exact(restored, original) -> None:
    got = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(restored))}
    want = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(original))}
    assert got.keys() == want.keys()
    for path, value in want.items():
        assert got[path].dtype == value.dtype, path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=str(path))


def check_import(tmp_path, writer, *, with_optimizer: bool, step: int = 7,
                 import_step: int | None = None):
    model, optimizer = trained()
    src = tmp_path / "src"
    writer(src, model, optimizer, step)
    before = tree_hash(src)
    report = distckpt.import_checkpoint(src, tmp_path / "dst", step=import_step)
    assert tree_hash(src) == before
    assert report.step == step and not report.unmapped
    assert set(report.items) == ({"model", "optimizer"} if with_optimizer else {"model"})
    restored = restore(tmp_path / "dst", with_optimizer)
    assert restored.verified and restored.step == step
    assert restored.metadata["imported_from"]["source"] == str(src.absolute())
    origin = restored.provenance["origin"]["imported_from"]  # provenance names the source
    assert origin["source"] == str(src.absolute()) and origin["layout"] == report.layout
    new_model = restored.items["model"]
    assert new_model.l1.kernel.get_value().sharding.mesh.devices.size == 8
    assert_bit_exact(new_model, model)
    if with_optimizer:
        new_opt = restored.items["optimizer"]
        assert_bit_exact(new_opt, optimizer)
    else:  # same fresh optimizer on both
        new_opt = nnx.Optimizer(new_model, optax.adam(1e-3), wrt=nnx.Param)
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    np.testing.assert_allclose(float(train_step(new_model, new_opt, X)),
                               float(train_step(model, optimizer, X)), rtol=1e-6)
    return report, restored


# --------------------------------------------------------------------------- Python API
@pytest.mark.fast
@pytest.mark.parametrize("writer, with_optimizer, layout", [
    (seed_manager_model_only, False, "orbax-manager"),
    (seed_manager_model_and_optimizer, True, "orbax-manager"),
    (seed_manager_pytree_items, True, "orbax-manager"),
])
def test_checkpoint_manager_layouts(tmp_path, writer, with_optimizer, layout):
    report, restored = check_import(tmp_path, writer, with_optimizer=with_optimizer)
    assert report.layout == layout and report.source_step == 7
    if writer is seed_manager_pytree_items:
        assert report.metrics == {"val_loss": 0.25} and restored.metrics == {"val_loss": 0.25}
        assert report.metadata["default/epoch"] == 7


@pytest.mark.fast
@pytest.mark.parametrize("writer, with_optimizer", [
    (seed_standard_checkpointer, False),
    (seed_pytree_checkpointer_training, True),
    (seed_split, False),
])
def test_single_saves(tmp_path, writer, with_optimizer):
    report, _ = check_import(tmp_path, writer, with_optimizer=with_optimizer, step=3,
                             import_step=3)  # a single save has no step number
    assert report.layout == "orbax-single" and report.source_step is None


@pytest.mark.fast
def test_one_step_of_a_manager_directory_and_another_item_name(tmp_path):
    model, optimizer = trained()
    seed_manager_model_only(tmp_path / "src", model, optimizer, 4)
    seed_manager_model_only(tmp_path / "src", model, optimizer, 9)
    report = distckpt.import_checkpoint(tmp_path / "src" / "4", tmp_path / "dst", item="net")
    assert report.layout == "orbax-manager-step" and report.step == 4
    assert set(report.items) == {"net"}
    report = distckpt.import_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert report.step == 9  # the newest


@pytest.mark.fast
def test_legacy_pickle_only_when_allowed(tmp_path):
    model, optimizer = trained()
    src = legacy_pickle(tmp_path, model, optimizer, 12)
    before = tree_hash(src)
    with pytest.raises(PickleRefusedError, match="executes code.*--allow-pickle"):
        distckpt.import_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    report = distckpt.import_checkpoint(src, tmp_path / "dst", allow_pickle=True)
    assert tree_hash(src) == before
    assert report.layout == "pickle" and report.step == 12 and not report.unmapped
    restored = restore(tmp_path / "dst", with_optimizer=True)
    assert_bit_exact(restored.items["model"], model)
    assert_bit_exact(restored.items["optimizer"], optimizer)
    np.testing.assert_allclose(float(train_step(restored.items["model"],
                                                restored.items["optimizer"], X)),
                               float(train_step(model, optimizer, X)), rtol=1e-6)


@pytest.mark.fast
def test_an_existing_step_is_refused_unless_overwrite(tmp_path):
    model, optimizer = trained()
    seed_standard_checkpointer(tmp_path / "src", model, optimizer, 0)
    distckpt.import_checkpoint(tmp_path / "src", tmp_path / "dst", step=5)
    before = tree_hash(tmp_path / "dst")
    with pytest.raises(distckpt.ImportSourceError, match="already has step 5.*--overwrite"):
        distckpt.import_checkpoint(tmp_path / "src", tmp_path / "dst", step=5)
    assert tree_hash(tmp_path / "dst") == before
    report = distckpt.import_checkpoint(tmp_path / "src", tmp_path / "dst", step=5,
                                        overwrite=True)
    assert report.step == 5
    with pytest.raises(distckpt.ImportSourceError, match="inside the source"):
        distckpt.import_checkpoint(tmp_path / "src", tmp_path / "src" / "sub")
    assert not (tmp_path / "src" / "sub").exists()


# --------------------------------------------------------------------------- the command
def run(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.run(CLI + list(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(res, *needles: str) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    return assert_one_line_error(res, *needles)


@pytest.fixture
def sources(tmp_path):
    """cwd with a StandardCheckpointer save, a pickle, a truncated save and foreign things."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    model, optimizer = trained()
    seed_standard_checkpointer(cwd / "std", model, optimizer, 0)
    legacy_pickle(cwd, model, optimizer, 3)
    seed_standard_checkpointer(cwd / "truncated", model, optimizer, 0)
    for data in (cwd / "truncated").rglob("d/*"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    (cwd / "foreign").mkdir()
    (cwd / "foreign" / "notes.txt").write_text("not a checkpoint")
    (cwd / "readme.txt").write_text("not a checkpoint")
    (cwd / "legacy" / "cut.pkl").write_bytes((cwd / "legacy" / "checkpoint_3.pkl").read_bytes()[:200])
    return cwd


@pytest.mark.parametrize("args, needles", [
    (["legacy/checkpoint_3.pkl", "out"], ["pickle file", "executes code", "--allow-pickle"]),
    (["foreign", "out"], ["foreign is not an Orbax checkpoint"]),
    (["readme.txt", "out"], ["readme.txt is a file but not a pickle file"]),
    (["missing", "out"], ["missing does not exist"]),
    (["truncated", "out"], ["Orbax could not read", "truncated"]),
    (["legacy/cut.pkl", "out", "--allow-pickle"], ["could not unpickle", "truncated"]),
    (["std", "std/inside"], ["inside the source"]),
])
def test_cli_refuses_with_one_line_and_writes_nothing(sources, args, needles):
    before = tree_hash(sources)
    res = run(sources, "import", *args)
    one_line_error(res, *needles)
    assert tree_hash(sources) == before
    assert not (sources / "out").exists() and not (sources / "std" / "inside").exists()


@pytest.mark.slow  # the two-process import stays
def test_cli_imports_relative_paths_and_inspect_names_the_command(sources):
    res = run(sources, "inspect", "std")
    assert "distckpt import std NEW_DIR" in res.stdout, res.stdout + res.stderr
    res = run(sources, "inspect", "legacy/checkpoint_3.pkl")
    assert "distckpt import legacy/checkpoint_3.pkl NEW_DIR --allow-pickle" in res.stdout
    assert "executes code" in res.stdout
    res = run(sources, "import", "legacy/checkpoint_3.pkl", "out", "--allow-pickle", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["step"] == 3 and report["layout"] == "pickle"
    assert report["destination"] == str(sources / "out")
    res = run(sources, "import", "legacy/checkpoint_3.pkl", "out", "--allow-pickle")
    one_line_error(res, "already has step 3", "--overwrite")
    res = run(sources, "inspect", "out")
    assert res.returncode == 0 and "committed steps [3]" in res.stdout, res.stdout
    res = run(sources, "import", "--help")
    assert res.returncode == 0 and "--allow-pickle" in res.stdout
    assert "executes code" in " ".join(res.stdout.split()).lower()


# --------------------------------------------------------------------------- two processes
@pytest.mark.multiprocess
def test_two_process_import_holds_only_shards(tmp_path, run_hosts):
    width = 256  # ~0.8 MB of arrays, most of it in kernels split over 8 devices
    model, optimizer = trained(width)
    seed_manager_model_and_optimizer(tmp_path / "src", model, optimizer, 21)
    before = tree_hash(tmp_path / "src")
    job = run_hosts(2, 4, timeout=300, command=[
        *CLI, "import", str(tmp_path / "src"), str(tmp_path / "dst"), "--json"]).check()
    reports = [json.loads(line.split("] ", 1)[1]) for line in job.output.splitlines()
               if line.startswith("[host ") and line.split("] ", 1)[1].startswith("{")]
    assert sorted(r["process"] for r in reports) == [0, 1], job.output[-3000:]
    for r in reports:
        assert r["step"] == 21 and r["process_bytes"] < 0.75 * r["bytes"], r
    assert tree_hash(tmp_path / "src") == before
    restored = restore(tmp_path / "dst", with_optimizer=True, width=width)
    assert restored.provenance["process_count"] == 2
    assert_bit_exact(restored.items["model"], model)
    assert_bit_exact(restored.items["optimizer"], optimizer)


def test_cli_argument_mistakes_are_one_line(tmp_path):
    res = run(tmp_path, "import", "only-src")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "distckpt import: error: the following arguments are required: DST; see distckpt "
        "import --help"]
    assert list(tmp_path.iterdir()) == []
