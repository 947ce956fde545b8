"""Run `distckpt bench` and put its table into docs/benchmarks.md.

    python benchmarks/checkpoint_bench.py --json bench.json --readme docs/benchmarks.md [bench flags]
    python benchmarks/checkpoint_bench.py --from-json bench.json --readme docs/benchmarks.md

The section is the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``
(``--section big``: ``<!-- bench:big:begin -->`` ... ``<!-- bench:big:end -->``); everything
else in the file is left as it is. With ``--from-json`` nothing is run: the
section is rendered again from a saved report (e.g. after editing the renderer). Every other
flag goes to ``distckpt bench`` (see ``distckpt bench --help``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from distckpt.bench import report as bench_report
    from distckpt.tools import cli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", help="Markdown file to update between the bench markers (docs/benchmarks.md)")
    parser.add_argument("--section", default="",
                        help="named section: markers <!-- bench:NAME:begin/end --> (default: "
                        "<!-- bench:begin/end -->)")
    parser.add_argument("--from-json", metavar="PATH",
                        help="render this saved report instead of running the benchmark")
    parser.add_argument("--json", metavar="PATH", default="bench.json",
                        help="where the report goes (default %(default)s)")
    args, rest = parser.parse_known_args(argv)
    if args.from_json:
        report_path = Path(args.from_json)
    else:
        report_path = Path(args.json)
        code = cli.main(["bench", *rest, "--json", str(report_path)])
        if code != 0:
            return code
    report = json.loads(report_path.read_text())
    body = bench_report.markdown(report, report.get("command") or "distckpt bench")
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(bench_report.replace_section(readme.read_text(), body, args.section))
        print(f"updated {readme}")
    else:
        print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
