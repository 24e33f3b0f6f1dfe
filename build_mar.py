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
from pathlib import Path

import yaml
from torchrec.models.dlrm import DLRM

from handler.codec import DEFAULT_MAX_ROWS
from model_factory.artifact import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelArtifact,
    Provenance,
    load_state_dict,
    read_artifact,
    write_artifact,
)
from model_factory.config import DEFAULT_PRESET, PRESETS, ConfigError, DLRMConfig, preset
from model_factory.factory import build_dlrm, format_summary, init_weights, load_weights, summarize

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
    serving = parser.add_argument_group("serving (written to the archive's model-config.yaml)")
    serving.add_argument(
        "--batch-size", type=int, default=32, help="TorchServe batchSize: requests per batch (default: 32)"
    )
    serving.add_argument(
        "--max-batch-delay", type=int, default=5, help="TorchServe maxBatchDelay in ms to fill a batch (default: 5)"
    )
    serving.add_argument(
        "--workers", type=int, default=1, help="worker processes (minWorkers = maxWorkers; default: 1)"
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
    args = parser.parse_args(argv)
    if args.output.suffix != ".mar":
        parser.error(f"--output must end in .mar, got {args.output}")
    for flag in ("batch_size", "workers", "max_rows", "response_timeout"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_batch_delay < 0 or args.threads < 0:
        parser.error("--max-batch-delay and --threads must not be negative")
    return args


def chosen_config(args: argparse.Namespace) -> DLRMConfig:
    if args.config is not None:
        return DLRMConfig.from_json(args.config.read_text())
    return preset(args.preset or DEFAULT_PRESET)


def write_model_artifact(args: argparse.Namespace, directory: Path) -> ModelArtifact:
    """Write the artifact to archive into ``directory``: from a checkpoint, or seeded random weights."""
    checkpoint: Path | None = args.checkpoint
    if checkpoint is not None and checkpoint.is_dir():
        if args.preset or args.config:
            raise ConfigError("a checkpoint directory carries its own model config: drop --preset/--config")
        artifact = read_artifact(checkpoint)
        load_weights(
            build_dlrm(artifact.model), load_state_dict(checkpoint / WEIGHTS_FILE)
        )  # fails early on a mismatch
        directory.mkdir(parents=True)
        shutil.copy2(checkpoint / CONFIG_FILE, directory / CONFIG_FILE)
        shutil.copy2(checkpoint / WEIGHTS_FILE, directory / WEIGHTS_FILE)
        return artifact
    config = chosen_config(args)
    model = build_dlrm(config)
    if checkpoint is not None:
        model = load_checkpoint(model, checkpoint)
        provenance = Provenance(trained=True, checkpoint=checkpoint.name)
    else:
        model = init_weights(model, seed=args.seed)
        provenance = Provenance(trained=False, seed=args.seed)
    artifact = ModelArtifact(model=config, provenance=provenance)
    write_artifact(directory, artifact, model)
    return artifact


def load_checkpoint(model: DLRM, path: Path) -> DLRM:
    """The model with the checkpoint's weights; a clear error for unsafe, missing or mismatched files."""
    try:
        return load_weights(model, load_state_dict(path))
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ConfigError(f"cannot load checkpoint {path}: {error}") from error


def model_yaml(args: argparse.Namespace) -> dict:
    """TorchServe's per-model settings, plus a ``handler`` section that the handler reads."""
    handler = {"max_rows_per_request": args.max_rows}
    if args.threads:
        handler["num_threads"] = args.threads
    return {
        "minWorkers": args.workers,
        "maxWorkers": args.workers,
        "batchSize": args.batch_size,
        "maxBatchDelay": args.max_batch_delay,
        "responseTimeout": args.response_timeout,
        "handler": handler,
    }


def copy_packages(destination: Path) -> None:
    """The Python packages the handler imports, so the archive needs nothing from this checkout."""
    for package in PACKAGES:
        shutil.copytree(
            REPO_ROOT / package, destination / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )


def build_archive(args: argparse.Namespace) -> Path:
    with tempfile.TemporaryDirectory(prefix="dlrm-mar-") as tmp:
        staging = Path(tmp)
        artifact = write_model_artifact(args, staging / "artifact")
        copy_packages(staging / "code")
        (staging / "model-config.yaml").write_text(yaml.safe_dump(model_yaml(args), sort_keys=False))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        command = [
            archiver_command(),
            "--model-name", args.output.stem,
            "--version", args.version,
            "--handler", str(HANDLER),
            "--serialized-file", str(staging / "artifact" / WEIGHTS_FILE),
            "--extra-files", f"{staging / 'artifact' / CONFIG_FILE},{staging / 'code'}",
            "--config-file", str(staging / "model-config.yaml"),
            "--export-path", str(args.output.parent),
            "--force",
        ]  # fmt: skip
        subprocess.run(command, check=True)
    print(format_summary(summarize(build_dlrm(artifact.model))))
    print(f"weights: {artifact.provenance.describe()}")
    return args.output


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
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
