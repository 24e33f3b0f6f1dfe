"""Build a TorchServe model archive of a DLRM with ``torch-model-archiver``.

The archive holds the model artifact (``model_config.json``, ``weights.pt`` and,
for quantized tables, ``tables.bin``), the handler and the packages it imports
(``handler``, ``model_factory``) and TorchServe's runtime shims (``torchserve_shims``, with
the start-up hook ``sitecustomize.py``): nothing else of this repository,
``model-config.yaml`` with the :class:`~handler.settings.ServingSettings`,
``oip-metadata.json``, the model's Open Inference Protocol tensors for the
frontend agent's metadata route, and optionally ``golden-set.json``, held-out
rows for the rollout gate.
Weights come from a trained checkpoint or, without one, from a seeded random
initialisation that the archive records as untrained.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
import yaml
from torchrec.models.dlrm import DLRM

import handler
import model_factory
import torchserve_shims
from handler import oip
from handler.predictor import DLRMPredictor
from handler.settings import ServingSettings
from model_archive.checkpoint import write_artifact_from_checkpoint
from model_archive.contents import MODEL_YAML, unzipped_path
from model_archive.golden import DEFAULT_GOLDEN_ROWS, GOLDEN_FILE, GoldenSet
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
from model_factory.config import DEFAULT_PRESET, ConfigError, DLRMConfig, preset
from model_factory.factory import build_dlrm, format_summary, init_weights, load_weights, summarize
from model_factory.files import move_into_place, write_file
from model_factory.quantization import QuantizationSpec, TableDtype, quantize_model_tables
from model_factory.random_tables import random_quantized_model
from model_factory.row_order import FrequencyOrder, load_frequencies, row_order
from model_factory.table_file import StoredTable
from servers.torchserve import executable
from training.checkpoint import is_checkpoint, latest_checkpoint
from training.criteo import CriteoFormatError, open_text, parse_lines, request_row

# The packages a worker imports, and the runtime shims, copied whole into every archive.
SERVED_PACKAGES = (
    Path(handler.__file__).parent,
    Path(model_factory.__file__).parent,
    Path(torchserve_shims.__file__).parent,
)
HANDLER_FILE = Path(handler.__file__).parent / "dlrm_handler.py"
STARTUP_HOOK = Path(torchserve_shims.__file__).parent / "sitecustomize.py"
DEFAULT_OUTPUT = Path("model_store/dlrm.mar")
# FBGEMM's table-batched collection holding the fp32 rows: the scores of TorchRec's per-table
# modules, with one lookup call for all tables instead of one module call per table.
DEFAULT_TABLES = TableDtype.FP32


class ArchiveFormat(StrEnum):
    """``default``: a zipped ``.mar``; ``no-archive``: a directory that TorchServe serves in place."""

    ZIPPED = "default"
    UNZIPPED = "no-archive"


@dataclass(frozen=True)
class BuildOptions:
    """Everything ``build_mar.py`` can be told; the defaults are what ``python build_mar.py`` builds.

    The model's shape comes from ``config_file``, else from a checkpoint directory,
    else from ``preset``. ``checkpoint`` is a trainer output directory (its
    ``weights.pt``, or its newest DCP checkpoint after a run of several ranks), a
    DCP checkpoint directory of any TorchRec DMP training of the shape, or a
    ``state_dict`` file; without one the weights are random from ``seed``.
    ``golden_set``: a held-out Criteo TSV file whose first ``golden_rows`` rows
    the archive carries for the rollout gate (model_archive/golden.py).
    ``frequencies``: ``frequencies.pt`` (or a directory holding one), the counts
    each table's rows are written in descending order of (:mod:`model_factory.row_order`).
    """

    preset: str | None = None
    config_file: Path | None = None
    checkpoint: Path | None = None
    seed: int = 0
    output: Path = DEFAULT_OUTPUT
    version: str = "1.0"
    archive_format: ArchiveFormat = ArchiveFormat.ZIPPED
    quantization: QuantizationSpec = field(default_factory=lambda: QuantizationSpec(DEFAULT_TABLES))
    serving: ServingSettings = field(default_factory=ServingSettings)
    golden_set: Path | None = None
    golden_rows: int = DEFAULT_GOLDEN_ROWS
    frequencies: Path | None = None

    def __post_init__(self) -> None:
        if self.output.suffix != ".mar":
            raise ConfigError(f"the output must end in .mar, got {self.output}")
        if self.frequencies is not None and TableDtype.NONE in (
            self.quantization.tables,
            *self.quantization.per_table.values(),
        ):
            raise ConfigError(
                "frequency order applies to table-batched tables (tables.bin): give --quantize other than none"
            )
        if self.preset is not None and self.config_file is not None:
            raise ConfigError("give a preset or a config file, not both")
        if self.golden_rows < 1:
            raise ConfigError(f"golden_rows must be at least 1, got {self.golden_rows}")

    @property
    def archive_path(self) -> Path:
        """The ``.mar`` file, or the directory of an unzipped archive."""
        return unzipped_path(self.output) if self.archive_format == ArchiveFormat.UNZIPPED else self.output

    def model_config(self) -> DLRMConfig:
        if self.config_file is not None:
            return DLRMConfig.from_json(self.config_file.read_text())
        if self.checkpoint is not None and (self.checkpoint / CONFIG_FILE).is_file():  # a trainer output's own
            return read_artifact(self.checkpoint).model
        return preset(self.preset or DEFAULT_PRESET)


def write_model_artifact(options: BuildOptions, directory: Path) -> ModelArtifact:
    """Write the artifact to archive into ``directory``: from a checkpoint or seeded random weights, quantized, and
    its tables' rows in descending training frequency when ``options.frequencies`` gives the counts."""
    artifact, weights = artifact_and_weights(options)
    order_of = None
    if options.frequencies is not None:
        counts = load_frequencies(options.frequencies, artifact.model)
        artifact = replace(artifact, frequency_order=FrequencyOrder.of(counts))

        def order_of(table: StoredTable) -> torch.Tensor:
            return row_order(counts[table.name])

    if weights is not None and is_checkpoint(weights):  # DCP: any TorchRec DMP training of this shape
        write_artifact_from_checkpoint(directory, artifact, weights, order_of)
        return artifact
    if weights is not None:
        model = load_checkpoint(artifact, weights)
    elif artifact.quantized_tables:  # created quantized: the fp32 tables never exist
        model = random_quantized_model(artifact.model, artifact.quantization, seed=options.seed)
    else:
        model = init_weights(build_dlrm(artifact.model), seed=options.seed)
    write_artifact(directory, artifact, model, order_of)
    return artifact


def artifact_and_weights(options: BuildOptions) -> tuple[ModelArtifact, Path | None]:
    """The artifact to write, quantized as asked, and its weights: a DCP checkpoint, a ``state_dict`` file, or
    ``None`` for seeded random ones."""
    quantization = options.quantization
    checkpoint = options.checkpoint
    if checkpoint is None:
        provenance = Provenance(trained=False, seed=options.seed)
        return ModelArtifact(model=options.model_config(), provenance=provenance, quantization=quantization), None
    if is_checkpoint(checkpoint) or not checkpoint.is_dir():  # DCP or a state_dict file of the chosen shape
        provenance = Provenance(trained=True, checkpoint=checkpoint.name)
        artifact = ModelArtifact(model=options.model_config(), provenance=provenance, quantization=quantization)
        return artifact, checkpoint
    if not (checkpoint / CONFIG_FILE).exists():
        raise ConfigError(f"{checkpoint} is neither a trainer output ({CONFIG_FILE}) nor a DCP checkpoint (.metadata)")
    if options.preset or options.config_file:
        raise ConfigError("a checkpoint directory carries its own model config: drop --preset/--config")
    trained = read_artifact(checkpoint)
    if trained.quantized_tables:
        raise ConfigError(f"{checkpoint} is already quantized: archive the fp32 checkpoint the trainer wrote")
    artifact = replace(trained, quantization=quantization)
    if (checkpoint / WEIGHTS_FILE).exists():
        return artifact, checkpoint / WEIGHTS_FILE
    latest = latest_checkpoint(checkpoint)  # a run of several ranks: its newest DCP checkpoint
    if latest is None:
        raise ConfigError(f"{checkpoint} holds neither {WEIGHTS_FILE} nor a complete DCP checkpoint")
    return artifact, latest


def load_checkpoint(artifact: ModelArtifact, path: Path) -> DLRM:
    """The checkpoint's fp32 model, quantized as ``artifact`` asks; a clear error for unsafe or mismatched files."""
    try:
        model = load_weights(build_dlrm(artifact.model), load_state_dict(path))
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ConfigError(f"cannot load checkpoint {path}: {error}") from error
    if artifact.quantized_tables:
        model = quantize_model_tables(model, artifact.model, artifact.quantization)
    return model


def copy_packages(destination: Path) -> None:
    """The Python packages the handler imports, so the archive needs nothing from this checkout, the runtime
    shims, and their start-up hook (``sitecustomize.py``), at the archive's top level where Python finds it."""
    ignored = shutil.ignore_patterns("__pycache__", "*.pyc", STARTUP_HOOK.name)
    for package in SERVED_PACKAGES:
        shutil.copytree(package, destination / package.name, ignore=ignored)
    shutil.copyfile(STARTUP_HOOK, destination / STARTUP_HOOK.name)


def build_archive(options: BuildOptions) -> tuple[Path, ModelArtifact]:
    """Run torch-model-archiver over a staged artifact; returns the archive (file or directory) and its model.

    The archive is built in the staging directory and renamed over the old one when complete
    (:func:`~model_factory.files.move_into_place`): the archiver itself truncates an existing ``.mar``
    and copies over the files of an existing unzipped archive, which TorchServe's workers may be mapping.
    """
    output = options.output
    output.parent.mkdir(parents=True, exist_ok=True)
    unzipped = options.archive_format == ArchiveFormat.UNZIPPED
    # Staged beside the output, so a large tables file is moved (renamed), never copied, into an unzipped archive.
    with tempfile.TemporaryDirectory(prefix=".dlrm-staging-", dir=output.parent) as tmp:
        staging = Path(tmp)
        artifact = write_model_artifact(options, staging / "artifact")
        copy_packages(staging / "code")
        model_yaml = staging / MODEL_YAML
        write_file(model_yaml, yaml.safe_dump(options.serving.to_model_yaml(), sort_keys=False))
        metadata = staging / "artifact" / oip.METADATA_FILE
        write_file(metadata, orjson.dumps(oip.model_metadata(artifact.model), option=orjson.OPT_INDENT_2))
        tables = staging / "artifact" / TABLES_FILE
        extra_files = [staging / "artifact" / CONFIG_FILE, metadata, staging / "code"]
        if options.golden_set is not None:
            rows, labels = read_golden_rows(options.golden_set, options.golden_rows, artifact.model)
            golden = GoldenSet(rows, labels, score_in_process(staging / "artifact", rows))
            extra_files.append(staging / GOLDEN_FILE)
            write_file(extra_files[-1], golden.to_json())
        if tables.exists() and not unzipped:
            extra_files.append(tables)
        built = staging / "archive"
        staged = built / (output.stem if unzipped else output.name)
        command = [
            executable("torch-model-archiver"),
            "--model-name", output.stem,
            "--version", options.version,
            "--handler", str(HANDLER_FILE),
            "--serialized-file", str(staging / "artifact" / WEIGHTS_FILE),
            "--extra-files", ",".join(str(path) for path in extra_files),
            "--config-file", str(model_yaml),
            "--export-path", str(built),
            "--archive-format", options.archive_format.value,
            "--force",
        ]  # fmt: skip
        built.mkdir()
        # The archiver gathers the files in $TMPDIR/<model name>, removed first: a private TMPDIR keeps two
        # builds of the same model name (tests, a rollout beside a build) from deleting each other's files.
        (staging / "tmp").mkdir()
        subprocess.run(command, check=True, env={**os.environ, "TMPDIR": str(staging / "tmp")})
        if tables.exists() and unzipped:
            tables.rename(staged / TABLES_FILE)
        move_into_place(staged, options.archive_path)
    return options.archive_path, artifact


def read_golden_rows(path: Path, rows: int, config: DLRMConfig) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The first ``rows`` lines of a Criteo TSV file as raw JSON rows keyed by ``config``'s names, and their labels.

    The lines are parsed by the training reader first, so a malformed one fails here with its line number.
    """
    try:
        with open_text(path) as lines:
            chunk = list(islice(lines, rows))
        if not chunk:
            raise ConfigError(f"{path} has no rows for a golden set")
        labels = parse_lines(chunk, path, first_line=1).labels.astype(np.int64)
    except (OSError, CriteoFormatError) as error:
        raise ConfigError(f"golden set: {error}") from error
    json_rows: list[dict[str, Any]] = [request_row(line, config) for line in chunk]
    return json_rows, labels


def score_in_process(artifact_dir: Path, rows: list[dict[str, Any]]) -> np.ndarray:
    """The rows' scores from the artifact in ``artifact_dir``, through the same predictor a worker runs."""
    predictor = DLRMPredictor.from_artifact(artifact_dir, torch.device("cpu"), max_rows=len(rows))
    (response,) = predictor.predict_bodies([orjson.dumps({"instances": rows})]).responses
    if response.status != 200:
        raise ConfigError(f"the golden rows are not valid requests for this model: {response.body.decode()}")
    return np.asarray([prediction["score"] for prediction in orjson.loads(response.body)["predictions"]])


def describe(artifact: ModelArtifact) -> str:
    """What was archived: the model summary, the stored table size and where the weights came from."""
    lines = [format_summary(summarize(build_dlrm(artifact.model)))]
    if artifact.quantized_tables:
        layout = artifact.table_file()
        lines.append(
            f"tables: {artifact.quantization.tables} rows, table-batched, {layout.size / 2**30:.2f} GiB in tables.bin"
        )
    if artifact.frequency_order is not None:
        remaps = sum(part.remap_size for part in layout.tbes)
        lines.append(f"rows in descending training frequency, the id → row remap {remaps / 2**20:.1f} MiB of it")
    lines.append(f"weights: {artifact.provenance.describe()}")
    return "\n".join(lines)
