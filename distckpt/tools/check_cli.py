"""`distckpt inspect` and `distckpt verify`: look at a checkpoint from one CPU process.

Exit status: 0 when the checkpoint is healthy, 1 when a problem was found (the
report says which), 2 when there is nothing to look at (a wrong path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Piped or redirected output has no width to fit: a table as wide as its contents, up to
# this, so a leaf path a user copies is never cut.
PIPE_WIDTH = 10_000


def _console() -> Console:
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = PIPE_WIDTH
    return console


DRILL_CHECKPOINTS = "checkpoints"
"""Where ``distckpt drill --dir DIR`` keeps its checkpoints (beside its logs and specs)."""


def checkpoint_dir(directory: str, command: str) -> str:
    """`directory`, or its checkpoints when it is a drill's directory: ``distckpt drill
    --dir DIR`` keeps logs and specs in DIR and the checkpoints in ``DIR/checkpoints``, and
    a user who ran it points inspect, verify and plan-restore at DIR. Says so on stderr."""
    from pathlib import Path

    if "://" in directory:
        return directory
    root = Path(directory)
    inner = root / DRILL_CHECKPOINTS
    try:
        is_drill = (inner.is_dir() and (root / "save-spec.json").is_file()
                    and not any(p.name.isdigit() for p in root.iterdir()))
    except OSError:
        return directory
    if not is_drill:
        return directory
    print(f"distckpt {command}: {directory} is a drill's directory; reading its checkpoints "
          f"in {inner}", file=sys.stderr)
    return str(inner)


def cmd_inspect(args: argparse.Namespace) -> int:
    from distckpt.tools.inspection import inspect_directory

    args.dir = checkpoint_dir(args.dir, "inspect")
    report = inspect_directory(args.dir, args.step)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_inspect(report)
    if report["problems"] and not report["steps"] and not report["found"]:
        return 2
    return 1 if report["problems"] else 0


def _print_inspect(report: dict[str, Any]) -> None:
    console = _console()
    steps = report["steps"]
    committed = [s["step"] for s in steps if s["committed"]]
    if report.get("importable"):  # a plain Orbax checkpoint or a pickle file: how to import it
        console.print(f"[yellow]{escape(report['problems'][0])}[/]")
        return
    console.print(f"{report['directory']}: committed steps {committed or 'none'}", markup=False)
    for s in steps:
        if not s["committed"]:
            console.print(f"  [yellow]step {s['step']} not committed[/]: {escape(s['reason'])}")
    for key in ("temporary", "quarantined"):
        if report.get(key):
            console.print(f"  {key}: {', '.join(report[key])}", markup=False)
    detail = report.get("detail")
    if detail and detail.get("topology"):
        topo = detail["topology"]
        console.print(f"step {detail['step']}: saved by {topo['process_count']} processes, "
                      f"{topo['device_count']} {topo['platform']} devices, mesh {topo['mesh']}; "
                      f"{detail.get('files', '?')} files, {detail.get('bytes', 0):,} bytes; "
                      f"metrics {detail.get('metrics')}; metadata {detail.get('metadata')}", markup=False)
        table = Table(show_header=True, header_style="bold")
        # A terminal too narrow for a path wraps it (fold), never cuts it with an ellipsis.
        table.add_column("leaf", overflow="fold")
        for col in ("shape", "dtype", "PartitionSpec"):
            table.add_column(col, overflow="fold")
        for name, leaf in detail["leaves"].items():
            table.add_row(name, str(tuple(leaf["shape"] or ())), str(leaf["dtype"]),
                          str(leaf["spec"]))
        console.print(table)
    for problem in report["problems"]:
        console.print(f"[red]problem[/]: {escape(problem)}")


def cmd_verify(args: argparse.Namespace) -> int:
    if not 0 < args.batch_mib < float("inf"):
        print(f"distckpt verify: error: --batch-mib {args.batch_mib:g}: give a positive number "
              "of MiB to read at a time, e.g. --batch-mib 256", file=sys.stderr)
        return 2
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from distckpt.errors import CheckpointError
    from distckpt.tools.verify import verify_directory

    args.dir = checkpoint_dir(args.dir, "verify")
    try:
        report = verify_directory(args.dir, args.step,
                                  batch_bytes=max(1, int(args.batch_mib * 1024 * 1024)))
    except CheckpointError as e:
        if args.json:
            print(json.dumps({"directory": args.dir, "ok": False, "error": str(e)}, indent=2))
        print(f"distckpt verify: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        console = _console()
        for v in report["steps"]:
            status = "[green]ok[/]" if v["ok"] else "[red]FAILED[/]"
            console.print(f"step {v['step']}: {status} ({v['arrays']} arrays, "
                          f"{v['bytes']:,} bytes checked in {v['seconds']:.2f}s)")
            for problem in v["problems"]:
                console.print(f"  {problem}", markup=False)
    return 0 if report["ok"] else 1


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "inspect", help="list steps, topology, leaves and problems of a checkpoint dir",
        description="Describe a checkpoint directory from one CPU process, whatever topology "
        "saved it: committed and uncommitted steps, topology, leaves (shape, dtype, saved "
        "PartitionSpec), metadata and metrics, and anything wrong with it. Reads small files "
        "only; changes nothing. Exit status 0 healthy, 1 problems found, 2 no such directory.")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--step", type=int, help="step to describe (default newest committed)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "verify", help="check every array of a checkpoint against its saved checksums",
        description="Read every array of every committed step (or --step) onto one CPU device "
        "and compare its content digest with the one recorded at save time. Works whatever "
        "topology saved the checkpoint; changes nothing. Exit status 0 all verified, 1 a "
        "mismatch or missing data, 2 nothing to verify.")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--step", type=int, help="verify only this step (default: every committed)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--batch-mib", type=float, default=1024,
                   help="read at most this many MiB of arrays at a time (default 1024)")
    p.set_defaults(func=cmd_verify)
