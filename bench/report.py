"""The benchmark's ratios against the issue's targets, its Markdown report and its plot.

Everything here reads the JSON document that ``bench.run`` writes, so a report
can be redrawn from a ``results.json`` alone: ``python -m bench.report results.json``.
Every rows/s of the DLRM is shown with its share of the machine's limit measured in the
same run (:mod:`bench.machine_limit`): the forward's multiply-adds at that rate ÷ the GEMM
throughput of the MLPs' precision with as many threads.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from bench import machine_limit

# The targets of issue 6, measured on the same run.
TARGET_CONCURRENCY = 32
TARGET_NOOP_RATIO = 0.85
TARGET_P99_MS = 50.0
TARGET_ROWS = 256
TARGET_INPROCESS_RATIO = 0.70
TARGET_OVERHEAD_MS = 1.5
# The targets of issue 12: codec cost per row in-process, one thread (µs), and large binary OIP requests served.
CODEC_TARGETS_US = {"codec_oip_binary": 0.3, "codec_oip_json": 2.0, "codec_instances": 4.0, "codec_rows": 8.0}
TARGET_OIP_ROWS = 1024
TARGET_OIP_RATIO = 0.8

INPROCESS_COLUMNS = {
    "model": "model forward",
    "forward": "predictor.forward (KJT + model)",
    "handler_instances": "handler, one instances body",
    "handler_rows": "handler, single-row bodies",
    "handler_oip_json": "handler, OIP JSON",
    "handler_oip_binary": "handler, OIP binary",
}
CODEC_NAMES = {
    "codec_oip_binary": "OIP binary",
    "codec_oip_json": "OIP JSON",
    "codec_instances": "one instances body",
    "codec_rows": "single-row bodies",
}


def find_point(points: list[dict], rows: int, concurrency: int | None = None, protocol: str = "rows") -> dict | None:
    for point in points:
        same_load = point["rows_per_request"] == rows and concurrency in (None, point["concurrency"])
        if same_load and point.get("protocol", "rows") == protocol:
            return point
    return None


def codec_us_per_row(timings: list[dict], mode: str, batch: int) -> float | None:
    """Microseconds per row of a codec mode: the handler with a stub model (decode, KJT, encode)."""
    timing = find_timing(timings, mode, batch)
    return None if timing is None else 1e6 / timing["rows_per_s"]


def find_timing(timings: list[dict], mode: str, batch: int) -> dict | None:
    return next((t for t in timings if t["mode"] == mode and t["batch"] == batch), None)


def workers_of(result: dict[str, Any]) -> int:
    return int(result["model_yaml"].get("minWorkers") or 1)


def ratios(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's three ratios from one setting's results (those whose points were measured)."""
    found: dict[str, dict[str, Any]] = {}
    served = find_point(result["served"], 1, TARGET_CONCURRENCY)
    noop = find_point(result["noop"], 1, TARGET_CONCURRENCY)
    if served and noop:
        value = served["req_per_s"] / noop["req_per_s"]
        p99 = served["latency_ms"]["p99"]
        found["served_vs_noop"] = {
            "what": f"single-row c={TARGET_CONCURRENCY}: DLRM req/s / no-op req/s",
            "value": value,
            "detail": f"{served['req_per_s']:,.0f} / {noop['req_per_s']:,.0f} req/s, DLRM p99 {p99:.1f} ms",
            "target": f">= {TARGET_NOOP_RATIO} with p99 <= {TARGET_P99_MS:g} ms",
            "met": value >= TARGET_NOOP_RATIO and p99 <= TARGET_P99_MS,
        }
    instances = find_point(result["served"], TARGET_ROWS)
    forward = find_timing(result["inprocess"], "forward", TARGET_ROWS)
    if instances and forward:
        # Each worker runs its own forward passes: the in-process ceiling of the setting is one forward per worker.
        workers = workers_of(result)
        ceiling = forward["rows_per_s"] * workers
        value = instances["rows_per_s"] / ceiling
        found["served_vs_inprocess"] = {
            "what": f"{TARGET_ROWS}-row instances, c={instances['concurrency']}: served rows/s / (in-process "
            f"forward rows/s at batch {TARGET_ROWS} x workers)",
            "value": value,
            "detail": f"{instances['rows_per_s']:,.0f} / ({forward['rows_per_s']:,.0f} x {workers}) rows/s",
            "target": f">= {TARGET_INPROCESS_RATIO}",
            "met": value >= TARGET_INPROCESS_RATIO,
        }
    single = find_point(result["served"], 1, 1)
    handler = find_timing(result["inprocess"], "handler_rows", 1)
    if single and handler:
        value = single["latency_ms"]["p50"] - handler["p50_ms"]
        found["c1_overhead_ms"] = {
            "what": "single-row c=1: served p50 - in-process handler p50 for one row (decode+forward+encode)",
            "value": value,
            "detail": f"{single['latency_ms']['p50']:.2f} - {handler['p50_ms']:.2f} ms",
            "target": f"<= {TARGET_OVERHEAD_MS} ms",
            "met": value <= TARGET_OVERHEAD_MS,
        }
    binary = find_point(result["served"], TARGET_OIP_ROWS, protocol="oip_binary")
    ceiling = find_timing(result.get("inprocess_all_threads", []), "model", TARGET_OIP_ROWS)
    if binary and ceiling:
        value = binary["rows_per_s"] / ceiling["rows_per_s"]
        cpu = (
            f"; CPU (cores): frontend {binary.get('frontend_cpu_cores', 0):.2f}, workers "
            f"{binary.get('workers_cpu_cores', 0):.2f}, wrk {binary.get('loadgen_cpu_cores', 0):.2f}"
        )
        found["oip_binary_vs_model"] = {
            "what": f"{TARGET_OIP_ROWS}-row OIP binary, c={binary['concurrency']}: served rows/s / in-process model "
            f"forward rows/s with all workers' threads in one process",
            "value": value,
            "detail": f"{binary['rows_per_s']:,.0f} / {ceiling['rows_per_s']:,.0f} rows/s{cpu}",
            "target": f">= {TARGET_OIP_RATIO}",
            "met": value >= TARGET_OIP_RATIO,
        }
    for mode, target in CODEC_TARGETS_US.items():
        batches = [32] if mode == "codec_rows" else [256, 1024, 4096]
        values = {batch: codec_us_per_row(result["inprocess"], mode, batch) for batch in batches}
        measured = {batch: value for batch, value in values.items() if value is not None}
        if measured:
            worst = max(measured.values())
            found[f"codec_{mode}"] = {
                "what": f"codec µs per row, {CODEC_NAMES[mode]} (the handler with a stub model, one thread)",
                "value": worst,
                "detail": ", ".join(f"batch {batch}: {value:.2f}" for batch, value in measured.items()),
                "target": f"<= {target}",
                "met": worst <= target,
            }
    return found


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load_name(point: dict) -> str:
    rows = "single row" if point["rows_per_request"] == 1 else f"{point['rows_per_request']} rows"
    protocol = point.get("protocol", "rows")
    via = "" if protocol == "rows" else f" {protocol.replace('_', ' ').replace('oip', 'OIP')}"
    return f"{rows}{via}, c={point['concurrency']}"


def optional(value: Any, digits: int = 1) -> str:
    """A number for a table cell, or a dash where there is none."""
    return "–" if value is None else f"{value:,.{digits}f}"


def inprocess_cell(document: dict[str, Any], timing: dict[str, Any], threads: int) -> str:
    """rows/s (its share of the limit, p50 ms); a codec timing runs no model, so it has no share."""
    share = (
        "" if timing["mode"].startswith("codec_") else f"{share_of_limit(document, timing['rows_per_s'], threads)}, "
    )
    return f"{timing['rows_per_s']:,.0f} ({share}{timing['p50_ms']:.2f} ms)"


def share_of_limit(document: dict[str, Any], rows_per_s: float, threads: int) -> str:
    """``rows_per_s`` forwards as a percentage of the machine's limit with ``threads`` threads ('–' without one)."""
    record = document.get("machine_limit")
    if record is None:
        return "–"
    work = record["multiply_adds_per_row"]
    return f"{machine_limit.fraction_of_limit(rows_per_s, work, record, document['mlp_precision'], threads):.1%}"


def point_row(document: dict[str, Any], point: dict, threads: int) -> list[str]:
    """A served point; a DLRM point's rows/s with its share of the limit with ``threads`` (all the workers')."""
    latency = point["latency_ms"]
    share = "–" if point["model"] == "noop" else share_of_limit(document, point["rows_per_s"], threads)
    return [
        point["model"],
        load_name(point),
        f"{point['req_per_s']:,.0f}",
        f"{point['rows_per_s']:,.0f}",
        share,
        f"{latency['p50']:.1f}",
        f"{latency['p99']:.1f}",
        f"{latency['p999']:.1f}",
        f"{point['http_errors']} / {point['socket_errors']}",
        optional(point["rows_per_batch"]),
        optional(point["handler_ms_per_batch"], 2),
        ", ".join(f"{rss:,.0f}" for rss in point["worker_rss_mib"]),
        f"{point['other_cpu_cores']:.2f}",
        " / ".join(
            f"{point.get(key, 0.0):.2f}" for key in ("frontend_cpu_cores", "workers_cpu_cores", "loadgen_cpu_cores")
        ),
    ]


POINT_HEADER = [
    "model", "load", "req/s", "rows/s", "share of limit", "p50 ms", "p99 ms", "p99.9 ms",
    "errors (HTTP >= 400 / socket)", "rows per forward", "handler ms per batch", "worker RSS MiB",
    "other CPU load (cores)", "CPU frontend / workers / wrk (cores)",
]  # fmt: skip


def ratio_rows(found: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [
        [ratio["what"], f"{ratio['value']:.2f}", ratio["detail"], ratio["target"], "yes" if ratio["met"] else "no"]
        for ratio in found.values()
    ]


def build_args(document: dict[str, Any]) -> list[str]:
    if "build_args" in document:
        return list(document["build_args"])
    preset = ["--preset", document["preset"]] if document["preset"] else []  # a run before build_args
    return [*preset, *document["archive_args"]]


def header_lines(document: dict[str, Any]) -> list[str]:
    machine, versions = document["machine"], document["versions"]
    mode = document["mode_settings"]
    return [
        f"# DLRM serving benchmark: {document['kind']}, {document['mode']} mode, {document['started']}",
        "",
        f"- Machine: {machine['cpu']}, {machine['logical_cores']} cores ({machine['usable_cores']} usable), "
        f"{machine['ram_gib']} GiB RAM, Linux {machine['kernel']}. Load average (1, 5, 15 min) at the start "
        f"{machine['loadavg']}, at the end {document.get('loadavg_end', '?')}.",
        "- Versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()) + ".",
        f"- Archive: `{shlex.join(['build_mar.py', *build_args(document)])}` plus each "
        "setting's workers, threads, batch size and delay; the no-op archive has the same model-config.yaml.",
        f"- Load: wrk, {mode['load_seconds']} s per point after {mode['warmup_seconds']} s of warm-up, threads = "
        f"min(connections, cores); `instances` points at c={document['instance_concurrency']}. wrk, TorchServe "
        "and the worker share the machine's cores. In-process: "
        f"{mode['inprocess_seconds']} s per point.",
        "- Noise: 'other CPU load' is the CPU that processes other than TorchServe, wrk and the harness used during "
        "the point (cores' worth); on a shared machine, numbers with a high value there are low.",
        f"- Run time: {document.get('duration_s', '?')} s.",
        "",
        *(
            [machine_limit.markdown(document["machine_limit"]), f"The MLPs run in {document['mlp_precision']}.", ""]
            if "machine_limit" in document
            else []
        ),
    ]


def setting_sections(document: dict[str, Any], result: dict[str, Any]) -> list[str]:
    yaml = result["model_yaml"]
    threads = result["threads_per_worker"]
    all_threads = threads * workers_of(result)
    lines = [
        f"## {result['label']}",
        "",
        f"model-config.yaml: `{json.dumps(yaml, separators=(',', ':'))}`; torch threads per worker: "
        f"{result['threads_per_worker']}.",
        "",
        "### Targets",
        "",
        table(["ratio", "value", "measured", "target", "met"], ratio_rows(ratios(result))),
        f"### In-process (DLRMPredictor, {threads} threads): rows/s (share of the limit, p50 ms per call)",
        "",
    ]
    batches = sorted({timing["batch"] for timing in result["inprocess"]})
    rows = []
    for batch in batches:
        row = [str(batch)]
        for mode in INPROCESS_COLUMNS:
            timing = find_timing(result["inprocess"], mode, batch)
            row.append("–" if timing is None else inprocess_cell(document, timing, threads))
        rows.append(row)
    lines += [table(["batch", *INPROCESS_COLUMNS.values()], rows)]
    if result["inprocess_all_threads"]:
        cells = [
            f"batch {timing['batch']}: {inprocess_cell(document, timing, all_threads)}"
            for timing in result["inprocess_all_threads"]
        ]
        lines += [f"Model forward with all workers' threads ({all_threads}) in one process: {'; '.join(cells)}.", ""]
    codec_rows = [
        [str(batch), *(optional(codec_us_per_row(result["inprocess"], mode, batch), 2) for mode in CODEC_TARGETS_US)]
        for batch in batches
        if batch > 1
    ]
    lines += [
        "### Codec cost per row in-process (µs: decode + KJT + encode, the handler with a stub model)",
        "",
        table(["batch", *(f"{CODEC_NAMES[mode]} (<= {t})" for mode, t in CODEC_TARGETS_US.items())], codec_rows),
    ]
    lines += [
        f"### Served through TorchServe (share of the {all_threads}-thread limit)",
        "",
        table(POINT_HEADER, [point_row(document, point, all_threads) for point in result["served"] + result["noop"]]),
    ]
    if result["profiles"]:
        names = list(result["profiles"])
        stages = sorted({stage for shares in result["profiles"].values() for stage in shares})
        stages.sort(key=lambda stage: -max(shares.get(stage, 0.0) for shares in result["profiles"].values()))
        rows = [
            [stage, *(f"{100 * result['profiles'][name].get(stage, 0.0):.1f}%" for name in names)] for stage in stages
        ]
        lines += [
            "### Where the DLRM worker's time goes (py-spy samples, idle included; first worker)",
            "",
            table(["stage", *names], rows),
        ]
    return lines


def sweep_table(document: dict[str, Any]) -> str:
    rows = []
    for result in document["settings"]:
        found = ratios(result)
        c32 = find_point(result["served"], 1, TARGET_CONCURRENCY)
        c1 = find_point(result["served"], 1, 1)
        rows.append(
            [
                result["label"],
                optional(c1 and c1["latency_ms"]["p50"], 2),
                optional(c32 and c32["req_per_s"], 0),
                optional(c32 and c32["latency_ms"]["p99"]),
                optional(found.get("served_vs_noop", {}).get("value"), 2),
                optional(found.get("served_vs_inprocess", {}).get("value"), 2),
                optional(found.get("c1_overhead_ms", {}).get("value"), 2),
                f"{max(point['other_cpu_cores'] for point in result['served'] + result['noop']):.2f}",
            ]
        )
    header = [
        "setting", "c=1 p50 ms", f"c={TARGET_CONCURRENCY} req/s", f"c={TARGET_CONCURRENCY} p99 ms",
        f"÷ no-op (>= {TARGET_NOOP_RATIO})", f"{TARGET_ROWS} rows ÷ in-process (>= {TARGET_INPROCESS_RATIO})",
        f"c=1 overhead ms (<= {TARGET_OVERHEAD_MS})", "max other CPU load",
    ]  # fmt: skip
    return table(header, rows)


def markdown(document: dict[str, Any]) -> str:
    lines = header_lines(document)
    if document["kind"] == "sweep":
        lines += ["## Sweep summary", "", sweep_table(document)]
    for result in document["settings"]:
        lines += setting_sections(document, result)
    return "\n".join(lines)


def plot(document: dict[str, Any], path: Path) -> None:
    """Throughput and p99: per concurrency and per rows per request (a run), per setting (a sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plot_sweep(plt, document) if document["kind"] == "sweep" else plot_run(plt, document["settings"][0])
    machine = document["machine"]
    figure.suptitle(f"DLRM on TorchServe, {machine['cpu']}, {machine['logical_cores']} cores")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_p99(axes: Any, xs: list[int], points: list[dict[str, Any]]) -> None:
    """The DLRM's p99 latency on a right-hand axis of ``axes``."""
    p99_axes = axes.twinx()
    p99_axes.plot(xs, [p["latency_ms"]["p99"] for p in points], "rx:", label="dlrm p99")
    p99_axes.legend(loc="upper right", fontsize=8)
    p99_axes.set_ylabel("p99 latency (ms)", color="r")
    p99_axes.set_ylim(bottom=0)


def plot_run(plt: Any, result: dict[str, Any]) -> Any:
    figure, (single, instances) = plt.subplots(1, 2, figsize=(13, 5))
    for model, style in (("dlrm", "o-"), ("noop", "s--")):
        points = [p for p in result["served"] + result["noop"] if p["model"] == model]
        singles = [p for p in points if p["rows_per_request"] == 1]
        single.plot(
            [p["concurrency"] for p in singles], [p["req_per_s"] for p in singles], style, label=f"{model} req/s"
        )
        if model == "dlrm":
            _plot_p99(single, [p["concurrency"] for p in singles], singles)
            for protocol, marker in (("rows", style), ("oip_json", "d-"), ("oip_binary", "v-")):
                many = [p for p in points if p["rows_per_request"] > 1 and p.get("protocol", "rows") == protocol]
                if many:
                    label = "instances" if protocol == "rows" else protocol.replace("oip_", "OIP ")
                    xs = [p["rows_per_request"] for p in many]
                    instances.plot(xs, [p["rows_per_s"] for p in many], marker, label=f"dlrm rows/s, {label}")
            many = [p for p in points if p["rows_per_request"] > 1 and p.get("protocol", "rows") == "rows"]
            _plot_p99(instances, [p["rows_per_request"] for p in many], many)
    forward = [t for t in result["inprocess"] if t["mode"] == "forward"]
    instances.plot(
        [t["batch"] for t in forward], [t["rows_per_s"] for t in forward], "g^-.", label="in-process forward rows/s"
    )
    single.set(xscale="log", xlabel="concurrent connections (single-row requests)", ylabel="requests/s")
    single.set_title(f"single-row requests ({result['label']})", fontsize=9)
    instances.set(xscale="log", xlabel="rows per request / batch (in-process)", ylabel="rows/s")
    instances.set_title("rows per request", fontsize=9)
    for axes in (single, instances):
        axes.legend(loc="upper left", fontsize=8)
        axes.grid(alpha=0.3)
    return figure


def plot_sweep(plt: Any, document: dict[str, Any]) -> Any:
    results = document["settings"]
    figure, axes = plt.subplots(figsize=(12, 1.2 + 0.6 * len(results)))
    labels = [result["label"] for result in results]
    served = [find_point(r["served"], 1, TARGET_CONCURRENCY) for r in results]
    noop = [find_point(r["noop"], 1, TARGET_CONCURRENCY) for r in results]
    positions = range(len(results))
    axes.barh([y + 0.2 for y in positions], [p["req_per_s"] if p else 0 for p in served], 0.4, label="dlrm req/s")
    axes.barh([y - 0.2 for y in positions], [p["req_per_s"] if p else 0 for p in noop], 0.4, label="no-op req/s")
    for y, point in zip(positions, served, strict=True):
        if point:
            label = f"p99 {point['latency_ms']['p99']:.0f} ms"
            axes.annotate(label, (point["req_per_s"], y + 0.2), xytext=(3, -3), textcoords="offset points", fontsize=8)
    axes.set_yticks(list(positions), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(f"single-row requests/s at c={TARGET_CONCURRENCY}")
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(axis="x", alpha=0.3)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description="Redraw results.md and results.png from a results.json.")
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    document = json.loads(args.results.read_text())
    args.results.with_suffix(".md").write_text(markdown(document))
    plot(document, args.results.with_suffix(".png"))


if __name__ == "__main__":
    main()
