"""``distckpt bench``: parse flags, run :func:`distckpt.bench.run_bench`, print, write files.

Importing this module does not import jax (the main CLI builds its parser eagerly).

    distckpt bench --json out.json                 # default: small state, 4 and 2 hosts
    distckpt bench --size 1GiB --json big.json
    distckpt bench --contenders orbax orbax:ocdbt=0 orbax:zarr3=1 distckpt --rss-saves 0
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

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
    from distckpt.bench import BenchConfig

    d = BenchConfig()
    p = subparsers.add_parser(
        "bench", help="benchmark checkpoint save/restore against raw I/O and plain Orbax",
        description="Save and restore one sharded NNX state of random float32 on simulated "
        "hosts (real processes), alternating the contenders (raw write+fsync / read, plain "
        "Orbax CheckpointManager, distckpt); medians of the repetitions after a warm-up. "
        "Prints the figures, the issue's targets and the Young/Daly save interval.")
    p.add_argument("--size", default=f"{d.size_bytes // 2**20}MiB",
                   help="state size over all hosts, e.g. 256MiB, 1GiB (default %(default)s)")
    p.add_argument("--hosts", default=",".join(map(str, d.hosts)),
                   help="simulated host counts, one job each (default %(default)s)")
    p.add_argument("--devices-per-host", type=int, default=d.devices_per_host,
                   help="CPU devices per host (default %(default)s)")
    p.add_argument("--data-parallel", type=int, default=d.data_parallel,
                   help="replicate the state over a data axis of this size (default "
                   "%(default)s: fully sharded)")
    p.add_argument("--leaves", type=int, default=d.leaves, help="arrays (default %(default)s)")
    p.add_argument("--contenders", nargs="+", default=list(d.contenders), metavar="C",
                   help="raw, orbax, distckpt, or KIND:key=value,... (e.g. "
                   "orbax:ocdbt=0,zarr3=1; see distckpt.bench_contenders); default %(default)s")
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
                   help="do not evict files from the page cache before reads")
    p.add_argument("--dir", help="new or empty directory (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--chart", metavar="PATH",
                   help="write the ratio chart as PNG (default: beside --json; needs "
                   "matplotlib, the 'bench' extra)")
    p.add_argument("--markdown", metavar="PATH", help="write the README section (Markdown)")
    p.add_argument("--timeout", type=float, default=d.timeout_s,
                   help="limit per job in seconds (default %(default)s)")
    p.add_argument("--progress", action="store_true",
                   help="show progress bars even when stdout is not a terminal")
    p.set_defaults(func=main, bench_parser=p)
    return p


_OUTPUT_ONLY = ("help", "dir", "keep", "json", "chart", "markdown", "progress", "timeout")


def command_line(args: argparse.Namespace) -> str:
    """The `distckpt bench` command that measures what `args` measures (flags left at
    their default, and those that only say where output goes, are omitted)."""
    parts = ["distckpt", "bench"]
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


def config_from_args(args: argparse.Namespace):
    from distckpt.bench import BenchConfig
    from distckpt.remat_planner import parse_bytes

    return BenchConfig(
        size_bytes=parse_bytes(args.size),
        hosts=tuple(int(h) for h in args.hosts.split(",") if h.strip()),
        devices_per_host=args.devices_per_host, data_parallel=args.data_parallel,
        leaves=args.leaves, contenders=tuple(args.contenders), reps=args.reps,
        warmup=args.warmup, rss_saves=args.rss_saves, train_rounds=args.train_rounds,
        train_steps=args.train_steps, train_model=parse_overrides(args.train_model),
        train_batch=args.train_batch, extras_on=args.extras_on,
        mtbf_s=parse_duration(args.mtbf), cold=not args.warm,
        directory=args.dir, keep=args.keep, timeout_s=args.timeout)


def main(args: argparse.Namespace) -> int:
    """Run ``bench`` with parsed `args`; returns the exit code."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from distckpt import bench, bench_report

    try:
        config = config_from_args(args)
        from distckpt.model import ModelConfig

        ModelConfig(**dict(config.train_model))
    except (ValueError, TypeError) as e:
        print(f"distckpt bench: error: {e}", file=sys.stderr)
        return 2
    console = Console(highlight=False)
    command = command_line(args)
    console.print(f"[bold]distckpt bench[/bold]: {args.size} state on "
                  f"{', '.join(config.label(h) for h in sorted(config.hosts, reverse=True))} "
                  f"hosts x devices; contenders {' '.join(config.contenders)}; "
                  f"{config.warmup} warm-up + {config.reps} timed repetitions")
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
        except (RuntimeError, ValueError) as e:
            console.print(f"[red]distckpt bench failed: {e}[/red]")
            return 1
        for task in tasks.values():
            total = next(t.total for t in progress.tasks if t.id == task)
            progress.update(task, completed=total, info="done")
    report["command"] = command
    bench_report.print_report(console, report)
    chart = args.chart or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if chart:
        if bench_report.write_chart(report, chart):
            report["chart"] = chart
            console.print(f"chart: {chart}")
        else:
            report["chart"] = None
            console.print("chart skipped: matplotlib is not installed "
                          "(pip install 'distckpt[bench]')")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        console.print(f"JSON report: {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(bench_report.markdown(report, command) + "\n")
        console.print(f"Markdown: {args.markdown}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m distckpt.bench_cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.func(parsed))
