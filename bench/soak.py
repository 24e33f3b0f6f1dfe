"""Soak test: a long steady load must give no errors and leave the workers' memory flat.

    python -m bench.soak                                   # 10 minutes of single-row requests at concurrency 32
    python -m bench.soak --duration 120 --concurrency 32   # a 2-minute check

Builds the default archive (``build_mar.py`` without options: the shipped serving
settings, 2 workers and batches of 32 within 1 ms), serves it with the shipped ``config.properties`` on
free loopback ports (servers.torchserve), warms up, then keeps ``concurrency`` connections
busy with single-row requests (bench.workload: Criteo-like rows, ids spread over the
tables) for ``duration`` seconds.

The load generator is wrk (Debian package ``wrk``) with bench/wrk_post.lua: one C event
loop drives 32 keep-alive connections at the server's full rate for a fraction of a core.
32 Python client threads would need about a core of their own on a 2-core machine,
measuring the client as much as the server.

It passes with 0 errors (HTTP status >= 400, socket errors and timeouts) and every
worker's RSS growing by less than 5 % from the end of the warm-up to the end of the run. RSS is
measured after the warm-up because the first requests grow the allocator's arenas,
which is not a leak; it is sampled every 10 s meanwhile, and the workers' pids must not
change (a restarted worker would hide a leak). The result goes to
``bench/results/<time>-soak/results.json``; the exit status is 1 when it fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.harness import build_archive, machine_record, results_dir
from bench.load import CpuMeter, post, run_wrk
from bench.workload import DISTINCT_ROWS, criteo_like_inputs, request_bodies, write_bodies
from model_factory.config import DEFAULT_PRESET, preset
from servers.torchserve import TorchServeProcess

MAX_RSS_GROWTH = 0.05
SAMPLE_EVERY_S = 10.0


@dataclass(frozen=True)
class MemorySample:
    seconds: float  # since the measured run started
    worker_rss_mib: tuple[float, ...]  # one per worker, in the order of their pids
    frontend_rss_mib: float


class MemorySampler:
    """Samples the workers' and the Java frontend's RSS every ``SAMPLE_EVERY_S`` while a run goes on."""

    def __init__(self, server: TorchServeProcess, worker_pids: list[int]) -> None:
        assert server.process is not None, "the server is started"
        self.workers = [psutil.Process(pid) for pid in worker_pids]
        self.frontend = next(p for p in psutil.Process(server.process.pid).children() if p.name() == "java")
        self.samples: list[MemorySample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()

    def sample(self) -> MemorySample:
        return MemorySample(
            seconds=round(time.monotonic() - self._start, 1),
            worker_rss_mib=tuple(round(worker.memory_info().rss / 2**20, 2) for worker in self.workers),
            frontend_rss_mib=round(self.frontend.memory_info().rss / 2**20, 2),
        )

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.samples.append(self.sample())

    def __enter__(self) -> MemorySampler:
        self.samples.append(self.sample())
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self.sample())


def soak(duration: int, concurrency: int, warmup: int, workdir: Path) -> dict[str, Any]:
    store = workdir / "model_store"
    build_archive(store / "dlrm.mar")
    bodies = request_bodies(criteo_like_inputs(preset(DEFAULT_PRESET), DISTINCT_ROWS), 1)
    bodies_file = write_bodies(bodies, workdir / "bodies.bin")
    with TorchServeProcess(store, "dlrm=dlrm.mar", workdir / "torchserve") as server:
        server.wait_ready()
        url = f"{server.endpoints.inference}/predictions/dlrm"
        answer = post(url, bodies[0])
        if answer.status_code != 200:
            sys.exit(f"the server refused a soak body: {answer.status_code} {answer.text[:300]}")
        worker_pids = sorted(server.worker_pids())
        print(f"warm-up: {warmup} s at concurrency {concurrency}", flush=True)
        run_wrk(url, bodies_file, concurrency, warmup)
        print(f"soak: {duration} s at concurrency {concurrency}", flush=True)
        assert server.process is not None
        meter = CpuMeter(server.process.pid, worker_pids)
        with MemorySampler(server, worker_pids) as memory:
            result = run_wrk(url, bodies_file, concurrency, duration)
        other_cores, steal_cores, _ = meter.stop()
        worker_pids_after = sorted(server.worker_pids())
    errors = result["errors"]
    error_count = errors["status"] + errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    start, end = memory.samples[0], memory.samples[-1]
    growth = max(after / before - 1 for before, after in zip(start.worker_rss_mib, end.worker_rss_mib, strict=True))
    seconds = result["duration_us"] / 1e6
    return {
        "kind": "soak",
        "passed": error_count == 0 and growth < MAX_RSS_GROWTH and worker_pids_after == worker_pids,
        "duration_s": round(seconds, 1),
        "warmup_s": warmup,
        "concurrency": concurrency,
        "requests": result["requests"],
        "req_per_s": round(result["requests"] / seconds, 1),
        "latency_ms": {name: round(value / 1e3, 2) for name, value in result["latency_us"].items()},
        "errors": error_count,
        "error_detail": errors,
        "worker_rss_mib": {"start": start.worker_rss_mib, "end": end.worker_rss_mib},
        "worker_rss_growth": round(growth, 4),
        "frontend_rss_mib": {"start": start.frontend_rss_mib, "end": end.frontend_rss_mib},
        "worker_restarted": worker_pids_after != worker_pids,
        "memory_timeline": [asdict(sample) for sample in memory.samples],
        "other_cpu_cores": round(other_cores, 2),
        "steal_cores": round(steal_cores, 2),
        **machine_record(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=600, help="seconds of measured load (default: 600)")
    parser.add_argument("--concurrency", type=int, default=32, help="connections kept busy (default: 32)")
    parser.add_argument("--warmup", type=int, default=30, help="seconds of load before measuring (default: 30)")
    parser.add_argument("--output", type=Path, help="result file (default: bench/results/<time>-soak/results.json)")
    args = parser.parse_args()
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="dlrm-soak-") as workdir:
        document = {"started": started.isoformat(timespec="seconds")} | soak(
            args.duration, args.concurrency, args.warmup, Path(workdir)
        )
    output = args.output or results_dir("soak", started) / "results.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2))
    rss, verdict = document["worker_rss_mib"], "PASSED" if document["passed"] else "FAILED"
    print(
        f"{verdict}: {document['requests']} requests in {document['duration_s']} s "
        f"({document['req_per_s']} req/s, p99 {document['latency_ms']['p99']} ms), {document['errors']} errors, "
        f"worker RSS {list(rss['start'])} -> {list(rss['end'])} MiB "
        f"(largest growth {document['worker_rss_growth']:+.2%}), "
        f"restarted: {document['worker_restarted']}\nresult: {output}"
    )
    sys.exit(0 if document["passed"] else 1)


if __name__ == "__main__":
    main()
