"""What every benchmark shares: building an archive, where results go, what a run ran on, timing and latency.

Each benchmark (``python -m bench.<name>``) builds its archives with :func:`build_archive`
(``build_mar.py`` in a subprocess, as a user builds them), writes its files into a new
:func:`results_dir` with :func:`write_results`, records :func:`machine_record` in its JSON (a
figure means little without the machine, its load and the versions it ran with), and reduces
timings with :func:`time_calls` and :func:`latency_summary`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from servers.memory import PeakRss
from servers.torchserve import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "bench" / "results"
BUILD_MAR = REPO_ROOT / "build_mar.py"
PACKAGES = ("torch", "torchrec", "fbgemm-gpu-cpu", "torchserve", "torch-model-archiver", "numpy", "orjson", "py-spy")


def results_dir(kind: str, started: datetime | None = None) -> Path:
    """A new folder ``bench/results/<UTC start time>-<kind>`` for one run's files."""
    directory = RESULTS_DIR / f"{started or datetime.now(UTC):%Y%m%d-%H%M%S}-{kind}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_results(directory: Path, document: dict[str, Any], markdown: str | None = None) -> None:
    """``results.json`` (and ``results.md``) in ``directory``."""
    (directory / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    if markdown is not None:
        (directory / "results.md").write_text(markdown)


def machine_record() -> dict[str, Any]:
    """What a result ran on: the machine and its load now, and the versions of everything in the path."""
    return {"machine": machine(), "versions": versions()}


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "loadavg": [round(load, 2) for load in os.getloadavg()],
    }


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["java"] = first_line([_java(), "-version"])
    found["wrk"] = first_line(["wrk", "-v"]).removeprefix("wrk ").split(" [")[0]
    return found


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    return os.path.join(home, "bin", "java") if home else "java"


def first_line(command: list[str]) -> str:
    """The first output line of a ``--version``-style command (some print to stderr, some exit non-zero)."""
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except OSError as error:
        return f"unavailable ({error.strerror})"
    lines = (completed.stdout + completed.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


@dataclass(frozen=True)
class Run:
    """A finished command: its wall-clock seconds and the peak RSS of its process tree (bytes)."""

    seconds: float
    peak_rss: int


def run_command(command: list[str], *, stream: bool = False, env: dict[str, str] | None = None) -> Run:
    """Run ``command`` from the repository root; exit the benchmark, with its output, if it fails.

    ``stream``: let its output through as it comes (builds and training runs of minutes show
    their progress); otherwise it is kept and shown only on failure.
    """
    output = None if stream else subprocess.PIPE
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT if output else None, text=True
    )
    meter = PeakRss([process.pid])
    captured, _ = process.communicate()
    seconds, peak = time.perf_counter() - started, meter.stop()
    if process.returncode != 0:
        sys.exit(f"failed (exit {process.returncode}): {' '.join(command)}\n{captured or ''}")
    return Run(seconds, peak)


def build_archive(output: Path, *args: str, stream: bool = False) -> Run:
    """``build_mar.py ARGS... --output OUTPUT``, as a user runs it; exits the benchmark if the build fails."""
    return run_command([sys.executable, str(BUILD_MAR), *args, "--output", str(output)], stream=stream)


def time_calls(
    call: Callable[[], Any], seconds: float, warmup: int = 3, min_calls: int = 5
) -> tuple[int, float, float]:
    """Calls, total seconds and median milliseconds per call of ``call`` run for about ``seconds``."""
    for _ in range(warmup):
        call()
    durations: list[float] = []
    started = time.perf_counter()
    while len(durations) < min_calls or time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        call()
        durations.append(time.perf_counter() - begin)
    return len(durations), sum(durations), statistics.median(durations) * 1e3


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """The median and 99th percentile of latencies in milliseconds (NaN for none), rounded to 0.01 ms."""
    if not latencies_ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    p50, p99 = np.percentile(np.asarray(latencies_ms, dtype=float), [50, 99])
    return {"p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2)}
