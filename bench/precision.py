"""Which precision the reference shape's MLPs should run in on this CPU: speed and accuracy of each, in one run.

The trained ``criteo-kaggle`` model (``runs/criteo-kaggle-synthetic``, built by ``build_mar.py`` with fp32
MLPs and the default fp32 table-batched tables) is loaded once; each candidate is that model with its
dense and over arch made another way, the tables untouched:

- ``fp32``: as trained (``--quantize-mlp none``); ``fp32 compiled``: its MLPs under ``torch.compile``
  (inductor's CPU backend, static shapes);
- ``bf16``: what ``--quantize-mlp bf16`` serves (:class:`model_factory.quantization.Bf16Linear`: every layer
  but the one-output logit layer in bfloat16); ``bf16 compiled``;
- ``int8 torch.ao``: what ``--quantize-mlp int8`` serves, ``torch.ao.quantization.quantize_dynamic``
  (deprecated; one activation scale per forward, reduced range);
- ``int8 torchao``: its successor, torchao's ``Int8DynamicActivationInt8WeightConfig`` (one scale per row
  and per output channel), eager and compiled, and compiled with the first and last layers left fp32;
- ``int8 static``: torchao's PT2E flow with the ``X86InductorQuantizer`` (activation scales calibrated on
  the first 1,000 held-out rows, the archive's golden rows), compiled.

For each, with one torch thread (a worker's share of 2 cores) and under ``torch.no_grad`` (the handler's
``inference_mode`` fails to compile the static int8 graphs; the others run alike under both):

- rows/s of the whole forward (lookups, MLPs, interaction) at batch 1, 256 and 1024, and of the MLPs
  alone at 256 and 1024: candidates interleaved, ``--rounds`` rounds, the median of each, and the
  ratio to fp32's median of the same run; the MLPs' multiply-adds/s as a share of this machine's int8
  GEMM throughput (``torch._int_mm``, int8 × int8 → int32, at the MLPs' shapes and batch sizes, measured
  in the same run) and of their own precision's GEMM (``torch.mm`` in fp32 or bf16);
- AUC on the held-out rows (``data/synthetic/validation.tsv``, 100k) and its change from fp32, and the
  largest and mean change of a row's click probability;
- batch dependence: the largest change of a row's probability scored alone against scored among 256
  (the rollout gate checks served scores against those recorded at build within 1e-4).

    python -m bench.precision               # after `make bench` (or its training step) trained the model
    python -m bench.precision --rounds 3 --seconds 0.2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM

from bench.harness import build_archive, machine_record, results_dir, time_calls, write_results
from bench.machine_limit import mlp_shapes
from model_factory.artifact import load_model
from model_factory.config import DLRMConfig
from model_factory.features import Preprocessing
from model_factory.quantization import MlpDtype, quantize_mlps
from servers.torchserve import REPO_ROOT
from training.criteo import read_batches

TRAINED_RUN = REPO_ROOT / "runs" / "criteo-kaggle-synthetic"
VALIDATION = REPO_ROOT / "data" / "synthetic" / "validation.tsv"
FORWARD_BATCHES = (1, 256, 1024)
MLP_BATCHES = (256, 1024)
CALIBRATION_ROWS = 1000  # the golden set's size (model_archive/golden.py)
SINGLE_ROWS = 256


@dataclass(frozen=True)
class Candidate:
    name: str
    make: Callable[[DLRM], Any]  # makes a copy of the fp32 model this candidate, in place
    gemm: str  # the precision of its MLPs' GEMMs: fp32, bf16 or int8


def torchao_int8(model: DLRM, keep: tuple[int, ...] = ()) -> DLRM:
    """torchao's int8 dynamic-activation, int8-weight ``Linear`` s, but for the MLP layers numbered in ``keep``."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: PLC0415

    layers = [m for arch in (model.dense_arch, model.over_arch) for m in arch.modules() if isinstance(m, nn.Linear)]
    chosen = {id(layer) for index, layer in enumerate(layers) if index not in keep}
    for arch in (model.dense_arch, model.over_arch):
        quantize_(arch, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda module, _: id(module) in chosen)
    return model


def compiled(model: DLRM, *, freezing: bool = True) -> DLRM:
    """The dense and over arch under ``torch.compile`` (inductor, CPU), a graph per batch size; ``freezing``
    folds the weights into the graph as constants, which lets inductor prepack them for oneDNN (fp32, bf16,
    static int8) but sends torchao's int8 ``Linear`` s to a slow kernel (2.6k rows/s, measured)."""
    for name in ("dense_arch", "over_arch"):
        setattr(model, name, torch.compile(getattr(model, name), dynamic=False, options={"freezing": freezing}))
    return model


def static_int8(model: DLRM, calibration: Batch) -> None:
    """torchao's PT2E flow: both archs exported, observed over a forward of ``calibration``, converted to int8
    with the activation ranges seen, and compiled (inductor lowers them to oneDNN's int8 ``Linear`` s)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: PLC0415
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86  # noqa: PLC0415

    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    rows = torch.export.Dim("rows", min=1, max=1 << 16)
    dense, sparse = calibration.dense_features, calibration.sparse_features
    with torch.no_grad():
        examples = {
            "dense_arch": dense,
            "over_arch": model.inter_arch(model.dense_arch(dense), model.sparse_arch(sparse)),
        }
        for name, example in examples.items():
            exported = torch.export.export(getattr(model, name), (example,), dynamic_shapes=({0: rows},))
            setattr(model, name, prepare_pt2e(exported.module(), quantizer))
        model(dense, sparse)
        for name in examples:
            setattr(model, name, torch.compile(convert_pt2e(getattr(model, name))))  # frozen: see main


def candidates(layers: int, calibration: Batch) -> list[Candidate]:
    bf16 = partial(quantize_mlps, dtype=MlpDtype.BF16)
    return [
        Candidate("fp32", lambda model: None, "fp32"),
        Candidate("fp32 compiled", compiled, "fp32"),
        Candidate("bf16", bf16, "bf16"),
        Candidate("bf16 compiled", lambda model: compiled(bf16(model)), "bf16"),
        Candidate("int8 torch.ao", partial(quantize_mlps, dtype=MlpDtype.INT8), "int8"),
        Candidate("int8 torchao", torchao_int8, "int8"),
        Candidate("int8 torchao compiled", lambda model: compiled(torchao_int8(model), freezing=False), "int8"),
        Candidate(
            "int8 torchao compiled, first and last layers fp32",
            lambda model: compiled(torchao_int8(model, keep=(0, layers - 1)), freezing=False),
            "int8",
        ),
        Candidate("int8 static", partial(static_int8, calibration=calibration), "int8"),
    ]


def gemm_limits(shapes: list[tuple[int, int]], seconds: float) -> dict[str, float]:
    """Multiply-adds/s of the MLPs' GEMMs back to back per precision (int8: int8 × int8 → int32), the best of
    the MLP batch sizes."""
    generator = torch.Generator().manual_seed(0)
    best: dict[str, float] = {}
    for batch in MLP_BATCHES:
        for gemm in ("fp32", "bf16", "int8"):
            seconds_per_call = 0.0
            for inputs, outputs in shapes:
                if gemm == "int8":
                    x = torch.randint(-127, 128, (batch, inputs), dtype=torch.int8, generator=generator)
                    weight = torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8, generator=generator)
                    call = partial(torch._int_mm, x, weight.T)
                else:
                    dtype = torch.float32 if gemm == "fp32" else torch.bfloat16
                    x = torch.rand(batch, inputs, generator=generator).to(dtype)
                    call = partial(torch.mm, x, torch.rand(outputs, inputs, generator=generator).to(dtype).T)
                with torch.no_grad():
                    seconds_per_call += time_calls(call, seconds)[2] / 1e3
            rate = batch * sum(inputs * outputs for inputs, outputs in shapes) / seconds_per_call
            best[gemm] = max(best.get(gemm, 0.0), rate)
    return best


def probabilities(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.sigmoid(model(b.dense_features, b.sparse_features).squeeze(1)) for b in batches])


def first_batch(size: int, config: DLRMConfig, preprocessing: Preprocessing) -> Batch:
    return next(read_batches([VALIDATION], size, config, preprocessing))


def rows_per_s(call: Callable[[], Any], rows: int, seconds: float) -> float:
    with torch.no_grad():
        return rows / (time_calls(call, seconds)[2] / 1e3)


def timings(models: dict[str, DLRM], inputs: dict[int, Batch], rounds: int, seconds: float) -> dict[str, Any]:
    """Median rows/s of each model's forward and MLPs per batch size, the models interleaved in every round."""
    fp32 = models["fp32"]
    mlp_inputs = {}
    with torch.no_grad():
        for size in MLP_BATCHES:
            dense, sparse = inputs[size].dense_features, inputs[size].sparse_features
            mlp_inputs[size] = (dense, fp32.inter_arch(fp32.dense_arch(dense), fp32.sparse_arch(sparse)))
    samples: dict[tuple[str, str, int], list[float]] = {}
    for round_ in range(rounds):
        for name, model in models.items():
            for size, batch in inputs.items():
                forward = partial(model, batch.dense_features, batch.sparse_features)
                samples.setdefault((name, "forward", size), []).append(rows_per_s(forward, size, seconds))
            for size, (dense, interaction) in mlp_inputs.items():
                mlps = partial(lambda m, d, i: (m.dense_arch(d), m.over_arch(i)), model, dense, interaction)
                samples.setdefault((name, "mlps", size), []).append(rows_per_s(mlps, size, seconds))
        print(f"round {round_ + 1}/{rounds} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    medians: dict[str, Any] = {}
    for (name, part, size), values in samples.items():
        medians.setdefault(name, {}).setdefault(part, {})[size] = statistics.median(values)
    return medians


@dataclass(frozen=True)
class Accuracy:
    auc: float
    auc_change: float
    max_change: float  # of a row's probability, against fp32
    mean_change: float
    batch_dependence: float  # the largest change of a row's probability, scored alone against among SINGLE_ROWS


@dataclass(frozen=True)
class HeldOut:
    """The held-out rows: all of them in batches of 1024, and the first SINGLE_ROWS one by one and together."""

    batches: list[Batch]
    labels: torch.Tensor
    singles: list[Batch]
    together: Batch


def accuracy(model: DLRM, rows: HeldOut, reference: torch.Tensor, reference_auc: float) -> Accuracy:
    scores = probabilities(model, rows.batches)
    auc = binary_auroc(scores, rows.labels).item()
    change = (scores - reference).abs()
    dependence = (probabilities(model, rows.singles) - probabilities(model, [rows.together])).abs().max().item()
    return Accuracy(auc, auc - reference_auc, change.max().item(), change.mean().item(), dependence)


def measure(directory: Path, rounds: int, seconds: float) -> dict[str, Any]:
    reference_model, artifact = load_model(directory)
    config, preprocessing = artifact.model, artifact.preprocessing
    batches = list(read_batches([VALIDATION], 1024, config, preprocessing))
    rows = HeldOut(
        batches,
        torch.cat([batch.labels for batch in batches]).long(),
        list(islice(read_batches([VALIDATION], 1, config, preprocessing), SINGLE_ROWS)),
        first_batch(SINGLE_ROWS, config, preprocessing),
    )
    reference = probabilities(reference_model, batches)
    reference_auc = binary_auroc(reference, rows.labels).item()
    shapes = mlp_shapes(config)
    models: dict[str, DLRM] = {}
    gemms: dict[str, str] = {}
    results: dict[str, Any] = {}
    for candidate in candidates(len(shapes), first_batch(CALIBRATION_ROWS, config, preprocessing)):
        model = reference_model if candidate.name == "fp32" else load_model(directory)[0]
        candidate.make(model)
        models[candidate.name], gemms[candidate.name] = model, candidate.gemm
        found = accuracy(model, rows, reference, reference_auc)
        results[candidate.name] = {"gemm": candidate.gemm, "accuracy": asdict(found)}
        print(f"{candidate.name}: {found}", flush=True)
    inputs = {size: first_batch(size, config, preprocessing) for size in FORWARD_BATCHES}
    speeds = timings(models, inputs, rounds, seconds)
    limits = gemm_limits(shapes, seconds)
    work = sum(inputs_ * outputs for inputs_, outputs in shapes)
    for name, result in results.items():
        forward, mlps = speeds[name]["forward"], speeds[name]["mlps"]
        result["forward_rows_per_s"] = forward
        result["forward_vs_fp32"] = {size: forward[size] / speeds["fp32"]["forward"][size] for size in forward}
        result["mlp_rows_per_s"] = mlps
        result["mlp_share_of_int8_gemm"] = {size: mlps[size] * work / limits["int8"] for size in mlps}
        result["mlp_share_of_own_gemm"] = {size: mlps[size] * work / limits[gemms[name]] for size in mlps}
    return {
        "model": str(TRAINED_RUN.relative_to(REPO_ROOT)),
        "validation_rows": len(reference),
        "mlp_shapes": shapes,
        "mlp_multiply_adds_per_row": work,
        "gemm_limits": limits,
        "candidates": results,
    }


def markdown(document: dict[str, Any]) -> str:
    """The table: accuracy, forward rows/s (× fp32), MLP rows/s and their share of the int8 and own GEMM."""
    limits = document["gemm_limits"]
    lines = [
        f"One torch thread; {document['validation_rows']:,} held-out rows; load average "
        f"{document['machine']['loadavg']} at the start, {document['loadavg_after']} at the end. GEMM throughput at "
        f"the MLPs' shapes (G multiply-adds/s, best of batches {list(MLP_BATCHES)}): "
        + ", ".join(f"{gemm} {rate / 1e9:.0f}" for gemm, rate in limits.items())
        + f"; the MLPs are {document['mlp_multiply_adds_per_row']:,} multiply-adds per row.",
        "",
        "| candidate | AUC change | max / mean \\|Δp\\| | alone vs batched \\|Δp\\| | "
        + " | ".join(f"forward rows/s @{size} (× fp32)" for size in FORWARD_BATCHES)
        + " | "
        + " | ".join(f"MLPs rows/s @{size}: share of int8 / own GEMM" for size in MLP_BATCHES)
        + " |",
        "|---|---|---|---|" + "---|" * (len(FORWARD_BATCHES) + len(MLP_BATCHES)),
    ]
    for name, result in document["candidates"].items():
        found = result["accuracy"]
        forward = " | ".join(
            f"{result['forward_rows_per_s'][size]:,.0f} ({result['forward_vs_fp32'][size]:.2f}×)"
            for size in FORWARD_BATCHES
        )
        mlps = " | ".join(
            f"{result['mlp_rows_per_s'][size]:,.0f}: {result['mlp_share_of_int8_gemm'][size]:.0%} / "
            f"{result['mlp_share_of_own_gemm'][size]:.0%} ({result['gemm']})"
            for size in MLP_BATCHES
        )
        lines.append(
            f"| {name} | {found['auc_change']:+.5f} | {found['max_change']:.1e} / {found['mean_change']:.1e} | "
            f"{found['batch_dependence']:.1e} | {forward} | {mlps} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of timings (default: 5)")
    parser.add_argument("--seconds", type=float, default=0.5, help="timing of each point per round (default: 0.5)")
    args = parser.parse_args(argv)
    if not (TRAINED_RUN / "weights.pt").exists():
        sys.exit(f"no trained model in {TRAINED_RUN}: run `make bench` (it trains it first) or its training step")
    torch.set_num_threads(1)
    torch._dynamo.config.recompile_limit = 64  # a graph per batch size for each compiled candidate
    # Frozen weights by default: the static int8 graphs only compile so (a per-call option is not enough).
    torch._inductor.config.freezing = True
    output = results_dir("precision")
    document: dict[str, Any] = machine_record()
    document["versions"]["torchao"] = version("torchao")
    with tempfile.TemporaryDirectory(prefix="dlrm-precision-") as tmp:
        archive = Path(tmp) / "kaggle.mar"
        build_archive(archive, "--checkpoint", str(TRAINED_RUN), "--quantize-mlp", "none",
                      "--archive-format", "no-archive", "--workers", "1")  # fmt: skip
        document |= measure(archive.with_suffix(""), args.rounds, args.seconds)
    document["loadavg_after"] = [round(load, 2) for load in os.getloadavg()]
    write_results(output, document, markdown(document))
    print(markdown(document))


if __name__ == "__main__":
    main()
