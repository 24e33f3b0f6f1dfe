"""The full-size Criteo-1TB DLRM (11.4B parameters) quantized and served on this CPU box.

For each table precision (int8, int4): build the archive with build_mar.py
(`--preset criteo-1tb --quantize ... --archive-format no-archive --workers 1`:
tables created quantized, never in fp32, and served in place, never unzipped),
start TorchServe and wait for the worker, then send single-row requests one at a
time — the pytorch/serve example's own ``sample_data.json`` unchanged, and
random rows over the full tables — and record:

- build time and the build's peak RSS;
- TorchServe start-to-ready time (the worker reading the tables);
- worker RSS when ready and after the requests;
- p50/p99 latency of single-row requests;
- the answer to the reference sample (ids up to 45,821,459: exact, not float32).

This is a benchmark, not a test: it writes about 18.5 GB and takes several minutes.

    python -m bench.fullsize                      # int8 and int4
    python -m bench.fullsize --dtypes int4 --requests 200 --keep
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
import requests

from bench import environment
from model_factory.config import preset
from servers.torchserve import REPO_ROOT, TorchServeProcess
from training.synthetic import random_inputs, request_rows

RESULTS_DIR = REPO_ROOT / "bench" / "results"
REFERENCE_SAMPLE = REPO_ROOT / "sample_data" / "reference_sample_data.json"


@dataclass(frozen=True)
class FullSizeResult:
    dtype: str
    tables_gib: float
    build_seconds: float
    build_peak_rss_gib: float
    start_to_ready_seconds: float
    worker_rss_ready_gib: float
    worker_rss_after_gib: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    reference_sample: dict


class PeakRss:
    """Samples a process tree's RSS in the background; ``peak`` is the largest sum seen."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            self.stopped.wait(self.interval)

    def stop(self) -> int:
        self.stopped.set()
        self.thread.join()
        return self.peak


def build(dtype: str, store: Path) -> tuple[float, int]:
    """Build the unzipped archive; returns (seconds, peak RSS in bytes)."""
    command = [
        sys.executable, str(REPO_ROOT / "build_mar.py"), "--preset", "criteo-1tb", "--quantize", dtype,
        "--archive-format", "no-archive", "--workers", "1", "--startup-timeout", "1800",
        "--output", str(store / f"dlrm-1tb-{dtype}.mar"),
    ]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT)
    meter = PeakRss(process.pid)
    if process.wait() != 0:
        meter.stop()
        sys.exit(f"build_mar.py failed for {dtype}")
    return time.perf_counter() - started, meter.stop()


def worker_rss(server: TorchServeProcess) -> int:
    (pid,) = server.worker_pids()
    return psutil.Process(pid).memory_info().rss


def serve_and_measure(dtype: str, store: Path, workdir: Path, count: int) -> dict:
    started = time.perf_counter()
    with TorchServeProcess(store, f"dlrm=dlrm-1tb-{dtype}", workdir) as server:
        server.wait_ready(timeout=1800)
        ready = time.perf_counter() - started
        rss_ready = worker_rss(server)
        url = f"{server.endpoints.inference}/predictions/dlrm"
        session = requests.Session()
        reference = session.post(
            url, data=REFERENCE_SAMPLE.read_bytes(), headers={"Content-Type": "application/json"}, timeout=60
        )
        config = preset("criteo-1tb")
        rows = list(request_rows(*random_inputs(config, count, np.random.default_rng(0))))
        latencies, errors = [], 0
        for row in rows:
            begin = time.perf_counter()
            response = session.post(url, json=row, timeout=60)
            latencies.append((time.perf_counter() - begin) * 1e3)
            errors += response.status_code != 200
        return {
            "start_to_ready_seconds": round(ready, 1),
            "worker_rss_ready_gib": round(rss_ready / 2**30, 2),
            "worker_rss_after_gib": round(worker_rss(server) / 2**30, 2),
            "requests": len(rows),
            "errors": errors,
            "p50_ms": round(statistics.median(latencies), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2),
            "reference_sample": {"status": reference.status_code, "body": reference.json()},
        }


def markdown(results: list[FullSizeResult], machine: dict) -> str:
    lines = [
        f"# Criteo-1TB DLRM (11,389,195,777 parameters) on {machine['cpu']}, "
        f"{machine['usable_cores']} cores, {machine['ram_gib']} GiB",
        "",
        "| tables | tables GiB | build | build peak RSS | start to ready | worker RSS ready / after | "
        "single-row p50 / p99 | errors | reference sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        score = r.reference_sample["body"].get("score")
        answer = f"{r.reference_sample['status']}, score {score:.4f}" if score is not None else "refused"
        lines.append(
            f"| {r.dtype} | {r.tables_gib:.2f} | {r.build_seconds:.0f} s | {r.build_peak_rss_gib:.1f} GiB | "
            f"{r.start_to_ready_seconds:.0f} s | {r.worker_rss_ready_gib:.1f} / {r.worker_rss_after_gib:.1f} GiB | "
            f"{r.p50_ms:.1f} / {r.p99_ms:.1f} ms | {r.errors} of {r.requests} | {answer} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=("int8", "int4"), default=["int4", "int8"])
    parser.add_argument("--requests", type=int, default=500, help="single-row requests per precision")
    parser.add_argument("--store", type=Path, help="model store for the archives (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the archives (about 18.5 GB) afterwards")
    args = parser.parse_args()
    output = RESULTS_DIR / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-fullsize"
    output.mkdir(parents=True)
    store = args.store or Path(tempfile.mkdtemp(prefix="dlrm-1tb-", dir=REPO_ROOT / "model_store"))
    store.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for dtype in args.dtypes:
            build_seconds, build_peak = build(dtype, store)
            model_dir = store / f"dlrm-1tb-{dtype}"
            tables_gib = (model_dir / "tables.bin").stat().st_size / 2**30
            served = serve_and_measure(dtype, store, output / f"torchserve-{dtype}", args.requests)
            result = FullSizeResult(
                dtype=dtype,
                tables_gib=round(tables_gib, 2),
                build_seconds=round(build_seconds, 1),
                build_peak_rss_gib=round(build_peak / 2**30, 2),
                **served,
            )
            results.append(result)
            print(json.dumps(asdict(result), indent=2), flush=True)
            if not args.keep:
                shutil.rmtree(model_dir)
    finally:
        if not args.keep and args.store is None:
            shutil.rmtree(store, ignore_errors=True)
    machine = environment.machine()
    (output / "results.json").write_text(
        json.dumps(
            {"machine": machine, "versions": environment.versions(), "results": [asdict(r) for r in results]},
            indent=2,
        )
    )
    (output / "results.md").write_text(markdown(results, machine))
    print((output / "results.md").read_text())


if __name__ == "__main__":
    main()
