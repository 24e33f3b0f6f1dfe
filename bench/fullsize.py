"""The full-size Criteo-1TB DLRM (11.4B parameters) quantized and served on this CPU box.

For each table precision (int8, int4): build the archive with build_mar.py
(`--preset criteo-1tb --quantize ... --archive-format no-archive --workers 1`:
tables created quantized, never in fp32, and served in place, never unzipped),
start TorchServe and wait for the worker, then send single-row requests one at a
time — the pytorch/serve example's own ``sample_data.json`` unchanged, and
random rows over the full tables — and record:

- build time and the build's peak RSS;
- TorchServe start-to-ready time (every worker mapping the tables) with a warm page cache;
- the workers' RSS, and the PSS of all serving Python processes (workers, their fork server, launchers)
  when ready and after the requests: the tables are one memory-mapped file, so the PSS adds up to one
  copy of it plus each worker's own memory;
- the time a SIGKILLed worker takes to be replaced by a READY one;
- p50/p99 latency of single-row requests;
- the answer to the reference sample (ids up to 45,821,459: exact, not float32);
- with ``--cold``: the same again after dropping the page cache (root);
- with ``--first-touch``: single rows in-process (one thread, a fresh process each) on a fresh mapping of
  the tables, without and with its pages mapped first (what each worker does in the background);
- with ``--touch-all``: as many plain processes as workers each map the tables and read every page of
  them, then report their PSS at the same moment: the sum shows the page cache's one copy shared when
  every page is in use (requests touch only the rows they look up).

This is a benchmark, not a test: it writes about 18.5 GB and takes several minutes.

    python -m bench.fullsize                      # int8 with 2 workers and int4 with 4
    python -m bench.fullsize --dtypes int4 --workers 2 --requests 200 --keep
    python -m bench.fullsize --dtypes int8 --touch-all
    python -m bench.fullsize --cold               # also from a cold page cache (root: drops it)
    python -m bench.fullsize --dtypes int8 --first-touch
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import psutil
import requests
import torch

from bench.harness import Run, build_archive, latency_summary, machine_record, results_dir, write_results
from handler.predictor import DLRMPredictor
from model_factory import tbe
from model_factory.config import preset
from servers.torchserve import REPO_ROOT, TorchServeProcess
from training.synthetic import random_inputs, request_rows

REFERENCE_SAMPLE = REPO_ROOT / "sample_data" / "reference_sample_data.json"
# Workers per precision: two int8 or four int4 workers share one mapped copy of the tables.
DEFAULT_WORKERS = {"int8": 2, "int4": 4}


@dataclass(frozen=True)
class FullSizeResult:
    dtype: str
    workers: int
    tables_gib: float
    build_seconds: float
    build_peak_rss_gib: float
    start_to_ready_seconds: float
    worker_rss_ready_gib: float  # per worker, the largest
    worker_rss_after_gib: float
    workers_pss_ready_gib: float  # all serving Python processes together
    workers_pss_after_gib: float
    killed_worker_ready_seconds: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    reference_sample: dict
    all_pages: dict | None = None  # --touch-all: processes, largest RSS and summed PSS with every page read
    cold: dict | None = None  # --cold: the same measurements after dropping the page cache
    first_touch: dict | None = None  # --first-touch: in-process single rows on fresh / populated mappings


def build(dtype: str, workers: int, store: Path) -> Run:
    """Build the unzipped archive: its seconds and peak RSS."""
    return build_archive(
        store / f"dlrm-1tb-{dtype}.mar",
        "--preset", "criteo-1tb", "--quantize", dtype, "--archive-format", "no-archive",
        "--workers", str(workers), "--startup-timeout", "1800",
        stream=True,
    )  # fmt: skip


def worker_memory(server: TorchServeProcess) -> tuple[int, int]:
    """The largest worker RSS, and the PSS of every Python process serving added up (shared pages counted
    once in all): the workers, the fork server they were forked from and the launchers TorchServe started."""
    assert server.process is not None
    workers = [psutil.Process(pid) for pid in server.worker_pids()]
    frontend = psutil.Process(server.process.pid)  # the torchserve command, parent of the Java frontend
    launchers = [p for p in frontend.children(recursive=True) if p.name().startswith("python")]
    # The fork server is the workers' parent, in the tree or not (it outlives the launcher that started it).
    candidates = [*launchers, *workers, *(worker.parent() for worker in workers)]
    pythons = {p.pid: p for p in candidates if p is not None and p.name().startswith("python")}
    rss = max(worker.memory_info().rss for worker in workers)
    return rss, sum(p.memory_full_info().pss for p in pythons.values())


def ready_workers(server: TorchServeProcess) -> int:
    description = requests.get(f"{server.endpoints.management}/models/dlrm", timeout=10).json()
    return sum(worker.get("status") == "READY" for worker in description[0]["workers"])


def replace_a_worker(server: TorchServeProcess, workers: int) -> float:
    """SIGKILL one worker; seconds until TorchServe has as many READY workers again."""
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    started = time.perf_counter()
    while victim in server.worker_pids() or ready_workers(server) < workers:
        if time.perf_counter() - started > 600:
            raise TimeoutError("the killed worker was not replaced within 600 s")
        time.sleep(0.1)
    return time.perf_counter() - started


_PAGE = 4096


def _read_every_page(model_dir: str, barrier: Any, results: Any) -> None:
    """Map the tables as a worker does, read one byte of every page, report RSS and PSS once all have."""
    from model_factory.artifact import load_model

    model, _ = load_model(Path(model_dir))
    for module in model.sparse_arch.embedding_bag_collection._emb_modules:
        int(module.weights_host[::_PAGE].sum())
    barrier.wait()
    info = psutil.Process().memory_full_info()
    results.put((info.rss, info.pss))
    barrier.wait()  # every process keeps its mapping until all have measured


def every_page_shared(model_dir: Path, processes: int) -> dict:
    """``processes`` processes mapping ``model_dir``'s tables with every page read: their largest RSS, PSS sum."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    children = [
        context.Process(target=_read_every_page, args=(str(model_dir), barrier, results)) for _ in range(processes)
    ]
    for child in children:
        child.start()
    measured = [results.get(timeout=1800) for _ in children]
    for child in children:
        child.join()
    return {
        "processes": processes,
        "largest_rss_gib": round(max(rss for rss, _ in measured) / 2**30, 2),
        "pss_sum_gib": round(sum(pss for _, pss in measured) / 2**30, 2),
    }


def drop_page_cache() -> None:
    """Write dirty pages back and drop the clean ones, the tables' included (root only)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        sys.exit(f"--cold needs to drop the page cache, as root: {error}")


def _time_single_rows(model_dir: str, populate: bool, count: int, seed: int, results: Any) -> None:
    """Single-row predictions of random ids in a fresh process, on freshly mapped tables: with every page
    mapped first (what a worker does in the background) or with the population left out (each new page
    a page fault on first touch)."""
    torch.set_num_threads(1)
    tables = str(Path(model_dir) / "tables.bin")
    left_out = mock.patch.object(tbe, "populate_in_background", lambda *_: None)
    with contextlib.nullcontext() if populate else left_out:
        predictor = DLRMPredictor.from_artifact(Path(model_dir), torch.device("cpu"))
    if populate:
        size = Path(tables).stat().st_size
        while sum(m.rss for m in psutil.Process().memory_maps() if m.path == tables) < size - 2**20:
            time.sleep(0.1)
    bodies = [json.dumps(row).encode() for row in request_rows(*random_inputs(
        preset("criteo-1tb"), count, np.random.default_rng(seed)))]  # fmt: skip
    latencies = []
    for body in bodies:
        begin = time.perf_counter()
        predictor.predict_bodies([body])
        latencies.append((time.perf_counter() - begin) * 1e3)
    results.put(latency_summary(latencies))


def first_touch(model_dir: Path, count: int) -> dict:
    """In-process single-row p50/p99 (ms, one thread) on fresh mappings, without and with the population."""
    context = multiprocessing.get_context("spawn")
    measured = {}
    for seed, (label, populate) in enumerate((("fresh_mapping", False), ("populated", True))):
        results = context.Queue()
        child = context.Process(target=_time_single_rows, args=(str(model_dir), populate, count, seed, results))
        child.start()
        measured[label] = results.get(timeout=1800)
        child.join()
    return measured


def serve_and_measure(dtype: str, workers: int, store: Path, workdir: Path, count: int) -> dict:
    started = time.perf_counter()
    with TorchServeProcess(store, f"dlrm=dlrm-1tb-{dtype}", workdir) as server:
        server.wait_ready(timeout=1800)
        while ready_workers(server) < workers:
            time.sleep(0.1)
        ready = time.perf_counter() - started
        rss_ready, pss_ready = worker_memory(server)
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
        rss_after, pss_after = worker_memory(server)
        return {
            "workers": workers,
            "start_to_ready_seconds": round(ready, 1),
            "worker_rss_ready_gib": round(rss_ready / 2**30, 2),
            "worker_rss_after_gib": round(rss_after / 2**30, 2),
            "workers_pss_ready_gib": round(pss_ready / 2**30, 2),
            "workers_pss_after_gib": round(pss_after / 2**30, 2),
            "killed_worker_ready_seconds": round(replace_a_worker(server, workers), 1),
            "requests": len(rows),
            "errors": errors,
            **latency_summary(latencies),
            "reference_sample": {"status": reference.status_code, "body": reference.json()},
        }


def markdown(results: list[FullSizeResult], machine: dict) -> str:
    lines = [
        f"# Criteo-1TB DLRM (11,389,195,777 parameters) on {machine['cpu']}, "
        f"{machine['usable_cores']} cores, {machine['ram_gib']} GiB",
        "",
        "| tables | workers | tables GiB | build | build peak RSS | start to ready | "
        "largest worker RSS ready / after | Python processes' PSS summed ready / after | killed worker replaced | "
        "single-row p50 / p99 | errors | reference sample |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        score = r.reference_sample["body"].get("score")
        answer = f"{r.reference_sample['status']}, score {score:.4f}" if score is not None else "refused"
        lines.append(
            f"| {r.dtype} | {r.workers} | {r.tables_gib:.2f} | {r.build_seconds:.0f} s | "
            f"{r.build_peak_rss_gib:.1f} GiB | {r.start_to_ready_seconds:.1f} s | "
            f"{r.worker_rss_ready_gib:.1f} / {r.worker_rss_after_gib:.1f} GiB | "
            f"{r.workers_pss_ready_gib:.1f} / {r.workers_pss_after_gib:.1f} GiB | "
            f"{r.killed_worker_ready_seconds:.1f} s | {r.p50_ms:.1f} / {r.p99_ms:.1f} ms | "
            f"{r.errors} of {r.requests} | {answer} |"
        )
    for r in results:
        if r.cold:
            c = r.cold
            lines.append(
                f"\n{r.dtype}, cold page cache: start to ready {c['start_to_ready_seconds']:.1f} s, killed worker "
                f"replaced {c['killed_worker_ready_seconds']:.1f} s, single-row p50 / p99 {c['p50_ms']:.1f} / "
                f"{c['p99_ms']:.1f} ms, errors {c['errors']} of {c['requests']}"
            )
    for r in results:
        if r.first_touch:
            fresh, populated = r.first_touch["fresh_mapping"], r.first_touch["populated"]
            lines.append(
                f"\n{r.dtype}, in-process single rows (one thread): fresh mapping p50 / p99 {fresh['p50_ms']:.2f} / "
                f"{fresh['p99_ms']:.2f} ms, every page mapped first {populated['p50_ms']:.2f} / "
                f"{populated['p99_ms']:.2f} ms"
            )
    for r in results:
        if r.all_pages:
            lines.append(
                f"\n{r.dtype}, every page read by {r.all_pages['processes']} processes: largest RSS "
                f"{r.all_pages['largest_rss_gib']:.2f} GiB, PSS summed {r.all_pages['pss_sum_gib']:.2f} GiB "
                f"(tables {r.tables_gib:.2f} GiB)"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=("int8", "int4"), default=["int4", "int8"])
    parser.add_argument(
        "--workers", type=int, help="workers for every precision (default: 2 for int8, 4 for int4, as issue 13 asks)"
    )
    parser.add_argument("--requests", type=int, default=500, help="single-row requests per precision")
    parser.add_argument("--store", type=Path, help="model store for the archives (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the archives (about 18.5 GB) afterwards")
    parser.add_argument(
        "--touch-all", action="store_true", help="also read every table page from as many processes as workers"
    )
    parser.add_argument(
        "--cold", action="store_true", help="also serve again after dropping the page cache (needs root)"
    )
    parser.add_argument(
        "--first-touch",
        action="store_true",
        help="also time single rows in-process on a fresh mapping, without and with its pages mapped first",
    )
    args = parser.parse_args()
    output = results_dir("fullsize")
    store = args.store or Path(tempfile.mkdtemp(prefix="dlrm-1tb-", dir=REPO_ROOT / "model_store"))
    store.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for dtype in args.dtypes:
            workers = args.workers or DEFAULT_WORKERS[dtype]
            built = build(dtype, workers, store)
            model_dir = store / f"dlrm-1tb-{dtype}"
            tables_gib = (model_dir / "tables.bin").stat().st_size / 2**30
            served = serve_and_measure(dtype, workers, store, output / f"torchserve-{dtype}", args.requests)
            cold = None
            if args.cold:
                drop_page_cache()
                cold = serve_and_measure(dtype, workers, store, output / f"torchserve-{dtype}-cold", args.requests)
            result = FullSizeResult(
                dtype=dtype,
                tables_gib=round(tables_gib, 2),
                build_seconds=round(built.seconds, 1),
                build_peak_rss_gib=round(built.peak_rss / 2**30, 2),
                **served,
                all_pages=every_page_shared(model_dir, workers) if args.touch_all else None,
                cold=cold,
                first_touch=first_touch(model_dir, args.requests) if args.first_touch else None,
            )
            results.append(result)
            print(json.dumps(asdict(result), indent=2), flush=True)
            if not args.keep:
                shutil.rmtree(model_dir)
    finally:
        if not args.keep and args.store is None:
            shutil.rmtree(store, ignore_errors=True)
    record = machine_record()
    text = markdown(results, record["machine"])
    write_results(output, {**record, "results": [asdict(r) for r in results]}, text)
    print(text)


if __name__ == "__main__":
    main()
