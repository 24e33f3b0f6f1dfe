"""Pack a DLRM into a TorchServe model archive (``model_store/dlrm.mar`` by default).

The archive holds the model config, the weights, the handler and the
``handler``/``model_factory`` packages it imports, plus a ``model-config.yaml``
with TorchServe's batching and worker settings. Weights come from a trained
checkpoint or, without one, from a seeded random initialisation that the
archive records as untrained.

    python build_mar.py                               # small preset, random weights, seed 0
    python build_mar.py --preset criteo-kaggle --batch-size 64
    python build_mar.py --checkpoint runs/small       # a trainer output directory
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml
from torchrec.models.dlrm import DLRM

from handler.codec import DEFAULT_MAX_ROWS
from handler.metrics import DEFAULT_FLUSH_SECONDS
from model_factory.artifact import (
    CONFIG_FILE,
    TABLES_FILE,
    WEIGHTS_FILE,
    ModelArtifact,
    Provenance,
    load_state_dict,
    read_artifact,
    write_artifact,
)
from model_factory.config import DEFAULT_PRESET, PRESETS, ConfigError, DLRMConfig, preset
from model_factory.factory import build_dlrm, format_summary, init_weights, load_weights, summarize
from model_factory.quantization import (
    MLP_DTYPES,
    TABLE_DTYPES,
    QuantizationSpec,
    quantize_model_tables,
    random_quantized_model,
    table_layouts,
)

REPO_ROOT = Path(__file__).resolve().parent
PACKAGES = ("handler", "model_factory")
HANDLER = REPO_ROOT / "handler" / "dlrm_handler.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model")
    shape = source.add_mutually_exclusive_group()
    shape.add_argument("--preset", choices=sorted(PRESETS), help=f"named model shape (default: {DEFAULT_PRESET})")
    shape.add_argument("--config", type=Path, help="model config JSON file (DLRMConfig fields) instead of a preset")
    source.add_argument(
        "--checkpoint",
        type=Path,
        help="trained weights: a trainer output directory (model_config.json + weights.pt; the shape comes "
        "from it) or a state_dict .pt file for the chosen preset/config. Loaded with weights_only=True.",
    )
    source.add_argument(
        "--seed", type=int, default=0, help="seed of the random initialisation used without --checkpoint (default: 0)"
    )
    archive = parser.add_argument_group("archive")
    archive.add_argument(
        "--output", type=Path, default=Path("model_store/dlrm.mar"), help="archive path (default: model_store/dlrm.mar)"
    )
    archive.add_argument("--version", default="1.0", help="model version recorded in the archive (default: 1.0)")
    archive.add_argument(
        "--archive-format",
        choices=("default", "no-archive"),
        default="default",
        help="default: a zipped .mar; no-archive: a directory named after --output without .mar, which TorchServe "
        "serves in place (no unzip at start-up: for multi-GB quantized tables)",
    )
    quantize = parser.add_argument_group("quantization (recorded in the archive, applied when the model loads)")
    quantize.add_argument(
        "--quantize",
        choices=TABLE_DTYPES,
        default="none",
        help="embedding tables, row-wise with TorchRec/FBGEMM: fp16, int8 or int4 (default: none = fp32)",
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
        choices=MLP_DTYPES,
        default="none",
        help="int8: dynamic int8 Linear layers for the MLPs (CPU only; default: none)",
    )
    serving = parser.add_argument_group("serving (written to the archive's model-config.yaml)")
    serving.add_argument(
        "--batch-size", type=int, default=32, help="TorchServe batchSize: requests per batch (default: 32)"
    )
    serving.add_argument(
        "--max-batch-delay",
        type=int,
        default=1,
        help="TorchServe maxBatchDelay: ms to wait for a batch to fill, paid in full by a lone request; "
        "keep it >= 1 with batching, 0 breaks TorchServe 0.12's batching (default: 1)",
    )
    serving.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes, each with its own copy of the model (minWorkers = maxWorkers; default: 2)",
    )
    serving.add_argument(
        "--metrics-flush-seconds",
        type=float,
        default=DEFAULT_FLUSH_SECONDS,
        help=f"the handler reports its metrics at most this often (default: {DEFAULT_FLUSH_SECONDS})",
    )
    serving.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker; 0 = usable cores / workers (default: 0)"
    )
    serving.add_argument(
        "--max-rows",
        type=int,
        default=DEFAULT_MAX_ROWS,
        help=f"rows allowed in one request (default: {DEFAULT_MAX_ROWS})",
    )
    serving.add_argument(
        "--response-timeout", type=int, default=120, help="TorchServe responseTimeout in seconds (default: 120)"
    )
    serving.add_argument(
        "--startup-timeout",
        type=int,
        default=300,
        help="TorchServe startupTimeout: seconds a worker may take to load the model; multi-GB tables "
        "need more than TorchServe's 120 (default: 300)",
    )
    args = parser.parse_args(argv)
    if args.output.suffix != ".mar":
        parser.error(f"--output must end in .mar, got {args.output}")
    for flag in ("batch_size", "workers", "max_rows", "response_timeout", "startup_timeout"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_batch_delay < 0 or args.threads < 0 or args.metrics_flush_seconds < 0:
        parser.error("--max-batch-delay, --threads and --metrics-flush-seconds must not be negative")
    return args


def feature_dtype(text: str) -> tuple[str, str]:
    feature, separator, dtype = text.partition("=")
    if not separator or dtype not in TABLE_DTYPES:
        raise argparse.ArgumentTypeError(f"expected FEATURE=DTYPE with DTYPE one of {TABLE_DTYPES}, got {text!r}")
    return feature, dtype


def chosen_config(args: argparse.Namespace) -> DLRMConfig:
    if args.config is not None:
        return DLRMConfig.from_json(args.config.read_text())
    return preset(args.preset or DEFAULT_PRESET)


def write_model_artifact(args: argparse.Namespace, directory: Path) -> ModelArtifact:
    """Write the artifact to archive into ``directory``: from a checkpoint or seeded random weights, quantized."""
    quantization = QuantizationSpec(args.quantize, dict(args.quantize_table), args.quantize_mlp)
    checkpoint: Path | None = args.checkpoint
    if checkpoint is not None and checkpoint.is_dir():
        if args.preset or args.config:
            raise ConfigError("a checkpoint directory carries its own model config: drop --preset/--config")
        trained = read_artifact(checkpoint)
        if trained.quantized_tables:
            raise ConfigError(f"{checkpoint} is already quantized: archive the fp32 checkpoint the trainer wrote")
        artifact = replace(trained, quantization=quantization)
        model = load_checkpoint(artifact, checkpoint / WEIGHTS_FILE)
    elif checkpoint is not None:
        provenance = Provenance(trained=True, checkpoint=checkpoint.name)
        artifact = ModelArtifact(model=chosen_config(args), provenance=provenance, quantization=quantization)
        model = load_checkpoint(artifact, checkpoint)
    else:
        provenance = Provenance(trained=False, seed=args.seed)
        artifact = ModelArtifact(model=chosen_config(args), provenance=provenance, quantization=quantization)
        if artifact.quantized_tables:  # created quantized: fp32 tables never exist (criteo-1tb: 45 GB)
            model = random_quantized_model(artifact.model, quantization, seed=args.seed)
        else:
            model = init_weights(build_dlrm(artifact.model), seed=args.seed)
    write_artifact(directory, artifact, model)
    return artifact


def load_checkpoint(artifact: ModelArtifact, path: Path) -> DLRM:
    """The checkpoint's fp32 model, quantized as ``artifact`` asks; a clear error for unsafe or mismatched files."""
    try:
        model = load_weights(build_dlrm(artifact.model), load_state_dict(path))
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ConfigError(f"cannot load checkpoint {path}: {error}") from error
    if artifact.quantized_tables:
        model = quantize_model_tables(model, artifact.model, artifact.quantization)
    return model


def model_yaml(args: argparse.Namespace) -> dict:
    """TorchServe's per-model settings, plus a ``handler`` section that the handler reads."""
    handler = {"max_rows_per_request": args.max_rows, "metrics_flush_seconds": args.metrics_flush_seconds}
    if args.threads:
        handler["num_threads"] = args.threads
    return {
        "minWorkers": args.workers,
        "maxWorkers": args.workers,
        "batchSize": args.batch_size,
        "maxBatchDelay": args.max_batch_delay,
        "responseTimeout": args.response_timeout,
        "startupTimeout": args.startup_timeout,
        "handler": handler,
    }


def copy_packages(destination: Path) -> None:
    """The Python packages the handler imports, so the archive needs nothing from this checkout."""
    for package in PACKAGES:
        shutil.copytree(
            REPO_ROOT / package, destination / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )


def build_archive(args: argparse.Namespace) -> Path:
    """Run torch-model-archiver over a staged artifact; returns the .mar file or the unzipped archive directory."""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    unzipped = args.archive_format == "no-archive"
    archive = args.output.with_suffix("") if unzipped else args.output
    # Staged beside the output, so a large tables file is moved (renamed), never copied, into an unzipped archive.
    with tempfile.TemporaryDirectory(prefix=".dlrm-staging-", dir=args.output.parent) as tmp:
        staging = Path(tmp)
        artifact = write_model_artifact(args, staging / "artifact")
        copy_packages(staging / "code")
        (staging / "model-config.yaml").write_text(yaml.safe_dump(model_yaml(args), sort_keys=False))
        tables = staging / "artifact" / TABLES_FILE
        extra_files = [staging / "artifact" / CONFIG_FILE, staging / "code"]
        if tables.exists() and not unzipped:
            extra_files.append(tables)
        command = [
            archiver_command(),
            "--model-name", args.output.stem,
            "--version", args.version,
            "--handler", str(HANDLER),
            "--serialized-file", str(staging / "artifact" / WEIGHTS_FILE),
            "--extra-files", ",".join(str(path) for path in extra_files),
            "--config-file", str(staging / "model-config.yaml"),
            "--export-path", str(args.output.parent),
            "--archive-format", args.archive_format,
            "--force",
        ]  # fmt: skip
        subprocess.run(command, check=True)
        if tables.exists() and unzipped:
            tables.rename(archive / TABLES_FILE)
    print(format_summary(summarize(build_dlrm(artifact.model))))
    if artifact.quantized_tables:
        layouts = table_layouts(artifact.model, artifact.quantization)
        stored = sum(layout.rows * layout.row_bytes for layout in layouts)
        print(f"tables stored quantized ({artifact.quantization.tables}): {stored / 2**30:.2f} GiB")
    print(f"weights: {artifact.provenance.describe()}")
    return archive


def archiver_command() -> str:
    """``torch-model-archiver`` from this interpreter's environment, else from PATH."""
    beside_python = Path(sys.executable).parent / "torch-model-archiver"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("torch-model-archiver")
    if found is None:
        sys.exit("torch-model-archiver is not installed: run `make install`")
    return found


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        output = build_archive(args)
    except ConfigError as error:
        sys.exit(f"build_mar.py: {error}")
    size = sum(path.stat().st_size for path in output.rglob("*")) if output.is_dir() else output.stat().st_size
    print(f"wrote {output} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
