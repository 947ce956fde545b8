"""``distckpt bench``: parse flags, run :func:`distckpt.bench.harness.run_bench`, print, write files.

Importing this module does not import jax (the main CLI builds its parser eagerly).

    distckpt bench --json out.json                 # default: small state, 4 and 2 hosts
    distckpt bench --size 1GiB --json big.json
    distckpt bench --contenders orbax orbax:ocdbt=0 orbax:zarr3=1 distckpt --rss-saves 0
    distckpt bench --dir s3://bucket/empty-prefix    # AWS_* environment: endpoint, keys
    distckpt bench --s3-server local                 # a private SeaweedFS on 127.0.0.1
    distckpt bench --platform gpu --size 1GiB        # one process over the local GPUs
    distckpt bench --data-parallel 2                 # replicated: bytes read vs unique
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from distckpt.bench import s3 as bench_s3
from distckpt.tools.outputs import output_file, prepare, write_text

_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*")


def parse_duration(text: str) -> float:
    """'4h', '90m', '3600', '2d' -> seconds.

    >>> parse_duration("4h"), parse_duration("90m"), parse_duration("30")
    (14400.0, 5400.0, 30.0)
    """
    m = _DURATION.fullmatch(text)
    if not m:
        raise ValueError(f"bad duration {text!r}: a number with an optional unit s, m, h or d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_overrides(text: str) -> tuple[tuple[str, int], ...]:
    """'d_model=256,n_layers=4' -> (('d_model', 256), ('n_layers', 4))."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"bad model override {item!r}: expected field=int")
        out.append((key.strip(), int(value)))
    return tuple(out)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on an argparse subparsers object."""
    from distckpt.bench.harness import BenchConfig

    d = BenchConfig()
    p = subparsers.add_parser(
        "bench", help="benchmark checkpoint save/restore against raw I/O and plain Orbax",
        description="Save and restore one sharded NNX state of random float32 on simulated "
        "hosts (real processes), alternating the contenders (raw write+fsync / read, plain "
        "Orbax CheckpointManager, distckpt); medians of the repetitions after a warm-up. "
        "Prints the figures, the performance targets and the Young/Daly save interval. "
        "With --dir s3://bucket/prefix (or --s3-server local) raw is PUT/GET of the same "
        "bytes as 4 MiB objects on the same server and the ratios compare distckpt with "
        "it; plain Orbax 0.12.8 cannot save on s3://, so the default contenders there are "
        "raw and distckpt, and an orbax contender asked for is probed with one tiny save "
        "and, when that fails, reported as failing with its error.")
    p.add_argument("--size", default=f"{d.size_bytes // 2**20}MiB",
                   help="state size over all hosts, e.g. 256MiB, 1GiB (default %(default)s)")
    p.add_argument("--platform", default=d.platform, metavar="{cpu,gpu,tpu}",
                   help="cpu: simulated hosts (processes) on CPU devices; gpu or tpu: one "
                   "process over this machine's GPUs or TPUs (all of them; --hosts and "
                   "--devices-per-host do not apply), the same contenders and figures "
                   "(default %(default)s)")
    p.add_argument("--single-process", action="store_true",
                   help="with --platform cpu: one process over --devices-per-host CPU "
                   "devices, the code path of an accelerator run (gpu and tpu imply it)")
    p.add_argument("--shapes", type=int, default=d.distinct_shapes,
                   help="leaves of distinct small shapes whose first and second save() "
                   "stall and restore are measured (what is built per shape, e.g. digest "
                   "kernels compiled on an accelerator); 0 to skip (default %(default)s)")
    p.add_argument("--hosts", default=",".join(map(str, d.hosts)),
                   help="simulated host counts, one job each (default %(default)s; one "
                   "process with --single-process or --platform gpu/tpu)")
    p.add_argument("--devices-per-host", type=int, default=d.devices_per_host,
                   help="CPU devices per host (default %(default)s)")
    p.add_argument("--data-parallel", type=int, default=d.data_parallel,
                   help="replicate the state over a data axis of this size (default "
                   "%(default)s: fully sharded)")
    p.add_argument("--leaves", type=int, default=d.leaves, help="arrays (default %(default)s)")
    p.add_argument("--contenders", nargs="+", default=None, metavar="C",
                   help="raw, orbax, distckpt, or KIND:key=value,... (e.g. "
                   "orbax:ocdbt=0,zarr3=1; see distckpt.bench.contenders); default "
                   f"{' '.join(bench_defaults('local'))}, on s3:// "
                   f"{' '.join(bench_defaults('s3'))}")
    p.add_argument("--reps", type=int, default=d.reps, help="timed repetitions (default "
                   "%(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed first repetitions "
                   "(default %(default)s)")
    p.add_argument("--rss-saves", type=int, default=d.rss_saves,
                   help="consecutive saves for the RSS-growth figure, 0 to skip (default "
                   "%(default)s)")
    p.add_argument("--train-rounds", type=int, default=d.train_rounds,
                   help="timed rounds of the training-loop figure, 0 to skip (default "
                   "%(default)s)")
    p.add_argument("--train-steps", type=int, default=d.train_steps,
                   help="steps per training block (default %(default)s)")
    p.add_argument("--train-model", default=",".join(f"{k}={v}" for k, v in d.train_model),
                   help="reference model (ModelConfig fields) of the training loop (default "
                   "%(default)s)")
    p.add_argument("--train-batch", type=int, default=d.train_batch,
                   help="training batch (default %(default)s)")
    p.add_argument("--extras-on", choices=("last", "all"), default=d.extras_on,
                   help="jobs that also measure RSS growth and the training loop: the last "
                   "(smallest) one, or all (default %(default)s)")
    p.add_argument("--mtbf", default="4h",
                   help="mean time between failures for the Young/Daly interval, e.g. 4h, "
                   "90m, 3600 (default %(default)s)")
    p.add_argument("--warm", action="store_true",
                   help="do not evict files from the page cache before reads (local disk "
                   "only; nothing is evicted on s3://)")
    p.add_argument("--dir", help="new or empty directory (default: a new temp dir), or an "
                   "empty or absent s3://bucket/prefix (endpoint, region and credentials "
                   "from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID/"
                   "AWS_SECRET_ACCESS_KEY; logs go to a local temp dir)")
    p.add_argument("--s3-server", choices=("local",),
                   help="'local': start a private SeaweedFS S3 server on 127.0.0.1 for this "
                   "run (its data on local disk; needs the `weed` binary of the test extra) "
                   f"and benchmark s3://{LOCAL_DIR} on it, or the s3:// --dir given")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    p.add_argument("--json", metavar="PATH", type=output_file,
                   help="write the report as JSON")
    p.add_argument("--chart", metavar="PATH", type=output_file,
                   help="write the ratio chart as PNG (default: beside --json; needs "
                   "matplotlib, the 'bench' extra)")
    p.add_argument("--markdown", metavar="PATH", type=output_file, help="write the docs/benchmarks.md section (Markdown)")
    p.add_argument("--timeout", type=float, default=d.timeout_s,
                   help="limit per job in seconds (default %(default)s)")
    p.add_argument("--progress", action="store_true",
                   help="show progress bars even when stdout is not a terminal")
    p.set_defaults(func=main, bench_parser=p)
    return p


_OUTPUT_ONLY = ("help", "dir", "keep", "json", "chart", "markdown", "progress", "timeout")
LOCAL_DIR = f"{bench_s3.LOCAL_BUCKET}/bench"
"""Bucket/prefix benchmarked on ``--s3-server local`` when no ``--dir`` is given."""


def bench_defaults(scheme: str) -> tuple[str, ...]:
    from distckpt.bench.names import LOCAL_CONTENDERS, S3_CONTENDERS

    return S3_CONTENDERS if scheme == "s3" else LOCAL_CONTENDERS


def command_line(args: argparse.Namespace) -> str:
    """The `distckpt bench` command that measures what `args` measures (flags left at
    their default, and those that only say where output goes, are omitted)."""
    parts = ["distckpt", "bench"]
    if args.dir and "://" in args.dir and args.s3_server is None:
        parts += ["--dir", args.dir]  # says what was measured (S3, not a local disk)
    parser: argparse.ArgumentParser = args.bench_parser
    for action in parser._actions:
        if not action.option_strings or action.dest in _OUTPUT_ONLY:
            continue
        value = getattr(args, action.dest, None)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            parts.append(flag)
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def bench_directory(args: argparse.Namespace) -> str | None:
    """--dir, or with ``--s3-server local`` the s3:// prefix to use on that server."""
    if args.s3_server != "local":
        return args.dir
    if args.dir is None:
        return f"s3://{LOCAL_DIR}"
    if "://" not in args.dir:
        raise ValueError(f"--s3-server local benchmarks an s3:// prefix on the private server; "
                         f"--dir {args.dir} is a local path: give --dir s3://bucket/prefix or "
                         "no --dir")
    return args.dir


def config_from_args(args: argparse.Namespace):
    from distckpt.bench.harness import BenchConfig
    from distckpt.remat.budget import parse_bytes

    hosts = tuple(int(h) for h in args.hosts.split(",") if h.strip())
    one_process = args.single_process or args.platform in ("gpu", "tpu")
    if one_process and args.hosts == ",".join(map(str, BenchConfig().hosts)):
        hosts = (1,)  # --hosts left at its default: the one process
    return BenchConfig(
        size_bytes=parse_bytes(args.size), platform=args.platform,
        single_process=args.single_process, distinct_shapes=args.shapes,
        hosts=hosts,
        devices_per_host=args.devices_per_host, data_parallel=args.data_parallel,
        leaves=args.leaves, contenders=tuple(args.contenders) if args.contenders else None,
        reps=args.reps,
        warmup=args.warmup, rss_saves=args.rss_saves, train_rounds=args.train_rounds,
        train_steps=args.train_steps, train_model=parse_overrides(args.train_model),
        train_batch=args.train_batch, extras_on=args.extras_on,
        mtbf_s=parse_duration(args.mtbf), cold=not args.warm,
        directory=bench_directory(args), keep=args.keep, timeout_s=args.timeout)


def main(args: argparse.Namespace) -> int:
    """Run ``bench`` with parsed `args`; returns the exit code."""
    from rich.console import Console
    from rich.markup import escape

    from distckpt.bench import report as bench_report

    try:
        config = config_from_args(args)
        from distckpt.tools.model import ModelConfig

        ModelConfig(**dict(config.train_model))
        from distckpt.bench.harness import with_local_devices

        config = with_local_devices(config)  # gpu/tpu: every local device, or refuse
    except (ValueError, TypeError) as e:
        print(f"distckpt bench: error: {e}", file=sys.stderr)
        return 2
    console = Console(highlight=False)
    command = command_line(args)
    where = (f"one process over {config.devices_per_host} {config.platform} devices"
             + (f" ({config.device_kind})" if config.device_kind else "")
             if config.single_process else
             f"{', '.join(config.label(h) for h in sorted(config.hosts, reverse=True))} "
             "hosts x devices")
    console.print(f"[bold]distckpt bench[/bold]: {args.size} state on {where}; "
                  f"contenders {' '.join(config.contenders or ())}; "
                  f"{config.warmup} warm-up + {config.reps} timed repetitions"
                  + (f"; checkpoints at {escape(str(config.directory))}" if config.on_s3 else ""))
    with contextlib.ExitStack() as stack:
        server = None
        if args.s3_server == "local":
            assert config.directory is not None  # bench_directory: s3:// on the server
            server = _start_private_server(console, stack, config.directory)
            if server is None:
                return 1
        report = _run(console, config, args)
        if report is None:
            return 1
        if server is not None:
            report["s3_server"] = ("private SeaweedFS on this machine "
                                   "(distckpt.tools.s3server), data on local disk")
    report["command"] = command
    bench_report.print_report(console, report)
    _write_outputs(console, report, args, command)
    return 0


def _start_private_server(console: Any, stack: contextlib.ExitStack, directory: str):
    """Enter a private SeaweedFS (its AWS_* environment set for the run) into `stack`;
    None (after saying why) if it cannot start."""
    from rich.markup import escape

    from distckpt.bench import s3 as bench_s3
    from distckpt.tools import s3server

    bucket = bench_s3.location(directory).bucket
    console.print(f"starting a private SeaweedFS S3 server for s3://{bucket} ...",
                  markup=False)
    try:
        return stack.enter_context(s3server.private_server(bucket))
    except (s3server.WeedNotFoundError, s3server.S3ServerError) as e:
        console.print(f"[red]distckpt bench: --s3-server local: {escape(str(e))}[/red]")
        return None


def _run(console: Any, config: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """run_bench with progress bars; None (after saying why) if it failed."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from distckpt.bench import harness as bench

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                  disable=not console.is_terminal and not args.progress) as progress:
        tasks = {config.label(h): progress.add_task(
            f"{config.label(h)} hosts", total=bench.job_units(config, extras), info="waiting",
            start=False) for h, extras in bench.job_hosts(config)}

        def on_event(e: dict[str, Any]) -> None:
            task = tasks.get(e.get("job"))
            if task is None:
                return
            if e["phase"] == "start":
                progress.start_task(task)
                progress.update(task, info="starting hosts")
                return
            progress.advance(task)
            detail = {"reps": f"rep {e.get('rep', 0) + 1}/{e.get('of')}",
                      "rss": f"save {e.get('save', 0) + 1}/{e.get('of')}",
                      "train": f"round {e.get('round', 0) + 1}/{e.get('of')}"}.get(e["phase"], "")
            progress.update(task, info=f"{e['phase']} {e.get('contender', '')} {detail}")

        try:
            report = bench.run_bench(config, progress=on_event)
        except (RuntimeError, ValueError, OSError) as e:
            console.print(f"distckpt bench failed: {e}", style="red", markup=False)
            return None
        for task in tasks.values():
            total = next(t.total for t in progress.tasks if t.id == task)
            progress.update(task, completed=total, info="done")
    return report


def _write_outputs(console: Any, report: dict[str, Any], args: argparse.Namespace,
                   command: str) -> None:
    """The chart, --json and --markdown files."""
    from distckpt.bench import report as bench_report

    chart = args.chart or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if chart:
        if bench_report.write_chart(report, str(prepare(chart))):
            report["chart"] = chart
            console.print(f"chart: {chart}", markup=False)
        else:
            report["chart"] = None
            console.print("chart skipped: matplotlib is not installed "
                          "(pip install 'distckpt\\[bench]')")
    if args.json:
        write_text(args.json, json.dumps(report, indent=1))
        console.print(f"JSON report: {args.json}", markup=False)
    if args.markdown:
        write_text(args.markdown, bench_report.markdown(report, command) + "\n")
        console.print(f"Markdown: {args.markdown}", markup=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m distckpt.bench.cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
