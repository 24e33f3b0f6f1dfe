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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torchrec.models.dlrm import DLRM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from handler.codec import INTERNAL_ERROR, Codec, Decoded, Received, Response
from handler.errors import ErrorKind, InvalidRequest
from handler.json_rows import RequestDecoder
from handler.oip import HEADER_LENGTH, OipCodec
from handler.ranking import RankingForward, Segment
from handler.rows import FeatureRows, concatenate
from handler.settings import DEFAULT_MAX_ROWS
from handler.torchserve import Request
from model_factory.artifact import ModelArtifact, load_model
from model_factory.features import feature_major_on_device, rows_to_kjt
from model_factory.sharding import load_sharded_model

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchResult:
    """Responses in request order, and what it took: valid rows, decode and forward+encode time."""

    responses: list[Response]
    rows: int
    decode_ms: float
    forward_ms: float


class DLRMPredictor:
    """Requests of any wire format in, one forward pass, each request answered in its format."""

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
        self.oip = OipCodec(artifact.model, artifact.preprocessing, self.decoder.validator, name, version)
        self.ranking = RankingForward(model)

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

        Each request's wire format is found (:meth:`wire_format`), each format's codec decodes its
        requests, the rows of all of them go through one forward pass, and each codec answers its
        own. Every step is taken for each request under its own guard (:meth:`_guard`): bad input
        gets its 4xx, a bug its 500, and neither touches the other requests of the batch; a
        decode or forward pass of several requests that fails is run again for each alone
        (:func:`each_alone_if_failed`). Requests a codec decodes together wait for the batch's
        others; the rest are decoded at once, so that a batch holds the parsed body of one
        large request at a time.
        """
        started = time.perf_counter()
        answers: dict[int, Response] = {}
        decoded: dict[int, tuple[Codec[Any], Decoded]] = {}
        waiting: dict[Codec[Any], list[Received]] = {}
        for index, request in enumerate(requests):
            with self._guard(index, self.decoder, request, answers):  # a body that is no JSON: a JSON rows error
                codec, body = self.wire_format(request)
            if index in answers:
                continue
            received = Received(index, request, body)
            if codec.decodes_together(received):
                waiting.setdefault(codec, []).append(received)
            else:
                self._decode(codec, [received], decoded, answers)
        for codec, batch in waiting.items():
            self._decode(codec, batch, decoded, answers)
        decoded_at = time.perf_counter()
        rows = 0
        order = sorted(decoded)
        outputs = each_alone_if_failed(self._forward_requests, [decoded[index][1] for index in order]) if order else []
        for index, output in zip(order, outputs, strict=True):
            codec, part = decoded[index]
            with self._guard(index, codec, requests[index], answers):
                answers[index] = self._answer(codec, part, *outcome(output))
                rows += part.num_rows
        finished = time.perf_counter()
        return BatchResult(
            responses=[answers[index] for index in range(len(requests))],
            rows=rows,
            decode_ms=(decoded_at - started) * 1e3,
            forward_ms=(finished - decoded_at) * 1e3,
        )

    def wire_format(self, request: Request) -> tuple[Codec[Any], Any]:
        """The codec of a request's wire format, and its body as that codec takes it.

        The Open Inference Protocol's when the request came by an OIP route, uses OIP's binary
        data extension, or its body is an OIP inference request (a JSON object whose ``inputs``
        is a list of tensors, where the JSON rows' columnar ``inputs`` is an object); else the
        JSON rows'. A body that did not come by an OIP route is parsed to tell, as JSON rows
        (whose errors it gets), and goes on parsed.
        """
        if request.oip_route or HEADER_LENGTH in request.headers:
            return self.oip, request.body
        payload = self.decoder.parse(request.body)
        if isinstance(payload, dict) and isinstance(payload.get("inputs"), list):
            return self.oip, payload
        return self.decoder, payload

    def _decode(
        self,
        codec: Codec[Any],
        batch: Sequence[Received],
        decoded: dict[int, tuple[Codec[Any], Decoded]],
        answers: dict[int, Response],
    ) -> None:
        """``batch`` decoded by ``codec``, each request into ``decoded`` or, refused, its answer into ``answers``."""
        for received, result in zip(batch, each_alone_if_failed(codec.decode_batch, batch), strict=True):
            with self._guard(received.position, codec, received.request, answers):
                decoded[received.position] = (codec, outcome(result))

    @contextmanager
    def _guard(self, index: int, codec: Codec[Any], request: Request, answers: dict[int, Response]) -> Iterator[None]:
        """Whatever goes wrong in this block is request ``index``'s own answer: its 4xx in its format, a 500 for
        a bug."""
        try:
            yield
        except InvalidRequest as error:
            answers[index] = codec.encode_error(error, request)
        except Exception:  # a bug, not bad input: this request fails alone, and the worker log says why
            logger.exception("request %d of the batch failed", index)
            answers[index] = Response(500, INTERNAL_ERROR)

    def _forward_requests(self, batch: Sequence[Decoded]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each request's logits and scores, from one forward pass over all of them."""
        logits, scores = self.forward([part.rows for part in batch], [part.context for part in batch])
        bounds = np.cumsum([0, *(part.num_rows for part in batch)]).tolist()
        return [(logits[start:end], scores[start:end]) for start, end in pairwise(bounds)]

    @staticmethod
    def _answer(codec: Codec[Any], decoded: Decoded, logits: np.ndarray, scores: np.ndarray) -> Response:
        overflowed = np.flatnonzero(~np.isfinite(logits))
        if overflowed.size:  # finite inputs so large that the MLPs overflow: no score to give
            row = int(overflowed[0])
            raise InvalidRequest(
                ErrorKind.NON_FINITE,
                f"row {row}: the model's output is not finite for these inputs: dense values too large",
                row=row,
                expected="dense values that keep the model's output finite",
            )
        return codec.encode(decoded, logits, scores)

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


def each_alone_if_failed(call: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R | Exception]:
    """``call(items)``, one result per item, from one call for all of them; should that call raise (a bug: bad
    input is a result), ``call`` for each item alone, so that the failure stays with the item that causes it,
    its exception in its place."""
    try:
        return list(call(items))
    except Exception as error:
        if len(items) == 1:
            return [error]
        logger.exception("%s for %d requests together failed: each alone", call.__name__, len(items))
        return [result for item in items for result in each_alone_if_failed(call, [item])]


def outcome(result: T | Exception) -> T:
    """A result of :func:`each_alone_if_failed` or a codec, raised when it is an error."""
    if isinstance(result, Exception):
        raise result
    return result


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
