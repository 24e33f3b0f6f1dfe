"""What each quantization option costs and buys, measured in one run.

For each option (fp32 in TorchRec's per-table modules or FBGEMM's table-batched
collection, fp16/int8/int4 tables, int8 tables + int8 MLPs) and each
model — the default `small` DLRM trained by `make train`, and the reference
shape `criteo-kaggle` (seeded random fp32 weights, which the other options
quantize) — the run builds the archive with build_mar.py and records:

- accuracy on the held-out synthetic rows (trained model only): AUC and its
  change against fp32, and the largest change of any row's click probability;
- the archive's size;
- the worker's RSS, all options served side by side by one TorchServe (fp32 weights are
  memory-mapped, so their RSS counts only the pages touched so far; quantized tables are
  read into memory whole);
- in-process rows/s of the model forward at batch 1, 64 and 1024 with one
  torch thread (a shipped worker's share of 2 cores).

    python -m bench.quantization            # after `make train`
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import requests
import torch
from torchmetrics.functional.classification import binary_auroc

from bench.harness import build_archive, machine_record, results_dir, time_calls, write_results
from model_archive.contents import extracted, read_file
from model_factory.artifact import WEIGHTS_FILE, load_model
from model_factory.features import rows_to_kjt
from servers.torchserve import REPO_ROOT, TorchServeProcess
from training.criteo import read_batches
from training.synthetic import random_inputs

TRAINED_RUN = REPO_ROOT / "runs" / "small-synthetic"
VALIDATION = REPO_ROOT / "data" / "synthetic" / "validation.tsv"
OPTIONS = {
    "fp32": [],
    "fp32 table-batched": ["--quantize", "fp32"],
    "fp16": ["--quantize", "fp16"],
    "int8": ["--quantize", "int8"],
    "int4": ["--quantize", "int4"],
    "int8+mlp8": ["--quantize", "int8", "--quantize-mlp", "int8"],
}
MODELS = {"small (trained)": ["--checkpoint", str(TRAINED_RUN)], "criteo-kaggle": ["--preset", "criteo-kaggle"]}
BATCHES = (1, 64, 1024)


@dataclass(frozen=True)
class OptionResult:
    model: str
    option: str
    auc: float | None
    auc_delta: float | None
    max_score_delta: float
    archive_mib: float
    worker_rss_mib: float
    rows_per_s: dict[int, float]


def archive_name(model: str, option: str) -> str:
    return f"{model.split()[0]}-{option.replace('+', '-')}"


def build(store: Path, model: str, source: list[str], option: str) -> Path:
    """build_mar.py for ``model`` from ``source`` (its model flags) with ``option``'s quantization flags."""
    archive = store / f"{archive_name(model, option)}.mar"
    build_archive(archive, *source, *OPTIONS[option], "--workers", "1")
    return archive


def scores(model: torch.nn.Module, batches: list) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([torch.sigmoid(model(b.dense_features, b.sparse_features).squeeze(1)) for b in batches])


def forward_rows_per_s(model: torch.nn.Module, config, seconds: float) -> dict[int, float]:
    speeds: dict[int, float] = {}
    for batch in BATCHES:
        dense, lengths, values = random_inputs(config, batch, np.random.default_rng(batch))
        inputs = (torch.from_numpy(dense), rows_to_kjt(config.sparse_feature_names, lengths, values))

        def forward(inputs: tuple = inputs) -> None:
            with torch.inference_mode():
                model(*inputs)

        calls, total, _ = time_calls(forward, seconds)
        speeds[batch] = round(batch * calls / total)
    return speeds


def served_rss(store: Path, names: list[str], workdir: Path) -> dict[str, float]:
    """Each archive's worker RSS (MiB), all served by one TorchServe, after a first prediction."""
    with TorchServeProcess(store, " ".join(f"{name}={name}.mar" for name in names), workdir) as server:
        rss = {}
        for name in names:
            server.wait_ready(name)
            body = (REPO_ROOT / "sample_data" / "sample_raw.json").read_bytes()
            requests.post(f"{server.endpoints.inference}/predictions/{name}", data=body,
                          headers={"Content-Type": "application/json"}, timeout=60).raise_for_status()  # fmt: skip
            (pid,) = server.worker_pids(name)
            rss[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        return rss


def markdown(results: list[OptionResult]) -> str:
    lines = [
        "| model | option | AUC | AUC change | max score change | archive MiB | worker RSS MiB | "
        + " | ".join(f"rows/s at {b}" for b in BATCHES)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(BATCHES),
    ]
    for r in results:
        auc = "–" if r.auc is None else f"{r.auc:.5f}"
        delta = "–" if r.auc_delta is None else f"{r.auc_delta:+.5f}"
        speeds = " | ".join(f"{r.rows_per_s[b]:,.0f}" for b in BATCHES)
        lines.append(
            f"| {r.model} | {r.option} | {auc} | {delta} | {r.max_score_delta:.2e} | {r.archive_mib:.1f} | "
            f"{r.worker_rss_mib:.0f} | {speeds} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per batch size (default: 3)")
    args = parser.parse_args()
    if not (TRAINED_RUN / "weights.pt").exists():
        sys.exit("run `make train` first: the accuracy figures need the trained default model")
    torch.set_num_threads(1)
    output = results_dir("quantization")
    results: list[OptionResult] = []
    with tempfile.TemporaryDirectory(prefix="dlrm-quant-") as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        for model_name, source in MODELS.items():
            reference_scores = None
            batches = None
            for option in OPTIONS:
                archive = build(store, model_name, source, option)
                if option == "fp32" and "--checkpoint" not in source:
                    # quantize these very weights: a random quantized archive would be another random model
                    weights = Path(tmp) / f"{archive.stem}-weights.pt"
                    weights.write_bytes(read_file(archive, WEIGHTS_FILE))
                    source = [*source, "--checkpoint", str(weights)]
                with extracted(archive) as directory:
                    model, artifact = load_model(directory)
                if batches is None:
                    batches = list(read_batches([VALIDATION], 10_000, artifact.model, artifact.preprocessing))
                    labels = torch.cat([b.labels for b in batches]).long()
                predicted = scores(model, batches)
                if reference_scores is None:
                    reference_scores, reference_auc = predicted, binary_auroc(predicted, labels).item()
                auc = binary_auroc(predicted, labels).item() if model_name.endswith("(trained)") else None
                results.append(
                    OptionResult(
                        model=model_name,
                        option=option,
                        auc=auc,
                        auc_delta=None if auc is None else auc - reference_auc,
                        max_score_delta=(predicted - reference_scores).abs().max().item(),
                        archive_mib=round(archive.stat().st_size / 2**20, 1),
                        worker_rss_mib=0.0,
                        rows_per_s=forward_rows_per_s(model, artifact.model, args.seconds),
                    )
                )
                print(results[-1], flush=True)
        names = [archive_name(r.model, r.option) for r in results]
        rss = served_rss(store, names, Path(tmp) / "torchserve")
        results = [
            OptionResult(**{**asdict(r), "worker_rss_mib": rss[name]}) for r, name in zip(results, names, strict=True)
        ]
    write_results(
        output, {**machine_record(), "threads": 1, "results": [asdict(r) for r in results]}, markdown(results)
    )
    print(markdown(results))


if __name__ == "__main__":
    main()
