"""`distckpt plan-restore`: what a restore onto a target slice will read, per host, before
reading it (:mod:`distckpt.tools.plan`).

Exit status: 0 the target matches the step strictly; 1 it does not (the plan is printed,
with the mismatches); 2 nothing to plan (one line on stderr says why; nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from distckpt.tools.outputs import output_file, write_text

DESCRIPTION = (
    "Plan restoring a committed step (the newest, or --step N) of DIR onto a target slice "
    "(--to HOSTSxDEVICES[:AXIS=SIZE,...], the drill's syntax), reading metadata only: per "
    "host the tier it reads from, the files and bytes it reads, the predicted peak host "
    "memory and read time; and whether the target matches the step strictly. Each leaf "
    "keeps the PartitionSpec it was saved with, on the target mesh's axes. Times assume "
    "--read-gbps per host, or a bandwidth measured by reading up to 16 MiB of the step's "
    "data. Exit status 0 strict match, 1 not strict, 2 nothing to plan.")


def cmd_plan(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"distckpt plan-restore: error: {message}", file=sys.stderr)
        return 2

    if args.step is not None and args.step < 0:
        return fail(f"--step {args.step}: give a committed step number >= 0")
    if args.read_gbps is not None and not 0 < args.read_gbps < float("inf"):
        return fail(f"--read-gbps {args.read_gbps:g}: give a positive number of GB/s")
    if args.memory_mb is not None and args.memory_mb < 1:
        return fail(f"--memory-mb {args.memory_mb}: give the restore budget in MiB, >= 1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # plans touch no accelerator
    from distckpt.tools.check_cli import checkpoint_dir

    args.dir = checkpoint_dir(args.dir, "plan-restore")
    from distckpt.errors import CheckpointError
    from distckpt.tools.drill import SliceSpec
    from distckpt.tools.plan import plan_restore

    try:
        target = SliceSpec.parse(args.to)
    except ValueError as e:
        return fail(f"--to {e}")
    try:
        plan = plan_restore(args.dir, target, args.step, memory_mb=args.memory_mb,
                            read_gbps=args.read_gbps, local_directory=args.local_dir,
                            host_names=args.host_names.split(",") if args.host_names else None)
    except (CheckpointError, ValueError, OSError) as e:
        text = str(e).strip().splitlines()
        return fail(text[0] if text else type(e).__name__)
    report = plan.to_json()
    _print(report)
    if args.json:
        write_text(args.json, json.dumps(report, indent=2))
    return 0 if plan.strict else 1


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:,.1f} s"


def _print(r: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from distckpt.tools.check_cli import _console

    console = _console()
    match = ("[green]strict match[/]" if r["strict"] else
             f"[red]NOT a strict match[/] ({len(r['mismatches'])} mismatch(es))")
    console.print(f"step {r['step']} of {escape(r['directory'])} (saved by {r['saved']}) "
                  f"onto {r['target']}: {match}")
    for line in r["mismatches"]:
        console.print(f"  {escape(line.strip())}")
    if r["new_axes"]:
        console.print(f"[yellow]mesh axes {', '.join(r['new_axes'])} are new: every leaf keeps "
                      "its saved spec, so none is sharded over them; if your rules shard onto "
                      "them, plan with your restore target (distckpt.plan_restore(..., "
                      "target=...))[/]")
    table = Table(title="restore plan per host", show_header=True, header_style="bold")
    for col in ("host", "tier", "bytes read", "files", "shards", "peak memory", "read time"):
        table.add_column(col, justify="left" if col == "tier" else "right")
    for h in r["hosts"]:
        table.add_row(str(h["process"]), h["tier"], _size(h["bytes"]), str(len(h["files"])),
                      _size(h["shard_bytes"]), _size(h["peak_memory_bytes"]),
                      _seconds(h["seconds"]))
    console.print(table)
    files = Table(title="files read per host", show_header=True, header_style="bold")
    files.add_column("host", justify="right")
    files.add_column("file (in the step directory)", overflow="fold")
    files.add_column("bytes", justify="right")
    for h in r["hosts"]:
        for rel, n in h["files"].items():
            files.add_row(str(h["process"]), escape(rel), f"{n:,}")
    console.print(files)
    how = "measured from the step's data now" if r["read_gbps_measured"] else "given"
    console.print(f"total {r['bytes']:,} bytes; read times at {r['read_gbps']:.3g} GB/s per "
                  f"host ({how}; --read-gbps sets it), memory with "
                  + (f"a {r['memory_mb']} MiB restore budget" if r["memory_mb"] is not None
                     else "the default restore budget (256 MiB, or 1/16 of a host's bytes if "
                     "less, at least 8 MiB)") + " (--memory-mb)")
    if not r["exact"]:
        console.print("[yellow]bytes are decoded bytes: the step's chunks are compressed or "
                      "zarr3, which TensorStore reads itself[/]")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plan-restore", help="what restoring a step onto a slice will read, "
                       "per host, from metadata only", description=DESCRIPTION)
    p.add_argument("dir", metavar="DIR", help="checkpoint directory (a path or s3://...)")
    p.add_argument("--to", required=True, metavar="SLICE",
                   help="target slice, HOSTSxDEVICES[:AXIS=SIZE,...], e.g. 2x4:fsdp=8")
    p.add_argument("--step", type=int, help="step to plan (default: the newest committed)")
    p.add_argument("--memory-mb", type=int, default=None,
                   help="restore memory budget in MiB, CheckpointOptions.restore_memory_mb "
                   "(default: 256, or 1/16 of a host's bytes if less, at least 8)")
    p.add_argument("--read-gbps", type=float, default=None,
                   help="read bandwidth per host in GB/s (default: measured from up to 16 MiB "
                   "of the step's data)")
    p.add_argument("--local-dir", metavar="TEMPLATE",
                   help="the local tier's directory (CheckpointOptions.local_directory, with "
                   "{host}): plan it too, as the restore would choose it")
    p.add_argument("--host-names", metavar="A,B,...",
                   help="with --local-dir: each host's name for {host}, by process index "
                   "(default host0,host1,...: the launcher's simulated hosts)")
    p.add_argument("--json", metavar="PATH", type=output_file,
                   help="also write the plan as JSON to PATH")
    p.set_defaults(func=cmd_plan)  # one-line argument errors: tools.cli.OneLineParser
