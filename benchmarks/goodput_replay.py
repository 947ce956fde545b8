"""Re-derive a `distckpt goodput` run's costs from its logs with the current cost model.

    python benchmarks/goodput_replay.py DIR [--json DIR.json]

`DIR` is the run's ``--dir`` (it keeps ``persistent.log`` and ``multi.log``); the JSON is
its ``--json`` report (default ``DIR.json``), which holds the plan, the costs and the
ETTRs as the run computed them. For each configuration, printed side by side: the save
costs calibration job A gives now against the ones the run's own attempts give (the
measured costs the *predicted* column uses), the ETTR predicted from them, and the
intervals a plan would now choose. Nothing is run; the logs are only read. Use it to check
a change of :mod:`distckpt.tools.goodput_report` against runs already on record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

LAUNCH = re.compile(r"^\[goodput\] launch at ([\d.]+)")
KILL = re.compile(r"^\[goodput\] SIGKILL host (\d+) at ([\d.]+)")
HOST0 = "[host 0] "  # the launcher's prefix of host 0's lines (its progress lines)


def attempts(log: Path) -> list:
    """The log's launches as Attempts (the first two are calibration jobs A and B)."""
    from distckpt.tools.goodput import PROGRESS
    from distckpt.tools.goodput_report import Attempt

    out: list[Attempt] = []
    for line in log.read_text().splitlines():
        if match := LAUNCH.match(line):
            out.append(Attempt(launched=float(match.group(1))))
        elif out and (match := KILL.match(line)):
            out[-1].killed = (float(match.group(2)), int(match.group(1)))
        elif out and line.startswith(HOST0) and (match := PROGRESS.match(line[len(HOST0):])):
            out[-1].events.append(json.loads(match.group(1)))
    return out


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from distckpt.tools import goodput_model as model
    from distckpt.tools.goodput import CAL_LOCAL_EVERY, CAL_SAVE_EVERY
    from distckpt.tools.goodput_report import measured_costs, step_costs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="the run's --dir (holds persistent.log, multi.log)")
    ap.add_argument("--json", type=Path, help="the run's --json report (default DIR.json)")
    args = ap.parse_args()
    report_path = args.json or args.dir.with_suffix(".json")
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as e:
        print(f"goodput_replay: cannot read the report {report_path}: {e}", file=sys.stderr)
        return 2
    for run in report["runs"]:
        log = args.dir / f"{run['name']}.log"
        if not log.is_file():
            print(f"goodput_replay: {log} is missing; give the run's --dir", file=sys.stderr)
            return 2
        found = attempts(log)
        plan = model.Plan(**run["plan"])
        local = plan.local_every is not None
        cal_got = step_costs(found[:1], CAL_SAVE_EVERY,
                             CAL_LOCAL_EVERY if local else None)
        calibrated = model.Costs(**run["calibration"])
        recal = dataclasses.replace(calibrated, cost_s=cal_got["cost_s"],
                                    local_cost_s=cal_got["local_cost_s"] if local else None)
        measured = measured_costs(found[2:], plan, calibrated)
        replan = model.plan(recal, plan.mtbf_s, plan.duration_s, local=local)

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        print(f"{run['name']}: ETTR {run['ettr']:.3f}; predicted {run['ettr_predicted']:.3f} "
              f"as run, {model.predict(measured, plan):.3f} now")
        print(f"  save cost: calibration {f(recal.cost_s)} (as run {f(calibrated.cost_s)}), "
              f"run {f(measured.cost_s)} (as run {f(run['measured']['cost_s'])})")
        if local:
            print(f"  local save cost: calibration {f(recal.local_cost_s)} (as run "
                  f"{f(calibrated.local_cost_s)}), run {f(measured.local_cost_s)} (as run "
                  f"{f(run['measured']['local_cost_s'])})")
        print(f"  plan now: save every {replan.save_every}"
              + (f", local every {replan.local_every}" if local else "")
              + f" (as run: {plan.save_every}"
              + (f", {plan.local_every})" if local else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
