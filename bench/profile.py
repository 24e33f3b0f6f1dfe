"""Where a TorchServe worker spends its time under load: py-spy samples sorted into serving stages.

``py-spy record`` samples the worker's Python stacks (``--idle`` keeps the
samples where it waits for the frontend) into a flame graph SVG and into
collapsed stacks, which :func:`breakdown` sorts into stages by the first rule
whose frame appears in a stack.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.load import Point, run_wrk
from bench.workload import Body, write_bodies
from servers.torchserve import TorchServeProcess

SAMPLE_RATE_HZ = 100
# (stage, frame substrings): the first stage with a matching frame takes the sample. Order matters:
# metrics are emitted through logging, KJT methods also run inside the model's forward, and so on.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle: waiting for the frontend", ("_retrieve_buffer (",)),
    ("metrics (TorchServe's PredictionTime line per batch, handler counters)", ("HandlerMetrics.", "(ts/metrics/")),
    ("logging", ("(logging/",)),
    ("forward: embedding lookups", ("SparseArch.forward",)),
    ("forward: bottom MLP", ("DenseArch.forward",)),
    ("forward: interaction", ("InteractionArch.forward",)),
    ("forward: top MLP", ("OverArch.forward",)),
    ("forward: other", ("DLRM.forward",)),
    ("KJT building", ("rows_to_kjt", "KeyedJaggedTensor")),
    ("decode (JSON parse, validation)", ("RequestDecoder.decode",)),
    ("encode (scores to JSON)", ("encode_scores",)),
    ("predictor glue (concatenate, sigmoid, split)", ("DLRMPredictor.",)),
    ("TorchServe protocol (read request, build response)", ("(ts/protocol/", "(ts/context.py")),
    ("TorchServe worker loop, other", ("(ts/",)),
)
OTHER = "other"
BACKGROUND_THREAD = "Thread._bootstrap ("
# Seconds of load before sampling starts, so that the profile sees the steady state.
SETTLE_SECONDS = 2


def py_spy() -> str:
    beside_python = Path(sys.executable).parent / "py-spy"
    return str(beside_python) if beside_python.exists() else "py-spy"


def record(pid: int, seconds: int, output: Path, fmt: str) -> Path:
    """Sample ``pid`` for ``seconds`` into ``output`` (``flamegraph`` SVG or ``raw`` collapsed stacks)."""
    command = [
        py_spy(), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(SAMPLE_RATE_HZ),
        "--idle", "--format", fmt, "--output", str(output),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if completed.returncode != 0 or not output.exists():
        raise RuntimeError(f"py-spy failed (exit {completed.returncode}): {completed.stderr.strip()[-1000:]}")
    return output


def stage_of(stack: str) -> str:
    for stage, frames in STAGES:
        if any(frame in stack for frame in frames):
            return stage
    return OTHER


def breakdown(collapsed: str) -> dict[str, float]:
    """Share of the serving thread's samples per stage (idle included), largest first.

    Stacks of other threads (they start in ``Thread._bootstrap``: the handler's
    metrics timer, asleep nearly always) are left out, or their idle samples
    would dilute every stage of the thread that serves the requests.
    """
    counts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and not stack.startswith(BACKGROUND_THREAD):
            counts[stage_of(stack)] += int(count)
    total = sum(counts.values()) or 1
    return {stage: count / total for stage, count in counts.most_common()}


def profile_under_load(
    server: TorchServeProcess, model: str, point: Point, bodies: list[Body], workdir: Path, stem: Path, seconds: int
) -> dict[str, float]:
    """Flame graph (``stem``.svg) and stage shares (from ``stem``.txt) of the first worker while wrk drives ``point``.

    py-spy runs outside the measured points: sampling pauses the worker briefly at every sample.
    """
    url = server.endpoints.inference + point.protocol.path(model)
    pid = server.worker_pids(model)[0]
    bodies_file = write_bodies(bodies, workdir / "profile-bodies.bin")
    with ThreadPoolExecutor(max_workers=1) as pool:
        load = pool.submit(run_wrk, url, bodies_file, point.concurrency, 2 * seconds + 2 * SETTLE_SECONDS + 5)
        time.sleep(SETTLE_SECONDS)
        record(pid, seconds, stem.with_suffix(".svg"), "flamegraph")
        collapsed = record(pid, seconds, stem.with_suffix(".txt"), "raw")
        load.result()
    return breakdown(collapsed.read_text())
