"""What a benchmark ran on: machine, load, and the versions of everything in the path."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psutil

PACKAGES = ("torch", "torchrec", "fbgemm-gpu-cpu", "torchserve", "torch-model-archiver", "numpy", "orjson", "py-spy")


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "loadavg": [round(load, 2) for load in os.getloadavg()],
    }


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
