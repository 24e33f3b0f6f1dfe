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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
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
# JSON row bodies up to this size are parsed and kept until the batch's other small bodies are parsed, to be
# checked together (a TorchServe batch of 32 single rows: one set of array checks, not 32); larger ones are
# decoded and dropped at once, so that a batch never holds the Python objects of more than one large body.
COMBINED_BODY_BYTES = 64 * 1024
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

    @property
    def is_describe(self) -> bool:
        """TorchServe's describe request (``GET /models/{m}?customized=true``, management API only).

        TorchServe marks it with a ``describe: True`` header, but it also copies every
        client header into an inference request: an inference request is told apart
        by the ``explain`` header that TorchServe adds to every one of its REST
        inference routes (gRPC requests have no headers at all).
        """
        return self.headers.get("describe") == "True" and "explain" not in self.headers and not self.grpc


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: Mapping[str, str] = field(default_factory=dict)
    error_kind: ErrorKind | None = None


@dataclass
class Reply:
    """How a request is answered: in OIP's shape (``oip``) when it came by an OIP route or its body is an
    OIP request, else in the JSON rows' shape. Decoding may find the former out."""

    request: Request
    oip: bool


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
        """One response per request, in order, whatever any request holds.

        Each request is decoded, answered and encoded under its own guard: bad input
        gets its 4xx, a bug its 500, and neither touches the other requests of the
        batch. A body is parsed, checked and dropped before the next one is parsed,
        so a batch holds the Python objects of one large body at a time; only small
        JSON row bodies wait to be checked together (:data:`COMBINED_BODY_BYTES`).
        """
        started = time.perf_counter()
        responses: dict[int, Response] = {}
        decoded: dict[int, RowsRequest | oip.OipRequest] = {}
        small_rows: dict[int, Any] = {}  # parsed small JSON row bodies, decoded together below
        for index, request in enumerate(requests):
            with self._guard(index, Reply(request, request.is_oip), responses) as reply:
                payload = self._decode(reply)
                if isinstance(payload, (RowsRequest, oip.OipRequest)):
                    decoded[index] = payload
                else:
                    small_rows[index] = payload
        if small_rows:
            self._decode_small_rows(small_rows, requests, decoded, responses)
        decoded_at = time.perf_counter()
        rows = 0
        if decoded:
            order = sorted(decoded)
            outputs = self._forward_each_alone_if_failed([decoded[index] for index in order])
            for index, output in zip(order, outputs, strict=True):
                reply = Reply(requests[index], isinstance(decoded[index], oip.OipRequest))
                with self._guard(index, reply, responses):
                    if isinstance(output, BaseException):
                        raise output
                    responses[index] = self._answer(decoded[index], requests[index], *output)
                    rows += decoded[index].num_rows
        finished = time.perf_counter()
        return BatchResult(
            responses=[responses[index] for index in range(len(requests))],
            rows=rows,
            decode_ms=(decoded_at - started) * 1e3,
            forward_ms=(finished - decoded_at) * 1e3,
        )

    def _decode(self, reply: Reply) -> RowsRequest | oip.OipRequest | Any:
        """A request's decoded rows; or, for a small JSON body of rows, its parsed value, to decode with others.

        A ``/predictions`` body that is an OIP request (``inputs`` a list of tensors, where the
        columnar rows' is an object of columns) is decoded, and answered, as OIP: ``reply.oip``.
        """
        request = reply.request
        if reply.oip:
            return self.oip.decode(request.body, request.headers.get(oip.HEADER_LENGTH), grpc=request.grpc)
        payload = parse_json(request.body, self.decoder.validator)
        if isinstance(payload, dict) and isinstance(payload.get("inputs"), list):
            reply.oip = True
            return self.oip.decode(payload)
        if isinstance(request.body, (bytes, bytearray, str)) and len(request.body) > COMBINED_BODY_BYTES:
            return self._decoded(self.decoder.decode_payloads([payload])[0])
        return payload

    def _decode_small_rows(
        self,
        payloads: dict[int, Any],
        requests: Sequence[Request],
        decoded: dict[int, RowsRequest | oip.OipRequest],
        responses: dict[int, Response],
    ) -> None:
        """Small JSON row bodies, decoded together (one set of array checks for a batch of single rows);
        should that fail other than on bad input, each alone under its own guard."""
        try:
            results = self.decoder.decode_payloads(list(payloads.values()))
        except Exception:
            logger.exception("decoding %d JSON bodies together failed: decoding each alone", len(payloads))
            results = None
        for position, (index, payload) in enumerate(payloads.items()):
            with self._guard(index, Reply(requests[index], oip=False), responses):
                result = results[position] if results is not None else self.decoder.decode_payloads([payload])[0]
                decoded[index] = self._decoded(result)

    @staticmethod
    def _decoded(result: RowsRequest | InvalidRequest) -> RowsRequest:
        if isinstance(result, InvalidRequest):
            raise result
        return result

    @contextmanager
    def _guard(self, index: int, reply: Reply, responses: dict[int, Response]) -> Iterator[Reply]:
        """Whatever goes wrong in this block is request ``index``'s own answer: its 4xx, or a 500 for a bug."""
        try:
            yield reply
        except InvalidRequest as error:
            responses[index] = self._error(error, reply)
        except Exception:  # a bug, not bad input: this request fails alone, and the worker log says why
            logger.exception("request %d of the batch failed", index)
            responses[index] = Response(500, INTERNAL_ERROR)

    def _forward_each_alone_if_failed(
        self, batch: Sequence[RowsRequest | oip.OipRequest]
    ) -> list[tuple[np.ndarray, np.ndarray] | BaseException]:
        """Each request's logits and scores from one forward pass over all of them.

        Should that pass fail (decoded rows are valid, so this is a bug), each request
        is run alone, so that the failure stays with the request that causes it.
        """
        try:
            logits, scores = self.forward([part.rows for part in batch], [part.context for part in batch])
        except Exception as error:
            if len(batch) == 1:
                return [error]
            logger.exception("the forward pass of %d requests failed: running each alone", len(batch))
            return [output for part in batch for output in self._forward_each_alone_if_failed([part])]
        bounds = np.cumsum([0, *(part.num_rows for part in batch)]).tolist()
        return [(logits[start:end], scores[start:end]) for start, end in pairwise(bounds)]

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
            return self._error(error, Reply(received, isinstance(request, oip.OipRequest)))
        if isinstance(request, RowsRequest):
            return Response(200, request.response(logits, scores))
        encoded = self.oip.encode(request, logits, scores)
        return Response(200, encoded.body, encoded.content_type, encoded.headers)

    def _error(self, error: InvalidRequest, reply: Reply) -> Response:
        body = self.oip.encode_error(error, grpc=reply.request.grpc) if reply.oip else encode_error(error)
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
