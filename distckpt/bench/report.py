"""Render a `distckpt bench` report: terminal tables, Markdown for docs/benchmarks.md, a PNG chart.

The chart needs matplotlib (``pip install 'distckpt[bench]'``); without it
:func:`write_chart` says so and returns False, and everything else still works.

A report on ``s3://`` renames the figures that are about files (objects instead), adds the
line that compares each contender with raw PUT/GET of the same bytes, shows a contender
that failed (plain Orbax there) as a column saying "fails", and prints the report's notes.
A report from ``--platform gpu``/``tpu`` names the platform and devices in each caption.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from distckpt.bench.figures import MiB, storage_scheme, targets_for

README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 0.01:
        return f"{x * 1000:.2f} ms"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _g(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"  # object stores: 0.015 GiB/s, not 0.01


def _mibps(gibps: float | None) -> str:
    return "-" if gibps is None else f"{gibps * 1024:.1f} MiB/s"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


def _read_vs_unique(f: dict[str, Any]) -> str:
    """'128 MiB / 64 MiB (2.00x)': bytes read on restore (all processes) / unique bytes."""
    read, unique = f.get("restore_read_bytes"), f.get("unique_bytes")
    if read is None or unique is None:
        return "-"
    ratio = f.get("ratios", {}).get("restore_read_vs_unique")
    return f"{_mib(read)} / {_mib(unique)}" + (f" ({_x(ratio)})" if ratio is not None else "")


def _first_second(f: dict[str, Any], key: str) -> str:
    first, second = f.get(f"shapes_first_{key}"), f.get(f"shapes_second_{key}")
    return "-" if first is None else f"{_s(first)} / {_s(second)}"


FIGURES = (
    ("save() stall", lambda f: _s(f.get("stall_s"))),
    ("save to committed", lambda f: _s(f.get("commit_s"))),
    ("save GiB/s", lambda f: _g(f.get("save_gibps"))),
    ("restore GiB/s (same topology)", lambda f: _g(f.get("restore_gibps"))),
    ("raw read of its files GiB/s", lambda f: _g(f.get("raw_read_files_gibps"))),
    ("restore from the other topology", lambda f: (
        "-" if f.get("cross_restore_s") is None
        else f"{_s(f['cross_restore_s'])} ({_g(f.get('cross_restore_gibps'))} GiB/s)")),
    ("peak extra RSS, save (x shard bytes)", lambda f: _x(f.get("save_rss"))),
    ("peak extra RSS, restore (x shard bytes)", lambda f: _x(f.get("restore_rss"))),
    ("RSS growth per save", lambda f: (
        "-" if f.get("rss_growth_bytes_per_save") is None
        else f"{f['rss_growth_bytes_per_save'] / MiB:.2f} MiB")),
    ("train step, saving every step", lambda f: (
        "-" if f.get("train_step_s") is None
        else f"{_s(f['train_step_s'])} ({_pct(f.get('train_inflation'))})")),
    ("files on disk", lambda f: (
        "-" if f.get("files_bytes") is None
        else f"{f['files']:.0f} / {_mib(f['files_bytes'])}")),
    ("bytes read on restore / unique bytes", lambda f: _read_vs_unique(f)),
    ("disk reads on restore (shared page cache)",
     lambda f: _mib(f.get("restore_disk_read_bytes"))),
    ("save() stall, distinct shapes: 1st / 2nd", lambda f: _first_second(f, "stall_s")),
    ("to committed, distinct shapes: 1st / 2nd", lambda f: _first_second(f, "commit_s")),
    ("restore, distinct shapes: 1st / 2nd", lambda f: _first_second(f, "restore_s")),
)


S3_HEADS = {"raw read of its files GiB/s": "raw GET of its objects GiB/s",
            "files on disk": "objects in the step"}
"""FIGURES rows renamed on s3://."""
FAILED_CELLS = {"save to committed": "fails"}
"""What a failed contender's column shows (its error is in the notes); '-' elsewhere."""


def figures(report: dict[str, Any]) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    """FIGURES, with the rows about files renamed for object storage."""
    if storage_scheme(report) != "s3":
        return list(FIGURES)
    return [(S3_HEADS.get(head, head), fn) for head, fn in FIGURES]


def columns(report: dict[str, Any], topo: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(contender, one cell per figure row) of a topology's table: the measured contenders,
    then those that failed (report['failed'])."""
    rows = figures(report)
    cells = {name: [fn(fig) for _, fn in rows] for name, fig in topo["contenders"].items()}
    for name in report.get("failed") or {}:
        cells[name] = [FAILED_CELLS.get(head, "-") for head, _ in FIGURES]
    order = report.get("config", {}).get("contenders") or list(cells)
    return [(name, cells[name]) for name in order if name in cells]


def vs_raw_line(report: dict[str, Any], topo: dict[str, Any]) -> str | None:
    """On s3://: each contender's save and restore throughput over raw PUT and GET of the
    same bytes on the same server; None elsewhere or without raw."""
    raw = report["references"].get("raw")
    if storage_scheme(report) != "s3" or raw is None:
        return None
    parts = [f"`{name}` save {_x(fig['ratios'].get('save_vs_raw'))}, restore "
             f"{_x(fig['ratios'].get('restore_vs_raw'))}"
             for name, fig in topo["contenders"].items() if name != raw]
    if not parts:
        return None
    put, get = topo["contenders"][raw].get("save_gibps"), topo["contenders"][raw].get(
        "restore_gibps")
    return (f"vs raw PUT/GET of the same bytes on the same server (PUT {_mibps(put)}, "
            f"GET {_mibps(get)}): " + "; ".join(parts))


def topology_caption(label: str, topo: dict[str, Any]) -> str:
    platform = topo.get("platform", "cpu")
    if platform != "cpu":
        where = (f"{label}: one process over {topo['devices_per_host']} {platform} devices"
                 f" ({topo.get('device_kind') or '?'})")
    else:
        where = f"{label}: {topo['hosts']} hosts x {topo['devices_per_host']} devices"
    line = (f"{where}, mesh "
            f"{topo['mesh']}; state {_mib(topo['total_bytes'])} in {topo['leaves']} leaves, "
            f"{_mib(topo['shard_bytes_per_process'])} per process; memcpy of those "
            f"{_s(topo['memcpy_s'])} (into fresh buffers {_s(topo['memcpy_alloc_s'])})")
    if topo.get("train_step_s_no_save") is not None:
        line += (f"; training step without saving {_s(topo['train_step_s_no_save'])} "
                 f"(state {_mib(topo.get('train_state_bytes'))})")
    if topo.get("cross_from"):
        line += f"; other topology = checkpoints saved by {topo['cross_from']}"
    if topo.get("distinct_shapes"):
        shapes = topo["distinct_shapes"]
        line += (f"; distinct shapes = {shapes['leaves']} leaves of distinct shapes "
                 f"({_mib(shapes['bytes'])}, new shapes for each contender), its 1st and 2nd "
                 "save/restore")
    return line


def _target_value(row: dict[str, Any]) -> str:
    if row["ratio"] == "train_inflation":
        return _pct(row["value"])
    if row["ratio"] == "rss_growth_mib_per_save":
        return f"{row['value']:.2f} MiB"
    return _x(row["value"])


def _target_threshold(row: dict[str, Any]) -> str:
    if row["ratio"] == "train_inflation":
        return f"{row['op']} {100 * row['threshold']:.0f}%"
    if row["ratio"] == "rss_growth_mib_per_save":
        return f"{row['op']} {row['threshold']:g} MiB"
    return f"{row['op']} {row['threshold']:g}x"


def margin_text(row: dict[str, Any]) -> str:
    """'+59% to spare', '3.2x short', '1252x over', '-44 points'."""
    value, thr = row["value"], row["threshold"]
    if row["ratio"] == "train_inflation":
        return f"{100 * (thr - value):+.0f} points"
    if row["met"]:
        return f"{100 * row['margin']:.0f}% to spare"
    if row["op"] == ">=":
        return f"{thr / value:.2f}x short" if value > 0 else "nothing measured"
    return f"{value / thr:.2f}x over" if thr > 0 else f"{value:.2f} over"


def policy_line(policy: dict[str, Any] | None) -> str:
    if not policy:
        return "Young/Daly: no distckpt save cost measured"
    line = (f"Young/Daly: save cost {_s(policy['cost_s'])} (stall + commit, {policy['topology']})"
            f", MTBF {policy['mtbf_s'] / 3600:g} h -> save every {policy['interval_s']:.0f} s")
    if policy.get("interval_steps") is not None:
        line += f" (~{policy['interval_steps']} training steps of {_s(policy['train_step_s'])})"
    line += (f"; expected time lost to saving + re-done work "
             f"{100 * policy['expected_loss_fraction']:.2f}%")
    if policy.get("every_step_loss_fraction") is not None:
        line += f" (saving every step: {100 * policy['every_step_loss_fraction']:.1f}%)"
    return line


def storage_text(report: dict[str, Any]) -> str:
    """'ext4 on /dev/sda1', or 'S3 s3://b/p at http://... (private SeaweedFS ...)'."""
    if storage_scheme(report) == "s3":
        st = report["storage"]
        text = f"S3 {st.get('url')} at {st.get('endpoint') or 'AWS'}"
        return text + (f" ({report['s3_server']})" if report.get("s3_server") else "")
    fs = report.get("filesystem", {})
    return f"{fs.get('type', '?')} on {fs.get('device', '?')}"


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    mem = m.get("memory_bytes")
    v = m.get("versions", {})
    return (f"{m.get('cpu', '?')}, {m.get('cores')} cores, "
            f"{'?' if mem is None else f'{mem / 2**30:.0f} GiB'} RAM, {storage_text(report)}"
            f"; {m.get('platform')}; Python {m.get('python')}, jax "
            f"{v.get('jax')}, orbax-checkpoint {v.get('orbax-checkpoint')}, tensorstore "
            f"{v.get('tensorstore')}; load average at start/end "
            f"{report['load_average_start'][0]:.1f}/{report['load_average_end'][0]:.1f}")


# --------------------------------------------------------------------------- terminal
def print_report(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    for label, topo in report["topologies"].items():
        table = Table(title=topology_caption(label, topo), title_justify="left",
                      header_style="bold")
        table.add_column("figure")
        cols = columns(report, topo)
        for name, _ in cols:
            table.add_column(name, justify="right")
        for i, (head, _) in enumerate(figures(report)):
            table.add_row(head, *(cells[i] for _, cells in cols))
        console.print(table)
        if line := vs_raw_line(report, topo):
            console.print(line)
    for note in report.get("notes") or []:
        console.print(f"note: {note}", markup=False)
    rows = report.get("targets") or []
    if rows:
        table = Table(title=f"targets ({report['references']['distckpt']})",
                      title_justify="left", header_style="bold")
        for head in ("target", "topology", "measured", "needed", "met", "margin"):
            table.add_column(head)
        for row in rows:
            table.add_row(row["target"], row["topology"], _target_value(row),
                          _target_threshold(row),
                          "[green]yes[/green]" if row["met"] else "[red]no[/red]",
                          margin_text(row))
        console.print(table)
    console.print(policy_line(report.get("policy")))
    console.print(f"machine: {machine_line(report)}", markup=False)


# --------------------------------------------------------------------------- markdown
def markdown(report: dict[str, Any], command: str) -> str:
    """The README's benchmark section body (between README_BEGIN and README_END)."""
    out = [f"Measured by `{command}` ({report['elapsed_s'] / 60:.1f} min) on: "
           f"{machine_line(report)}.", ""]
    for label, topo in report["topologies"].items():
        cols = columns(report, topo)
        out.append(f"**{topology_caption(label, topo)}**")
        out.append("")
        out.append("| figure | " + " | ".join(f"`{n}`" for n, _ in cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        for i, (head, _) in enumerate(figures(report)):
            out.append(f"| {head} | " + " | ".join(cells[i] for _, cells in cols) + " |")
        out.append("")
        if line := vs_raw_line(report, topo):
            out += [line + ".", ""]
    for note in report.get("notes") or []:
        out += [f"Note: {note}.", ""]
    rows = report.get("targets") or []
    if rows:
        out.append(f"Targets for `{report['references']['distckpt']}`:")
        out.append("")
        out.append("| target | topology | measured | needed | met | margin |")
        out.append("|---|---|---:|---:|---|---|")
        for row in rows:
            out.append(f"| {row['target']} | {row['topology']} | {_target_value(row)} | "
                       f"{_target_threshold(row)} | {'yes' if row['met'] else '**no**'} | "
                       f"{margin_text(row)} |")
        out.append("")
    out.append(policy_line(report.get("policy")) + ".")
    return "\n".join(out)


def markers(section: str = "") -> tuple[str, str]:
    """The README markers of a section: ``<!-- bench:begin -->`` or, named,
    ``<!-- bench:NAME:begin -->`` (and ``...:end -->``)."""
    if not section:
        return README_BEGIN, README_END
    return f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"


def replace_section(text: str, body: str, section: str = "") -> str:
    """`text` with the part between the section's markers replaced by `body`."""
    begin, end = markers(section)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {begin} ... {end} markers in that file")
    return pattern.sub(lambda _m: f"{begin}\n{body}\n{end}", text, count=1)


# --------------------------------------------------------------------------- chart
def write_chart(report: dict[str, Any], path: str) -> bool:
    """A PNG with one panel per target: each contender's ratio on each topology, coloured
    by whether it meets the threshold (dashed line). Raw (the limit itself) and a
    contender's comparison with itself are left out.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    refs = report["references"]
    panels = []
    for t in targets_for(storage_scheme(report)):
        bars = []
        for label, topo in report["topologies"].items():
            if t.get("replicated") and topo.get("data_parallel", 1) <= 1:
                continue
            for name, fig in topo["contenders"].items():
                if name == refs.get("raw"):
                    continue
                if t["ratio"].endswith("_vs_orbax") and name == refs.get("orbax"):
                    continue
                value = fig.get("ratios", {}).get(t["ratio"])
                if value is not None:
                    met = value >= t["threshold"] if t["op"] == ">=" else value <= t["threshold"]
                    bars.append((f"{label} {name}", value, met, name == refs.get("distckpt")))
        if bars:
            panels.append((t, bars))
    if not panels:
        return False
    height = sum(0.45 + 0.22 * len(bars) for _, bars in panels) + 0.8
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, height), squeeze=False,
                             gridspec_kw={"height_ratios": [len(b) + 1 for _, b in panels]})
    for ax, (t, bars) in zip(axes[:, 0], panels, strict=True):
        ys = list(range(len(bars)))[::-1]
        vals = [b[1] for b in bars]
        for y, (_, v, met, ours) in zip(ys, bars, strict=True):
            ax.barh([y], [v], color="tab:green" if met else "tab:red", height=0.7,
                    alpha=1.0 if ours else 0.45)
        ax.axvline(t["threshold"], color="black", linestyle="--", linewidth=1)
        ax.set_yticks(ys, [b[0] for b in bars])
        positive = [v for v in vals if v > 0]
        if len(positive) == len(vals) and \
                max(positive + [t["threshold"]]) / min(positive + [t["threshold"]]) > 30:
            ax.set_xscale("log")
        else:
            ax.set_xlim(min(0.0, *vals), max(*vals, t["threshold"]) * 1.3)
        for y, v in zip(ys, vals, strict=True):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
        ax.set_title(f"{t['name']} (need {t['op']} {t['threshold']:g})", fontsize=9,
                     loc="left")
        ax.tick_params(labelsize=7)
    fig.suptitle("distckpt bench: ratios vs targets (green met, red missed, dashed = "
                 f"threshold; solid = {refs.get('distckpt')}, pale = others)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
