"""The ranking benchmark's Markdown report and plot, from its JSON document alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench import machine_limit
from bench.ranking_workload import CANDIDATES, CONTEXT_FEATURES, FORMATS, P99_BOUND_MS, PAIRS

# MLPerf Inference v5.0, DLRM-v2 server scenario, Intel's result on one Xeon 6980P socket (128 cores).
MLPERF_ANCHOR: dict[str, Any] = {
    "queries_per_s": 9100,
    "cores": 128,
    "model": "DLRM-v2 (DCNv2 interaction, 26 multi-hot tables, dim 128, about 100 GB)",
}


def share_of_limit(document: dict[str, Any], fmt: str, candidates_per_s: float, threads: int) -> str:
    """``candidates_per_s`` of ``fmt`` as a percentage of the machine's limit with ``threads`` threads."""
    work = document["multiply_adds_per_candidate"][fmt]
    limit = document["machine_limit"]
    return f"{machine_limit.fraction_of_limit(candidates_per_s, work, limit, document['mlp_precision'], threads):.1%}"


def markdown(document: dict[str, Any]) -> str:
    cores = int(document["machine"]["usable_cores"])
    inproc = document["inprocess"]
    per_second = inproc["candidates_per_s"]
    work = document["multiply_adds_per_candidate"]
    lines = [
        f"# Ranking queries: {document['model']} ({document['tables']} tables, {document['mlp_precision']} MLPs), "
        f"{document['mode']} run, {document['started']}",
        "",
        machine_limit.markdown(document["machine_limit"]),
        f"In-process, one thread, one query of {inproc['candidates']} candidates ({CONTEXT_FEATURES} sparse features "
        "as context), ranking against the same rows expanded, in each format; candidates/s with their share of "
        f"the one-thread limit (multiply-adds per candidate: {work['expanded']:,} expanded, {work['ranking']:,} "
        "ranking):",
        "",
        "| format | expanded ms | ranking ms | expanded candidates/s | ranking candidates/s "
        "| ranking candidates/s ÷ expanded | ranking bytes ÷ expanded |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {pair} | {inproc['ms'][expanded]} | {inproc['ms'][ranked]} "
            f"| {per_second[expanded]:,} ({share_of_limit(document, expanded, per_second[expanded], 1)}) "
            f"| {per_second[ranked]:,} ({share_of_limit(document, ranked, per_second[ranked], 1)}) "
            f"| **{inproc['speedup'][pair]}** | **{inproc['bytes_ratio'][pair]}** |"
            for pair, (expanded, ranked) in PAIRS.items()
        ),
        "",
        f"Served (shipped settings, {cores} cores shared with the client), queries of {CANDIDATES[0]}-{CANDIDATES[1]}"
        f" candidates, Poisson arrivals; the best rate with p99 <= {P99_BOUND_MS:.0f} ms and no error, its "
        f"candidates/s as a share of the {cores}-core limit:",
        "",
        "| format | queries/s | candidates/s | share of limit | p50 ms | p99 ms | queries/s per core | closed loop q/s "
        "| CPU ms per query there: frontend / workers / client |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt in FORMATS:
        found = document["served"][fmt]
        best = found["best"]
        cpu = " / ".join(str(value) for value in found["closed_loop_cpu_ms_per_query"].values())
        closed_loop = f"{found['closed_loop_queries_per_s']} | {cpu} |"
        if best is None:
            lines.append(f"| {fmt} | none within the bound | | | | | | {closed_loop}")
            continue
        at_least = ">= " if found["search_ended_within_bound"] else ""  # the search stopped before the bound
        lines.append(
            f"| {fmt} | {at_least}{best['completed_per_s']} | {best['candidates_per_s']:,} "
            f"| {share_of_limit(document, fmt, best['candidates_per_s'], cores)} | {best['p50_ms']} "
            f"| {best['p99_ms']} "
            f"| {best['completed_per_s'] / cores:.1f} | {closed_loop}"
        )
    ratios = {pair: document["served"][ranked]["closed_loop_ratios"] for pair, (_, ranked) in PAIRS.items()}
    lines += [
        "",
        f"Closed loop, ranking ÷ expanded queries/s in each of {len(ratios['json'])} rounds of every format in turn,"
        " median (min-max):",
        "",
        "| format | closed-loop queries/s, ranking ÷ expanded |",
        "|---|---|",
        *(
            f"| {pair} | **{np.median(value):.2f}** ({min(value):.2f}-{max(value):.2f}) |"
            for pair, value in ratios.items()
        ),
    ]
    anchor = MLPERF_ANCHOR
    lines += [
        "",
        f"MLPerf anchor: {anchor['queries_per_s']:,} queries/s on {anchor['cores']} cores "
        f"({int(anchor['queries_per_s']) / int(anchor['cores']):.0f} per core), {anchor['model']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for fmt in FORMATS:
        points = document["served"][fmt]["points"]
        axes.plot([p["offered_per_s"] for p in points], [p["p99_ms"] for p in points], marker="o", label=fmt)
    axes.axhline(P99_BOUND_MS, color="grey", linestyle="--", label=f"p99 bound {P99_BOUND_MS:.0f} ms")
    axes.set_xlabel("offered queries/s (Poisson)")
    axes.set_ylabel("p99 latency (ms)")
    axes.set_yscale("log")
    axes.set_title(f"Ranking queries of {CANDIDATES[0]}-{CANDIDATES[1]} candidates ({document['model']})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
