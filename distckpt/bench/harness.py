"""``distckpt bench``: checkpoint speed and memory against the disk (or S3) and plain Orbax.

Same state, same run: for each topology (default 4 and then 2 simulated hosts x 2 CPU
devices) one real multi-process job (:mod:`distckpt.bench.worker`, started through
:func:`distckpt.tools.launcher.launch`, each process calling ``jax.distributed.initialize``)
builds one sharded NNX state of random float32 and runs every contender on it in turn,
A B C A B C ..., ``warmup`` + ``reps`` times; figures are medians of the timed
repetitions, each repetition's figure being its slowest process. Contenders:

``raw``       the limit: each process writes its unique shard bytes to one file, buffered,
              fsync'd, and reads them back into preallocated host buffers;
``orbax``     Orbax ``CheckpointManager`` with default options, as the seeds use it
              (``orbax:key=value,...`` tunes it, see
              :class:`distckpt.bench.contenders.PlainOrbax`);
``distckpt``  :class:`distckpt.CheckpointService` with its defaults.

Figures: ``save()`` stall, time until committed, save GiB/s, restore GiB/s (page cache
evicted first), raw read GiB/s of the same files, restore onto another topology (the
previous, larger job's checkpoints), peak extra RSS over the shard bytes a process holds
during save and restore, RSS growth over consecutive saves, and the reference training
loop's step-time inflation when it saves every step (:mod:`distckpt.bench.figures` computes
them from the processes' records, with the ratios, the performance targets and the Young/Daly
interval for the measured cost and an MTBF). The report is a JSON-ready dict (schema
:data:`SCHEMA`); :mod:`distckpt.bench.report` renders it as a table, Markdown and a chart.

On object storage (``directory`` = ``s3://bucket/prefix``, empty or absent; endpoint and
credentials from the ``AWS_*`` environment) the same jobs run with these differences:

* ``raw`` PUTs each process's shard bytes as 4 MiB objects through TensorStore's s3
  kvstore and GETs them back (:class:`distckpt.bench.contenders.RawObjects`); committed =
  every PUT acknowledged. The ratios ``save_vs_raw`` and ``restore_vs_raw`` are then
  distckpt against raw PUT and GET of the same bytes on the same server, and
  :data:`distckpt.bench.figures.S3_TARGETS` names them so.
* the default contenders are raw and distckpt
  (:func:`distckpt.bench.names.default_contenders`). Plain Orbax
  (orbax-checkpoint 0.12.8) cannot save on ``s3://`` (with OCDBT: "Checkpoint path should
  be absolute. Got s3:/..."; without it the finalize renames a directory, which S3 does
  not have). When asked for anyway, each orbax contender is first probed with one tiny
  save in one process; if that fails, the report carries the failure as its outcome
  (``failed``: ``"<error first line>"``, shown as "fails" in the tables) and the jobs run
  the other contenders. A later Orbax that works passes the probe and is measured.
* nothing is evicted from a page cache (reads go over HTTP to the server, whatever it
  caches); the raw read of a contender's files is a GET of its step's objects, split over
  the processes ("raw GET of its objects"), and its files are objects.
* logs, specs and per-process results go to a new local temporary directory.
"""


from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distckpt.bench.figures import (
    add_ratios,
    aggregate,
    policy_summary,
    reference_names,
    targets,
)
from distckpt.bench.machine import filesystem_of, machine
from distckpt.bench.names import default_contenders, parse_contender

SCHEMA = "distckpt-bench/1"
PLATFORMS = ("cpu", "gpu", "tpu")
"""--platform: simulated CPU hosts, or one process over the local GPUs or TPUs."""
_EVENT = re.compile(r"BENCH (\{.*\})$")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One `distckpt bench` run."""

    size_bytes: int = 64 * 2**20
    """Bytes of the benchmark state (all hosts together; float32, random normal)."""
    hosts: tuple[int, ...] = (4, 2)
    """Simulated host counts, one job each, run largest first (each later job also
    restores the previous job's checkpoints: the cross-topology figure)."""
    devices_per_host: int = 2
    """CPU devices per simulated host."""
    data_parallel: int = 1
    """Size of a 'data' mesh axis over which the state is replicated (1: fully sharded)."""
    leaves: int = 8
    """Arrays in the state (equal-sized float32 matrices)."""
    contenders: tuple[str, ...] | None = None
    """KIND[:key=value,...] with KIND raw, orbax or distckpt; None: the default for the
    storage, :func:`distckpt.bench.names.default_contenders` (set in
    ``__post_init__``)."""
    reps: int = 5
    """Timed repetitions per contender."""
    warmup: int = 1
    """Untimed repetitions before them."""
    rss_saves: int = 20
    """Consecutive saves per contender for the RSS-growth figure (0 skips it)."""
    train_rounds: int = 2
    """Timed rounds of training blocks (0 skips the training-loop figure)."""
    train_steps: int = 4
    """Steps per training block."""
    train_model: tuple[tuple[str, int], ...] = ()
    """distckpt.tools.model.ModelConfig overrides of the reference model the loop trains
    (default: `distckpt train`'s model)."""
    train_batch: int = 8
    """Global batch of the training loop."""
    train_seq_len: int = 33
    """Tokens per sequence of the training loop."""
    extras_on: str = "last"
    """Topologies that also measure RSS growth and the training loop: 'last' (the last,
    smallest job; these figures are per process) or 'all'."""
    mtbf_s: float = 4 * 3600.0
    """Mean time between failures for the Young/Daly interval in the report."""
    cold: bool = True
    """Evict the files from the page cache before every read."""
    directory: str | None = None
    """New or empty directory for checkpoints and logs (default: a temporary one), or an
    empty or absent ``s3://bucket/prefix`` for the checkpoints (logs go to a temporary
    local directory)."""
    keep: bool = False
    """Keep the checkpoints afterwards (logs and per-process results are always kept)."""
    seed: int = 0
    """Seeds the random state."""
    timeout_s: float = 900.0
    """Limit for each job."""
    platform: str = "cpu"
    """'cpu' (simulated hosts on CPU devices), 'gpu' or 'tpu' (one process over this
    machine's accelerators: :func:`local_devices`, :meth:`with_local_devices`)."""
    single_process: bool = False
    """One process over this machine's devices of `platform` (implied by gpu and tpu; with
    cpu, `devices_per_host` CPU devices): the path an accelerator run takes."""
    distinct_shapes: int = 300
    """Leaves of distinct small shapes whose first and second save() stall (and restore)
    are measured separately, on the jobs that measure the extras (0 skips it)."""
    device_kind: str | None = None
    """What the devices are (e.g. 'NVIDIA H200'), from :func:`local_devices`."""

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise ValueError(f"--platform must be one of {', '.join(PLATFORMS)}, got "
                             f"{self.platform!r}")
        if self.platform != "cpu":
            object.__setattr__(self, "single_process", True)
        if self.single_process and tuple(self.hosts) != (1,):
            raise ValueError(f"--hosts {','.join(map(str, self.hosts))}: a one-process run "
                             f"(--platform {self.platform}"
                             + ("" if self.platform != "cpu" else " --single-process")
                             + ") has one host over the local devices; leave --hosts out")
        if self.distinct_shapes < 0:
            raise ValueError(f"--shapes must be >= 0, got {self.distinct_shapes}")
        if self.contenders is None:
            object.__setattr__(self, "contenders", default_contenders(self.directory))
        if self.size_bytes < 1 or self.leaves < 1:
            raise ValueError("size and leaves must be >= 1")
        if not self.hosts or any(h < 1 for h in self.hosts) or self.devices_per_host < 1:
            raise ValueError(f"need hosts >= 1 and devices per host >= 1, got {self.hosts}, "
                             f"{self.devices_per_host}")
        if self.data_parallel < 1:
            raise ValueError(f"--data-parallel must be >= 1, got {self.data_parallel}")
        # An accelerator's device count is known once asked (with_local_devices).
        for h in self.hosts if self.platform == "cpu" or self.device_kind else ():
            if (h * self.devices_per_host) % self.data_parallel:
                raise ValueError(f"data_parallel={self.data_parallel} does not divide the "
                                 f"{h * self.devices_per_host} devices of {h} hosts")
        if self.reps < 1 or self.warmup < 0 or self.rss_saves < 0:
            raise ValueError("need reps >= 1, warmup >= 0, rss_saves >= 0")
        if self.train_rounds < 0 or self.train_steps < 1:
            raise ValueError("need train_rounds >= 0 and train_steps >= 1")
        if self.extras_on not in ("last", "all"):
            raise ValueError(f"extras_on must be 'last' or 'all', got {self.extras_on!r}")
        if self.mtbf_s <= 0:
            raise ValueError(f"mtbf must be positive, got {self.mtbf_s}")
        if not self.contenders or len(set(self.contenders)) != len(self.contenders):
            raise ValueError(f"contenders must be given once each, got {self.contenders}")
        for c in self.contenders:
            parse_contender(c)
        if self.on_s3:
            from distckpt.bench import s3 as bench_s3

            bench_s3.location(self.directory)  # a bad URL or another scheme fails here

    @property
    def on_s3(self) -> bool:
        """The checkpoints go to ``s3://`` (an object store), not a local directory."""
        from distckpt.bench import s3 as bench_s3

        return bench_s3.is_url(self.directory)

    def mesh(self, hosts: int) -> str:
        devices = hosts * self.devices_per_host
        if self.data_parallel > 1:
            return f"data={self.data_parallel},fsdp={devices // self.data_parallel}"
        return f"fsdp={devices}"

    def label(self, hosts: int) -> str:
        return f"{hosts}x{self.devices_per_host}"

    def distinct_shape_list(self, hosts: int) -> list[tuple[int, int]]:
        """`distinct_shapes` small float32 matrices, no two of the same shape: rows one per
        fsdp shard, columns 8, 9, 10, ... (a first save compiles anything per shape)."""
        rows = hosts * self.devices_per_host // self.data_parallel
        return [(rows, 8 + i) for i in range(self.distinct_shapes)]

    def shapes(self) -> list[tuple[int, int]]:
        """The state's float32 [rows, 1024] matrices, the same on every topology: rows are
        a multiple of every job's fsdp size so that each restores the others' saves."""
        multiple = math.lcm(*(h * self.devices_per_host // self.data_parallel
                              for h in self.hosts))
        cols = 1024
        rows = (self.size_bytes // self.leaves // (4 * cols)) // multiple * multiple
        return [(max(multiple, rows), cols)] * self.leaves

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train_model"] = dict(self.train_model)
        out["hosts"] = list(self.hosts)
        out["contenders"] = list(self.contenders or ())
        return out


# --------------------------------------------------------------------------- devices
def local_devices(platform: str, timeout_s: float = 300.0) -> tuple[int, str]:
    """(how many, what kind) of this machine's `platform` devices, asked of a fresh process
    (:func:`distckpt.bench.worker.device_summary`), so that this one never initializes an
    accelerator (nor holds its memory while the job runs). Raises ValueError
    ``no gpu devices found: ...`` (the reason on the same line) when there are none."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    try:
        res = subprocess.run([sys.executable, "-m", "distckpt.bench.worker", "--devices",
                              platform], capture_output=True, text=True, env=env,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ValueError(f"no {platform} devices found: asking jax for them took over "
                         f"{timeout_s:g} s") from None
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise ValueError(f"no {platform} devices found: {tail}")
    found = json.loads(lines[-1])
    if found.get("error") or not found.get("count"):
        raise ValueError(f"no {platform} devices found: "
                         f"{found.get('error') or 'jax lists none'}")
    return int(found["count"]), str(found.get("kind") or platform)


def with_local_devices(config: BenchConfig) -> BenchConfig:
    """`config` on an accelerator: one host with every local device of its platform (the
    data-parallel size checked against them). A cpu config is returned as it is."""
    if config.platform == "cpu":
        return config
    count, kind = local_devices(config.platform)
    return dataclasses.replace(config, hosts=(1,), devices_per_host=count, device_kind=kind)


# --------------------------------------------------------------------------- driver
def _prepare_dir(directory: str | None) -> Path:
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="distckpt-bench-"))
    path = Path(directory).resolve()  # Orbax's OCDBT paths must be absolute
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"bench directory {path} is not empty; give a new or empty one")
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_storage(config: BenchConfig) -> tuple[Path, str, dict[str, Any]]:
    """(local directory for logs, specs and results; where the checkpoints go; the report's
    description of that storage). An ``s3://`` prefix must hold no objects: it is checked
    before anything is written anywhere."""
    if not config.on_s3:
        workdir = _prepare_dir(config.directory)
        return workdir, str(workdir), {"scheme": "file", "url": str(workdir)}
    from distckpt import storage
    from distckpt.bench import s3 as bench_s3

    assert config.directory is not None  # on_s3
    location = bench_s3.location(config.directory)
    storage.check_empty(location.url, label=f"bench prefix {location.url}")
    workdir = Path(tempfile.mkdtemp(prefix="distckpt-bench-"))
    return workdir, location.url, location.describe()


def _join(base: str, *parts: str) -> str:
    """`base`/`parts` for a local directory or a URL (Path would fold a URL's '//')."""
    return "/".join([base.rstrip("/"), *parts])


def _remove(root: str) -> None:
    from distckpt import storage
    from distckpt.bench import s3 as bench_s3

    if bench_s3.is_url(root):
        storage.remove_objects(root)
    else:
        shutil.rmtree(root, ignore_errors=True)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def job_units(config: BenchConfig, extras: bool = True) -> int:
    """Progress events one job emits (for a progress bar's total)."""
    n = len(config.contenders or ())
    reps = (config.warmup + config.reps) * n
    if not extras:
        return reps
    train = (config.train_rounds + 1) * (n + 1) if config.train_rounds else 0
    shapes = n if config.distinct_shapes else 0
    return reps + shapes + config.rss_saves * n + train


def job_hosts(config: BenchConfig) -> list[tuple[int, bool]]:
    """(hosts, measures the extras) of each job, in the order they run."""
    order = sorted(set(config.hosts), reverse=True)
    return [(h, config.extras_on == "all" or i == len(order) - 1)
            for i, h in enumerate(order)]


def probe_contenders(config: BenchConfig, names: list[str], root: str, workdir: Path
                     ) -> dict[str, str]:
    """The contenders in `names` whose tiny probe save at `root` failed -> the error's first
    line (:func:`distckpt.bench.worker.probe`, one process with this config's devices)."""
    from distckpt.tools.launcher import launch

    devices = config.devices_per_host
    spec: dict[str, Any] = {
        "contenders": names, "root": root, "mesh": f"fsdp={devices}",
        "shapes": [(8 * devices, 256)], "timeout_s": config.timeout_s,
        "out": str(workdir / "probe.json")}
    spec_path = workdir / "probe-spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = workdir / "probe.log"
    with open(log_path, "w") as log:
        result = launch([sys.executable, "-m", "distckpt.bench.worker", "--probe",
                         str(spec_path)], 1, devices, out=log, timeout_s=config.timeout_s,
                        cwd=str(workdir))  # stock Orbax makes local "s3:" dirs in its cwd
    shutil.rmtree(workdir / "s3:", ignore_errors=True)
    if result.returncode != 0 or not Path(spec["out"]).exists():
        raise RuntimeError(f"bench probe exited {result.returncode}; log {log_path}:\n"
                           f"{_tail(log_path)}")
    outcome = json.loads(Path(spec["out"]).read_text())
    return {name: error for name, error in outcome.items() if error is not None}


def _notes(config: BenchConfig, failed: dict[str, str]) -> list[str]:
    """The report's notes: how figures on S3 differ from local disk, and which contenders
    failed (with their error)."""
    notes = []
    if config.on_s3:
        notes.append("object storage: 'raw' PUTs and GETs the same bytes as 4 MiB objects "
                     "through TensorStore's s3 kvstore (committed = every PUT acknowledged); "
                     "'raw GET of its objects' GETs a contender's step objects, split over "
                     "the processes; nothing is evicted from a page cache before reads "
                     "(they go over HTTP to the server, whatever it caches)")
    if not config.on_s3:
        notes.append(
            "bytes read on restore: what the processes read through read calls (Linux "
            "/proc/self/io rchar), summed over processes, i.e. what hosts with their own "
            "page caches would fetch from shared storage; 'disk reads' is what this "
            "machine's disk served (read_bytes): the simulated hosts share one page cache, "
            "so a file read by several of them is read from disk once"
            + ("" if config.cold else ", and with --warm nothing is evicted, so it is "
               "mostly 0") + "; unique bytes are the bytes of the step's files")
    for name, error in failed.items():
        notes.append(f"`{name}` fails on {config.directory}: {error} (one-process probe "
                     "save; not run in the jobs)")
    return notes


def run_bench(config: BenchConfig, *, progress: Callable[[dict[str, Any]], None] | None = None
              ) -> dict[str, Any]:
    """Run every job; return the report. Raises RuntimeError (with the log's tail) if a job
    fails, ValueError if the directory or prefix is not empty."""
    from distckpt.tools.launcher import launch

    if config.platform != "cpu" and config.device_kind is None:
        config = with_local_devices(config)
    workdir, base, storage = prepare_storage(config)
    started = time.time()
    failed: dict[str, str] = {}
    if config.on_s3:
        orbax = [c for c in config.contenders or () if parse_contender(c)[0] == "orbax"]
        if orbax:
            failed = probe_contenders(config, orbax, _join(base, "probe"), workdir)
    contenders = [c for c in config.contenders or () if c not in failed]
    report: dict[str, Any] = {
        "schema": SCHEMA, "config": config.to_json(), "machine": machine(),
        "filesystem": filesystem_of(workdir), "storage": storage, "directory": base,
        "logs": str(workdir), "load_average_start": list(os.getloadavg()),
        "references": reference_names(contenders), "failed": failed,
        "platform": {"name": config.platform, "single_process": config.single_process,
                     "devices": config.devices_per_host, "kind": config.device_kind},
        "notes": _notes(config, failed), "topologies": {},
    }
    previous_root: str | None = None
    for hosts, extras in job_hosts(config):
        if not contenders:
            break
        label = config.label(hosts)
        root = _join(base, label)
        out_dir = workdir / "results"
        out_dir.mkdir(exist_ok=True)
        spec = {
            "label": label, "mesh": config.mesh(hosts), "shapes": config.shapes(),
            "contenders": contenders,
            "reps": config.reps, "warmup": config.warmup,
            "rss_saves": config.rss_saves if extras else 0,
            "cold": config.cold and not config.on_s3, "seed": config.seed, "root": root,
            "out_dir": str(out_dir), "timeout_s": config.timeout_s,
            "cross_root": previous_root,
            "platform": config.platform, "single_process": config.single_process,
            "distinct_shapes": config.distinct_shape_list(hosts) if extras else [],
            "train": {"rounds": config.train_rounds if extras else 0,
                      "steps": config.train_steps,
                      "model": dict(config.train_model), "batch": config.train_batch,
                      "seq_len": config.train_seq_len, "mesh": config.mesh(hosts)},
        }
        spec_path = workdir / f"{label}-spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        log_path = workdir / f"{label}.log"

        def on_line(_host: int, line: str, label=label) -> None:
            match = _EVENT.search(line)
            if match and progress is not None:
                progress(json.loads(match.group(1)))

        if progress is not None:
            progress({"job": label, "phase": "start", "hosts": hosts})
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            result = launch([sys.executable, "-m", "distckpt.bench.worker", str(spec_path)],
                            hosts, config.devices_per_host, out=log,
                            timeout_s=config.timeout_s, line_callback=on_line)
        records = [out_dir / f"{label}.p{i}.json" for i in range(hosts)]
        if result.returncode != 0 or not all(p.exists() for p in records):
            raise RuntimeError(f"bench job {label} exited {result.returncode}; log {log_path}:"
                               f"\n{_tail(log_path)}")
        topo = aggregate([json.loads(p.read_text()) for p in records], contenders)
        topo.update(hosts=hosts, devices_per_host=config.devices_per_host,
                    mesh=config.mesh(hosts), data_parallel=config.data_parallel,
                    platform=config.platform, device_kind=config.device_kind,
                    wall_s=time.perf_counter() - t0,
                    cross_from=(previous_root.rsplit("/", 1)[-1] if previous_root else None))
        add_ratios(topo, contenders)
        report["topologies"][label] = topo
        if previous_root is not None and not config.keep:
            _remove(previous_root)
        previous_root = root
    if previous_root is not None and not config.keep:
        _remove(previous_root)
    report["targets"] = targets(report)
    report["policy"] = policy_summary(report, config.mtbf_s)
    report["load_average_end"] = list(os.getloadavg())
    report["elapsed_s"] = time.time() - started
    return report
