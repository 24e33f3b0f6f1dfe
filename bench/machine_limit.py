"""This machine's own limit for a DLRM forward: GEMM throughput at the MLPs' shapes, and the work per row.

The reference shape's forward (``criteo-kaggle``: dimension 64, bottom MLP 512-256-64, top MLP
512-512-256-1) is 806,720 multiply-adds per row, 94% of them in the MLPs' seven ``Linear``
layers, so what bounds its rows/s is how fast this machine multiplies matrices. This module
measures that, in the precisions the MLPs are served in, with one thread and with every usable
core, at the MLPs' own shapes (a batch of rows times each layer's weight):

- fp32: ``torch.mm``, the GEMM of a float ``Linear``; bf16: the same in bfloat16, what
  ``--quantize-mlp bf16`` serves;
- int8: ``torch._int_mm`` (int8 × int8 → int32), the machine's own int8 GEMM: not the served
  ``--quantize-mlp int8`` kernel, whose speed is what is measured against the limit (a limit
  measured through it would make any int8 kernel look as good as the machine allows).

The throughput at a batch size is the layers' multiply-adds over the time of their GEMMs back to
back (no bias, activation or interaction); a precision's limit with N threads is the best over
the batch sizes and the thread counts up to N measured (N threads can always do what one does:
on a busy machine, two OpenMP threads on two cores can be slower than one). A benchmark then
states each figure as a fraction of it: rows/s × multiply-adds per row ÷ limit
(:func:`fraction_of_limit`).

    python -m bench.machine_limit --mode quick      # criteo-kaggle, batch 1024, 0.3 s per layer
    python -m bench.machine_limit --preset small    # full: batches 256, 1024 and 4096
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.harness import machine_record, results_dir, run_command, time_calls, usable_cores, write_results
from model_factory.artifact import ModelArtifact
from model_factory.config import DLRMConfig, preset
from model_factory.factory import build_dlrm, init_weights
from model_factory.features import rows_to_kjt
from model_factory.quantization import MlpDtype

DEFAULT_PRESET = "criteo-kaggle"


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"


def served_precision(artifact: ModelArtifact) -> Precision:
    """The precision an archive's MLPs are served in."""
    return {MlpDtype.NONE: Precision.FP32, MlpDtype.BF16: Precision.BF16, MlpDtype.INT8: Precision.INT8}[
        artifact.quantization.mlp
    ]


@dataclass(frozen=True)
class Mode:
    seconds: float  # per layer, batch, precision and thread count
    batches: tuple[int, ...]


MODES = {"quick": Mode(seconds=0.3, batches=(1024,)), "full": Mode(seconds=1.0, batches=(256, 1024, 4096))}


def mlp_shapes(config: DLRMConfig) -> list[tuple[int, int]]:
    """``(inputs, outputs)`` of every ``Linear`` in the forward: the bottom MLP's, then the top MLP's."""
    bottom = [config.num_dense_features, *config.dense_arch_layer_sizes]
    top = [config.embedding_dim + _pairs(config.num_sparse_features + 1), *config.over_arch_layer_sizes]
    return [*pairwise(bottom), *pairwise(top)]


def _pairs(vectors: int) -> int:
    return vectors * (vectors - 1) // 2


def _work(shapes: list[tuple[int, int]]) -> int:
    """Multiply-adds of one row through these layers."""
    return sum(inputs * outputs for inputs, outputs in shapes)


def multiply_adds_per_row(config: DLRMConfig) -> int:
    """A row's multiply-adds from the layer sizes: the MLPs' layers and the interaction's ``bmm``.

    TorchRec's dot interaction multiplies all ``F + 1`` vectors (dense embedding and sparse
    features) with each other, ``(F + 1)² × D``, and keeps the pairs above the diagonal.
    """
    vectors = config.num_sparse_features + 1
    return _work(mlp_shapes(config)) + vectors * vectors * config.embedding_dim


def ranking_multiply_adds_per_candidate(config: DLRMConfig, context_features: int) -> int:
    """A candidate's multiply-adds in a ranking request whose context holds ``context_features`` sparse features.

    ``handler.ranking``'s split forward (float MLPs): the bottom MLP; the candidate's own vectors
    (dense embedding and own sparse features) with each other and with the context's; the top MLP
    without the first layer's inputs from context-only pairs (once per request, left out here).
    """
    shapes, bottom_layers = mlp_shapes(config), len(config.dense_arch_layer_sizes)
    (first_inputs, first_outputs), *rest = shapes[bottom_layers:]
    own = config.num_sparse_features - context_features + 1
    interaction = own * (own + context_features) * config.embedding_dim
    top = (first_inputs - _pairs(context_features)) * first_outputs + _work(rest)
    return _work(shapes[:bottom_layers]) + interaction + top


def counted_multiply_adds_per_row(config: DLRMConfig, rows: int = 4) -> int:
    """A row's multiply-adds counted by ``FlopCounterMode`` over one forward of a float DLRM of this shape.

    Lookups are not multiply-adds, so the tables have one row each (the count does not depend
    on their size); the counter gives FLOPs, two per multiply-add.
    """
    shape = replace(config, num_embeddings_per_feature=(1,) * config.num_sparse_features)
    model = init_weights(build_dlrm(shape), seed=0)
    features = config.num_sparse_features
    lengths, ids = np.ones((rows, features), np.int64), np.zeros(rows * features, np.int64)
    sparse = rows_to_kjt(config.sparse_feature_names, lengths, ids)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(rows, config.num_dense_features), sparse)
    return counter.get_total_flops() // 2 // rows


@dataclass(frozen=True)
class Throughput:
    precision: str
    threads: int
    batch: int
    multiply_adds_per_s: float
    layer_ms: list[float]  # median milliseconds per call of each layer's GEMM, in mlp_shapes order


def gemm_throughput(shapes: list[tuple[int, int]], precision: Precision, batch: int, seconds: float) -> Throughput:
    """Multiply-adds/s of the layers' GEMMs at ``batch`` rows, with the current torch thread count."""
    generator = torch.Generator().manual_seed(0)
    layer_ms = []
    for inputs, outputs in shapes:
        x = torch.rand(batch, inputs, generator=generator)
        call: Callable[[], Any]
        if precision != Precision.INT8:
            dtype = torch.float32 if precision == Precision.FP32 else torch.bfloat16
            weight = torch.rand(outputs, inputs, generator=generator).to(dtype)  # as nn.Linear holds it
            call = partial(torch.mm, x.to(dtype), weight.T, out=torch.empty(batch, outputs, dtype=dtype))
        else:
            quantized = torch.randint(-128, 128, (batch, inputs), dtype=torch.int8, generator=generator)
            weight = torch.randint(-128, 128, (outputs, inputs), dtype=torch.int8, generator=generator)
            call = partial(torch._int_mm, quantized, weight.T)
        with torch.inference_mode():
            layer_ms.append(time_calls(call, seconds)[2])
    work = batch * _work(shapes)
    return Throughput(str(precision), torch.get_num_threads(), batch, work / (sum(layer_ms) / 1e3), layer_ms)


def thread_counts() -> list[int]:
    """One thread, and every usable core."""
    return sorted({1, usable_cores()})


def measure(config: DLRMConfig, mode: Mode) -> dict[str, Any]:
    """The limits (multiply-adds/s) by precision and thread count, every throughput measured, the work per row."""
    threads_before = torch.get_num_threads()
    points = []
    try:
        for threads in thread_counts():
            torch.set_num_threads(threads)
            for precision in Precision:
                for batch in mode.batches:
                    points.append(gemm_throughput(mlp_shapes(config), precision, batch, mode.seconds))
                    print(_line(points[-1]), flush=True)
    finally:
        torch.set_num_threads(threads_before)
    limits = {
        str(precision): {
            str(threads): max(
                p.multiply_adds_per_s for p in points if p.precision == precision and p.threads <= threads
            )
            for threads in thread_counts()
        }
        for precision in Precision
    }
    return {
        "shapes": mlp_shapes(config),
        "multiply_adds_per_row": counted_multiply_adds_per_row(config),
        "mode": asdict(mode),
        "limits": limits,
        "throughputs": [asdict(point) for point in points],
    }


def _line(point: Throughput) -> str:
    return (
        f"{point.precision} GEMMs, {point.threads} thread(s), batch {point.batch}: "
        f"{point.multiply_adds_per_s / 1e9:.1f} G multiply-adds/s"
    )


def limit(record: dict[str, Any], precision: str, threads: int) -> float:
    """The limit measured with ``threads`` threads, or with the next larger count measured (all cores)."""
    measured = record["limits"][precision]
    counts = sorted(int(count) for count in measured)
    return float(measured[str(next((count for count in counts if count >= threads), counts[-1]))])


def fraction_of_limit(
    rows_per_s: float, multiply_adds: int, record: dict[str, Any], precision: str, threads: int
) -> float:
    """The share of the machine's GEMM throughput that ``rows_per_s`` rows of ``multiply_adds`` each amount to."""
    return rows_per_s * multiply_adds / limit(record, precision, threads)


def measure_in_subprocess(config: DLRMConfig, mode: str, output: Path) -> dict[str, Any]:
    """:func:`measure` in a process of its own, whose OpenMP threads are gone when it returns."""
    config_file = output.with_suffix(".config.json")
    config_file.write_text(json.dumps(config.to_dict()))
    run_command(
        [
            sys.executable,
            "-m",
            "bench.machine_limit",
            "--mode",
            mode,
            "--config",
            str(config_file),
            "--output",
            str(output),
        ],
        stream=True,
    )
    return json.loads(output.read_text())


def markdown(record: dict[str, Any]) -> str:
    """The limits (G multiply-adds/s per precision and thread count), the work per row, and what was measured."""
    counts = sorted({int(count) for limits in record["limits"].values() for count in limits})
    lines = [
        f"Machine limit: GEMM throughput at the MLPs' shapes {record['shapes']}, G multiply-adds/s, the best of "
        f"batches {record['mode']['batches']} and of as many threads or fewer; the forward is "
        f"{record['multiply_adds_per_row']:,} multiply-adds per row.",
        "",
        "| precision | " + " | ".join(f"up to {count} thread(s)" for count in counts) + " |",
        "|---|" + "---|" * len(counts),
        *(
            f"| {precision} | " + " | ".join(f"{limits[str(count)] / 1e9:.1f}" for count in counts) + " |"
            for precision, limits in record["limits"].items()
        ),
        "",
        "Measured: "
        + "; ".join(
            f"{point['precision']} {point['threads']} thread(s) batch {point['batch']}: "
            f"{point['multiply_adds_per_s'] / 1e9:.1f}"
            for point in record["throughputs"]
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", default=DEFAULT_PRESET, help="model shape (default: %(default)s)")
    model.add_argument("--config", type=Path, help="a model_config JSON file (DLRMConfig fields) instead")
    parser.add_argument("--output", type=Path, help="write the JSON here (default: a new folder in bench/results)")
    args = parser.parse_args(argv)
    config = DLRMConfig.from_json(args.config.read_text()) if args.config else preset(args.preset)
    record = measure(config, MODES[args.mode])
    if args.output:
        args.output.write_text(json.dumps(record, indent=2) + "\n")
    else:
        write_results(results_dir(f"machine-limit-{args.mode}"), {**machine_record(), **record}, markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
