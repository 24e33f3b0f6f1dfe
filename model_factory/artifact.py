"""A model artifact: the directory layout shared by checkpoints and archives.

An artifact is a directory holding

- ``model_config.json``: the :class:`ModelArtifact` (model shape, the
  preprocessing of raw features, the quantization, and where the weights came
  from);
- ``weights.pt``: the model's ``state_dict``, loaded with ``weights_only=True``;
  without the embedding tables when they are quantized, which are then in
- ``tables.bin``: the quantized tables, laid out as FBGEMM's CPU TBEs hold them
  (see :mod:`model_factory.table_file`); the layout is recorded in
  ``model_config.json`` (``table_file``) and checked at load. On CPU the file is
  mapped read-only and shared, not copied.

Format 2 introduced that layout. Format 3 is a frequency-ordered artifact
(``build_mar.py --frequencies``): each table's rows hottest first, the id → row
remap in ``tables.bin`` (:mod:`model_factory.row_order`) and the summary of the
counts in ``model_config.json`` (``frequency_order``); a reader of format 2
only would serve its rows by the wrong ids, so it must refuse it, and only such
artifacts are written as format 3. Both are read. Artifacts of any other format
(format 1, before 0.1.0: unpadded rows, no recorded layout) are refused with a
message saying to rebuild them.

The trainer writes one, ``build_mar.py`` packs one into the model store and
the handler loads one from the extracted archive; all three go through this
module, so the served model is rebuilt from the same description it was saved
with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchrec.models.dlrm import DLRM

from model_factory.config import ConfigError, DLRMConfig
from model_factory.factory import build_dlrm, load_weights, table_name
from model_factory.features import Preprocessing
from model_factory.files import replacing, write_file
from model_factory.quantization import QuantizationSpec, quantize_mlps
from model_factory.row_order import FrequencyOrder
from model_factory.table_file import StoredTable, TableFile
from model_factory.tbe import load_tables, table_file_layout, write_tables

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "weights.pt"
TABLES_FILE = "tables.bin"
FORMAT_VERSION = 2
FREQUENCY_ORDERED_FORMAT_VERSION = 3
_TABLES_PREFIX = "sparse_arch."


@dataclass(frozen=True)
class Provenance:
    """Where the weights came from, reported by the server in its model description."""

    trained: bool
    seed: int | None = None
    checkpoint: str | None = None
    metrics: dict[str, float] | None = None

    def describe(self) -> str:
        if not self.trained:
            return f"UNTRAINED: deterministic random weights (seed {self.seed}); scores are not meaningful"
        return f"trained weights from {self.checkpoint or 'a checkpoint'}"


@dataclass(frozen=True)
class ModelArtifact:
    model: DLRMConfig
    provenance: Provenance
    preprocessing: Preprocessing = Preprocessing()
    quantization: QuantizationSpec = QuantizationSpec()
    # Rows in descending training frequency (format 3): the summary of the counts they are ordered by.
    frequency_order: FrequencyOrder | None = None
    # The table file's layout model_config.json records (quantized tables); checked at load.
    recorded_table_file: TableFile | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.quantization.validate_for(self.model)
        if self.frequency_order is None:
            return
        if not self.quantized_tables:
            raise ConfigError(
                "frequency order applies to table-batched tables (tables.bin): quantize the tables (fp32 keeps them "
                "as they are), not none"
            )
        names, ordered = sorted(map(table_name, self.model.sparse_feature_names)), sorted(self.frequency_order.tables)
        if ordered != names:
            raise ConfigError(f"the frequency order names the tables {ordered}, not the model's {names}")

    @property
    def quantized_tables(self) -> bool:
        return self.quantization.quantizes_tables(self.model)

    @property
    def format_version(self) -> int:
        return FORMAT_VERSION if self.frequency_order is None else FREQUENCY_ORDERED_FORMAT_VERSION

    def table_file(self) -> TableFile:
        """How this artifact's ``tables.bin`` is laid out: as FBGEMM's CPU TBEs hold the tables."""
        return table_file_layout(self.model, self.quantization, self.frequency_order is not None)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format_version": self.format_version,
            "model": self.model.to_dict(),
            "preprocessing": asdict(self.preprocessing),
            "quantization": asdict(self.quantization),
            "provenance": asdict(self.provenance),
        }
        if self.quantized_tables:
            data["table_file"] = self.table_file().to_dict()
        if self.frequency_order is not None:
            data["frequency_order"] = self.frequency_order.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelArtifact:
        version = data.get("format_version")
        if version not in (FORMAT_VERSION, FREQUENCY_ORDERED_FORMAT_VERSION):
            raise ConfigError(
                f"unsupported artifact format_version {version!r}; expected {FORMAT_VERSION} or "
                f"{FREQUENCY_ORDERED_FORMAT_VERSION}: rebuild the archive with this version of build_mar.py"
            )
        order = data.get("frequency_order")
        if (order is not None) != (version == FREQUENCY_ORDERED_FORMAT_VERSION):
            raise ConfigError(
                f"format_version {version} {'with' if order is not None else 'without'} a frequency_order: format "
                f"{FREQUENCY_ORDERED_FORMAT_VERSION} is the frequency-ordered one, and only it"
            )
        recorded = data.get("table_file")
        return cls(
            model=DLRMConfig.from_dict(data["model"]),
            provenance=Provenance(**data["provenance"]),
            preprocessing=Preprocessing(**data["preprocessing"]),
            quantization=QuantizationSpec(**data.get("quantization", {})),  # absent: fp32, as checkpoints are
            frequency_order=FrequencyOrder.from_dict(order) if order is not None else None,
            recorded_table_file=TableFile.from_dict(recorded) if recorded is not None else None,
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str = CONFIG_FILE) -> ModelArtifact:
        """The artifact a ``model_config.json`` describes; a :class:`ConfigError` naming ``source`` otherwise."""
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"cannot read model artifact {source}: {error}") from error


def write_artifact(
    directory: Path,
    artifact: ModelArtifact,
    model: DLRM,
    order_of: Callable[[StoredTable], torch.Tensor] | None = None,
) -> None:
    """Save ``model`` as ``artifact`` says: tables into ``tables.bin`` when quantized, the rest into weights.pt.

    A frequency-ordered artifact needs ``order_of``, each table's ids in row order.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if artifact.quantized_tables:
        state = {key: value for key, value in state.items() if not key.startswith(_TABLES_PREFIX)}
        tables = model.sparse_arch.embedding_bag_collection
        write_tables(tables, artifact.table_file(), directory / TABLES_FILE, order_of)
    save_state_dict(directory / WEIGHTS_FILE, state)
    write_description(directory, artifact)


def write_description(directory: Path, artifact: ModelArtifact) -> None:
    """``model_config.json`` alone: for weights written some other way."""
    directory.mkdir(parents=True, exist_ok=True)
    write_file(directory / CONFIG_FILE, json.dumps(artifact.to_dict(), indent=2) + "\n")


def read_artifact(directory: Path) -> ModelArtifact:
    path = directory / CONFIG_FILE
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read model artifact {path}: {error}") from error
    return ModelArtifact.from_json(text, source=str(path))


def save_state_dict(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Save a state dict as ``weights.pt``, replacing the file rather than rewriting it: workers map it."""
    with replacing(path) as file:
        torch.save(state, file)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely: tensors only (``weights_only``), memory-mapped rather than copied."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_model(
    directory: Path, device: torch.device | str = "cpu", *, copy_tables: bool = False
) -> tuple[DLRM, ModelArtifact]:
    """Rebuild the artifact's model on ``device`` in eval mode, quantized as the artifact records.

    Quantized tables are mapped read-only from ``tables.bin`` on CPU, shared with
    every other process that maps it; ``copy_tables`` (and any GPU) streams them
    into tables of the process's own instead. Nothing in ``directory`` is written.
    """
    device = torch.device(device)
    artifact = read_artifact(directory)
    model = build_dlrm(artifact.model)
    state = load_state_dict(directory / WEIGHTS_FILE)
    if artifact.quantized_tables:
        path = directory / TABLES_FILE
        layout = checked_table_file(artifact, path)
        tables = load_tables(
            artifact.model,
            artifact.quantization,
            layout,
            path,
            device,
            copy=copy_tables,
            frequency_order=artifact.frequency_order,
        )
        model.sparse_arch.embedding_bag_collection = tables
        load_dense_weights(model, state, device)
    else:
        load_weights(model, state, device)
    quantize_mlps(model, artifact.quantization.mlp)
    return model.eval(), artifact


def checked_table_file(artifact: ModelArtifact, path: Path) -> TableFile:
    """The layout of the artifact's table file at ``path``, with a :class:`ConfigError` naming the file unless
    model_config.json records the layout this TorchRec and FBGEMM hold the tables in."""
    layout = artifact.table_file()
    recorded = artifact.recorded_table_file
    if recorded is None:
        raise ConfigError(f"{CONFIG_FILE} records no layout for {path} ({layout.size} bytes expected): rebuild it")
    if recorded != layout:
        raise ConfigError(
            f"{CONFIG_FILE} records {path} as {recorded.size} bytes in {len(recorded.tbes)} TBE(s), but this "
            f"TorchRec/FBGEMM holds these tables as {layout.size} bytes in {len(layout.tbes)} TBE(s): "
            "rebuild the archive"
        )
    return layout


def load_dense_weights(model: DLRM, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Load everything but the (already loaded, quantized) tables; strict about every other key."""
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in result.missing_keys if not key.startswith(_TABLES_PREFIX)]
    if missing or result.unexpected_keys:
        raise ConfigError(f"weights do not match the model: missing {missing}, unexpected {result.unexpected_keys}")
    for name in ("dense_arch", "inter_arch", "over_arch"):
        getattr(model, name).to(device)
