"""Request rows for tests, and an independent offline scorer to check served scores against."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchrec.models.dlrm import DLRM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from model_factory.config import DEFAULT_PRESET, DLRMConfig, preset
from training.criteo import NUM_FIELDS, CriteoFormatError, request_row


def random_row(config: DLRMConfig, rng: np.random.Generator, max_ids: int = 3) -> dict[str, Any]:
    """A valid row in the reference format, with 0..max_ids ids per feature (multi-hot and empty included)."""
    lengths = rng.integers(0, max_ids + 1, size=config.num_sparse_features)
    values = [
        int(v)
        for size, length in zip(config.num_embeddings_per_feature, lengths, strict=True)
        for v in rng.integers(0, size, size=length)
    ]
    return {
        "float_features": [float(x) for x in rng.normal(1.0, 1.0, size=config.num_dense_features)],
        "id_list_features.lengths": [int(n) for n in lengths],
        "id_list_features.values": values,
    }


def columnar(body: dict[str, Any]) -> dict[str, Any]:
    """A body's columnar form: its ``instances`` as ``inputs``, every key of its rows with the rows' values in
    order (a raw row's absent feature as null, which means the same); its other keys (a context) as they are."""
    rows = body["instances"]
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = {key: [row.get(key) for row in rows] for key in keys}
    return {key: value for key, value in body.items() if key != "instances"} | {"inputs": columns}


def offline_logits(model: DLRM, config: DLRMConfig, rows: list[dict[str, Any]]) -> np.ndarray:
    """Score rows with a KJT assembled feature by feature in plain Python (not the serving code's transpose)."""
    per_feature_values: list[list[int]] = [[] for _ in config.sparse_feature_names]
    per_feature_lengths: list[list[int]] = [[] for _ in config.sparse_feature_names]
    for row in rows:
        position = 0
        for feature, length in enumerate(row["id_list_features.lengths"]):
            per_feature_values[feature].extend(row["id_list_features.values"][position : position + length])
            per_feature_lengths[feature].append(length)
            position += length
    sparse = KeyedJaggedTensor(
        keys=list(config.sparse_feature_names),
        values=torch.tensor([v for values in per_feature_values for v in values], dtype=torch.int64),
        lengths=torch.tensor([n for lengths in per_feature_lengths for n in lengths], dtype=torch.int64),
    )
    dense = torch.tensor([row["float_features"] for row in rows], dtype=torch.float32)
    with torch.no_grad():
        return model(dense, sparse).squeeze(1).numpy()


def raw_request_row(line: str) -> dict[str, int | str]:
    """One TSV line (label ignored) as the handler's raw-row request: features keyed by name, missing ones absent."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != NUM_FIELDS:
        raise CriteoFormatError(f"expected {NUM_FIELDS} tab-separated fields, got {len(fields)}")
    return {name: value for name, value in request_row(line, preset(DEFAULT_PRESET)).items() if value is not None}
