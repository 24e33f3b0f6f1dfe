"""The serving path without TorchServe: request bodies in, HTTP status and JSON bytes out.

``DLRMPredictor`` decodes every request of a batch, runs all valid rows in one
forward pass and splits the scores back per request. The TorchServe handler is
a thin adapter over it, and benchmarks and tests call it directly to measure
or check exactly what the server runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.models.dlrm import DLRM

from handler.codec import DecodedRequest, RequestDecoder, encode_error, encode_scores
from handler.errors import ErrorKind, InvalidRequest
from handler.settings import DEFAULT_MAX_ROWS
from model_factory.artifact import ModelArtifact, load_model
from model_factory.features import rows_to_kjt


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    error_kind: ErrorKind | None = None


@dataclass(frozen=True)
class BatchResult:
    """Responses in request order, and what it took: valid rows, decode and forward+encode time."""

    responses: list[Response]
    rows: int
    decode_ms: float
    forward_ms: float


class DLRMPredictor:
    def __init__(self, model: DLRM, artifact: ModelArtifact, device: torch.device, max_rows: int = DEFAULT_MAX_ROWS):
        self.model = model
        self.artifact = artifact
        self.device = device
        self.decoder = RequestDecoder(artifact.model, artifact.preprocessing, max_rows=max_rows)

    @classmethod
    def from_artifact(cls, directory: Path, device: torch.device, max_rows: int = DEFAULT_MAX_ROWS) -> DLRMPredictor:
        model, artifact = load_model(directory, device)
        return cls(model, artifact, device, max_rows)

    def predict_bodies(self, bodies: Sequence[Any]) -> BatchResult:
        """One response per body, in order; invalid bodies get their 4xx without affecting the others."""
        started = time.perf_counter()
        responses: dict[int, Response] = {}
        valid: list[tuple[int, DecodedRequest]] = []
        for index, request in enumerate(self.decoder.decode_many(bodies)):
            if isinstance(request, InvalidRequest):
                responses[index] = Response(request.status, encode_error(request), request.kind)
            else:
                valid.append((index, request))
        decoded = time.perf_counter()
        rows = 0
        if valid:
            logits, scores = self.forward([request for _, request in valid])
            for index, request in valid:
                end = rows + request.num_rows
                body = encode_scores(logits[rows:end].tolist(), scores[rows:end].tolist(), request.single_row)
                responses[index] = Response(200, body)
                rows = end
        finished = time.perf_counter()
        return BatchResult(
            responses=[responses[index] for index in range(len(bodies))],
            rows=rows,
            decode_ms=(decoded - started) * 1e3,
            forward_ms=(finished - decoded) * 1e3,
        )

    def forward(self, requests: Sequence[DecodedRequest]) -> tuple[np.ndarray, np.ndarray]:
        """Logits and click probabilities for all rows of ``requests``, in one forward pass."""
        dense = np.concatenate([request.dense for request in requests])
        lengths = np.concatenate([request.lengths for request in requests])
        values = np.concatenate([request.values for request in requests])
        sparse = rows_to_kjt(self.artifact.model.sparse_feature_names, lengths, values)
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(dense).to(self.device), sparse.to(self.device)).squeeze(1).float()
            scores = torch.sigmoid(logits)
        return logits.cpu().numpy(), scores.cpu().numpy()
