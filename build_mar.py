"""Pack a DLRM into a TorchServe model archive (``model_store/dlrm.mar`` by default).

The archive holds the model config, the weights, the handler and the
``handler``/``model_factory`` packages it imports, plus a ``model-config.yaml``
with TorchServe's batching and worker settings. Weights come from a trained
checkpoint or, without one, from a seeded random initialisation that the
archive records as untrained.

    python build_mar.py                               # small preset, random weights, seed 0
    python build_mar.py --preset criteo-kaggle --batch-size 64
    python build_mar.py --checkpoint runs/small       # a trainer output directory
    python build_mar.py --preset criteo-1tb --quantize int8 --checkpoint ckpt/step-100  # a DCP checkpoint
    python build_mar.py --checkpoint runs/small --quantize int8 --frequencies runs/small  # hottest rows first
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from handler.settings import ServingSettings, SettingsError
from model_archive.build import DEFAULT_TABLES, ArchiveFormat, BuildOptions, build_archive, describe
from model_factory.config import DEFAULT_PRESET, PRESETS, ConfigError
from model_factory.quantization import MlpDtype, QuantizationSpec, TableDtype, default_mlp_dtype

DEFAULTS = BuildOptions()
SERVING = DEFAULTS.serving


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model")
    shape = source.add_mutually_exclusive_group()
    shape.add_argument("--preset", choices=sorted(PRESETS), help=f"named model shape (default: {DEFAULT_PRESET})")
    shape.add_argument("--config", type=Path, help="model config JSON file (DLRMConfig fields) instead of a preset")
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="trained weights: a trainer output directory (model_config.json + weights.pt or DCP checkpoints; "
        "the shape comes from it), a torch.distributed.checkpoint directory written by any TorchRec DMP training "
        "of the chosen preset/config (read one table at a time), or a state_dict .pt file for the chosen "
        "preset/config. Loaded with weights_only=True.",
    )
    source.add_argument(
        "--seed", type=int, default=DEFAULTS.seed, help="seed of the random initialisation used without --checkpoint"
    )
    source.add_argument(
        "--frequencies",
        type=Path,
        help="frequencies.pt, or a directory holding one (a trainer output, python -m training.frequencies's): "
        "write each table's rows in descending training frequency, with the id → row remap, so that the hottest "
        "rows share pages and stay resident when the tables do not fit in memory; scores do not change "
        "(needs --quantize other than none)",
    )
    archive = parser.add_argument_group("archive")
    archive.add_argument(
        "--output", type=Path, default=DEFAULTS.output, help=f"archive path (default: {DEFAULTS.output})"
    )
    archive.add_argument("--version", default=DEFAULTS.version, help="model version recorded in the archive")
    archive.add_argument(
        "--archive-format",
        type=ArchiveFormat,
        choices=list(ArchiveFormat),
        default=DEFAULTS.archive_format,
        help="default: a zipped .mar; no-archive: a directory named after --output without .mar, which TorchServe "
        "serves in place (no unzip at start-up: for multi-GB quantized tables)",
    )
    archive.add_argument(
        "--golden-set",
        type=Path,
        help="a held-out Criteo TSV file (the validation data, never training rows): its first --golden-rows rows, "
        "their labels and this model's scores go into the archive for the rollout gate (python -m rollout)",
    )
    archive.add_argument(
        "--golden-rows",
        type=int,
        default=DEFAULTS.golden_rows,
        help="rows of --golden-set to keep (default: %(default)s)",
    )
    quantize = parser.add_argument_group("quantization (recorded in the archive, applied when the model loads)")
    quantize.add_argument(
        "--quantize",
        type=TableDtype,
        choices=list(TableDtype),
        default=DEFAULT_TABLES,
        help="embedding tables in FBGEMM's table-batched collection (one lookup for all tables): fp32 (the "
        "default), or quantized row-wise to fp16, int8 or int4; none: TorchRec's fp32 modules, one per table",
    )
    quantize.add_argument(
        "--quantize-table",
        action="append",
        default=[],
        type=feature_dtype,
        metavar="FEATURE=DTYPE",
        help="per-table override of --quantize, e.g. cat_0=int4 (repeatable)",
    )
    quantize.add_argument(
        "--quantize-mlp",
        type=MlpDtype,
        choices=list(MlpDtype),
        help="the MLPs' Linear layers: none (fp32), bf16 (bfloat16 weights and activations: fast on CPUs with AMX "
        "or AVX512-BF16, and on GPUs) or int8 (dynamic quantization, CPU only; deprecated upstream); default: bf16 "
        "for the reference MLPs (criteo-kaggle, criteo-1tb) on a CPU with AMX or AVX512-BF16, none otherwise",
    )
    serving = parser.add_argument_group("serving (written to the archive's model-config.yaml)")
    serving.add_argument(
        "--batch-size", type=int, default=SERVING.batch_size, help="TorchServe batchSize: requests per batch"
    )
    serving.add_argument(
        "--max-batch-delay",
        type=int,
        default=SERVING.max_batch_delay_ms,
        help="TorchServe maxBatchDelay: ms to wait for a batch to fill, paid in full by a lone request; "
        "keep it >= 1 with batching, 0 breaks TorchServe 0.12's batching",
    )
    serving.add_argument(
        "--workers",
        type=int,
        default=SERVING.workers,
        help="worker processes, each with its own copy of the model (minWorkers = maxWorkers)",
    )
    serving.add_argument(
        "--metrics-flush-seconds",
        type=float,
        default=SERVING.metrics_flush_seconds,
        help="the handler reports its metrics at most this often",
    )
    serving.add_argument(
        "--threads", type=int, default=SERVING.threads, help="torch threads per worker; 0 = usable cores / workers"
    )
    serving.add_argument("--max-rows", type=int, default=SERVING.max_rows, help="rows allowed in one request")
    serving.add_argument(
        "--shard-tables-gpus",
        type=int,
        default=SERVING.shard_tables_gpus,
        metavar="N",
        help="shard the quantized tables table-wise over cuda:0..N-1 of one worker, for tables larger than one GPU "
        "(needs --quantize and --workers 1; the worker uses all N GPUs and fails to load with fewer; "
        "default: 0 = off, as is 1)",
    )
    serving.add_argument(
        "--response-timeout", type=int, default=SERVING.response_timeout_s, help="TorchServe responseTimeout (s)"
    )
    serving.add_argument(
        "--startup-timeout",
        type=int,
        default=SERVING.startup_timeout_s,
        help="TorchServe startupTimeout: seconds a worker may take to load the model; multi-GB tables "
        "need more than TorchServe's own default of 120",
    )
    return parser


def feature_dtype(text: str) -> tuple[str, TableDtype]:
    feature, separator, dtype = text.partition("=")
    if not separator or dtype not in set(TableDtype):
        choices = ", ".join(TableDtype)
        raise argparse.ArgumentTypeError(f"expected FEATURE=DTYPE with DTYPE one of {choices}, got {text!r}")
    return feature, TableDtype(dtype)


def parse_args(argv: list[str] | None = None) -> BuildOptions:
    arguments = parser()
    args = arguments.parse_args(argv)
    unquantized = args.quantize == TableDtype.NONE and not args.quantize_table
    if args.shard_tables_gpus > 1 and (unquantized or args.quantize_mlp == MlpDtype.INT8):
        arguments.error(
            "--shard-tables-gpus shards table-batched tables over GPUs: it needs --quantize other than none, "
            "and MLPs that run on a GPU (not --quantize-mlp int8)"
        )
    try:
        options = BuildOptions(
            preset=args.preset,
            config_file=args.config,
            checkpoint=args.checkpoint,
            seed=args.seed,
            output=args.output,
            version=args.version,
            archive_format=args.archive_format,
            golden_set=args.golden_set,
            golden_rows=args.golden_rows,
            frequencies=args.frequencies,
            quantization=QuantizationSpec(args.quantize, dict(args.quantize_table), args.quantize_mlp or MlpDtype.NONE),
            serving=ServingSettings(
                workers=args.workers,
                batch_size=args.batch_size,
                max_batch_delay_ms=args.max_batch_delay,
                response_timeout_s=args.response_timeout,
                startup_timeout_s=args.startup_timeout,
                threads=args.threads,
                max_rows=args.max_rows,
                metrics_flush_seconds=args.metrics_flush_seconds,
                shard_tables_gpus=args.shard_tables_gpus,
            ),
        )
        if args.quantize_mlp is None:  # measured per shape and CPU: docs/quantization.md
            mlp = default_mlp_dtype(options.model_config())
            return replace(options, quantization=replace(options.quantization, mlp=mlp))
        return options
    except (ConfigError, SettingsError) as error:
        arguments.error(str(error))


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    try:
        archive, artifact = build_archive(options)
    except ConfigError as error:
        sys.exit(f"build_mar.py: {error}")
    print(describe(artifact))
    size = sum(path.stat().st_size for path in archive.rglob("*")) if archive.is_dir() else archive.stat().st_size
    print(f"wrote {archive} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
