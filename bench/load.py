"""Drive a running TorchServe with wrk and record one load point: throughput, latency, errors, memory, noise.

wrk (Debian package ``wrk``) keeps ``concurrency`` connections busy, each sending
the next body as soon as its previous answer arrives, and ``wrk_post.lua``
reports its latency percentiles as JSON. Alongside, the point records the
workers' RSS, the handler's own counters from TorchServe's metrics API (rows per
forward pass) and how much CPU other processes took meanwhile: on a shared
2-core machine that is the noise in the numbers.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from bench.workload import Body, Protocol, write_bodies
from servers.torchserve import TorchServeProcess

WRK_SCRIPT = Path(__file__).with_name("wrk_post.lua")
# Requests slower than this count as wrk timeouts (socket errors) instead of latencies.
WRK_TIMEOUT_S = 30
RESULT_MARKER = "WRK_RESULT "
# The handler's counters (handler/metrics.py) that tell how requests were batched.
HANDLER_COUNTERS = ("DLRMBatches", "DLRMRows", "DLRMDecodeMilliseconds", "DLRMForwardMilliseconds")
PROMETHEUS_SAMPLE = re.compile(r"^(\w+)(?:\{[^}]*\})? ([0-9.eE+-]+)$")


@dataclass(frozen=True)
class Point:
    """A load point: ``rows_per_request`` 1 is the single-row format, more is an ``instances`` body
    (or, with an OIP ``protocol``, one inference request of that many rows)."""

    rows_per_request: int
    concurrency: int
    protocol: Protocol = Protocol.ROWS

    @property
    def name(self) -> str:
        kind = "single row" if self.rows_per_request == 1 else f"{self.rows_per_request} rows"
        via = "" if self.protocol == Protocol.ROWS else f" {self.protocol}"
        return f"{kind}{via}, c={self.concurrency}"


@dataclass(frozen=True)
class PointResult:
    model: str
    rows_per_request: int
    concurrency: int
    protocol: str
    seconds: float
    requests: int
    req_per_s: float
    rows_per_s: float
    latency_ms: dict[str, float]
    http_errors: int  # responses with a status of 400 or more (wrk's "Non-2xx or 3xx responses")
    socket_errors: int
    worker_rss_mib: list[float]
    rows_per_batch: float | None
    handler_ms_per_batch: float | None
    other_cpu_cores: float
    steal_cores: float
    loadavg_1m: float
    # Cores' worth of CPU each part took during the point: TorchServe's Java frontend, its workers, wrk.
    frontend_cpu_cores: float = 0.0
    workers_cpu_cores: float = 0.0
    loadgen_cpu_cores: float = 0.0


class CpuMeter:
    """CPU seconds the whole machine spent busy, minus what TorchServe, wrk and this process spent;
    and what the frontend, the workers and wrk each took."""

    def __init__(self, server_pid: int, worker_pids: list[int]) -> None:
        root = psutil.Process(server_pid)
        # Workers are the fork server's children: in the frontend's tree only while the launcher that
        # started that server lives.
        self.workers = [psutil.Process(pid) for pid in worker_pids]
        tree = [root, *root.children(recursive=True), *self.workers]
        self.processes = list({process.pid: process for process in tree}.values())
        self.frontend = [process for process in self.processes if process.name() == "java"]
        self.start = self._sample()
        self.parts_start = self._parts()

    @staticmethod
    def _machine() -> tuple[float, float]:
        times = psutil.cpu_times()
        busy = times.user + times.nice + times.system + times.irq + times.softirq
        return busy, times.steal

    def _ours(self) -> float:
        total = 0.0
        for process in self.processes:
            try:
                times = process.cpu_times()
            except psutil.Error:  # a worker that died meanwhile: its CPU time is lost to the estimate
                continue
            total += times.user + times.system
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):  # children: wrk, once waited for
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def _sample(self) -> tuple[float, float, float, float]:
        busy, steal = self._machine()
        return time.monotonic(), busy, steal, self._ours()

    def _parts(self) -> tuple[float, float, float]:
        """CPU seconds of the frontend, the workers, and wrk (this process's waited-for children)."""
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return _cpu_seconds(self.frontend), _cpu_seconds(self.workers), usage.ru_utime + usage.ru_stime

    def stop(self) -> tuple[float, float, tuple[float, float, float]]:
        """Cores' worth of CPU that other processes used and the hypervisor stole since the start, and the
        frontend's, workers' and wrk's."""
        end = self._sample()
        wall, busy, steal, ours = (b - a for a, b in zip(self.start, end, strict=True))
        frontend, workers, loadgen = (b - a for a, b in zip(self.parts_start, self._parts(), strict=True))
        return max(0.0, busy - ours) / wall, steal / wall, (frontend / wall, workers / wall, loadgen / wall)


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += times.user + times.system
    return total


def run_wrk(url: str, bodies: Path, concurrency: int, seconds: int) -> dict:
    command = [
        "wrk", f"-t{min(concurrency, os.cpu_count() or 1)}", f"-c{concurrency}", f"-d{seconds}s",
        "--timeout", f"{WRK_TIMEOUT_S}s", "-s", str(WRK_SCRIPT), url, "--", str(bodies),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line.removeprefix(RESULT_MARKER))
    raise RuntimeError(f"wrk gave no result (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}")


def handler_counters(metrics_url: str) -> dict[str, float]:
    """The handler's counters summed over workers; empty for a model without them (the no-op)."""
    text = requests.get(f"{metrics_url}/metrics", params={"name[]": list(HANDLER_COUNTERS)}, timeout=10).text
    counters: dict[str, float] = {}
    for line in text.splitlines():
        match = PROMETHEUS_SAMPLE.match(line)
        if match and match[1] in HANDLER_COUNTERS:
            counters[match[1]] = counters.get(match[1], 0.0) + float(match[2])
    return counters


def post(url: str, body: Body) -> requests.Response:
    return requests.post(url, data=body.data, headers=body.headers, timeout=WRK_TIMEOUT_S)


def measure_point(
    server: TorchServeProcess,
    model: str,
    point: Point,
    bodies: list[Body],
    workdir: Path,
    seconds: int,
    warmup_seconds: int,
) -> PointResult:
    """One wrk run of ``seconds`` after a warm-up run, against a server whose ``model`` is READY."""
    url = server.endpoints.inference + point.protocol.path(model)
    answer = post(url, bodies[0])
    if answer.status_code != 200:
        raise RuntimeError(f"{model} refused a benchmark body ({point.name}): {answer.status_code} {answer.text[:300]}")
    bodies_file = write_bodies(bodies, workdir / f"bodies-{point.rows_per_request}-{point.protocol}.bin")
    if warmup_seconds:
        run_wrk(url, bodies_file, point.concurrency, warmup_seconds)
    assert server.process is not None, "the server is started"
    before = handler_counters(server.endpoints.metrics)
    meter = CpuMeter(server.process.pid, server.worker_pids(model))
    result = run_wrk(url, bodies_file, point.concurrency, seconds)
    other_cores, steal_cores, (frontend_cores, workers_cores, loadgen_cores) = meter.stop()
    after = handler_counters(server.endpoints.metrics)
    rss = [psutil.Process(pid).memory_info().rss / 2**20 for pid in server.worker_pids(model)]
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in HANDLER_COUNTERS}
    batches = delta["DLRMBatches"]
    duration = result["duration_us"] / 1e6
    errors = result["errors"]
    return PointResult(
        model=model,
        rows_per_request=point.rows_per_request,
        concurrency=point.concurrency,
        protocol=str(point.protocol),
        seconds=duration,
        requests=result["requests"],
        req_per_s=result["requests"] / duration,
        rows_per_s=result["requests"] * point.rows_per_request / duration,
        latency_ms={name: value / 1e3 for name, value in result["latency_us"].items()},
        http_errors=errors["status"],
        socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        worker_rss_mib=rss,
        rows_per_batch=delta["DLRMRows"] / batches if batches else None,
        handler_ms_per_batch=(delta["DLRMDecodeMilliseconds"] + delta["DLRMForwardMilliseconds"]) / batches
        if batches
        else None,
        other_cpu_cores=other_cores,
        steal_cores=steal_cores,
        loadavg_1m=os.getloadavg()[0],
        frontend_cpu_cores=frontend_cores,
        workers_cpu_cores=workers_cores,
        loadgen_cpu_cores=loadgen_cores,
    )
