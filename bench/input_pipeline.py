"""How fast the trainer's input pipeline reads, and how long the training loop waits on it.

1. Reading alone: ``read_batches`` rows/s on one core with the exact parser
   alone (the reader before the fast path) and with the fast path, and
   ``prefetched_batches`` rows/s (its workers' pace, passing batches between
   processes included).
2. The real training loop of ``training.train`` (the ``small`` preset's sharded
   model, its optimizer and ``train_step``) fed by ``read_batches`` serially,
   with each parser, and by ``prefetched_batches`` (background worker processes):
   the share of the loop's time spent waiting for the next batch.

    python -m bench.input_pipeline --threads 1         # after `make data`; 1 thread on 2 cores
    python -m bench.input_pipeline --rows 500000 --workers 2
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from unittest import mock

import torch
from torchrec.datasets.utils import Batch

from model_factory.config import preset
from model_factory.features import Preprocessing
from servers.torchserve import REPO_ROOT
from training import criteo
from training.distributed import init_process_group
from training.loader import prefetched_batches
from training.train import TrainingConfig, build_sharded_model, loss_function, make_optimizer, train_step

TRAIN_DATA = REPO_ROOT / "data" / "synthetic" / "train.tsv"
WARMUP_BATCHES = 20


def exact_parser_only() -> AbstractContextManager[object]:
    """``read_batches`` as it was before the fast path: every chunk through the exact parser."""
    return mock.patch.object(criteo, "parse_lines", criteo._parse_exactly)


@dataclass(frozen=True)
class LoopTiming:
    rows: int
    seconds: float
    waiting: float  # in ``next()`` on the batches, the first batch included
    first_batch: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def read_rate(batches: Iterator[Batch], rows: int, batch_size: int) -> float:
    """Rows/s of consuming the first ``rows`` rows of ``batches`` and doing nothing else."""
    started, count = time.perf_counter(), 0
    for batch in islice(batches, -(-rows // batch_size)):
        count += batch.labels.numel()
    return count / (time.perf_counter() - started)


def timed_loop(batches: Iterator[Batch], rows: int, batch_size: int, step: Callable[[Batch], object]) -> LoopTiming:
    """Train on the first ``rows`` rows of ``batches``, timing the waits for each next batch."""
    waiting, count, first_batch = 0.0, 0, 0.0
    started = time.perf_counter()
    for _ in range(-(-rows // batch_size)):
        asked = time.perf_counter()
        batch = next(batches, None)
        waited = time.perf_counter() - asked
        if batch is None:
            break
        waiting += waited
        first_batch = first_batch or waited
        step(batch)
        count += batch.labels.numel()
    return LoopTiming(count, time.perf_counter() - started, waiting, first_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=TRAIN_DATA, help="a Criteo TSV file (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=300_000, help="rows per measurement (default: 300000)")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per batch (default: 1024)")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes (default: 1)")
    parser.add_argument("--prefetch", type=int, default=4, help="batches each worker keeps ready (default: 4)")
    parser.add_argument("--threads", type=int, help="torch threads of the training step (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    config = preset("small")
    preprocessing = Preprocessing()

    def serial() -> Iterator[Batch]:
        return criteo.read_batches([args.data], args.batch_size, config, preprocessing)

    def prefetched() -> Iterator[Batch]:
        return prefetched_batches(
            [args.data], args.batch_size, config, preprocessing, workers=args.workers, prefetch=args.prefetch
        )

    loaders: list[tuple[str, Callable[[], Iterator[Batch]], Callable[[], AbstractContextManager[object]]]] = [
        ("read_batches, exact parser only", serial, exact_parser_only),
        ("read_batches, fast path", serial, nullcontext),
        (f"prefetched_batches, fast path, {args.workers} worker(s)", prefetched, nullcontext),
    ]
    print(f"{args.data}, batches of {args.batch_size}, {args.rows:,} rows per measurement")
    print("\n| reading alone (serial: on one core) | rows/s |\n|---|---:|")
    for name, batches, parser_context in loaders:
        with parser_context():
            print(f"| {name} | {read_rate(batches(), args.rows, args.batch_size):,.0f} |")

    ranks = init_process_group()
    with tempfile.TemporaryDirectory() as output:
        training = TrainingConfig(config, (args.data,), (), Path(output), batch_size=args.batch_size)
        model, _ = build_sharded_model(training, ranks)
        optimizer = make_optimizer(model, training)
        criterion = loss_function(training.loss, training.positive_weight)

        def step(batch: Batch) -> object:
            return train_step(model, optimizer, criterion, batch)

        ready = list(islice(serial(), WARMUP_BATCHES + 100))
        timed_loop(iter(ready[:WARMUP_BATCHES]), WARMUP_BATCHES * args.batch_size, args.batch_size, step)
        steps_only = timed_loop(iter(ready[WARMUP_BATCHES:]), 100 * args.batch_size, args.batch_size, step)
        print(
            f"\ntraining step alone (small preset, {torch.get_num_threads()} torch threads): "
            f"{steps_only.rows_per_s:,.0f} rows/s"
        )
        print("\n| training loop fed by | rows/s | waiting on data | first batch |\n|---|---:|---:|---:|")
        for name, batches, parser_context in loaders:
            with parser_context():
                timing = timed_loop(batches(), args.rows, args.batch_size, step)
            print(
                f"| {name} | {timing.rows_per_s:,.0f} | {timing.waiting / timing.seconds:.1%} "
                f"| {timing.first_batch * 1e3:.0f} ms |"
            )


if __name__ == "__main__":
    main()
