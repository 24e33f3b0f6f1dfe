"""The serving path without TorchServe: requests in, HTTP status, headers and body out.

``DLRMPredictor`` decodes every request of a TorchServe batch in its own wire
format (JSON rows, or the Open Inference Protocol over REST or gRPC), runs all
valid rows in one forward pass and answers each request in its format, invalid
ones with their own 4xx. The TorchServe handler is a thin adapter over it, and
benchmarks and tests call it directly to measure or check exactly what a worker
runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from torchrec.models.dlrm import DLRM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from handler import oip
from handler.errors import ErrorKind, InvalidRequest
from handler.json_rows import RequestDecoder, RowsRequest, encode_error, parse_json
from handler.ranking import RankingForward, Segment
from handler.rows import FeatureRows, concatenate
from handler.settings import DEFAULT_MAX_ROWS
from model_factory.artifact import ModelArtifact, load_model
from model_factory.features import feature_major_on_device, rows_to_kjt
from model_factory.sharding import load_sharded_model

JSON = "application/json"
INTERNAL_ERROR = orjson.dumps({"code": 500, "type": "internal_error", "message": "the server failed; see its log"})
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One request's body and HTTP headers (names lower-cased), as TorchServe hands them to a worker.

    ``grpc``: it came through TorchServe's OIP gRPC service (``ModelInfer``). TorchServe
    marks the requests of its REST routes with an ``explain`` header, and those of
    ``/predictions`` also with ``url_path``: ``explain`` alone means ``/v2/.../infer``.
    """

    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)
    grpc: bool = False

    @property
    def is_oip(self) -> bool:
        oip_route = "explain" in self.headers and "url_path" not in self.headers
        return self.grpc or oip_route or oip.HEADER_LENGTH in self.headers


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: Mapping[str, str] = field(default_factory=dict)
    error_kind: ErrorKind | None = None


@dataclass(frozen=True)
class BatchResult:
    """Responses in request order, and what it took: valid rows, decode and forward+encode time."""

    responses: list[Response]
    rows: int
    decode_ms: float
    forward_ms: float


class DLRMPredictor:
    def __init__(
        self,
        model: DLRM,
        artifact: ModelArtifact,
        device: torch.device,
        max_rows: int = DEFAULT_MAX_ROWS,
        name: str = "dlrm",
        version: str = "1.0",
    ) -> None:
        self.model = model
        self.artifact = artifact
        self.device = device
        self.decoder = RequestDecoder(artifact.model, artifact.preprocessing, max_rows=max_rows)
        self.ranking = RankingForward(model)
        self.oip = oip.OipCodec(artifact.model, artifact.preprocessing, self.decoder.validator, name, version)

    @classmethod
    def from_artifact(
        cls,
        directory: Path,
        device: torch.device,
        max_rows: int = DEFAULT_MAX_ROWS,
        shard_tables_gpus: int = 0,
        **names: str,
    ) -> DLRMPredictor:
        """The predictor of the artifact in ``directory``, its model on ``device``.

        ``shard_tables_gpus`` above 1 shards the quantized tables over that many
        ranks (:mod:`model_factory.sharding`): ``cuda:0`` .. ``cuda:N-1`` when
        ``device`` is ``cuda:0``, which gets the inputs and the dense MLPs (TorchRec's
        sharded tables send each GPU its features' ids and gather the embeddings
        back), or every rank on the CPU.
        """
        if shard_tables_gpus > 1:
            model, artifact = load_sharded_model(directory, shard_tables_gpus, device)
        else:
            model, artifact = load_model(directory, device)
        return cls(model, artifact, device, max_rows, **names)

    def predict_bodies(self, bodies: Sequence[Any]) -> BatchResult:
        """:meth:`predict` for bodies without headers (JSON rows, or OIP JSON)."""
        return self.predict([Request(body) for body in bodies])

    def predict(self, requests: Sequence[Request]) -> BatchResult:
        """One response per request, in order; invalid requests get their 4xx without affecting the others."""
        started = time.perf_counter()
        decoded: dict[int, RowsRequest | oip.OipRequest] = {}
        responses: dict[int, Response] = {}
        json_rows: list[tuple[int, Any]] = []
        for index, request in enumerate(requests):
            as_oip = request.is_oip
            try:
                if as_oip:
                    header_length = request.headers.get(oip.HEADER_LENGTH)
                    decoded[index] = self.oip.decode(request.body, header_length, grpc=request.grpc)
                    continue
                payload = parse_json(request.body)
                # OIP's "inputs" is a list of tensors; the columnar rows' is an object of columns.
                as_oip = isinstance(payload, dict) and isinstance(payload.get("inputs"), list)
                if as_oip:
                    decoded[index] = self.oip.decode(payload)
                else:
                    json_rows.append((index, payload))
            except InvalidRequest as error:
                responses[index] = self._error(error, request, as_oip)
            except Exception:  # a bug, not bad input: this request fails alone, and the worker log says why
                logger.exception("request %d of the batch failed to decode", index)
                responses[index] = Response(500, INTERNAL_ERROR)
        if json_rows:
            for (index, _), result in zip(
                json_rows, self.decoder.decode_payloads([payload for _, payload in json_rows]), strict=True
            ):
                if isinstance(result, InvalidRequest):
                    responses[index] = self._error(result, requests[index], as_oip=False)
                else:
                    decoded[index] = result
        decoded_at = time.perf_counter()
        rows = 0
        if decoded:
            order = sorted(decoded)
            batch = [decoded[index] for index in order]
            contexts = [part.context for part in batch]
            logits, scores = self.forward([part.rows for part in batch], contexts)
            for index in order:
                end = rows + decoded[index].num_rows
                responses[index] = self._answer(decoded[index], requests[index], logits[rows:end], scores[rows:end])
                rows = end
        finished = time.perf_counter()
        return BatchResult(
            responses=[responses[index] for index in range(len(requests))],
            rows=rows,
            decode_ms=(decoded_at - started) * 1e3,
            forward_ms=(finished - decoded_at) * 1e3,
        )

    def _answer(
        self, request: RowsRequest | oip.OipRequest, received: Request, logits: np.ndarray, scores: np.ndarray
    ) -> Response:
        overflowed = np.flatnonzero(~np.isfinite(logits))
        if overflowed.size:  # finite inputs so large that the MLPs overflow: no score to give
            row = int(overflowed[0])
            error = InvalidRequest(
                ErrorKind.NON_FINITE,
                f"row {row}: the model's output is not finite for these inputs: dense values too large",
                row=row,
                expected="dense values that keep the model's output finite",
            )
            return self._error(error, received, as_oip=isinstance(request, oip.OipRequest))
        if isinstance(request, RowsRequest):
            return Response(200, request.response(logits, scores))
        encoded = self.oip.encode(request, logits, scores)
        return Response(200, encoded.body, encoded.content_type, encoded.headers)

    def _error(self, error: InvalidRequest, request: Request, as_oip: bool) -> Response:
        body = self.oip.encode_error(error, grpc=request.grpc) if as_oip else encode_error(error)
        return Response(error.status, body, error_kind=error.kind)

    def forward(
        self, parts: Sequence[FeatureRows], contexts: Sequence[FeatureRows | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and click probabilities for all rows of ``parts``, in one forward pass.

        ``contexts[i]``, when given, is one row of sparse ids shared by every row of
        ``parts[i]`` (a ranking request): its ids are looked up once, with the other
        rows' in the same lookup, and what depends on the context alone is computed
        once (:mod:`handler.ranking`).

        On a GPU the rows go over as they are, from pinned host memory with
        asynchronous copies, and the ids are reordered for the KJT there; the only
        synchronisation is the copy of the scores back.
        """
        contexts = contexts or [None] * len(parts)
        context_rows = [context for context in contexts if context is not None]
        num_rows = sum(part.num_rows for part in parts)
        rows = concatenate([*parts, *context_rows])
        keys = list(self.artifact.model.sparse_feature_names)
        with torch.inference_mode():
            if self.device.type == "cpu":
                dense = torch.from_numpy(np.require(rows.dense, requirements="W"))  # binary inputs may be read-only
                sparse = rows_to_kjt(keys, rows.lengths, rows.values)
            else:
                dense, lengths, values = (
                    torch.from_numpy(np.require(array, requirements="W"))
                    .pin_memory()
                    .to(self.device, non_blocking=True)
                    for array in (rows.dense, rows.lengths, rows.values)
                )
                kjt_lengths, kjt_values = feature_major_on_device(lengths, values)
                sparse = KeyedJaggedTensor(keys=keys, values=kjt_values, lengths=kjt_lengths)
            if context_rows:
                logits = self.ranking(dense[:num_rows], sparse, segments(parts, contexts))
            else:
                logits = self.model(dense, sparse).squeeze(1).float()
            scores = torch.sigmoid(logits)
        return logits.cpu().numpy(), scores.cpu().numpy()


def segments(parts: Sequence[FeatureRows], contexts: Sequence[FeatureRows | None]) -> list[Segment]:
    """The batch's rows as :class:`Segment` s: each ranking request's, and runs of other rows between them.

    The context rows follow all other rows, in request order. A ranking request's
    shared features are those its context has ids for (the decoders have checked
    that no candidate has ids of them).
    """
    result: list[Segment] = []
    start, context_row = 0, sum(part.num_rows for part in parts)
    for part, context in zip(parts, contexts, strict=True):
        end = start + part.num_rows
        if context is not None:
            shared = tuple(bool(flag) for flag in (context.lengths[0] > 0).tolist())
            result.append(Segment(start, end, context_row, shared))
            context_row += 1
        elif result and result[-1].context_row is None:
            result[-1] = Segment(result[-1].start, end)
        else:
            result.append(Segment(start, end))
        start = end
    return result
