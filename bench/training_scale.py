"""Training on one and two ranks, and a DCP checkpoint of 8 GiB of fp32 tables converted into an int8 archive.

1. ``python -m training.train`` (one rank) and ``torchrun --standalone
   --nproc-per-node 2 -m training.train`` (two gloo ranks, tables sharded) on
   the same planted rows with the same global batch: rows/s, the share of the
   loop spent waiting for data, AUC, from each run's ``metrics.json``.
2. A two-rank run of a DLRM whose 26 fp32 tables (64-dim) hold 8 GiB, for a few
   steps, its DCP checkpoint (each rank writes its shards) then converted by
   ``build_mar.py --quantize int8``: the conversion's time and peak RSS (the
   process tree, sampled), against the target of the int8 tables' size + 2 GiB.

This is a benchmark, not a test: part 2 writes about 11 GB and takes minutes.

    python -m bench.training_scale
    python -m bench.training_scale --skip-conversion --rows 200000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import build_archive, machine_record, results_dir, run_command, write_results
from model_factory.config import DLRMConfig, criteo_kaggle
from servers.torchserve import REPO_ROOT
from training.checkpoint import latest_checkpoint
from training.synthetic import PlantedClickModel, write_tsv

GLOBAL_BATCH = 2048
# 26 tables × 1,290,555 rows × 64 fp32 values = 8.0 GiB.
CONVERSION_ROWS_PER_TABLE = 1_290_555


def train_command(ranks: int, output: Path, train: Path, validation: Path, *args: str) -> list[str]:
    launcher = [sys.executable, "-m", "training.train"]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        launcher += ["-m", "training.train"]
    return [
        *launcher,
        "--train", str(train),
        "--validation", str(validation),
        "--output", str(output),
        "--batch-size", str(GLOBAL_BATCH // ranks),
        "--no-progress",
        *args,
    ]  # fmt: skip


def training_speed(workdir: Path, rows: int) -> list[dict[str, Any]]:
    planted = PlantedClickModel(seed=0)
    train, validation = workdir / "train.tsv", workdir / "validation.tsv"
    write_tsv(train, rows, planted, seed=1)
    write_tsv(validation, 20_000, planted, seed=2)
    results = []
    for ranks in (1, 2):
        output = workdir / f"ranks-{ranks}"
        trained = run_command(train_command(ranks, output, train, validation, "--preset", "small"), stream=True)
        metrics = json.loads((output / "metrics.json").read_text())
        results.append(
            {
                "ranks": ranks,
                "rows": metrics["rows_seen"],
                "train_rows_per_second": metrics["train_rows_per_second"],
                "data_wait_share": metrics["data_wait_share"],
                "auc": round(metrics["auc"], 5),
                "wall_seconds": round(trained.seconds, 1),
                "peak_rss_gib": round(trained.peak_rss / 2**30, 2),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def conversion(workdir: Path) -> dict[str, Any]:
    reference = criteo_kaggle()
    config = DLRMConfig(
        num_embeddings_per_feature=(CONVERSION_ROWS_PER_TABLE,) * reference.num_sparse_features,
        embedding_dim=reference.embedding_dim,
        dense_arch_layer_sizes=reference.dense_arch_layer_sizes,
        over_arch_layer_sizes=reference.over_arch_layer_sizes,
    )
    config_file = workdir / "config-8gib.json"
    config_file.write_text(json.dumps(config.to_dict()))
    planted = PlantedClickModel(seed=0)
    train, validation = workdir / "train-8gib.tsv", workdir / "validation-8gib.tsv"
    write_tsv(train, GLOBAL_BATCH * 5, planted, seed=1)
    write_tsv(validation, 2_000, planted, seed=2)
    output = workdir / "run-8gib"
    trained = run_command(train_command(2, output, train, validation, "--config", str(config_file)), stream=True)
    checkpoint = latest_checkpoint(output)
    assert checkpoint is not None
    checkpoint_bytes = sum(path.stat().st_size for path in checkpoint.iterdir())
    archive = workdir / "store" / "dlrm-8gib.mar"
    converted = build_archive(
        archive, "--config", str(config_file), "--checkpoint", str(checkpoint),
        "--quantize", "int8", "--archive-format", "no-archive",
        stream=True,
    )  # fmt: skip
    tables = (archive.with_suffix("") / "tables.bin").stat().st_size
    result = {
        "fp32_tables_gib": round(sum(config.num_embeddings_per_feature) * config.embedding_dim * 4 / 2**30, 2),
        "checkpoint_gib": round(checkpoint_bytes / 2**30, 2),
        "two_rank_training_seconds": round(trained.seconds, 1),
        "two_rank_training_peak_rss_gib": round(trained.peak_rss / 2**30, 2),
        "conversion_seconds": round(converted.seconds, 1),
        "conversion_peak_rss_gib": round(converted.peak_rss / 2**30, 2),
        "int8_tables_gib": round(tables / 2**30, 2),
        "target_peak_rss_gib": round(tables / 2**30 + 2, 2),
    }
    print(json.dumps(result), flush=True)
    return result


def markdown(speed: list[dict[str, Any]], converted: dict[str, Any] | None) -> str:
    lines = [
        "| ranks | rows/s | waiting for data | AUC | peak RSS |",
        "|---|---|---|---|---|",
        *(
            f"| {r['ranks']} | {r['train_rows_per_second']:,.0f} | {r['data_wait_share']:.1%} | {r['auc']:.4f} | "
            f"{r['peak_rss_gib']:.2f} GiB |"
            for r in speed
        ),
    ]
    if converted:
        lines += [
            "",
            f"DCP checkpoint of {converted['fp32_tables_gib']} GiB fp32 tables ({converted['checkpoint_gib']} GiB on "
            f"disk, 2 ranks) → int8 archive ({converted['int8_tables_gib']} GiB of tables): "
            f"{converted['conversion_seconds']:.0f} s, peak RSS {converted['conversion_peak_rss_gib']:.2f} GiB "
            f"(target < {converted['target_peak_rss_gib']:.2f} GiB)",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000, help="training rows for the speed runs")
    parser.add_argument("--skip-conversion", action="store_true", help="only the 1- and 2-rank speed runs")
    parser.add_argument("--workdir", type=Path, help="where data, runs and archives go (default: a temporary one)")
    args = parser.parse_args()
    output = results_dir("training-scale")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dlrm-training-scale-", dir=REPO_ROOT / "model_store"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        speed = training_speed(workdir, args.rows)
        converted = None if args.skip_conversion else conversion(workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    write_results(output, {**machine_record(), "speed": speed, "conversion": converted}, markdown(speed, converted))
    print(markdown(speed, converted))


if __name__ == "__main__":
    main()
