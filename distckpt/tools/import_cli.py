"""`distckpt import`: bring a plain Orbax checkpoint (or, on opt-in, a pickle file) in.

Exit status: 0 imported; 1 the source or destination cannot be used (one line on
stderr says why and what to do; nothing is written); 2 a bad argument.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DESCRIPTION = (
    "Import an existing checkpoint as one committed distckpt step in DST: an Orbax "
    "CheckpointManager directory (its newest step, or --step N), one of its step "
    "directories, a single StandardCheckpointer/PyTreeCheckpointer save (nnx.state(model), "
    "nnx.split(model), a dict of model and optimizer states), or a pickle file. The layout is "
    "detected and reported. One model's tree becomes the item a distckpt save of "
    "{'model': model} writes (--item to rename it); model + optimizer layouts become 'model' "
    "and 'optimizer', so CheckpointService.restore(abstract_target(...)) loads them strictly. "
    "The step keeps the source's step number and metrics; the step's metadata names the "
    "source. SRC is only read. Run it under `distckpt launch` or on every host of a job to "
    "read the arrays sharded over all processes. WARNING: a pickle file is read only with "
    "--allow-pickle, because unpickling executes code stored in the file: allow it only for "
    "files you trust.")


def cmd_import(args: argparse.Namespace) -> int:
    def fail(message: str, code: int = 1) -> int:
        print(f"distckpt import: error: {message}", file=sys.stderr)
        return code

    if args.step is not None and args.step < 0:
        return fail(f"--step {args.step}: give a step number >= 0", 2)
    if not args.item or "/" in args.item:
        return fail(f"--item {args.item!r}: give a non-empty item name without '/'", 2)

    import jax

    from distckpt.errors import CheckpointError
    from distckpt.multihost import coordinator
    from distckpt.multihost.coordinator import DecisionFailedError
    from distckpt.storage import warm
    from distckpt.tools.importer import import_checkpoint

    warm(args.dst)  # an s3:// destination's packages load while the hosts connect
    coordinator.initialize()
    held = _HeldStderr()
    try:
        report = import_checkpoint(args.src, args.dst, step=args.step, item=args.item,
                                   allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    except (CheckpointError, DecisionFailedError, ValueError, OSError) as e:
        text = str(e).strip().splitlines()
        held.drop(f"distckpt import: error: {text[0] if text else type(e).__name__}")
        return 1
    except BaseException:
        held.release()
        raise
    held.release()
    if args.json:
        payload = {"process": jax.process_index(), **report.to_json()}
        print(json.dumps(payload, indent=2 if jax.process_count() == 1 else None), flush=True)
    elif coordinator.is_primary():
        _print(report.to_json())
    return 0


class _HeldStderr:
    """Hold what is written to stderr (file descriptor 2) while an import runs.

    When Orbax fails to read a damaged checkpoint, TensorStore's callbacks may still fire
    after Orbax closed its event loop and print "RuntimeError: Event loop is closed"
    tracebacks, during the import or as the process exits. A refused import prints one
    line: `drop` discards what was held and keeps stderr silenced until exit (the line
    goes to the original stderr); `release` puts stderr back and replays what was held.
    """

    def __init__(self) -> None:
        import tempfile

        sys.stderr.flush()
        self._saved = os.dup(2)
        self._held = tempfile.TemporaryFile()
        os.dup2(self._held.fileno(), 2)

    def release(self) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        self._held.seek(0)
        sys.stderr.buffer.write(self._held.read())
        sys.stderr.flush()
        self._held.close()

    def drop(self, line: str) -> None:
        """Write `line` to the original stderr; discard the rest, now and until exit."""
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        self._held.close()
        os.write(self._saved, (line + "\n").encode())


def _print(r: dict[str, Any]) -> None:
    items = ", ".join(f"{name} ({n} arrays, from {r['kinds'][name]})"
                      for name, n in r["items"].items())
    print(f"imported {r['source']}: {r['description']}")
    print(f"  into {r['destination']} step {r['step']}: {items}; {r['arrays']} arrays, "
          f"{r['bytes']:,} bytes")
    if r["metrics"]:
        print(f"  metrics: {r['metrics']}")
    if r["metadata"]:
        print(f"  kept as metadata (imported_from.values): {r['metadata']}")
    if r["unmapped"]:
        print(f"  NOT imported ({len(r['unmapped'])} arrays that map to no item): "
              + ", ".join(r["unmapped"]))
    print(f"  restore with CheckpointService({r['destination']!r}).restore("
          "distckpt.abstract_target(factory, mesh))")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("import", help="import a plain Orbax checkpoint (or a pickle file, "
                       "with --allow-pickle) as a distckpt step", description=DESCRIPTION)
    p.add_argument("src", metavar="SRC", help="the checkpoint to import (never modified)")
    p.add_argument("dst", metavar="DST", help="distckpt checkpoint directory to write into "
                   "(new, or an existing distckpt directory)")
    p.add_argument("--step", type=int, help="the CheckpointManager step to import (default: "
                   "its newest) and the step number in DST (default: the source's own, else 0)")
    p.add_argument("--item", default="model",
                   help="item name for a single model's tree (default %(default)s)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pickle file; unpickling EXECUTES CODE stored in the file, so "
                   "give this only for files you trust")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the step in DST if it already exists")
    p.add_argument("--json", action="store_true",
                   help="print the import report as JSON (every process prints its own)")
    p.set_defaults(func=cmd_import)  # one-line argument errors: tools.cli.OneLineParser
