"""``distckpt goodput``: flags, printing, the JSON report and the PNG of progress.

Importing this module does not import jax (the main CLI builds its parser eagerly). The
runs themselves are :func:`distckpt.tools.goodput.run_goodput`.

    distckpt goodput --hosts 4 --devices-per-host 2 --duration 5m --mtbf 60s --json gp.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from distckpt.tools.outputs import output_file, prepare, write_text

NAMES = {"persistent": "persistent-only", "multi": "multi-tier"}
LOCAL_PREFIX = "distckpt-bench/goodput"
"""Bucket/prefix of the persistent tier on ``--s3-server local`` without ``--persistent``."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``goodput`` subcommand on an argparse subparsers object."""
    from distckpt.tools.cli import _add_model_flags

    p = subparsers.add_parser(
        "goodput", help="ETTR of the reference trainer under injected host failures",
        description="Run the reference trainer for a fixed wall time while hosts are "
        "SIGKILLed at random (exponential, mean --mtbf) and the job is restarted, once "
        "persistent-only and once multi-tier, each with Young/Daly intervals from its "
        "measured costs; report ETTR (productive training time / wall time), failures, "
        "steps lost, recovery time and the ETTR the model predicts. See docs/goodput.md.")
    p.add_argument("--hosts", type=int, default=4, help="simulated hosts (default 4)")
    p.add_argument("--devices-per-host", type=int, default=2,
                   help="CPU devices per host (default 2)")
    p.add_argument("--duration", default="5m", metavar="TIME",
                   help="wall time of each run, e.g. 5m, 300s, 300 (default 5m; the "
                   "calibration of each run comes on top)")
    p.add_argument("--mtbf", default="60s", metavar="TIME",
                   help="mean time between injected failures (default 60s)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the failure schedule (default: random, printed)")
    p.add_argument("--step-delay", type=float, default=0.2, metavar="SECONDS",
                   help="sleep added to each training step (default 0.2)")
    p.add_argument("--runs", default="persistent,multi", metavar="NAMES",
                   help="configurations to run, in order: persistent, multi "
                   "(default persistent,multi)")
    p.add_argument("--dir", help="new or empty directory for checkpoints and logs "
                   "(default: a new temporary directory, kept for its logs and figures)")
    p.add_argument("--persistent", metavar="URL",
                   help="persistent tier on object storage: an empty or absent "
                   "s3://bucket/prefix (endpoint, region and credentials from the AWS_* "
                   "environment), each run under PREFIX/<run>, emptied after it (default: "
                   "a directory under --dir)")
    p.add_argument("--s3-server", choices=("local",),
                   help="local: start a private SeaweedFS S3 server on 127.0.0.1 for the "
                   f"persistent tier (s3://{LOCAL_PREFIX}, or the --persistent given)")
    p.add_argument("--json", metavar="PATH", type=output_file,
                   help="also write the report as JSON")
    p.add_argument("--png", metavar="PATH", type=output_file,
                   help="the progress figure (default: next to --json, else in the work "
                   "directory)")
    _add_model_flags(p)
    p.set_defaults(func=cmd_goodput)
    return p


def config_from_args(args: argparse.Namespace):
    """The GoodputConfig of the flags; ValueError names the flag that is wrong."""
    from distckpt.bench.cli import parse_duration
    from distckpt.tools.cli import _model_overrides
    from distckpt.tools.goodput import GoodputConfig

    times = {}
    for flag, text in (("--duration", args.duration), ("--mtbf", args.mtbf)):
        try:
            times[flag] = parse_duration(text)
        except ValueError as e:
            raise ValueError(f"{flag} {e}") from e
    persistent = args.persistent
    if args.s3_server == "local" and persistent is None:
        persistent = f"s3://{LOCAL_PREFIX}"
    return GoodputConfig(
        persistent=persistent,
        duration_s=times["--duration"], mtbf_s=times["--mtbf"], hosts=args.hosts,
        devices_per_host=args.devices_per_host,
        seed=args.seed if args.seed is not None else secrets.randbelow(2**31),
        step_delay_s=args.step_delay,
        runs=tuple(r.strip() for r in args.runs.split(",") if r.strip()),
        model=_model_overrides(args), batch=args.batch)


def check(config, directory: str | None, s3_server: str | None = None) -> None:
    """Everything that would fail once started: the model on the slice's mesh, the
    directory, an object-store persistent tier that is not empty (on a server of the
    user's; a private one starts empty). Creates nothing."""
    from distckpt.state.mesh import MeshSpec
    from distckpt.tools.drill import check_directory
    from distckpt.tools.model import ModelConfig
    from distckpt.tools.train import TrainConfig, check_fits

    cfg = TrainConfig(model=ModelConfig(**config.model), batch=config.batch)
    devices = config.hosts * config.devices_per_host
    check_fits(cfg, MeshSpec.parse(f"fsdp={devices}"))
    if directory is not None and "://" in directory:
        raise ValueError(f"--dir {directory}: give a local directory")
    check_directory(directory, empty=False)  # a file, or inside one
    if directory is not None and Path(directory).is_dir() and any(Path(directory).iterdir()):
        raise ValueError(f"--dir {directory} is not empty; give a new or empty directory "
                         "(goodput writes checkpoints and logs there)")
    if config.persistent is not None:
        from distckpt.storage.location import Location

        try:
            Location.parse(config.persistent)
        except ValueError as e:
            raise ValueError(f"--persistent {config.persistent}: {e}") from e
        if s3_server is None:
            from distckpt import storage

            storage.check_empty(config.persistent, label=f"--persistent {config.persistent}")


def cmd_goodput(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        check(config, args.dir, args.s3_server)
    except ValueError as e:
        print(f"distckpt goodput: error: {e}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if args.s3_server == "local":
            from distckpt import storage
            from distckpt.tools import s3server

            assert config.persistent is not None
            bucket = storage.Location.parse(config.persistent).bucket
            print(f"starting a private SeaweedFS S3 server for s3://{bucket} ...", flush=True)
            try:
                stack.enter_context(s3server.private_server(bucket))
            except (s3server.WeedNotFoundError, s3server.S3ServerError) as e:
                print(f"distckpt goodput: error: --s3-server local: {e}", file=sys.stderr)
                return 1
        return _run(args, config)
    raise AssertionError("unreachable")  # the with block returns


def _run(args: argparse.Namespace, config: Any) -> int:
    from distckpt.tools.goodput import GoodputError, GoodputStopped, run_goodput

    def stop(signum: int, _frame: Any) -> None:  # between jobs; during one, the launcher
        raise GoodputStopped(signum)             # passes it to the job, then says so

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)

    if args.dir is not None:
        workdir = Path(args.dir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="distckpt-goodput-"))
    where = (f"; persistent tier {config.persistent}/<run>"
             + (" on a private SeaweedFS" if args.s3_server == "local" else "")
             if config.persistent else "")
    print(f"distckpt goodput: {config.hosts}x{config.devices_per_host}, "
          f"{config.duration_s:g}s per run, MTBF {config.mtbf_s:g}s, seed {config.seed}, "
          f"step delay {config.step_delay_s:g}s; work directory {workdir}{where}", flush=True)
    try:
        reports = run_goodput(config, workdir, on_event=_print_event)
    except GoodputStopped as e:
        print(f"distckpt goodput: {e}", file=sys.stderr)
        return 128 + e.signum
    except GoodputError as e:
        print(f"distckpt goodput: error: {e}", file=sys.stderr)
        return 1
    _print_table(reports)
    value = {"hosts": config.hosts, "devices_per_host": config.devices_per_host,
             "duration_s": config.duration_s, "mtbf_s": config.mtbf_s, "seed": config.seed,
             "step_delay_s": config.step_delay_s,
             "persistent": config.persistent or "local directory",
             "s3_server": args.s3_server, "runs": [r.to_json() for r in reports]}
    if args.json:
        write_text(args.json, json.dumps(value, indent=2))
        print(f"JSON report: {args.json}")
    png = args.png or (str(Path(args.json).with_suffix(".png")) if args.json
                       else str(workdir / "goodput.png"))
    write_png(value, str(prepare(png)))
    print(f"progress figure: {png}")
    return 0


def _print_event(kind: str, fields: dict[str, Any]) -> None:
    if kind == "start":
        print(f"{fields['run']}: calibrating (log {fields['log']})", flush=True)
    elif kind == "planned":
        cal, plan = fields["calibration"], fields["plan"]
        def cost(value: float | None) -> str:
            return "" if value is None else f" (costs {value:.3f}s)"

        local = (f", local save stall {cal['local_stall_s']:.3f}s"
                 f"{cost(cal.get('local_cost_s'))} every {plan['local_every']}"
                 if plan["local_every"] else "")
        print(f"  step {cal['step_s']:.3f}s, start {cal['start_s']:.1f}s, restart "
              f"{cal['restart_s']:.1f}s, save stall {cal['stall_s']:.3f}s"
              f"{cost(cal.get('cost_s'))} commit "
              f"{cal['commit_s']:.3f}s{local}; persistent save every {plan['save_every']} "
              f"steps; planned ETTR {fields['ettr_planned']:.3f}; running", flush=True)
    elif kind == "failure":
        print(f"  failure at {fields['at']:.1f}s: host {fields['host']} killed at step "
              f"{fields['step']}", flush=True)


def _print_table(reports) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="goodput under injected failures", header_style="bold")
    for column in ("run", "ETTR", "predicted", "planned", "failures", "steps lost",
                   "recovery (median)", "step", "restores by tier"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in reports:
        recovery = r.recovery_seconds_median
        table.add_row(NAMES[r.name], f"{r.ettr:.3f}", f"{r.ettr_predicted:.3f}",
                      f"{r.ettr_planned:.3f}", f"{r.failures} ({r.kills_issued} kills)",
                      str(r.steps_lost), "-" if recovery is None else f"{recovery:.1f}s",
                      f"{r.start_step} -> {r.final_step}",
                      ", ".join(f"{k} {v}" for k, v in sorted(r.restored_tiers.items())) or "-")
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 160
    console.print(table)
    print("ETTR: productive steps x the run's step time / wall time; predicted: Daly's model "
          "with the run's measured costs; planned: with the calibration's (docs/goodput.md)")


def write_png(report: dict[str, Any], path: str) -> None:
    """Step against wall time, one panel per run, each failure a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.8 * len(runs) + 0.6), sharex=True,
                             squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        ts = [p[0] for p in run["progress"]]
        steps = [p[1] for p in run["progress"]]
        ax.plot(ts, steps, drawstyle="steps-post", linewidth=1.2, label="step reached")
        step_s, begin = run["measured"]["step_s"], run["start_step"]
        ax.plot([0, report["duration_s"]], [begin, begin + report["duration_s"] / step_s],
                linestyle=":", color="grey", linewidth=1, label="failure-free")
        for i, f in enumerate(run["failure_log"]):
            ax.axvline(f["at"], color="tab:red", linewidth=0.9, alpha=0.8,
                       label="failure" if i == 0 else None)
        ax.set_ylabel("step")
        ax.set_title(f"{NAMES.get(run['name'], run['name'])}: ETTR {run['ettr']:.3f} "
                     f"(predicted {run['ettr_predicted']:.3f}), {run['failures']} failures, "
                     f"{run['steps_lost']} steps lost", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        ax.set_xlim(0, report["duration_s"])
    axes[-1, 0].set_xlabel("wall time (s)")
    fig.suptitle(f"{report['hosts']}x{report['devices_per_host']}, MTBF {report['mtbf_s']:g}s, "
                 f"seed {report['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
