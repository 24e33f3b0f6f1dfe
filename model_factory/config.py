"""Typed DLRM model configuration and the named presets.

A :class:`DLRMConfig` fully determines the shape of the TorchRec ``DLRM`` that
:mod:`model_factory.factory` builds. It travels inside every archive as JSON
(``model_config.json``), so the server rebuilds exactly the model that was
trained or initialised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from model_factory.features import DENSE_FEATURE_NAMES, SPARSE_FEATURE_NAMES


class ConfigError(ValueError):
    """A model configuration is inconsistent; the message says which field and why."""


@dataclass(frozen=True)
class DLRMConfig:
    """Shape of a DLRM: one embedding table per sparse feature, two MLPs.

    Lists passed in are stored as tuples so that a config is hashable and cannot
    be mutated after validation.
    """

    num_embeddings_per_feature: tuple[int, ...]
    embedding_dim: int
    dense_arch_layer_sizes: tuple[int, ...]
    over_arch_layer_sizes: tuple[int, ...]
    dense_feature_names: tuple[str, ...] = DENSE_FEATURE_NAMES
    sparse_feature_names: tuple[str, ...] = SPARSE_FEATURE_NAMES

    def __post_init__(self) -> None:
        for name in (
            "num_embeddings_per_feature",
            "dense_arch_layer_sizes",
            "over_arch_layer_sizes",
            "dense_feature_names",
            "sparse_feature_names",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        _check_names("dense_feature_names", self.dense_feature_names)
        _check_names("sparse_feature_names", self.sparse_feature_names)
        overlap = set(self.dense_feature_names) & set(self.sparse_feature_names)
        if overlap:
            raise ConfigError(f"feature names used as both dense and sparse: {sorted(overlap)}")
        if len(self.num_embeddings_per_feature) != len(self.sparse_feature_names):
            raise ConfigError(
                f"num_embeddings_per_feature has {len(self.num_embeddings_per_feature)} entries "
                f"but there are {len(self.sparse_feature_names)} sparse features; "
                "give one table size per sparse feature"
            )
        _check_positive_ints("num_embeddings_per_feature", self.num_embeddings_per_feature)
        _check_positive_ints("embedding_dim", (self.embedding_dim,))
        _check_positive_ints("dense_arch_layer_sizes", self.dense_arch_layer_sizes)
        _check_positive_ints("over_arch_layer_sizes", self.over_arch_layer_sizes)
        if self.dense_arch_layer_sizes[-1] != self.embedding_dim:
            raise ConfigError(
                f"the last dense_arch_layer_sizes entry ({self.dense_arch_layer_sizes[-1]}) must "
                f"equal embedding_dim ({self.embedding_dim}): the dense embedding is interacted "
                "with the sparse embeddings by dot product"
            )
        if self.over_arch_layer_sizes[-1] != 1:
            raise ConfigError(
                f"the last over_arch_layer_sizes entry must be 1 (one click logit per row), "
                f"got {self.over_arch_layer_sizes[-1]}"
            )

    @property
    def num_dense_features(self) -> int:
        return len(self.dense_feature_names)

    @property
    def num_sparse_features(self) -> int:
        return len(self.sparse_feature_names)

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DLRMConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING)
        if missing:
            raise ConfigError(f"model config is missing required keys {missing}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> DLRMConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"model config is not valid JSON: {error}") from error
        return cls.from_dict(data)


def _check_names(field: str, names: tuple[str, ...]) -> None:
    if not names:
        raise ConfigError(f"{field} must not be empty")
    if not all(isinstance(name, str) and name for name in names):
        raise ConfigError(f"{field} must be non-empty strings, got {list(names)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{field} contains duplicates: {list(names)}")


def _check_positive_ints(field: str, values: tuple[int, ...]) -> None:
    if not values:
        raise ConfigError(f"{field} must not be empty")
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{field}[{index}] must be a positive integer, got {value!r}")


# Table sizes of the Criteo 1TB click logs as used by the TorchRec DLRM reference
# (and the pytorch/serve torchrec_dlrm example): 177,944,275 rows in all.
CRITEO_1TB_NUM_EMBEDDINGS: tuple[int, ...] = (
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
    2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
)  # fmt: skip

# The MLP shape of the TorchRec DLRM reference (and of MLPerf's DLRM).
REFERENCE_DENSE_ARCH = (512, 256, 64)
REFERENCE_OVER_ARCH = (512, 512, 256, 1)

# Hash size that caps the Criteo tables for `criteo-kaggle`: keeps the reference
# MLP shape while the tables (26 x <=100k rows x 64) fit a small CPU box.
KAGGLE_HASH_SIZE = 100_000

# Hash size of the small default: tables of at most 10k rows, dimension 16.
SMALL_HASH_SIZE = 10_000


def capped_table_sizes(hash_size: int) -> tuple[int, ...]:
    """Criteo table sizes with every table capped at ``hash_size`` rows (ids are hashed modulo it)."""
    return tuple(min(size, hash_size) for size in CRITEO_1TB_NUM_EMBEDDINGS)


def criteo_1tb() -> DLRMConfig:
    """The reference Criteo-1TB DLRM: 11,389,195,777 parameters (45.6 GB in fp32)."""
    return DLRMConfig(
        num_embeddings_per_feature=CRITEO_1TB_NUM_EMBEDDINGS,
        embedding_dim=64,
        dense_arch_layer_sizes=REFERENCE_DENSE_ARCH,
        over_arch_layer_sizes=REFERENCE_OVER_ARCH,
    )


def criteo_kaggle() -> DLRMConfig:
    """The reference DLRM shape with the Criteo tables capped at ``KAGGLE_HASH_SIZE`` rows."""
    return DLRMConfig(
        num_embeddings_per_feature=capped_table_sizes(KAGGLE_HASH_SIZE),
        embedding_dim=64,
        dense_arch_layer_sizes=REFERENCE_DENSE_ARCH,
        over_arch_layer_sizes=REFERENCE_OVER_ARCH,
    )


def small() -> DLRMConfig:
    """A small DLRM (about 2.4M parameters) that trains and serves quickly on 2 CPU cores."""
    return DLRMConfig(
        num_embeddings_per_feature=capped_table_sizes(SMALL_HASH_SIZE),
        embedding_dim=16,
        dense_arch_layer_sizes=(64, 16),
        over_arch_layer_sizes=(64, 32, 1),
    )


PRESETS: dict[str, Callable[[], DLRMConfig]] = {
    "small": small,
    "criteo-kaggle": criteo_kaggle,
    "criteo-1tb": criteo_1tb,
}
DEFAULT_PRESET = "small"


def preset(name: str) -> DLRMConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
