"""The ``distckpt`` command: drill, launch, train, inspect, import, remat-plan, goodput.

Thin on purpose: parse arguments, call the library, print. Logic lives in the
modules the commands name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from distckpt.tools.outputs import output_file, write_text


def _console() -> Console:
    from distckpt.tools.check_cli import PIPE_WIDTH

    console = Console(stderr=False, highlight=False)
    if not console.is_terminal:  # nothing to fit; a path a user copies is never cut
        console.width = PIPE_WIDTH
    return console


# --------------------------------------------------------------------------- drill
def _model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
              "n_kv_heads": args.kv_heads, "head_dim": args.head_dim, "d_ff": args.d_ff,
              "vocab": args.vocab}
    return {k: v for k, v in fields.items() if v is not None}


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reference model size (defaults: a tiny model that runs in seconds)")
    g.add_argument("--d-model", type=int, help="model width (default 64)")
    g.add_argument("--layers", type=int, help="transformer blocks (default 2)")
    g.add_argument("--heads", type=int, help="query heads (default 4)")
    g.add_argument("--kv-heads", type=int, help="key/value heads (default 2)")
    g.add_argument("--head-dim", type=int, help="head width (default 16)")
    g.add_argument("--d-ff", type=int, help="MLP width (default 128)")
    g.add_argument("--vocab", type=int, help="vocabulary (default 256)")
    g.add_argument("--batch", type=int, default=8, help="global batch size (default 8)")


def cmd_drill(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from distckpt.tools.drill import DrillConfig, check_config, run_drill

    try:
        source = _parse_slice("--from", args.source)
        if args.target is None:  # a lost host is replaced by the same kind of machine
            args.target = args.source if args.fault == "lose-host" else "2x2:fsdp=2,tensor=2"
        target = _parse_slice("--to", args.target)
        steps = args.steps
        if steps is None:  # two saves to fall back between when a fault is injected
            steps = 2 * args.save_every if args.fault else 6
            if args.fault == "lose-host":  # the last steps only the local tier holds
                steps -= 1
        config = DrillConfig(source=source, target=target, steps=steps,
                             save_every=args.save_every, directory=args.dir,
                             model=_model_overrides(args), batch=args.batch, fault=args.fault,
                             keep=args.keep, tiers=args.tiers)
        check_config(config)  # the model on both meshes, the directory: before anything starts
    except ValueError as e:
        print(f"distckpt drill: error: {e}", file=sys.stderr)
        return 2
    console = _console()
    console.print(f"[bold]distckpt drill[/bold]: save on {source.hosts} hosts x {source.devices} "
                  f"devices (mesh {source.mesh}), restore on {target.hosts} x {target.devices} "
                  f"(mesh {target.mesh}); {config.steps} steps, save every {config.save_every}")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, transient=False,
                  disable=not console.is_terminal and not args.progress) as progress:
        save_task = progress.add_task("save   ", total=config.steps, info="starting hosts")
        restore_task = progress.add_task("restore", total=2, info="waiting", start=False)

        def on_progress(fields: dict[str, Any]) -> None:
            if fields.get("phase") == "save" and "step" not in fields:
                progress.update(save_task, info=f"host {fields.get('host')} killed")
            elif fields.get("phase") == "save":
                mark = " saved" if fields.get("saved") else ""
                progress.update(save_task, completed=min(fields["step"], config.steps),
                                info=f"step {fields['step']} loss {fields['loss']:.4f}{mark}")
            else:
                progress.start_task(restore_task)
                progress.advance(restore_task)
                progress.update(restore_task, info=fields.get("stage", ""))

        report = run_drill(config, progress=on_progress)
        progress.update(restore_task, completed=2, info="done" if report.verified else "failed")
    _print_report(console, report)
    if args.keep:
        console.print(f"kept the drill's directory (logs, specs, results): {report.directory}",
                      soft_wrap=True, markup=False)
    elif report.removed and not report.verified:
        console.print("the drill's temporary directory (its logs) was removed; rerun with "
                      "--keep to keep it")
    if args.json:
        write_text(args.json, json.dumps(report.to_json(), indent=2))
        console.print(f"JSON report: {args.json}", markup=False)
    return 0 if report.verified else 1


def _parse_slice(flag: str, text: str):
    """SliceSpec.parse, its error naming the flag the user typed."""
    from distckpt.tools.drill import SliceSpec

    try:
        return SliceSpec.parse(text)
    except ValueError as e:
        raise ValueError(f"{flag} {e}") from e


def _fmt(x: float | None, unit: str = "s") -> str:
    return "-" if x is None else f"{x:.3f}{unit}"


def _print_report(console: Console, report) -> None:
    table = Table(title="restore drill", show_header=True, header_style="bold")
    table.add_column("check")
    table.add_column("result", overflow="fold")  # paths wrap, never end in an ellipsis
    table.add_row("verified", "[green]yes[/green]" if report.verified else "[red]NO[/red]")
    table.add_row("from -> to", f"{report.source} -> {report.target}")
    if report.fault:
        table.add_row("fault injected", report.fault)
    table.add_row("restored step", f"{report.restored_step} (expected {report.expected_step})")
    table.add_row("steps lost", f"{report.steps_lost} (trained to step {report.trained_until})")
    for step, reason in report.skipped:
        table.add_row(f"skipped step {step}", escape(reason[:200]))
    table.add_row("leaves / bytes", f"{report.leaves} / {report.bytes:,}")
    table.add_row("contents bit-identical",
                  "yes" if report.restored_step is not None and not report.content_mismatch
                  else f"no: {report.content_mismatch[:3]}")
    table.add_row("shardings = target",
                  "yes" if report.restored_step is not None and not report.sharding_mismatch
                  else f"no: {report.sharding_mismatch[:3]}")
    table.add_row("next-step loss", f"{report.loss_before} -> {report.loss_after} "
                  f"(|diff| {report.loss_abs_diff}, rel tol {report.loss_rel_tol:g})")
    table.add_row("tiers", report.tiers)
    if report.restored_from:
        table.add_row("restored from (per host)", ", ".join(report.restored_from))
    table.add_row("restore time", _fmt(report.restore_seconds))
    table.add_row("recovery (restart to first step)", _fmt(report.recovery_seconds))
    table.add_row("save stall per save", ", ".join(_fmt(s) for s in report.save_stall_seconds))
    table.add_row("commit time per save", ", ".join(_fmt(s) for s in report.commit_seconds))
    table.add_row("phase wall time", ", ".join(f"{k} {v:.1f}s"
                                               for k, v in report.phase_seconds.items()))
    table.add_row("directory", escape(report.directory) + (" (temporary, removed; --keep keeps it)"
                                                   if report.removed else ""))
    console.print(table)
    if report.failure:
        console.print(f"[red]{escape(report.failure)}[/red]")


# --------------------------------------------------------------------------- launch
def cmd_launch(args: argparse.Namespace) -> int:
    from distckpt.tools.launcher import LaunchError, launch

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("distckpt launch: error: give the command after '--', e.g. "
              "distckpt launch --hosts 2 --devices-per-host 4 -- python train.py",
              file=sys.stderr)
        return 2
    if args.hosts < 1 or args.devices_per_host < 1:
        print("distckpt launch: error: --hosts and --devices-per-host must be >= 1",
              file=sys.stderr)
        return 2
    if args.timeout is not None and not args.timeout > 0:
        print(f"distckpt launch: error: --timeout {args.timeout:g}: give a positive number of "
              "seconds, or leave it out to wait for the hosts", file=sys.stderr)
        return 2
    try:
        result = launch(command, args.hosts, args.devices_per_host, timeout_s=args.timeout,
                        show_gloo=True if args.verbose or args.launch_verbose else None)
    except LaunchError as e:
        print(f"distckpt launch: error: {e}", file=sys.stderr)
        return e.returncode
    return result.returncode


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    import time

    from distckpt import storage
    from distckpt.multihost import coordinator
    from distckpt.state.mesh import MeshSpec, make_mesh, mesh_spec_of
    from distckpt.tools import train
    from distckpt.tools.drill import check_directory
    from distckpt.tools.model import ModelConfig

    # The drill's checks, before anything is created: the same mistakes, the same messages.
    try:
        spec = MeshSpec.parse(args.mesh) if args.mesh is not None else None
        cfg = train.TrainConfig(model=ModelConfig(**_model_overrides(args)), batch=args.batch)
        check_directory(args.dir, empty=False)  # a checkpoint directory may be resumed
        if args.local_every is not None and (args.local_dir is None or args.local_every < 1):
            raise ValueError(f"--local-every {args.local_every}: give a step count >= 1, "
                             "with --local-dir")
        if args.executable_cache is not None:
            if not args.executable_cache:
                raise ValueError("--executable-cache: an empty path; give a directory")
            check_directory(args.executable_cache, empty=False, flag="--executable-cache")
            cache = Path(args.executable_cache)
            parent = next(q for q in (cache, *cache.parents) if q.exists())
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"--executable-cache {args.executable_cache}: {parent} is "
                                 "not writable; give a directory this user can write")
    except ValueError as e:
        print(f"distckpt train: error: {e}", file=sys.stderr)
        return 2
    storage.warm(args.dir)  # imports s3fs while initialize() waits for the other hosts
    topo = coordinator.initialize()
    try:
        mesh = make_mesh(spec or f"fsdp={topo.global_devices}")
        train.check_fits(cfg, mesh_spec_of(mesh))
    except ValueError as e:
        print(f"distckpt train: error: {e}", file=sys.stderr)
        return 2
    delay = args.step_delay

    def progress(fields: dict[str, Any]) -> None:  # one machine-readable line per event
        if coordinator.is_primary():
            print(f"{train.PROGRESS_PREFIX} {json.dumps(fields)}", flush=True)

    if args.progress:
        progress({"event": "init", "t": time.time()})
    result = train.run(args.dir, args.steps, args.save_every, mesh, cfg,
                       max_to_keep=args.max_to_keep, crash_after=args.crash_after,
                       on_step=(lambda _step, _loss: time.sleep(delay)) if delay else None,
                       local_directory=args.local_dir, local_every=args.local_every,
                       progress=progress if args.progress else None,
                       executable_cache=args.executable_cache)
    if coordinator.is_primary():
        print(json.dumps({"start_step": result.start_step, "last_step": result.last_step,
                          "saved_steps": result.saved_steps,
                          "preempted_at": result.preempted_at,
                          "losses": {str(k): v for k, v in result.losses.items()}}), flush=True)
    return 0


# --------------------------------------------------------------------------- parser

class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (argparse prints the usage first): what
    is wrong, and where to read how to call it. Subcommands' parsers are of this class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    from distckpt.tools.faults import FAULTS

    parser = OneLineParser(
        prog="distckpt",
        description="Distributed multi-host checkpoints for JAX / Flax NNX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("drill", help="save on one simulated slice, restore onto another, verify",
                       description="Pod-slice restore drill on simulated CPU hosts. SLICE is "
                       "HOSTSxDEVICES[:AXIS=SIZE,...], e.g. 4x2:data=2,fsdp=4.")
    p.add_argument("--from", dest="source", default="4x2:data=2,fsdp=4", metavar="SLICE",
                   help="slice that trains and saves (default %(default)s; a slice without a "
                   "mesh gets fsdp=<all devices>)")
    p.add_argument("--to", dest="target", default=None, metavar="SLICE",
                   help="slice that restores (default 2x2:fsdp=2,tensor=2; with --fault "
                   "lose-host, the --from slice)")
    p.add_argument("--tiers", default="persistent", metavar="TIERS",
                   help="persistent (default), or local,persistent: a local step every step "
                   "(each host's own directory, a copy on the next host) in front of the "
                   "persistent saves")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default 6; with --fault, twice --save-every)")
    p.add_argument("--save-every", type=int, default=4, help="save interval (default 4)")
    p.add_argument("--dir", help="new or empty directory to use (default: a new temp dir)")
    p.add_argument("--json", metavar="PATH", type=output_file,
                   help="also write the report as JSON (missing parent directories are made)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory the drill makes (logs, specs and, "
                   "without --dir, the checkpoints) and print where it is; by default it is "
                   "removed when the drill ends")
    p.add_argument("--fault", choices=FAULTS, default=None,
                   help="inject a fault and prove recovery: kill-during-save (every saving "
                   "host SIGKILLed inside the last save's commit), preempt (SIGTERM to one "
                   "saving host), corrupt (flip bytes of the newest step's array data), "
                   "lose-host (SIGKILL the last host after its last step, wipe its local tier, "
                   "restart)")
    p.add_argument("--progress", action="store_true",
                   help="show progress bars even when stdout is not a terminal")
    _add_model_flags(p)
    p.set_defaults(func=cmd_drill)

    p = sub.add_parser("launch", help="run a command as N simulated hosts on this machine",
                       description="Start N processes as N hosts of one JAX job (gloo on CPU).")
    p.add_argument("--hosts", type=int, required=True, help="number of processes")
    p.add_argument("--devices-per-host", type=int, default=1, help="CPU devices per process")
    p.add_argument("--timeout", type=float, default=None, help="stop everything after seconds")
    p.add_argument("--verbose", dest="launch_verbose", action="store_true",
                   help="keep Gloo's '[Gloo] Rank N is connected' lines (hidden by default; "
                   "or set DISTCKPT_SHOW_GLOO=1)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("train", help="resumable reference training job (one process per host)",
                       description="Train the reference transformer, checkpointing every K "
                       "steps; restarts resume from the newest committed step. Run one process "
                       "per host (see launch/ for cluster recipes).")
    p.add_argument("--dir", required=True, help="checkpoint directory shared by all hosts")
    p.add_argument("--steps", type=int, default=20, help="train up to this step (default 20)")
    p.add_argument("--save-every", type=int, default=5, help="save interval (default 5)")
    p.add_argument("--mesh", help="mesh spec, e.g. data=2,fsdp=4 (default fsdp=<all devices>)")
    p.add_argument("--max-to-keep", type=int, default=3, help="steps to keep (default 3)")
    p.add_argument("--crash-after", type=int, default=None,
                   help="testing: SIGKILL this process after that step's save commits")
    p.add_argument("--step-delay", type=float, default=0.0, metavar="SECONDS",
                   help="testing: sleep this long after each step (a slower step; same numbers)")
    p.add_argument("--local-dir", metavar="DIR",
                   help="host-local checkpoint tier ('{host}' becomes DISTCKPT_HOST, else the "
                   "hostname); a peer keeps a copy of each host's steps")
    p.add_argument("--local-every", type=int, default=None, metavar="K",
                   help="with --local-dir: save to the local tier every K steps (default 1)")
    p.add_argument("--executable-cache", metavar="DIR",
                   help="keep each process's compiled training step in DIR and load it on the "
                   "next start instead of compiling (JAX's own cache serves process 0 only "
                   "on CPU). The files are pickles (JAX serialized executables): use a "
                   "directory only this job writes")
    p.add_argument("--progress", action="store_true",
                   help="print a machine-readable line per event on the primary host: "
                   "'TRAIN {json}' (restore, each step: times, saves)")
    _add_model_flags(p)
    p.set_defaults(func=cmd_train)

    from distckpt.tools import check_cli

    check_cli.add_parsers(sub)
    from distckpt.tools import import_cli

    import_cli.add_parser(sub)
    from distckpt.tools import plan_cli

    plan_cli.add_parser(sub)

    try:
        from distckpt.remat import cli as remat_cli
    except ImportError:
        pass
    else:
        remat_cli.add_parser(sub)
    from distckpt.bench import cli as bench_cli

    bench_cli.add_parser(sub)
    from distckpt.tools import goodput_cli

    goodput_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        try:
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.WARNING)
        except ImportError:
            pass
        # Orbax logs routine notes (e.g. "directory is read only") as absl warnings.
        logging.getLogger("absl").setLevel(logging.ERROR)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
