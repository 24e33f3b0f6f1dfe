"""MLPerf's DLRM server scenario, in miniature: one user and N candidates per query, Poisson arrivals.

A query is one user with N candidate items, N uniform in [100, 700]; queries arrive
as a Poisson process at a target rate (an open loop: a slow answer does not slow the
arrivals, as it would with wrk's closed loop), and a system is judged by the highest
rate at which the 99th percentile of latency stays within 60 ms (MLPerf Inference's
DLRM-v2 server scenario). Each query is sent in two formats (docs/api.md, "Ranking
requests"):

- ``expanded``: ``{"instances": [...]}``, every candidate a full raw Criteo row;
- ``ranking``: ``{"context": {...}, "instances": [...]}``, the user's 13 first sparse
  features once as context, each candidate with the other 26 features;
- ``columns_expanded``, ``columns_ranking``: the same as columns (``{"inputs": {feature:
  [values]}}``, beside the context);
- ``oip_expanded``, ``oip_ranking``: the same rows as Open Inference Protocol binary
  tensors (the model inputs the server's preprocessing makes of them), expanded, or
  with the context as ``context_sparse_lengths``/``context_sparse_ids`` (the candidates' lengths
  compact: only the features the context has no ids for).

The run builds an archive (``--checkpoint``, trained weights, or ``--preset``, default
``criteo-kaggle``, the reference shape, random weights; ``--quantize`` as build_mar.py's),
measures this machine's GEMM limit (:mod:`bench.machine_limit`), one 500-candidate query of
each format in-process (one thread, alternately) and then serves the archive with the shipped
settings, driven by an asyncio/aiohttp Poisson client. After a short unmeasured closed
loop of every format (TorchServe's frontend runs on the JVM, which compiles as it serves:
unwarmed, the first format measured paid for it), the closed-loop capacity of every
format, in rounds of short bursts with the formats in turn (the machine's drift over
minutes then falls on all formats alike, and each round gives a ranking ÷ expanded
ratio); then, per format, a short search over rates: fractions of its capacity, then up
by 1.25x while the p99 stays within the bound (at most four steps; the results say when
the search ended still within it, the best rate then a lower bound), then two geometric
bisections between the highest rate within the bound and the next one tried. Latency
counts from each query's scheduled arrival time, so a client that falls behind shows as
latency, not as a lower rate. The closed loop also measures the CPU each part takes per
query: TorchServe's frontend, its workers, this client. Each candidates/s figure comes with
its fraction of the machine's limit: candidates/s × the forward's multiply-adds per candidate
(a ranking format's split forward does less per candidate than an expanded one) ÷ the
GEMM throughput of the MLPs' precision, with one thread in-process and all cores served.
Results go to ``bench/results/<time>-ranking-<mode>/`` (JSON, Markdown, plot).

    python -m bench.ranking --checkpoint runs/criteo-kaggle-synthetic   # as `make bench` runs it
    python -m bench.ranking --mode quick --checkpoint runs/small-synthetic  # 4 s per rate, fewer rates
    python -m bench.ranking --quantize none # TorchRec's per-table modules
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import torch

from bench import machine_limit
from bench.harness import build_archive, latency_summary, machine_record, results_dir, write_results
from bench.load import CpuMeter
from bench.ranking_report import MLPERF_ANCHOR, markdown, plot
from bench.ranking_workload import (
    CANDIDATES,
    FORMATS,
    P99_BOUND_MS,
    PAIRS,
    Message,
    Query,
    make_queries,
    make_query,
    multiply_adds_per_candidate,
)
from handler.json_rows import RequestDecoder
from handler.predictor import DLRMPredictor, Request
from model_archive.build import DEFAULT_TABLES
from model_archive.contents import model_artifact, serving_settings
from model_factory.quantization import TableDtype
from servers.torchserve import TorchServeProcess

DEFAULT_PRESET = "criteo-kaggle"
CLIENTS_PER_WORKER = 4  # closed-loop clients: enough in flight for TorchServe to batch
WARMUP_SECONDS = 3.0  # per format, unmeasured, before any measurement
RATE_STEP, STEPS_UP = 1.25, 4  # above the fractions of capacity, while the p99 bound holds


@dataclass(frozen=True)
class RatePoint:
    format: str
    offered_per_s: float
    seconds: float
    queries: int
    errors: int
    completed_per_s: float
    candidates_per_s: float
    p50_ms: float
    p99_ms: float

    @property
    def within_bound(self) -> bool:
        return self.errors == 0 and self.p99_ms <= P99_BOUND_MS


@dataclass(frozen=True)
class Mode:
    seconds: float
    fractions: tuple[float, ...]  # offered rates, as fractions of the closed-loop capacity
    bisections: int  # geometric bisections between the last rate within the p99 bound and the first beyond
    closed_loop_rounds: int  # the closed loop's seconds per format, split into this many interleaved bursts


MODES = {
    "full": Mode(seconds=15, fractions=(0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9), bisections=2, closed_loop_rounds=5),
    "quick": Mode(seconds=4, fractions=(0.1, 0.25, 0.5), bisections=0, closed_loop_rounds=2),
}


@dataclass(frozen=True)
class Burst:
    """One closed-loop burst of one format: its rate and the CPU milliseconds per query of each part."""

    queries_per_s: float
    cpu_ms_per_query: dict[str, float]  # frontend, workers, client


def inprocess(predictor: DLRMPredictor, query: Query, repeats: int) -> dict[str, Any]:
    """One query in each format through ``DLRMPredictor`` (one thread), the formats timed in turn."""
    seconds: dict[str, list[float]] = {name: [] for name in FORMATS}
    for _ in range(repeats):
        for name in FORMATS:
            message = query.messages[name]
            request = Request(message.body, {key.lower(): value for key, value in message.headers.items()})
            started = time.perf_counter()
            (response,) = predictor.predict([request]).responses
            seconds[name].append(time.perf_counter() - started)
            assert response.status == 200, response.body[:200]
    medians = {name: float(np.median(values)) for name, values in seconds.items()}
    return {
        "candidates": query.candidates,
        "ms": {name: round(value * 1e3, 2) for name, value in medians.items()},
        "candidates_per_s": {name: round(query.candidates / value) for name, value in medians.items()},
        "bytes": {name: len(query.messages[name].body) for name in FORMATS},
        "speedup": {pair: round(medians[expanded] / medians[ranked], 3) for pair, (expanded, ranked) in PAIRS.items()},
        "bytes_ratio": {
            pair: round(len(query.messages[ranked].body) / len(query.messages[expanded].body), 3)
            for pair, (expanded, ranked) in PAIRS.items()
        },
    }


async def _send(session: aiohttp.ClientSession, url: str, message: Message, scheduled: float) -> tuple[float, bool]:
    loop = asyncio.get_running_loop()
    try:
        async with session.post(url + message.path, data=message.body, headers=message.headers) as response:
            await response.read()
            ok = response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        ok = False
    return loop.time() - scheduled, ok


async def _poisson(url: str, queries: list[Query], name: str, rate: float, seconds: float, seed: int) -> RatePoint:
    rng = np.random.default_rng(seed)
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = loop.time()
        scheduled = start
        tasks: list[asyncio.Task[tuple[float, bool]]] = []
        candidates = 0
        while (scheduled := scheduled + rng.exponential(1 / rate)) < start + seconds:
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            query = queries[len(tasks) % len(queries)]
            candidates += query.candidates
            tasks.append(asyncio.create_task(_send(session, url, query.messages[name], scheduled)))
        results = await asyncio.gather(*tasks)
        elapsed = loop.time() - start
    latency = latency_summary([seconds * 1e3 for seconds, _ in results])
    errors = sum(not ok for _, ok in results)
    return RatePoint(
        format=name,
        offered_per_s=round(rate, 2),
        seconds=round(elapsed, 1),
        queries=len(results),
        errors=errors,
        completed_per_s=round((len(results) - errors) / elapsed, 2),
        candidates_per_s=round(candidates / elapsed),
        p50_ms=latency["p50_ms"],
        p99_ms=latency["p99_ms"],
    )


def closed_loop_capacity(url: str, queries: list[Query], name: str, clients: int, seconds: float) -> float:
    """Queries per second with ``clients`` clients sending back to back: the rate the search starts from."""

    async def run() -> float:
        deadline = asyncio.get_running_loop().time() + seconds
        done = 0

        async def client(offset: int) -> None:
            nonlocal done
            async with aiohttp.ClientSession() as session:
                index = offset
                while asyncio.get_running_loop().time() < deadline:
                    message = queries[index % len(queries)].messages[name]
                    async with session.post(url + message.path, data=message.body, headers=message.headers) as r:
                        await r.read()
                    done += 1
                    index += clients

        await asyncio.gather(*(client(offset) for offset in range(clients)))
        return done / seconds

    return asyncio.run(run())


def interleaved_closed_loop(
    server: TorchServeProcess, queries: list[Query], clients: int, seconds: float, rounds: int
) -> dict[str, list[Burst]]:
    """Every format's closed loop in ``rounds`` bursts of ``seconds``, the formats in turn (reversed every
    other round).

    On a shared machine whose speed drifts by tens of percent over minutes, formats
    measured one after the other differ by the drift as much as by their cost; in
    turns, each round's ranking ÷ expanded compares like with like, and the spread
    over rounds shows what is left.
    """
    assert server.process is not None
    bursts: dict[str, list[Burst]] = {fmt: [] for fmt in FORMATS}
    for round_index in range(rounds):
        for fmt in FORMATS if round_index % 2 == 0 else FORMATS[::-1]:
            meter = CpuMeter(server.process.pid, server.worker_pids())
            started, client_started = time.monotonic(), time.process_time()
            rate = closed_loop_capacity(server.endpoints.inference, queries, fmt, clients, seconds)
            client_cores = (time.process_time() - client_started) / (time.monotonic() - started)
            _, _, (frontend_cores, worker_cores, _) = meter.stop()
            per_query = {
                part: round(cores / rate * 1e3, 2)
                for part, cores in (("frontend", frontend_cores), ("workers", worker_cores), ("client", client_cores))
            }
            bursts[fmt].append(Burst(round(rate, 2), per_query))
        print(
            f"closed loop, round {round_index + 1} of {rounds}: "
            + ", ".join(f"{fmt} {bursts[fmt][-1].queries_per_s:.1f}" for fmt in FORMATS)
            + " q/s",
            flush=True,
        )
    return bursts


def _bracket(points: list[RatePoint]) -> tuple[float, float] | None:
    """The highest offered rate within the p99 bound and the lowest above it, if there are both."""
    within = [point.offered_per_s for point in points if point.within_bound]
    above = [point.offered_per_s for point in points if within and point.offered_per_s > max(within)]
    return (max(within), min(above)) if above else None


def served(archive: Path, queries: list[Query], mode: Mode, workdir: Path) -> dict[str, Any]:
    workers = serving_settings(archive).workers
    store, name = archive.parent, archive.name
    results: dict[str, Any] = {}
    with TorchServeProcess(store, f"dlrm={name}", workdir / "torchserve") as server:
        server.wait_ready()
        url = server.endpoints.inference
        for fmt in FORMATS:  # the JVM compiles the frontend's hot paths as it serves: not on the first format's clock
            closed_loop_capacity(url, queries, fmt, CLIENTS_PER_WORKER * workers, seconds=WARMUP_SECONDS)
        rounds = mode.closed_loop_rounds
        bursts = interleaved_closed_loop(server, queries, CLIENTS_PER_WORKER * workers, mode.seconds / rounds, rounds)
        for index, fmt in enumerate(FORMATS):
            capacity = float(np.mean([burst.queries_per_s for burst in bursts[fmt]]))
            points = [
                asyncio.run(_poisson(url, queries, fmt, capacity * fraction, mode.seconds, seed=index))
                for fraction in mode.fractions
            ]
            for _ in range(STEPS_UP):  # on while the bound holds, so that it, not the search, sets the best rate
                if not points[-1].within_bound:
                    break
                rate = points[-1].offered_per_s * RATE_STEP
                points.append(asyncio.run(_poisson(url, queries, fmt, rate, mode.seconds, seed=index)))
            ended_within_bound = points[-1].within_bound
            for _ in range(mode.bisections):
                if (bracket := _bracket(points)) is None:
                    break
                rate = (bracket[0] * bracket[1]) ** 0.5
                points.append(asyncio.run(_poisson(url, queries, fmt, rate, mode.seconds, seed=index)))
            points.sort(key=lambda point: point.offered_per_s)
            best = max((p for p in points if p.within_bound), key=lambda p: p.completed_per_s, default=None)
            results[fmt] = {
                "search_ended_within_bound": ended_within_bound,
                "closed_loop_queries_per_s": round(capacity, 2),
                "closed_loop_cpu_ms_per_query": {  # the median burst's, by part
                    part: round(float(np.median([burst.cpu_ms_per_query[part] for burst in bursts[fmt]])), 2)
                    for part in bursts[fmt][0].cpu_ms_per_query
                },
                "closed_loop_bursts": [asdict(burst) for burst in bursts[fmt]],
                "points": [asdict(point) for point in points],
                "best": asdict(best) if best else None,
            }
            summary = f"best {best.completed_per_s} q/s, p99 {best.p99_ms} ms" if best else "no rate within the bound"
            print(f"{fmt}: closed loop {capacity:.1f} q/s; {summary}", flush=True)
    for expanded_format, ranked_format in PAIRS.values():  # ranking ÷ expanded q/s, round by round
        results[ranked_format]["closed_loop_ratios"] = [
            round(ranked.queries_per_s / expanded.queries_per_s, 3)
            for expanded, ranked in zip(bursts[expanded_format], bursts[ranked_format], strict=True)
        ]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default=os.environ.get("BENCH_MODE", "full"))
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=DEFAULT_PRESET, help="model shape, random weights (default: %(default)s)")
    source.add_argument("--checkpoint", type=Path, help="trained weights: a trainer output directory (`make bench`'s)")
    parser.add_argument("--queries", type=int, default=64, help="distinct queries, sent in turn")
    parser.add_argument(
        "--quantize",
        type=TableDtype,
        choices=list(TableDtype),
        default=DEFAULT_TABLES,
        help="the archive's tables, as build_mar.py's --quantize (default: %(default)s)",
    )
    parser.add_argument("--output-dir", type=Path)
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    started = datetime.now(UTC)
    output_dir = args.output_dir or results_dir(f"ranking-{args.mode}", started)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = ["--checkpoint", str(args.checkpoint)] if args.checkpoint else ["--preset", args.preset]
    with tempfile.TemporaryDirectory(prefix="dlrm-ranking-") as tmp:
        store = Path(tmp) / "store"
        build_archive(store / "dlrm.mar", *model, "--quantize", args.quantize, "--archive-format", "no-archive")
        archive = store / "dlrm"  # unzipped: served in place
        artifact = model_artifact(archive)
        limit = machine_limit.measure_in_subprocess(artifact.model, args.mode, Path(tmp) / "machine-limit.json")
        decoder = RequestDecoder(artifact.model, artifact.preprocessing, max_rows=CANDIDATES[1])
        queries = make_queries(artifact.model, decoder, args.queries, seed=1)
        torch.set_num_threads(1)
        predictor = DLRMPredictor.from_artifact(archive, torch.device("cpu"), max_rows=CANDIDATES[1])
        one_query = make_query(artifact.model, decoder, 500, np.random.default_rng(7))
        document: dict[str, Any] = {
            "mode": args.mode,
            "model": " ".join(model),
            "tables": args.quantize.value,
            "started": started.isoformat(timespec="seconds"),
            **machine_record(),
            "machine_limit": limit,
            "mlp_precision": machine_limit.served_precision(artifact),
            "multiply_adds_per_candidate": multiply_adds_per_candidate(artifact.model, artifact.quantization.mlp),
            "p99_bound_ms": P99_BOUND_MS,
            "mlperf_anchor": MLPERF_ANCHOR,
            "inprocess": inprocess(predictor, one_query, repeats=20 if args.mode == "full" else 6),
        }
        print(f"in-process: {document['inprocess']}", flush=True)
        document["served"] = served(archive, queries, mode, Path(tmp))
    text = markdown(document)
    write_results(output_dir, document, text)
    plot(document, output_dir / "results.png")
    print(f"\n{text}\nresults: {output_dir}")


if __name__ == "__main__":
    main()
