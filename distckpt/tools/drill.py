"""The pod-slice restore drill: save on one slice shape, restore onto another, prove it.

``distckpt drill`` runs two real multi-process jobs through the local launcher (each
process runs :mod:`distckpt.tools.drill_worker`):

1. **save** on the *from* slice (default 4 hosts x 2 devices, mesh
   ``data=2,fsdp=4``): train the reference transformer for ``steps`` updates,
   saving asynchronously every ``save_every``. At each save every process adds
   its share of a sharding-independent content digest of every saved leaf
   (:mod:`distckpt.state.digest`). The losses of all updates are recorded, plus one
   update past the last save when the run ends on a save.
2. **restore** on the *to* slice (default 2 hosts x 2 devices, mesh
   ``fsdp=2,tensor=2``), read-only: restore the newest committed step into an
   abstract target built for the new mesh, then check

   * every restored leaf's digest equals the saved one (bit-identical contents,
     whatever the sharding),
   * every restored leaf's sharding is the target sharding,
   * the next update on the new slice gives the old slice's loss for that update.

The loss tolerance: when both slices have the same hosts, devices and mesh the
update is the same program on the same data, so the loss must be bit-identical.
Otherwise XLA reassociates float32 sums differently for the new mesh (the loss
is a mean over batch x sequence tokens of log-sum-exps over the vocabulary,
each logit a sum over the model width), so results differ by a few ulps per
sum; the drill accepts a relative difference of 1e-5 (about 80 float32 ulps),
an order of magnitude above the ~1e-7 observed for the default slices, and far
below what a wrong parameter, optimizer moment or RNG key produces (>1e-3).

Faults (``--fault``) prove the reliability promises on the way:

* ``kill-during-save``: every saving host is SIGKILLed inside the background commit
  of the last save (a power loss mid-save). The restore must pick the previous
  save, verified; ``steps_lost`` is then the save interval plus the steps after
  the last save.
* ``preempt``: one saving host gets SIGTERM mid-run. Every host saves the same
  step (:mod:`distckpt.multihost.preemption`), commits and exits 0; the restore must pick
  that step and lose nothing.
* ``corrupt``: after the save phase, bytes of the newest step's largest array
  data file are flipped. The restore must detect it, skip that step (the report
  says why) and restore the previous save, verified.

``--dir`` is a new or empty local directory (checkpoints in ``<dir>/checkpoints``, logs,
phase specs and results next to them), or an empty object-store prefix
(``s3://bucket/prefix``, ``gs://bucket/prefix``): the checkpoints are written there,
by every simulated host, with the endpoint and credentials of the environment
(:mod:`distckpt.storage`), and the logs, specs and results go to a new local temporary
directory (the report's ``directory``; ``checkpoints`` says where the steps are). Without
``--dir`` everything goes to a new temporary directory. A temporary directory is removed
when the drill ends, passed or failed, unless ``--keep`` (then the CLI prints where it is).

The report (a table, and JSON with ``--json``) says whether the restore was
verified, which step was restored, how many steps of work were lost, how long
the restore took, each save's blocking stall and commit time, and the loss
difference. Exit status 0 only when verified.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distckpt.state.meshspec import MeshSpec
from distckpt.tools.faults import FAULTS as FAULTS
from distckpt.tools.faults import TIERS as TIERS
from distckpt.tools.faults import Fault as Fault

SAME_TOPOLOGY_RTOL = 0.0
CROSS_TOPOLOGY_RTOL = 1e-5
WORKER_MODULE = "distckpt.tools.drill_worker"
"""Each phase's processes run ``python -m WORKER_MODULE save|restore SPEC.json``."""
_PROGRESS = re.compile(r"DRILL (\w+) (.*)$")  # drill_worker._emit's progress lines


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """``HOSTSxDEVICES[:AXIS=SIZE,...]``: simulated hosts, CPU devices per host, mesh."""

    hosts: int
    """Processes (simulated hosts)."""
    devices: int
    """CPU devices per host."""
    mesh: MeshSpec
    """Mesh over all hosts' devices."""

    def __post_init__(self):
        if self.hosts < 1 or self.devices < 1:
            raise ValueError(f"a slice needs >= 1 host and >= 1 device, got {self}")
        if self.mesh.size != self.hosts * self.devices:
            raise ValueError(
                f"slice {self.hosts}x{self.devices} has {self.hosts * self.devices} devices but "
                f"mesh {self.mesh} has {self.mesh.size}; make the axis sizes multiply to "
                f"{self.hosts * self.devices}")

    @classmethod
    def parse(cls, text: str, default_mesh: str | None = None) -> SliceSpec:
        match = re.fullmatch(r"\s*(\d+)x(\d+)(?::(.+))?\s*", text)
        if not match:
            raise ValueError(
                f"{text!r} is not a slice: expected HOSTSxDEVICES[:AXIS=SIZE,...], e.g. '4x2' "
                "or '4x2:data=2,fsdp=4'")
        hosts, devices = int(match.group(1)), int(match.group(2))
        if hosts < 1 or devices < 1:  # before a default mesh is made up from them
            raise ValueError(f"{text.strip()}: hosts and devices per host must be >= 1, "
                             "e.g. '2x4'")
        mesh = match.group(3) or default_mesh or f"fsdp={hosts * devices}"
        try:
            return cls(hosts, devices, MeshSpec.parse(mesh))
        except ValueError as e:  # errors start with what the user wrote
            raise ValueError(f"{text.strip()}: {e}") from e

    def __str__(self) -> str:
        return f"{self.hosts}x{self.devices}:{self.mesh}"


@dataclasses.dataclass(frozen=True)
class DrillConfig:
    """A drill: where from, where to, how long, where to write."""

    source: SliceSpec = SliceSpec.parse("4x2:data=2,fsdp=4")
    """The slice that trains and saves."""
    target: SliceSpec = SliceSpec.parse("2x2:fsdp=2,tensor=2")
    """The slice that restores."""
    steps: int = 6
    """Updates the source slice makes."""
    save_every: int = 4
    """Save interval in steps."""
    directory: str | None = None
    """Empty or new directory for the checkpoints and logs (default: a new temp dir), or
    an empty ``s3://``/``gs://`` prefix for the checkpoints (logs go to a temp dir)."""
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides of distckpt.tools.model.ModelConfig fields."""
    batch: int = 8
    """Global batch size."""
    timeout_s: float = 600.0
    """Limit for each phase."""
    fault: Fault | None = None
    """A fault to inject (a Fault, or its name: one of FAULTS)."""
    keep: bool = False
    """Keep the temporary directory the drill makes (default: removed when it ends)."""
    tiers: str = "persistent"
    """``persistent``, or ``local,persistent``: a local step every step (each host's local
    directory under the drill's directory, a peer copy on the next host) in front of the
    persistent saves every save_every."""

    def __post_init__(self):
        tiers = ",".join(t.strip() for t in str(self.tiers).split(","))
        if tiers == "persistent,local":
            tiers = "local,persistent"
        if tiers not in TIERS:
            raise ValueError(f"--tiers {self.tiers!r}: choose 'persistent' or 'local,persistent'")
        object.__setattr__(self, "tiers", tiers)
        if self.steps < 1 or self.save_every < 1:
            raise ValueError("steps and save_every must be >= 1")
        if self.save_every > self.steps:
            raise ValueError(f"save_every={self.save_every} > steps={self.steps}: nothing would "
                             "be saved; lower --save-every or raise --steps")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; choose one of {', '.join(FAULTS)}")
        if self.fault is not None:
            object.__setattr__(self, "fault", Fault(self.fault))
        if (self.fault in (Fault.KILL_DURING_SAVE, Fault.CORRUPT)
                and self.last_save < 2 * self.save_every):
            raise ValueError(
                f"--fault {self.fault} needs two saves to fall back between, but steps="
                f"{self.steps} with save_every={self.save_every} saves once; use --steps >= "
                f"{2 * self.save_every}")
        if self.fault is Fault.LOSE_HOST and self.source.hosts < 2:
            raise ValueError("--fault lose-host needs a --from slice with at least 2 hosts")
        if self.fault is Fault.PREEMPT and self.steps < 3:
            raise ValueError("--fault preempt needs --steps >= 3 (time to deliver the signal)")
        if self.directory is not None and "://" in self.directory:
            from distckpt import storage

            storage.Location.parse(self.directory)  # a bad URL fails here (ValueError)

    @property
    def preempt_after(self) -> int:
        """The step after which the drill sends SIGTERM to one saving host."""
        return max(1, self.steps // 2)

    @property
    def last_save(self) -> int:
        return self.steps - self.steps % self.save_every

    @property
    def local(self) -> bool:
        return self.tiers == "local,persistent"


# --------------------------------------------------------------------------- driver
@dataclasses.dataclass
class DrillReport:
    verified: bool
    source: str
    target: str
    restored_step: int | None
    expected_step: int
    steps_lost: int | None
    leaves: int
    bytes: int
    restore_seconds: float | None
    save_stall_seconds: list[float]
    commit_seconds: list[float | None]
    loss_before: float | None
    loss_after: float | None
    loss_abs_diff: float | None
    loss_rel_tol: float
    content_mismatch: list[str]
    sharding_mismatch: list[str]
    phase_seconds: dict[str, float]
    directory: str
    fault: Fault | None = None
    skipped: list[list[Any]] = dataclasses.field(default_factory=list)
    """[step, reason] of newer steps the restore skipped (e.g. a corrupt step)."""
    trained_until: int | None = None
    """The last step the saving slice trained (before a fault stopped it)."""
    failure: str | None = None
    checkpoints: str | None = None
    """Where the checkpoints are (``<directory>/checkpoints``, or the object-store URL)."""
    removed: bool = False
    """`directory` was a temporary directory and was removed when the drill ended."""
    tiers: str = "persistent"
    restored_from: list[str] = dataclasses.field(default_factory=list)
    """Per host of the restoring job: 'local', 'peer' or 'persistent'."""
    recovery_seconds: float | None = None
    """From the restore job's launch to the end of its first training step."""
    lost_host: int | None = None
    """--fault lose-host: the host that was killed and whose local tier was wiped."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_directory(directory: str | None, *, empty: bool = True, flag: str = "--dir") -> None:
    """Raise ValueError unless `directory` (local path or object-store URL) is absent or
    a directory, and with `empty` (the drill) holds nothing; creates nothing. The drill
    never touches existing checkpoints; ``distckpt train`` (``empty=False``) resumes them.
    `flag` names the argument in the messages."""
    if directory is None:
        return
    from distckpt import storage

    location = storage.Location.parse(directory)
    if not location.is_local:
        if not empty:
            return
        storage.check_empty(location, label=f"{flag} {location.url}")
        return
    path = Path(directory)
    what = "a new or empty directory" if empty else "a directory"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {directory} is a file; give {what}")
    existing = next((p for p in path.parents if p.exists()), None)
    if not path.exists() and existing is not None and not existing.is_dir():
        raise ValueError(f"{flag} {directory} is inside {existing}, which is a file; "
                         f"give {what}")
    if not empty:
        return
    if path.exists() and any(path.iterdir()):
        raise ValueError(
            f"drill directory {path} is not empty; the drill needs a new or empty directory "
            "so it never touches existing checkpoints")


def check_config(config: DrillConfig) -> None:
    """Raise ValueError for anything that would fail the drill once started: a model
    that does not shard onto either slice's mesh, a directory that is not new or empty.
    Creates nothing."""
    check_directory(config.directory)  # first: it needs no JAX, so a wrong --dir fails fast
    from distckpt.tools.model import ModelConfig
    from distckpt.tools.train import TrainConfig, check_fits

    cfg = TrainConfig(model=ModelConfig(**config.model), batch=config.batch)
    for flag, slice_ in (("--from", config.source), ("--to", config.target)):
        try:
            check_fits(cfg, slice_.mesh)
        except ValueError as e:
            raise ValueError(f"{flag} {slice_}: {e}") from e


def _prepare_dirs(directory: str | None) -> tuple[Path, str]:
    """(local directory for logs and specs, checkpoint directory or URL)."""
    if directory is not None:
        from distckpt import storage

        location = storage.Location.parse(directory)
        if not location.is_local:
            check_directory(directory)
            return Path(tempfile.mkdtemp(prefix="distckpt-drill-")), location.url
    workdir = _prepare_dir(directory)
    from distckpt.tools.check_cli import DRILL_CHECKPOINTS

    return workdir, str(workdir / DRILL_CHECKPOINTS)


def _prepare_dir(directory: str | None) -> Path:
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="distckpt-drill-"))
    check_directory(directory)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run_phase(name: str, slice_: SliceSpec, spec: dict[str, Any], workdir: Path,
               timeout_s: float, on_line, on_start=None) -> tuple[int, Path]:
    from distckpt.tools.launcher import launch

    spec_path = workdir / f"{name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / f"{name}.log"
    with open(log_path, "w") as log:
        result = launch([sys.executable, "-m", WORKER_MODULE, name, str(spec_path)],
                        slice_.hosts, slice_.devices, out=log, timeout_s=timeout_s,
                        line_callback=on_line, forward_signals=True, on_start=on_start)
    return result.returncode, log_path


def corrupt_newest(ckpt_dir: Path | str, step: int) -> str:
    """Flip one bit in each of 8 places of the step's largest array data file."""
    import random

    if "://" in str(ckpt_dir):
        return _corrupt_newest_object(str(ckpt_dir), step)
    files = [p for p in (Path(ckpt_dir) / str(step) / "state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    rng = random.Random(step)
    for _ in range(8):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    target.write_bytes(bytes(data))
    return str(target.relative_to(ckpt_dir))


def _corrupt_newest_object(url: str, step: int) -> str:
    """corrupt_newest on object storage: the same bits, read and rewritten as one object."""
    import random

    from distckpt import storage

    _, root = storage.open_directory(url)
    state = root / str(step) / "state"
    sizes = {rel: size for rel, size in storage.list_files(state).items()
             if rel.rsplit("/", 2)[-2:-1] == ["d"]}
    rel = max(sizes, key=lambda r: sizes[r])
    data = bytearray((state / rel).read_bytes())
    rng = random.Random(step)
    for _ in range(8):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    (state / rel).write_bytes(bytes(data))
    return f"{step}/state/{rel}"


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def run_drill(config: DrillConfig, *, progress=None) -> DrillReport:
    """Run both phases; `progress(phase, fields)` is called as workers report.

    A temporary directory the drill makes (no ``directory``, or an object-store one) is
    removed when the drill ends, however it ends, unless ``config.keep``.
    """
    workdir, ckpt_dir = _prepare_dirs(config.directory)
    temporary = config.directory is None or "://" in config.directory
    try:
        report = _run_phases(config, workdir, ckpt_dir, progress)
    finally:
        if temporary and not config.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report.removed = temporary and not config.keep
    return report


def _run_phases(config: DrillConfig, workdir: Path, ckpt_dir: str, progress) -> DrillReport:
    base = {"model": config.model, "batch": config.batch, "ckpt_dir": ckpt_dir,
            "local_dir": str(workdir / "local" / "{host}") if config.local else None}

    pids: list[int] = []
    signalled: list[int] = []

    def on_line(_host: int, line: str) -> None:
        match = _PROGRESS.search(line)
        if not match:
            return
        fields = json.loads(match.group(2))
        if (config.fault is Fault.PREEMPT and not signalled and fields.get("phase") == "save"
                and fields.get("step", 0) >= config.preempt_after and pids):
            import signal

            os.kill(pids[-1], signal.SIGTERM)  # one host only; the others must follow
            signalled.append(pids[-1])
        if progress is not None:
            progress(fields)

    report = DrillReport(
        verified=False, source=str(config.source), target=str(config.target),
        restored_step=None, expected_step=config.last_save, steps_lost=None, leaves=0, bytes=0,
        restore_seconds=None, save_stall_seconds=[], commit_seconds=[], loss_before=None,
        loss_after=None, loss_abs_diff=None, loss_rel_tol=CROSS_TOPOLOGY_RTOL,
        content_mismatch=[], sharding_mismatch=[], phase_seconds={}, directory=str(workdir),
        fault=config.fault, checkpoints=ckpt_dir, tiers=config.tiers)
    same = config.source == config.target
    report.loss_rel_tol = SAME_TOPOLOGY_RTOL if same else CROSS_TOPOLOGY_RTOL

    t0 = time.perf_counter()
    save_out = workdir / "save-result.json"
    killing = config.fault in (Fault.KILL_DURING_SAVE, Fault.LOSE_HOST)
    lost = config.source.hosts - 1 if config.fault is Fault.LOSE_HOST else None
    rc, log = _run_phase("save", config.source, {
        **base, "mesh": str(config.source.mesh), "steps": config.steps,
        "save_every": config.save_every, "out": str(save_out),
        "preempt_after": config.preempt_after if config.fault is Fault.PREEMPT else None,
        "kill_step": config.last_save if config.fault is Fault.KILL_DURING_SAVE else None,
        "lose_host": lost},
        workdir, config.timeout_s, on_line, on_start=pids.extend)
    report.phase_seconds["save"] = time.perf_counter() - t0
    if (rc != 0 and not killing) or (killing and rc == 0) or not save_out.exists():
        why = "was not killed" if killing and rc == 0 else f"exited {rc}"
        report.failure = f"save phase {why}; log {log}:\n{_tail(log)}"
        return report
    saved = json.loads(save_out.read_text())
    report.save_stall_seconds = [s["stall_s"] for s in saved["save_stats"]]
    report.commit_seconds = [s["commit_s"] for s in saved["save_stats"]]
    report.trained_until = config.steps
    if config.fault is Fault.PREEMPT:
        if saved["preempted_at"] is None:
            report.failure = (f"SIGTERM to host pid {signalled} did not preempt the run; log "
                              f"{log}:\n{_tail(log)}")
            return report
        report.trained_until = report.expected_step = saved["preempted_at"]
    elif config.fault in (Fault.KILL_DURING_SAVE, Fault.CORRUPT):
        report.expected_step = config.last_save - config.save_every
    if config.fault is Fault.CORRUPT:
        corrupt_newest(ckpt_dir if "://" in ckpt_dir else Path(ckpt_dir), config.last_save)
    if config.fault is Fault.LOSE_HOST:
        # The killed machine is replaced: it comes back with an empty local tier.
        report.lost_host = lost
        shutil.rmtree(workdir / "local" / f"host{lost}", ignore_errors=True)
        report.expected_step = config.steps if config.local else config.last_save

    t0 = time.perf_counter()
    t0_wall = time.time()
    restore_out = workdir / "restore-result.json"
    rc, log = _run_phase("restore", config.target, {
        **base, "mesh": str(config.target.mesh), "saved": str(save_out),
        "out": str(restore_out)}, workdir, config.timeout_s, on_line)
    report.phase_seconds["restore"] = time.perf_counter() - t0
    if rc != 0 or not restore_out.exists():
        report.failure = f"restore phase exited {rc}; log {log}:\n{_tail(log)}"
        return report
    got = json.loads(restore_out.read_text())
    report.restored_step = got["restored_step"]
    report.restored_from = got["restored_from"]
    report.recovery_seconds = got["first_step_wall"] - t0_wall
    report.steps_lost = report.trained_until - got["restored_step"]
    report.skipped = got["skipped"]
    report.leaves, report.bytes = got["leaves"], got["bytes"]
    report.restore_seconds = got["restore_seconds"]
    report.content_mismatch = got["content_mismatch"]
    report.sharding_mismatch = got["sharding_mismatch"]
    report.loss_before = saved["losses"].get(str(got["next_step"]))
    report.loss_after = got["next_loss"]
    if report.loss_before is not None:
        report.loss_abs_diff = abs(report.loss_after - report.loss_before)
    tol = report.loss_rel_tol * max(1.0, abs(report.loss_before or 0.0))
    problems = []
    if report.restored_step != report.expected_step:
        problems.append(f"restored step {report.restored_step}, expected step "
                        f"{report.expected_step}")
    if not got["verified_by_service"]:
        problems.append("the restore did not verify the arrays against the commit record")
    if (config.fault is Fault.LOSE_HOST and config.local
            and report.restored_from[lost] != "peer"):  # type: ignore[index]
        problems.append(f"the replaced host {lost} restored from "
                        f"{report.restored_from[lost]}, not from its peer's copy")  # type: ignore[index]
    if config.fault is Fault.CORRUPT and config.last_save not in [s for s, _ in report.skipped]:
        problems.append(f"the corrupted step {config.last_save} was not reported as skipped")
    if report.content_mismatch:
        problems.append(f"{len(report.content_mismatch)} leaves differ from what was saved: "
                        f"{report.content_mismatch[:5]}")
    if report.sharding_mismatch:
        problems.append(f"{len(report.sharding_mismatch)} leaves not in the target sharding: "
                        f"{report.sharding_mismatch[:5]}")
    if report.loss_abs_diff is None or report.loss_abs_diff > tol:
        problems.append(f"next-step loss {report.loss_after} vs {report.loss_before} "
                        f"(|diff| {report.loss_abs_diff} > tolerance {tol:g})")
    report.verified = not problems
    report.failure = "; ".join(problems) or None
    return report
