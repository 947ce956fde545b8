"""The figures of a `distckpt bench` report, from its workers' per-process records.

:func:`aggregate` turns one job's records into per-contender figures (each repetition's
figure is its slowest process's, figures are medians of the timed repetitions);
:func:`add_ratios` compares each contender with raw and plain Orbax
(:func:`reference_names`), one memcpy of the shard bytes and its own figures;
:func:`targets` checks distckpt against the performance targets (:data:`TARGETS`; on ``s3://``
:data:`S3_TARGETS`, where raw is PUT and GET of the same bytes); :func:`policy_summary`
gives the Young/Daly interval for the measured cost and an MTBF. All of it works on the
JSON-ready dicts of the report (:mod:`distckpt.bench.harness` builds it,
:mod:`distckpt.bench.report` renders it).
"""

from __future__ import annotations

import statistics
from typing import Any

from distckpt.bench.names import parse_contender

GiB = float(2**30)
MiB = float(2**20)

# The performance targets (docs/benchmarks.md); "ratio" names a key of a contender's ratios.
TARGETS: tuple[dict[str, Any], ...] = (
    {"name": "save throughput vs raw write+fsync", "ratio": "save_vs_raw", "op": ">=",
     "threshold": 0.8},
    {"name": "save throughput vs plain Orbax", "ratio": "save_vs_orbax", "op": ">=",
     "threshold": 1.5},
    {"name": "restore throughput vs raw read of the same files", "ratio": "restore_vs_files",
     "op": ">=", "threshold": 0.7},
    {"name": "restore throughput vs plain Orbax", "ratio": "restore_vs_orbax", "op": ">=",
     "threshold": 1.5},
    {"name": "restore onto another topology / same topology (time)",
     "ratio": "cross_vs_same", "op": "<=", "threshold": 1.2},
    {"name": "save() stall / one memcpy of the shard bytes", "ratio": "stall_vs_memcpy",
     "op": "<=", "threshold": 1.5},
    {"name": "save() stall / plain Orbax's stall", "ratio": "stall_vs_orbax", "op": "<=",
     "threshold": 1.0},
    {"name": "extra peak RSS during save / shard bytes", "ratio": "save_rss", "op": "<=",
     "threshold": 1.2},
    {"name": "peak extra RSS during restore / shard bytes (restored arrays included)",
     "ratio": "restore_rss", "op": "<=", "threshold": 1.2},
    {"name": "RSS growth per save over consecutive saves (MiB)", "ratio": "rss_growth_mib_per_save",
     "op": "<=", "threshold": 1.0},
    {"name": "training step-time inflation, saving every step", "ratio": "train_inflation",
     "op": "<=", "threshold": 0.05},
    {"name": "replicated state: bytes read from storage on restore / unique bytes",
     "ratio": "restore_read_vs_unique", "op": "<=", "threshold": 1.01, "replicated": True},
)
"""A target with ``replicated`` is checked only on topologies whose state is replicated
(``--data-parallel`` > 1)."""


# Object storage has no thresholds of its own: the same ones, with raw being PUT/GET.
S3_TARGETS: tuple[dict[str, Any], ...] = (
    {"name": "save throughput vs raw PUT of the same bytes", "ratio": "save_vs_raw",
     "op": ">=", "threshold": 0.8},
    {"name": "restore throughput vs raw GET of the same bytes", "ratio": "restore_vs_raw",
     "op": ">=", "threshold": 0.7},
    {"name": "restore throughput vs raw GET of its own objects", "ratio": "restore_vs_files",
     "op": ">=", "threshold": 0.7},
    *(t for t in TARGETS if t["ratio"] not in ("save_vs_raw", "restore_vs_files")),
)


def targets_for(scheme: str) -> tuple[dict[str, Any], ...]:
    """The targets for storage `scheme` ('file' or 's3')."""
    return S3_TARGETS if scheme == "s3" else TARGETS


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def rss_slope(after: list[float]) -> float:
    """Bytes of RSS growth per save: the least-squares slope of the RSS after each save,
    from the 2nd save on (the first allocates what later saves reuse; the allocator's
    ups and downs make the end points alone too noisy).

    >>> rss_slope([100, 10, 12, 14, 16])
    2.0
    """
    ys = after[1:]
    if len(ys) < 2:
        return 0.0
    return statistics.linear_regression(range(len(ys)), ys).slope


def aggregate(records: list[dict[str, Any]], contenders: list[str]) -> dict[str, Any]:
    """Per-contender figures of one job from its processes' records.

    Each repetition's time is its slowest process's; RSS ratios are the largest
    process's; figures are medians over the timed repetitions.
    """
    records = sorted(records, key=lambda r: r["process"])
    first = records[0]
    total = first["total_bytes"]
    shard = max(r["shard_bytes"] for r in records)
    out: dict[str, Any] = {
        "processes": len(records), "total_bytes": total, "leaves": first["leaves"],
        "shapes": first["shapes"], "shard_bytes_per_process": shard,
        "memcpy_s": max(r["memcpy_s"] for r in records),
        "memcpy_alloc_s": max(r["memcpy_alloc_s"] for r in records),
        "phase_s": records[0].get("phase_s", {}),
        "distinct_shapes": {k: first["distinct_shapes"][k] for k in ("leaves", "bytes")}
        if first.get("distinct_shapes") else None,
        "contenders": {},
    }
    shard_of = {r["process"]: r["shard_bytes"] for r in records}
    by_rep: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        for row in r["reps"]:
            by_rep.setdefault((row["contender"], row["rep"]), []).append(
                {**row, "process": r["process"]})

    for name in contenders:
        reps = sorted(rep for (c, rep) in by_rep if c == name)
        timed = [rep for rep in reps if not by_rep[(name, rep)][0]["warmup"]]
        series: dict[str, list[float]] = {}

        def worst(rows, key):
            vals = [row.get(key) for row in rows]
            return None if any(v is None for v in vals) else max(vals)

        def total_of(rows, key):
            vals = [row.get(key) for row in rows]
            return None if any(v is None for v in vals) else sum(vals)

        def rss_ratio(rows, base, peak):
            if any(row.get(peak) is None for row in rows):
                return None
            return max((row[peak] - row[base]) / shard_of[row["process"]] for row in rows)

        for rep in timed:
            rows = by_rep[(name, rep)]
            for key in ("stall_s", "commit_s", "restore_s", "raw_read_files_s",
                        "cross_restore_s"):
                series.setdefault(key, []).append(worst(rows, key))
            series.setdefault("save_rss", []).append(
                rss_ratio(rows, "save_rss_base", "save_rss_peak"))
            series.setdefault("restore_rss", []).append(
                rss_ratio(rows, "restore_rss_base", "restore_rss_peak"))
            series.setdefault("cross_restore_rss", []).append(
                rss_ratio(rows, "cross_restore_rss_base", "cross_restore_rss_peak"))
            for key in ("restore_read_bytes", "restore_disk_read_bytes"):
                series.setdefault(key, []).append(total_of(rows, key))
            series.setdefault("files_bytes", []).append(rows[0]["files_bytes"])
            series.setdefault("files", []).append(rows[0]["files"])
        fig: dict[str, Any] = {key: _median(vals) for key, vals in series.items()}
        fig["reps"] = {key: vals for key, vals in series.items()}
        fig["save_gibps"] = _div(total / GiB, fig.get("commit_s"))
        fig["restore_gibps"] = _div(total / GiB, fig.get("restore_s"))
        fig["raw_read_files_gibps"] = _div((fig.get("files_bytes") or 0) / GiB,
                                           fig.get("raw_read_files_s"))
        fig["cross_restore_gibps"] = _div(total / GiB, fig.get("cross_restore_s"))
        fig["unique_bytes"] = fig.get("files_bytes")
        shapes = [r.get("distinct_shapes", {}).get(name) for r in records]
        if all(shapes):
            for key in shapes[0]:
                fig[f"shapes_{key}"] = max(s[key] for s in shapes)
        growth = [r["rss_growth"].get(name) for r in records]
        if all(g for g in growth):
            fig["rss_growth_bytes_per_save"] = max(rss_slope(g) for g in growth)
            fig["rss_after_saves"] = [g for g in growth]
        train = [r["train"].get("seconds_per_step", {}) for r in records]
        if all(name in t for t in train) and all("none" in t for t in train):
            rounds = len(train[0][name])
            per_round = [max(t[name][i] for t in train) for i in range(rounds)]
            base = [max(t["none"][i] for t in train) for i in range(rounds)]
            fig["train_step_s"] = _median(per_round)
            fig["train_inflation"] = _median([a / b - 1.0 for a, b in
                                              zip(per_round, base, strict=True)])
            out["train_step_s_no_save"] = _median(base)
            out["train_state_bytes"] = records[0]["train"].get("state_bytes")
        out["contenders"][name] = fig
    return out


def reference_names(contenders: list[str]) -> dict[str, str | None]:
    """The contenders the ratios compare against: raw, plain (option-less) orbax, distckpt."""
    def first(kind: str, plain: bool) -> str | None:
        for c in contenders:
            k, opts = parse_contender(c)
            if k == kind and (not plain or not opts):
                return c
        return None

    return {"raw": first("raw", False), "orbax": first("orbax", True),
            "distckpt": first("distckpt", False)}


def add_ratios(topo: dict[str, Any], contenders: list[str]) -> None:
    """Each contender's ratios against raw, plain Orbax, memcpy and its own figures."""
    ref = reference_names(contenders)
    figs = topo["contenders"]
    raw = figs.get(ref["raw"]) if ref["raw"] else None
    orbax = figs.get(ref["orbax"]) if ref["orbax"] else None
    for _name, fig in figs.items():
        ratios = {
            "save_vs_raw": _div(fig.get("save_gibps"), raw and raw.get("save_gibps")),
            "save_vs_orbax": _div(fig.get("save_gibps"), orbax and orbax.get("save_gibps")),
            "restore_vs_files": _div(fig.get("restore_gibps"), fig.get("raw_read_files_gibps")),
            "restore_vs_raw": _div(fig.get("restore_gibps"), raw and raw.get("restore_gibps")),
            "restore_vs_orbax": _div(fig.get("restore_gibps"),
                                     orbax and orbax.get("restore_gibps")),
            "cross_vs_same": _div(fig.get("cross_restore_s"), fig.get("restore_s")),
            "stall_vs_memcpy": _div(fig.get("stall_s"), topo["memcpy_s"]),
            "stall_vs_orbax": _div(fig.get("stall_s"), orbax and orbax.get("stall_s")),
            "save_rss": fig.get("save_rss"),
            "restore_rss": fig.get("restore_rss"),
            "rss_growth_mib_per_save": (None if fig.get("rss_growth_bytes_per_save") is None
                                        else fig["rss_growth_bytes_per_save"] / MiB),
            "train_inflation": fig.get("train_inflation"),
            "restore_read_vs_unique": _div(fig.get("restore_read_bytes"),
                                           fig.get("unique_bytes")),
            "restore_disk_read_vs_unique": _div(fig.get("restore_disk_read_bytes"),
                                                fig.get("unique_bytes")),
            "shapes_first_stall_vs_second": _div(fig.get("shapes_first_stall_s"),
                                                 fig.get("shapes_second_stall_s")),
        }
        fig["ratios"] = ratios


def storage_scheme(report: dict[str, Any]) -> str:
    """'file' or 's3' (reports from before s3:// support have no 'storage': 'file')."""
    return report.get("storage", {}).get("scheme", "file")


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance targets, checked for distckpt on every topology that measured them.

    `margin` is how far the ratio is on the good side of the threshold, relative to it
    (0.25: 25% better than needed; negative: missed by that much).
    """
    name = report["references"]["distckpt"]
    rows: list[dict[str, Any]] = []
    if name is None:
        return rows
    for label, topo in report["topologies"].items():
        ratios = topo["contenders"][name]["ratios"]
        for t in targets_for(storage_scheme(report)):
            value = ratios.get(t["ratio"])
            if value is None or (t.get("replicated") and topo.get("data_parallel", 1) <= 1):
                continue
            thr = t["threshold"]
            met = value >= thr if t["op"] == ">=" else value <= thr
            if t["op"] == ">=":
                margin = value / thr - 1.0
            elif thr > 0:
                margin = 1.0 - value / thr
            else:
                margin = -value
            rows.append({"target": t["name"], "ratio": t["ratio"], "topology": label,
                         "value": value, "op": t["op"], "threshold": thr, "met": met,
                         "margin": margin})
    return rows


def policy_summary(report: dict[str, Any], mtbf_s: float) -> dict[str, Any] | None:
    """Young/Daly interval from distckpt's measured cost of a save, on the topology that
    also measured the training step (else the largest), with the expected time lost."""
    from distckpt.checkpoint.policy import expected_loss_fraction, young_daly_interval

    name = report["references"]["distckpt"]
    if name is None or not report["topologies"]:
        return None
    label, topo = max(report["topologies"].items(),
                      key=lambda kv: (kv[1].get("train_step_s_no_save") is not None,
                                      kv[1]["processes"]))
    fig = topo["contenders"][name]
    if fig.get("commit_s") is None:
        return None
    # commit_s counts from the start of save() until committed: stall + background commit.
    cost = fig["commit_s"]
    interval = young_daly_interval(cost, mtbf_s)
    out = {"topology": label, "cost_s": cost, "stall_s": fig.get("stall_s"), "mtbf_s": mtbf_s,
           "interval_s": interval,
           "expected_loss_fraction": expected_loss_fraction(interval, cost, mtbf_s)}
    step_s = topo.get("train_step_s_no_save")
    if step_s:
        out["train_step_s"] = step_s
        out["interval_steps"] = max(1, round(interval / step_s))
        out["every_step_loss_fraction"] = expected_loss_fraction(step_s, cost, mtbf_s)
    return out
