"""A model artifact: the directory layout shared by checkpoints and archives.

An artifact is a directory holding

- ``model_config.json``: the :class:`ModelArtifact` (model shape, the
  preprocessing of raw features, and where the weights came from), and
- ``weights.pt``: the model's ``state_dict``.

The trainer writes one, ``build_mar.py`` packs one into ``dlrm.mar`` and the
handler loads one from the extracted archive; all three go through this module,
so the served model is rebuilt from the same description it was saved with.
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

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "weights.pt"
FORMAT_VERSION = 1


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(),
            "preprocessing": asdict(self.preprocessing),
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
        )


def write_artifact(directory: Path, artifact: ModelArtifact, model: DLRM) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(artifact.to_dict(), indent=2) + "\n")


def read_artifact(directory: Path) -> ModelArtifact:
    path = directory / CONFIG_FILE
    try:
        return ModelArtifact.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"cannot read model artifact {path}: {error}") from error


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely: tensors only (``weights_only``), memory-mapped rather than copied."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_model(directory: Path, device: torch.device | str = "cpu") -> tuple[DLRM, ModelArtifact]:
    """Rebuild the artifact's model on ``device`` in eval mode."""
    artifact = read_artifact(directory)
    model = load_weights(build_dlrm(artifact.model), load_state_dict(directory / WEIGHTS_FILE), device)
    return model.eval(), artifact
