"""The JSON rows' codec: which form a body is, its rows decoded, its answer encoded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from itertools import chain
from typing import Any

import numpy as np
import orjson

from handler import values
from handler.codec import Received, Response
from handler.errors import ErrorKind, InvalidRequest, wrong_json_type
from handler.json_rows.columns import Columns
from handler.json_rows.ranking import Rankings
from handler.json_rows.raw import RawRows
from handler.json_rows.reference import ReferenceRows
from handler.json_rows.request import COLUMNS_FIELD, CONTEXT_FIELD, INSTANCES_FIELD, RowsRequest, instance_list
from handler.rows import RowValidator, split
from handler.settings import DEFAULT_MAX_ROWS
from handler.torchserve import Request
from model_factory.config import DLRMConfig
from model_factory.features import Preprocessing

EMPTY_BODY = "the request has no JSON body: send it with 'Content-Type: application/json'"
# JSON row bodies up to this size are parsed and kept until the batch's other small bodies are parsed, to be
# checked together (a TorchServe batch of 32 single rows: one set of array checks, not 32); larger ones are
# decoded and dropped at once, so that a batch never holds the Python objects of more than one large body.
COMBINED_BODY_BYTES = 64 * 1024


class RequestDecoder:
    """The JSON rows' codec for one model configuration: bodies decoded and validated, answers encoded."""

    def __init__(self, config: DLRMConfig, preprocessing: Preprocessing, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self.validator = RowValidator(config, max_rows)
        self.reference = ReferenceRows(self.validator)
        self.raw = RawRows(self.validator, preprocessing)
        self.rankings = Rankings(self.reference, self.raw)
        self.columns = Columns(self.rankings)

    @property
    def max_rows(self) -> int:
        return self.validator.max_rows

    # ------------------------------------------------------------------ the codec

    def parse(self, body: bytes | bytearray | str | dict | list | None) -> Any:
        """The JSON value of a request body; TorchServe may hand over bytes or an already-parsed value.

        Text with more arrays and objects than a request of at most ``max_rows`` rows holds is refused unparsed.
        """
        if body is None:
            body = b""
        if not isinstance(body, (bytes, bytearray, str)):
            return body
        return values.parse_json(body, self.validator, EMPTY_BODY, "the request body is not valid JSON")

    def decodes_together(self, received: Received) -> bool:
        body = received.request.body
        return not isinstance(body, (bytes, bytearray, str)) or len(body) <= COMBINED_BODY_BYTES

    def decode_batch(self, batch: Sequence[Received]) -> list[RowsRequest | InvalidRequest]:
        """Requests whose bodies :meth:`parse` has parsed, decoded as :meth:`decode_payloads` does."""
        return self.decode_payloads([received.body for received in batch])

    def encode(self, decoded: RowsRequest, logits: np.ndarray, scores: np.ndarray) -> Response:
        if decoded.columnar:  # columnar in, columnar out, as TF Serving answers
            return Response(200, orjson.dumps({"outputs": {"score": scores.tolist(), "logit": logits.tolist()}}))
        return Response(200, encode_scores(logits, scores, decoded.single_row))

    def encode_error(self, error: InvalidRequest, request: Request) -> Response:
        return Response(error.status, encode_error(error), error_kind=error.kind)

    # ------------------------------------------------------------------ decoding

    def decode(self, body: bytes | bytearray | str | dict | list | None) -> RowsRequest:
        """One request body's rows as arrays; raises :class:`InvalidRequest` when anything is wrong."""
        (result,) = self.decode_many([body])
        if isinstance(result, InvalidRequest):
            raise result
        return result

    def decode_many(self, bodies: Sequence[Any]) -> list[RowsRequest | InvalidRequest]:
        """Each body decoded as :meth:`decode` would, its error in its place when it is invalid."""
        results: dict[int, RowsRequest | InvalidRequest] = {}
        payloads: list[tuple[int, Any]] = []
        for index, body in enumerate(bodies):
            try:
                payloads.append((index, self.parse(body)))
            except InvalidRequest as error:
                results[index] = error
        decoded = self.decode_payloads([payload for _, payload in payloads])
        for (index, _), result in zip(payloads, decoded, strict=True):
            results[index] = result
        return [results[index] for index in range(len(bodies))]

    def decode_payloads(self, payloads: Sequence[Any]) -> list[RowsRequest | InvalidRequest]:
        """:meth:`decode_many` for JSON values already parsed (by the predictor, to tell formats apart).

        The rows of all model-input bodies (the reference format) are checked and
        converted together, as one ``instances`` list: a TorchServe batch of 32
        single-row requests then costs one set of array checks instead of 32. When
        that combined decode finds a problem, the bodies are decoded one by one, so
        that each error names its own request's row and the valid requests still pass.
        """
        results: dict[int, RowsRequest | InvalidRequest] = {}
        model_inputs: list[tuple[int, list, bool]] = []  # (payload index, rows, single row)
        for index, payload in enumerate(payloads):
            if isinstance(payload, dict) and payload.keys() & {COLUMNS_FIELD, CONTEXT_FIELD}:
                results[index] = _decoded_or_error(self._decode_with_context_or_columns, payload)
                continue
            try:
                rows, single_row = self._rows(payload)
            except InvalidRequest as error:
                results[index] = error
                continue
            if self.raw.is_raw_row(rows[0]):
                results[index] = _decoded_or_error(self._decode_raw_rows, rows, single_row)
            else:
                model_inputs.append((index, rows, single_row))
        if model_inputs:
            indices, row_lists, single_rows = zip(*model_inputs, strict=True)
            several = len(row_lists) > 1
            combined = (
                _decoded_or_error(self._decode_rows, list(chain.from_iterable(row_lists)), False) if several else None
            )
            pieces: list[RowsRequest | InvalidRequest]
            if isinstance(combined, RowsRequest):
                parts = split(combined.rows, [len(rows) for rows in row_lists])
                pieces = [RowsRequest(part, single) for part, single in zip(parts, single_rows, strict=True)]
            else:
                pieces = [
                    _decoded_or_error(self._decode_rows, rows, single_row)
                    for rows, single_row in zip(row_lists, single_rows, strict=True)
                ]
            for index, piece in zip(indices, pieces, strict=True):
                results[index] = piece
        return [results[index] for index in range(len(payloads))]

    def _decode_with_context_or_columns(self, payload: dict) -> RowsRequest:
        """A ranking request, or the columnar form (decoded as the rows it transposes to unless it is raw and
        well formed)."""
        if COLUMNS_FIELD not in payload:
            return self.rankings.decode(payload)
        columns = self.columns.decode(payload)
        request = columns if isinstance(columns, RowsRequest) else self.decode(columns)
        return replace(request, single_row=False, columnar=True)

    def _rows(self, payload: Any) -> tuple[list, bool]:
        """The rows of a parsed request body, and whether it is a single row rather than ``instances``."""
        if not isinstance(payload, dict):
            raise wrong_json_type(
                "the request body must be a JSON object", payload, "object", kind=ErrorKind.INVALID_BODY
            )
        if INSTANCES_FIELD not in payload:
            return [payload], True
        extra = sorted(set(payload) - {INSTANCES_FIELD})
        if extra:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"a body with {INSTANCES_FIELD!r} must have no other keys, got {extra}",
                field=extra[0],
            )
        return instance_list(payload[INSTANCES_FIELD], self.validator), False

    def _decode_rows(self, rows: list, single_row: bool) -> RowsRequest:
        return RowsRequest(self.reference.rows(rows), single_row)

    def _decode_raw_rows(self, rows: list, single_row: bool) -> RowsRequest:
        """Raw Criteo rows → the same arrays as the reference format, through the archive's preprocessing."""
        return RowsRequest(self.raw.rows(rows), single_row)


def _decoded_or_error(decode: Callable[..., RowsRequest], *arguments: Any) -> RowsRequest | InvalidRequest:
    try:
        return decode(*arguments)
    except InvalidRequest as error:
        return error


def encode_scores(logits: np.ndarray, scores: np.ndarray, single_row: bool) -> bytes:
    """``{"score": p, "logit": z}``, or ``{"predictions": [...]}`` of those, in row order."""
    predictions = [
        {"score": score, "logit": logit} for score, logit in zip(scores.tolist(), logits.tolist(), strict=True)
    ]
    return orjson.dumps(predictions[0] if single_row else {"predictions": predictions})


def encode_error(error: InvalidRequest) -> bytes:
    return orjson.dumps(error.to_body())
