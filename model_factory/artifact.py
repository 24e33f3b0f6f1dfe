"""A model artifact: the directory layout shared by checkpoints and archives.

An artifact is a directory holding

- ``model_config.json``: the :class:`ModelArtifact` (model shape, the
  preprocessing of raw features, the quantization, and where the weights came
  from);
- ``weights.pt``: the model's ``state_dict``, loaded with ``weights_only=True``;
  without the embedding tables when they are quantized, which are then in
- ``tables.bin``: the quantized tables (see :mod:`model_factory.quantization`).

The trainer writes one, ``build_mar.py`` packs one into the model store and
the handler loads one from the extracted archive; all three go through this
module, so the served model is rebuilt from the same description it was saved
with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torchrec.models.dlrm import DLRM

from model_factory.config import ConfigError, DLRMConfig
from model_factory.factory import build_dlrm, load_weights
from model_factory.features import Preprocessing
from model_factory.quantization import (
    MlpDtype,
    QuantizationSpec,
    empty_quantized_collection,
    quantize_mlps,
    read_tables,
    table_layouts,
    write_tables,
)

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "weights.pt"
TABLES_FILE = "tables.bin"
FORMAT_VERSION = 1
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

    def __post_init__(self) -> None:
        self.quantization.validate_for(self.model)

    @property
    def quantized_tables(self) -> bool:
        return self.quantization.quantizes_tables(self.model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(),
            "preprocessing": asdict(self.preprocessing),
            "quantization": asdict(self.quantization),
            "provenance": asdict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelArtifact:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ConfigError(f"unsupported artifact format_version {version!r}; expected {FORMAT_VERSION}")
        return cls(
            model=DLRMConfig.from_dict(data["model"]),
            provenance=Provenance(**data["provenance"]),
            preprocessing=Preprocessing(**data["preprocessing"]),
            quantization=QuantizationSpec(**data.get("quantization", {})),  # absent: fp32, as checkpoints are
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str = CONFIG_FILE) -> ModelArtifact:
        """The artifact a ``model_config.json`` describes; a :class:`ConfigError` naming ``source`` otherwise."""
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"cannot read model artifact {source}: {error}") from error


def write_artifact(directory: Path, artifact: ModelArtifact, model: DLRM) -> None:
    """Save ``model`` as ``artifact`` says: tables into ``tables.bin`` when quantized, the rest into weights.pt."""
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if artifact.quantized_tables:
        state = {key: value for key, value in state.items() if not key.startswith(_TABLES_PREFIX)}
        layouts = table_layouts(artifact.model, artifact.quantization)
        write_tables(model.sparse_arch.embedding_bag_collection, layouts, directory / TABLES_FILE)
    torch.save(state, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(artifact.to_dict(), indent=2) + "\n")


def read_artifact(directory: Path) -> ModelArtifact:
    path = directory / CONFIG_FILE
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read model artifact {path}: {error}") from error
    return ModelArtifact.from_json(text, source=str(path))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely: tensors only (``weights_only``), memory-mapped rather than copied."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_model(directory: Path, device: torch.device | str = "cpu") -> tuple[DLRM, ModelArtifact]:
    """Rebuild the artifact's model on ``device`` in eval mode, quantized as the artifact records."""
    device = torch.device(device)
    artifact = read_artifact(directory)
    model = build_dlrm(artifact.model)
    state = load_state_dict(directory / WEIGHTS_FILE)
    if artifact.quantized_tables:
        tables = empty_quantized_collection(artifact.model, artifact.quantization, device)
        read_tables(tables, table_layouts(artifact.model, artifact.quantization), directory / TABLES_FILE)
        model.sparse_arch.embedding_bag_collection = tables
        load_dense_weights(model, state, device)
    else:
        load_weights(model, state, device)
    if artifact.quantization.mlp == MlpDtype.INT8:
        if device.type != "cpu":
            raise ConfigError("int8 MLPs (dynamic quantization) run on CPU only: serve this archive on CPU")
        quantize_mlps(model)
    return model.eval(), artifact


def load_dense_weights(model: DLRM, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Load everything but the (already loaded, quantized) tables; strict about every other key."""
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in result.missing_keys if not key.startswith(_TABLES_PREFIX)]
    if missing or result.unexpected_keys:
        raise ConfigError(f"weights do not match the model: missing {missing}, unexpected {result.unexpected_keys}")
    for name in ("dense_arch", "inter_arch", "over_arch"):
        getattr(model, name).to(device)
