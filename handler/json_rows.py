"""The JSON row formats of ``POST /predictions/dlrm``: decode, validate, encode.

Plain Python and NumPy, no TorchServe: the predictor calls it, unit tests call it
directly. The shared rules (finite values, lengths, id ranges) are
:class:`~handler.rows.RowValidator`'s; this module checks what only JSON rows
can get wrong (types, keys, counts per row).

Request bodies (JSON):

- one row, the pytorch/serve ``torchrec_dlrm`` format::

    {"float_features": [13 numbers],
     "id_list_features.lengths": [26 ints >= 0],
     "id_list_features.values": [sum(lengths) ints]}

  ``values`` lists the ids of feature 0, then feature 1, ...; each id is a row
  index in ``[0, num_embeddings)`` of its feature's table.
- one raw Criteo row, keyed by the schema's names, as logged before any
  preprocessing: ``{"int_0": 5, ..., "int_12": 0, "cat_0": "05db9164", ...,
  "cat_25": "c0d61a5c"}``; integers or null, 8-hex-digit strings or null/empty;
  an absent key means missing. It goes through the archive's
  :class:`~model_factory.features.Preprocessing`, exactly as in training.
- several rows: ``{"instances": [row, ...]}`` (all rows in the format of the first).
- a ranking request, one user and ``N`` candidates in raw Criteo rows:
  ``{"context": {features shared by all rows}, "instances": [{the other features}, ...]}``;
  every feature is given exactly once, in the context or in every candidate (null for
  missing). The context's sparse ids are looked up once for all candidates
  (:attr:`RowsRequest.context`); its dense values are copied into every row, since the
  dense MLP takes all dense features together. Scores as for ``instances``.
- a ranking request in the reference format, by the OIP ranking request's rules:
  ``{"context": {"id_list_features.lengths": [26], "id_list_features.values": [...]},
  "instances": [{"float_features": [13], "id_list_features.lengths": [m or 26], ...}]}``;
  the context's features are those of context length > 0, a candidate's lengths cover
  the other ``m`` features (or all 26, 0 for the context's); ``float_features`` in the
  context or in every candidate.

- columnar, TF Serving's ``inputs`` form of ``instances``: ``{"inputs": {field: [its value
  in row 0, row 1, ...]}}``, every field of the row format an array of one value per row
  (all of the same length), optionally beside a ranking ``context``. It saves repeating
  every key in every row. Raw Criteo columns take a fast path straight to arrays;
  anything else (the reference format's fields, or a problem to name) is decoded as the
  rows it transposes to, so each rule and error is the row format's (row ``i`` is
  position ``i`` of the columns).

Responses: ``{"score": p, "logit": z}`` for one row, ``{"predictions": [...]}``
in request order for ``instances``, ``{"outputs": {"score": [...], "logit": [...]}}``
for ``inputs`` (columnar in, columnar out, as TF Serving answers). Invalid input raises
:class:`~handler.errors.InvalidRequest`, which carries the HTTP status and a JSON
body naming the field, the row, what was expected and what was received.
Nothing is coerced: ids must be JSON integers (never floats or strings), dense
values finite numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np
import orjson

from handler import values
from handler.codec import Received, Response
from handler.errors import ROWS, ErrorKind, InvalidRequest, Location, fits_int64, json_type
from handler.rows import FeatureRows, FieldNames, RowValidator, preprocessed, preprocessed_ranking, split
from handler.settings import DEFAULT_MAX_ROWS
from handler.torchserve import Request
from handler.values import INT_TYPES, NUMBER_TYPES, BeyondRange
from model_factory.config import DLRMConfig
from model_factory.features import CategoryFormatError, Preprocessing, parse_categories

DENSE_FIELD = "float_features"
LENGTHS_FIELD = "id_list_features.lengths"
VALUES_FIELD = "id_list_features.values"
INSTANCES_FIELD = "instances"
COLUMNS_FIELD = "inputs"
CONTEXT_FIELD = "context"
ROW_FIELDS = (DENSE_FIELD, LENGTHS_FIELD, VALUES_FIELD)
_ROW_FIELD_SET = frozenset(ROW_FIELDS)
FIELD_NAMES = FieldNames(dense=DENSE_FIELD, lengths=LENGTHS_FIELD, values=VALUES_FIELD)
# A ranking request's context is named in errors in place of a row.
CONTEXT = Location(CONTEXT_FIELD)
EMPTY_BODY = "the request has no JSON body: send it with 'Content-Type: application/json'"
# JSON row bodies up to this size are parsed and kept until the batch's other small bodies are parsed, to be
# checked together (a TorchServe batch of 32 single rows: one set of array checks, not 32); larger ones are
# decoded and dropped at once, so that a batch never holds the Python objects of more than one large body.
COMBINED_BODY_BYTES = 64 * 1024

_RAW_INT_TYPES: frozenset[type] = frozenset({int, type(None)})
_RAW_CATEGORY_TYPES: frozenset[type] = frozenset({str, type(None)})


@dataclass(frozen=True)
class RowsRequest:
    """The rows of one JSON request, whether it was one row rather than ``instances``, and whether
    it came (and is answered) columnar.

    ``context``, for a ranking request: one row with only the context's sparse ids, whose
    pooled embeddings the forward adds to every row's (``rows`` then hold the candidates,
    without the context's sparse ids and with its dense values copied in).
    """

    rows: FeatureRows
    single_row: bool
    context: FeatureRows | None = None
    columnar: bool = False

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows


class RequestDecoder:
    """The JSON rows' codec for one model configuration: bodies decoded and validated, answers encoded."""

    def __init__(self, config: DLRMConfig, preprocessing: Preprocessing, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self.config = config
        self.preprocessing = preprocessing
        self.validator = RowValidator(config, max_rows)
        self.num_dense = config.num_dense_features
        self.num_sparse = config.num_sparse_features
        self.raw_fields = frozenset(config.dense_feature_names + config.sparse_feature_names)

    @property
    def max_rows(self) -> int:
        return self.validator.max_rows

    def parse(self, body: bytes | bytearray | str | dict | list | None) -> Any:
        """A request body's JSON value (:func:`parse_json`)."""
        return parse_json(body, self.validator)

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
        single-row requests then costs one set of array checks instead of 32
        (README, Performance, has the measured gain). When that combined
        decode finds a problem, the bodies are decoded one by one, so that each
        error names its own request's row and the valid requests still pass.
        """
        results: dict[int, RowsRequest | InvalidRequest] = {}
        model_inputs: list[tuple[int, list, bool]] = []  # (payload index, rows, single row)
        for index, payload in enumerate(payloads):
            if isinstance(payload, dict) and payload.keys() & {COLUMNS_FIELD, CONTEXT_FIELD}:
                decode = self._decode_columns if COLUMNS_FIELD in payload else self._decode_ranking
                try:
                    results[index] = decode(payload)
                except InvalidRequest as error:
                    results[index] = error
                continue
            try:
                rows, single_row = self._rows(payload)
            except InvalidRequest as error:
                results[index] = error
                continue
            if self._is_raw_row(rows[0]):
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

    def _rows(self, payload: Any) -> tuple[list, bool]:
        """The rows of a parsed request body, and whether it is a single row rather than ``instances``."""
        if not isinstance(payload, dict):
            raise InvalidRequest(
                ErrorKind.INVALID_BODY,
                f"the request body must be a JSON object, got {json_type(payload)}",
                expected="object",
                got=json_type(payload),
            )
        if INSTANCES_FIELD not in payload:
            return [payload], True
        return self._instances(payload), False

    def _is_raw_row(self, row: Any) -> bool:
        """A raw row names schema features and none of the reference format's fields."""
        return isinstance(row, dict) and not row.keys() & _ROW_FIELD_SET and bool(row.keys() & self.raw_fields)

    def _instances(self, payload: dict) -> list:
        extra = sorted(set(payload) - {INSTANCES_FIELD})
        if extra:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"a body with {INSTANCES_FIELD!r} must have no other keys, got {extra}",
                field=extra[0],
            )
        return self._instance_list(payload[INSTANCES_FIELD])

    def _instance_list(self, rows: Any) -> list:
        """The value of ``instances``: a list of at most ``max_rows`` rows."""
        if not isinstance(rows, list):
            raise InvalidRequest(
                ErrorKind.WRONG_TYPE,
                f"{INSTANCES_FIELD!r} must be a list of rows, got {json_type(rows)}",
                field=INSTANCES_FIELD,
                expected="array",
                got=json_type(rows),
            )
        self.validator.check_row_count(len(rows), INSTANCES_FIELD)
        return rows

    def _decode_ranking(self, payload: dict) -> RowsRequest:
        """A context and its candidates (raw Criteo rows), each feature given in exactly one of them."""
        extra = sorted(payload.keys() - {CONTEXT_FIELD, INSTANCES_FIELD})
        if extra:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"a ranking request has only {CONTEXT_FIELD!r} and {INSTANCES_FIELD!r}, got {extra[0]!r}",
                field=extra[0],
            )
        if INSTANCES_FIELD not in payload:
            raise InvalidRequest(
                ErrorKind.MISSING_FIELD, f"a ranking request needs {INSTANCES_FIELD!r}", field=INSTANCES_FIELD
            )
        context = payload[CONTEXT_FIELD]
        if not isinstance(context, dict):
            raise InvalidRequest(
                ErrorKind.WRONG_TYPE,
                f"{CONTEXT_FIELD!r} must be an object of features, got {json_type(context)}",
                field=CONTEXT_FIELD,
                expected="object",
                got=json_type(context),
            )
        candidates = payload[INSTANCES_FIELD]
        if context.keys() & _ROW_FIELD_SET or (
            not context and isinstance(candidates, list) and candidates and not self._is_raw_row(candidates[0])
        ):
            return self._decode_reference_ranking(context, self._instance_list(candidates))
        unknown = [name for name in context if name not in self.raw_fields]
        if unknown:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"{CONTEXT_FIELD}: unknown field {unknown[0]!r}; the context holds raw Criteo features "
                f"({self.config.dense_feature_names[0]}.., {self.config.sparse_feature_names[0]}..)",
                field=unknown[0],
            )
        candidates = self._instance_list(candidates)
        own_dense, own_sparse = self._own_features(context)
        # Well-formed candidates have exactly the features the context lacks; else the first problem is named.
        columns = self._well_formed_raw_columns(candidates, own_dense, own_sparse)
        if columns is None:
            self._check_each_feature_once(context, candidates)
        context_values = self._raw_context_values(context)
        ints, categories = columns or self._checked_raw_columns(candidates, own_dense, own_sparse)
        return self._raw_ranking(context, context_values, ints, categories)

    def _own_features(self, context: dict) -> tuple[list[str], list[str]]:
        """The dense and sparse features a raw ranking's candidates give: those the context does not."""
        return (
            [name for name in self.config.dense_feature_names if name not in context],
            [name for name in self.config.sparse_feature_names if name not in context],
        )

    def _raw_context_values(self, context: dict) -> tuple[np.ndarray, np.ndarray]:
        """The raw context's checked values (as :meth:`_raw_columns`, one row), its errors named as the context's."""
        dense_names = [name for name in self.config.dense_feature_names if name in context]
        sparse_names = [name for name in self.config.sparse_feature_names if name in context]
        return self._raw_columns([context], dense_names, sparse_names, CONTEXT)

    def _raw_ranking(
        self, context: dict, context_values: tuple[np.ndarray, np.ndarray], ints: np.ndarray, categories: np.ndarray
    ) -> RowsRequest:
        """A raw ranking's rows from checked values: the candidates' (``ints`` ``[N, own dense]``,
        ``categories`` ``[N, own sparse]``) and the context's."""
        rows, context_row = preprocessed_ranking(
            self.preprocessing,
            self.validator.table_sizes,
            context_values,
            (ints, categories),
            shared_dense=np.array([name in context for name in self.config.dense_feature_names]),
            shared_sparse=np.array([name in context for name in self.config.sparse_feature_names]),
        )
        return RowsRequest(rows=rows, single_row=False, context=context_row)

    def _decode_reference_ranking(self, context: dict, candidates: list) -> RowsRequest:
        """A context and candidates in the reference format (the OIP ranking request's rules, in JSON).

        The context holds ``float_features`` or each candidate does; the context's
        ``id_list_features.lengths`` (all 26) give the ids of its features (those of
        length > 0); each candidate's lengths cover the other features only (compact)
        or all 26 with 0 for the context's.
        """
        context_row = self._reference_context(context)
        own = context_row.lengths[0] == 0
        fields = _ROW_FIELD_SET - {DENSE_FIELD} if DENSE_FIELD in context else _ROW_FIELD_SET
        widths = tuple(sorted({int(own.sum()), self.num_sparse}))
        context_fields = frozenset(context.keys() & {DENSE_FIELD})
        dense_rows, length_rows, value_rows = self._well_formed_fields(
            candidates, fields, widths
        ) or self._checked_fields(candidates, fields, widths, context_fields)
        ids = self._ids(value_rows, sum(map(len, value_rows)))
        dense = None if DENSE_FIELD in context else values.float32(dense_rows)
        rows = self.validator.ranking_rows(
            context_row, dense, length_rows, ids, FIELD_NAMES, CONTEXT_FIELD, sent_dense=dense_rows
        )
        return RowsRequest(rows, single_row=False, context=context_row)

    def _reference_context(self, context: dict) -> FeatureRows:
        """The context of a reference-format ranking as one row (no ids: lengths 0; no dense values: zeros)."""
        unknown = sorted(context.keys() - _ROW_FIELD_SET)
        if unknown:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"{CONTEXT.prefix(0)}unknown field {unknown[0]!r}; a reference-format context holds {DENSE_FIELD!r}, "
                f"or {LENGTHS_FIELD!r} with {VALUES_FIELD!r}, or all three",
                field=unknown[0],
            )
        fields = context.keys() | (
            {LENGTHS_FIELD, VALUES_FIELD} if context.keys() & {LENGTHS_FIELD, VALUES_FIELD} else set()
        )
        dense_rows, length_rows, value_rows = self._row_fields(context, 0, frozenset(fields), location=CONTEXT)
        dense = values.float32(dense_rows) if dense_rows else np.zeros((1, self.num_dense), dtype=np.float32)
        lengths = np.array(length_rows or [[0] * self.num_sparse], dtype=np.int64)
        ids = self._ids(value_rows, int(lengths.sum()), CONTEXT)
        return self.validator.check(FeatureRows(dense, lengths, ids), FIELD_NAMES, CONTEXT, dense_rows or None)

    def _check_each_feature_once(self, context: dict, candidates: list) -> None:
        schema = self.config.dense_feature_names + self.config.sparse_feature_names
        for index, row in enumerate(candidates):
            if not isinstance(row, dict):
                continue  # the raw-row decode names it
            both = next((name for name in schema if name in row and name in context), None)
            if both is not None:
                raise _given_twice(both, index)
            neither = next((name for name in schema if name not in row and name not in context), None)
            if neither is not None:
                raise InvalidRequest(
                    ErrorKind.MISSING_FIELD,
                    f"row {index}: {neither!r} is in neither {CONTEXT_FIELD!r} nor the row: a ranking request "
                    "gives every feature once (null for missing)",
                    field=neither,
                    row=index,
                )

    def _decode_rows(self, rows: list, single_row: bool) -> RowsRequest:
        dense_rows, length_rows, value_rows = self._well_formed_fields(rows) or self._checked_fields(rows)
        lengths = np.array(length_rows, dtype=np.int64)
        features = FeatureRows(values.float32(dense_rows), lengths, self._ids(value_rows, int(lengths.sum())))
        return RowsRequest(self.validator.check(features, FIELD_NAMES, sent_dense=dense_rows), single_row)

    def _decode_raw_rows(self, rows: list, single_row: bool) -> RowsRequest:
        """Raw Criteo rows → the same arrays as the reference format, through the archive's preprocessing."""
        raw_ints, categories = self._raw_columns(
            rows, self.config.dense_feature_names, self.config.sparse_feature_names
        )
        return RowsRequest(
            preprocessed(self.preprocessing, self.validator.table_sizes, raw_ints, categories), single_row
        )

    def _raw_columns(
        self, rows: list, dense_names: Sequence[str], sparse_names: Sequence[str], location: Location = ROWS
    ) -> tuple[np.ndarray, np.ndarray]:
        """The checked raw values of these features in ``rows`` (an absent key is a missing value).

        ``raw_ints``: ``[N, len(dense_names)]`` float64, NaN for missing; categories:
        ``[N, len(sparse_names)]`` parsed hex values.
        """
        return self._well_formed_raw_columns(rows, dense_names, sparse_names) or self._checked_raw_columns(
            rows, dense_names, sparse_names, location
        )

    def _well_formed_raw_columns(
        self, rows: list, dense_names: Sequence[str], sparse_names: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`_raw_columns` of rows with nothing wrong, in a few C-speed passes over all values; else None.

        The fast path, as :meth:`_well_formed_fields` is for the reference format: a
        round of Python checks per row cost more than the values' conversion. Anything
        it does not accept (a wrong type, an absent or unknown key, a bad category, an
        integer at or beyond ±2^63 as a float) goes to :meth:`_checked_raw_columns`,
        which names the first problem or accepts it.
        """
        width = len(dense_names) + len(sparse_names)
        if set(map(type, rows)) != {dict} or set(map(len, rows)) != {width}:
            return None
        try:  # with as many keys as names, each name found means no other key
            ints, categories = _values(rows, dense_names), _values(rows, sparse_names)
        except KeyError:
            return None
        parsed = _well_formed_raw_values(ints, categories)
        if parsed is None:
            return None
        return parsed[0].reshape(len(rows), len(dense_names)), parsed[1].reshape(len(rows), len(sparse_names))

    def _decode_columns(self, payload: dict) -> RowsRequest:
        """The columnar form (``inputs``) of ``instances`` or of a ranking's candidates, answered columnar.

        Raw Criteo columns with nothing wrong go straight to arrays, a column at a
        time; anything else is decoded as the rows the columns transpose to (row
        ``i``: every column's value ``i``), by the row format's rules and errors.
        """
        extra = sorted(payload.keys() - {COLUMNS_FIELD, CONTEXT_FIELD})
        if extra:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"a body with {COLUMNS_FIELD!r} has only that and {CONTEXT_FIELD!r}, got {extra[0]!r}",
                field=extra[0],
            )
        columns = self._columns(payload[COLUMNS_FIELD])
        rest = {key: value for key, value in payload.items() if key != COLUMNS_FIELD}  # the context, if any
        request = self._well_formed_raw_columns_request(columns, rest) or self._decode_as_rows(columns, rest)
        return replace(request, single_row=False, columnar=True)

    def _decode_as_rows(self, columns: dict[str, list], rest: dict[str, Any]) -> RowsRequest:
        """The columns decoded as the ``instances`` they transpose to, beside the body's ``rest`` (its context)."""
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        (request,) = self.decode_payloads([rest | {INSTANCES_FIELD: rows}])
        if isinstance(request, InvalidRequest):
            raise request
        return request

    def _columns(self, columns: Any) -> dict[str, list]:
        """The value of ``inputs``: an object of arrays of one value per row, as many rows in each."""
        if not isinstance(columns, dict):
            raise InvalidRequest(
                ErrorKind.WRONG_TYPE,
                f"{COLUMNS_FIELD!r} must be an object of columns (a field's values, one per row), "
                f"got {json_type(columns)}",
                field=COLUMNS_FIELD,
                expected="object",
                got=json_type(columns),
            )
        for name, column in columns.items():
            if not isinstance(column, list):
                raise InvalidRequest(
                    ErrorKind.WRONG_TYPE,
                    f"{COLUMNS_FIELD}: {name!r} must be an array of one value per row, got {json_type(column)}",
                    field=name,
                    expected="array",
                    got=json_type(column),
                )
        counts = [len(column) for column in columns.values()]
        if len(set(counts)) > 1:
            first = next(iter(columns))
            name, count = next((name, count) for name, count in zip(columns, counts, strict=True) if count != counts[0])
            raise InvalidRequest(
                ErrorKind.WRONG_COUNT,
                f"{COLUMNS_FIELD}: {name!r} has {count} values but {first!r} has {counts[0]}: every column has "
                "one value per row",
                field=name,
                expected=counts[0],
                got=count,
            )
        self.validator.check_row_count(counts[0] if counts else 0, COLUMNS_FIELD)
        return columns

    def _well_formed_raw_columns_request(self, columns: dict[str, list], rest: dict[str, Any]) -> RowsRequest | None:
        """The request of raw Criteo columns with nothing wrong, beside the body's ``rest`` (a raw context, if
        any); else None."""
        context = rest.get(CONTEXT_FIELD)
        if not rest:
            own_dense, own_sparse = list(self.config.dense_feature_names), list(self.config.sparse_feature_names)
        elif isinstance(context, dict) and context.keys() <= self.raw_fields:
            own_dense, own_sparse = self._own_features(context)
        else:
            return None
        if columns.keys() != {*own_dense, *own_sparse}:
            return None
        parsed = _well_formed_raw_values(
            list(chain.from_iterable(columns[name] for name in own_dense)),
            list(chain.from_iterable(columns[name] for name in own_sparse)),
        )
        if parsed is None:
            return None
        num_rows = len(next(iter(columns.values())))
        ints = parsed[0].reshape(len(own_dense), num_rows).T  # the columns, one after the other
        categories = parsed[1].reshape(len(own_sparse), num_rows).T
        if context is None:
            return RowsRequest(preprocessed(self.preprocessing, self.validator.table_sizes, ints, categories), False)
        return self._raw_ranking(context, self._raw_context_values(context), ints, categories)

    def _checked_raw_columns(
        self, rows: list, dense_names: Sequence[str], sparse_names: Sequence[str], location: Location = ROWS
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_raw_columns` row by row: the first problem becomes :class:`InvalidRequest`."""
        raw_ints: list[list[int | None]] = []
        raw_categories: list[str] = []
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise InvalidRequest(
                    ErrorKind.INVALID_ROW,
                    f"row {index} must be a JSON object keyed by feature names, got {json_type(row)}",
                    row=index,
                    expected="object",
                    got=json_type(row),
                )
            unknown = sorted(row.keys() - self.raw_fields)
            if unknown:
                all_dense, all_sparse = self.config.dense_feature_names, self.config.sparse_feature_names
                raise InvalidRequest(
                    ErrorKind.UNKNOWN_FIELD,
                    f"{location.prefix(index)}unknown field {unknown[0]!r}; a raw row has the keys "
                    f"{all_dense[0]}..{all_dense[-1]} and {all_sparse[0]}..{all_sparse[-1]}",
                    field=unknown[0],
                    row=location.row(index),
                )
            ints = [row.get(name) for name in dense_names]
            if not set(map(type, ints)) <= _RAW_INT_TYPES:
                name, value = next(
                    (n, v) for n, v in zip(dense_names, ints, strict=True) if type(v) not in _RAW_INT_TYPES
                )
                raise InvalidRequest(
                    ErrorKind.NON_INTEGER,
                    f"{location.prefix(index)}{name} must be a JSON integer or null, got {json_type(value)} {value!r}",
                    field=name,
                    row=location.row(index),
                    expected="integer or null",
                    got=value,
                )
            overflowing = next(
                (n for n, v in zip(dense_names, ints, strict=True) if v is not None and not fits_int64(v)), None
            )
            if overflowing is not None:
                raise InvalidRequest(
                    ErrorKind.NON_FINITE,
                    f"{location.prefix(index)}{overflowing} = {row[overflowing]} does not fit a 64-bit integer",
                    field=overflowing,
                    row=location.row(index),
                    expected="integer within int64",
                    got=str(row[overflowing]),
                )
            categories = [row.get(name) for name in sparse_names]
            if not set(map(type, categories)) <= _RAW_CATEGORY_TYPES:
                position = next(i for i, v in enumerate(categories) if type(v) not in _RAW_CATEGORY_TYPES)
                raise _invalid_category(index, sparse_names[position], categories[position], location)
            raw_ints.append(ints)
            raw_categories.extend("" if value is None else value for value in categories)
        parsed = values.categories(
            raw_categories,
            len(sparse_names),
            lambda row, position, text: _invalid_category(row, sparse_names[position], text, location),
        )
        dense = np.array([[np.nan if v is None else float(v) for v in ints] for ints in raw_ints], dtype=np.float64)
        return dense.reshape(len(rows), len(dense_names)), parsed.reshape(len(rows), len(sparse_names))

    def _well_formed_fields(
        self, rows: list, fields: frozenset[str] = _ROW_FIELD_SET, widths: tuple[int, ...] | None = None
    ) -> tuple[list, list, list] | None:
        """The columns of ``rows`` if every row is well formed, checked for all rows at once; else None.

        The fast path for valid requests: a few C-speed passes over all rows
        instead of one Python round of checks per row, which dominated the decode
        of large requests. Anything it does not accept goes to
        :meth:`_checked_fields`, which finds the first problem and names it. Ranges
        (finite dense values, ids within their tables) are checked afterwards, on
        the arrays, for both paths.
        """
        if widths is None:
            widths = (self.num_sparse,)
        if not all(type(row) is dict and row.keys() == fields for row in rows):
            return None
        dense_rows = [row[DENSE_FIELD] for row in rows] if DENSE_FIELD in fields else []
        length_rows = [row[LENGTHS_FIELD] for row in rows]
        value_rows = [row[VALUES_FIELD] for row in rows]
        well_formed = (
            set(map(type, chain(dense_rows, length_rows, value_rows))) == {list}
            and set(map(len, dense_rows)) <= {self.num_dense}
            and set(map(len, length_rows)) <= set(widths)
            and set(map(type, chain.from_iterable(dense_rows))) <= NUMBER_TYPES
            and set(map(type, chain.from_iterable(length_rows))) <= INT_TYPES
            and set(map(type, chain.from_iterable(value_rows))) <= INT_TYPES
            and min(chain.from_iterable(length_rows), default=0) >= 0
            and list(map(sum, length_rows)) == list(map(len, value_rows))
        )
        return (dense_rows, length_rows, value_rows) if well_formed else None

    def _checked_fields(
        self,
        rows: list,
        fields: frozenset[str] = _ROW_FIELD_SET,
        widths: tuple[int, ...] | None = None,
        context_fields: frozenset[str] = frozenset(),
    ) -> tuple[list, list, list]:
        """The columns of ``rows``, checked row by row: raises on the first malformed row."""
        dense_rows, length_rows, value_rows = [], [], []
        for index, row in enumerate(rows):
            dense, lengths, ids = self._row_fields(row, index, fields, widths, context_fields)
            dense_rows.extend(dense)
            length_rows.extend(lengths)
            value_rows.extend(ids)
        return dense_rows, length_rows, value_rows

    def _row_fields(
        self,
        row: Any,
        index: int,
        fields: frozenset[str] = _ROW_FIELD_SET,
        widths: tuple[int, ...] | None = None,
        context_fields: frozenset[str] = frozenset(),
        location: Location = ROWS,
    ) -> tuple[list, list, list]:
        """The lists of ``fields`` in one row, checked for presence, JSON type and counts, each wrapped in a
        list (empty for a field not among ``fields``). ``widths``: the accepted numbers of lengths (26 unless
        a ranking's candidates may leave out the context's features); ``context_fields``: what the context
        already gives; ``location``: how errors name the row."""
        names = [name for name in ROW_FIELDS if name in fields]
        if not isinstance(row, dict):
            raise InvalidRequest(
                ErrorKind.INVALID_ROW,
                f"row {index} must be a JSON object with keys {names}, got {json_type(row)}",
                row=index,
                expected="object",
                got=json_type(row),
            )
        both = next((name for name in context_fields if name in row), None)
        if both is not None:
            raise _given_twice(both, index)
        unknown = sorted(row.keys() - fields)
        if unknown:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"{location.prefix(index)}unknown field {unknown[0]!r}; a row has exactly the keys {names}",
                field=unknown[0],
                row=location.row(index),
            )
        missing = [name for name in names if name not in row]
        if missing:
            raise InvalidRequest(
                ErrorKind.MISSING_FIELD,
                f"{location.prefix(index)}missing field {missing[0]!r}",
                field=missing[0],
                row=location.row(index),
            )
        dense = []
        if DENSE_FIELD in fields:
            dense = [_typed_list(row, DENSE_FIELD, index, NUMBER_TYPES, "number", location)]
            _check_count(DENSE_FIELD, dense[0], (self.num_dense,), index, location)
        if LENGTHS_FIELD not in fields:
            return dense, [], []
        lengths = _typed_list(row, LENGTHS_FIELD, index, INT_TYPES, "integer", location)
        ids = _typed_list(row, VALUES_FIELD, index, INT_TYPES, "integer", location)
        _check_count(LENGTHS_FIELD, lengths, widths or (self.num_sparse,), index, location)
        _check_lengths(lengths, len(ids), index, location)
        return dense, [lengths], [ids]

    def _ids(self, value_rows: list[list[int]], count: int, location: Location = ROWS) -> np.ndarray:
        """The rows' ids, in order, as int64 (an id beyond int64 is out of every table)."""
        try:
            return values.integers(value_rows, np.int64, count)
        except BeyondRange as beyond:
            raise self.validator.out_of_range(
                beyond.part, beyond.position, beyond.value, None, VALUES_FIELD, location
            ) from None


def _typed_list(row: dict, field: str, index: int, allowed: frozenset[type], what: str, location: Location) -> list:
    """The field's value, which must be a JSON array of the allowed scalar types (:func:`values.check_types`)."""
    value = row[field]
    if not isinstance(value, list):
        raise InvalidRequest(
            ErrorKind.WRONG_TYPE,
            f"{location.prefix(index)}{field!r} must be an array of {what}s, got {json_type(value)}",
            field=field,
            row=location.row(index),
            expected=f"array of {what}s",
            got=json_type(value),
        )
    values.check_types(value, allowed, what, f"{location.prefix(index)}{field}", field, location.row(index))
    return value


def _check_count(field: str, value: list, accepted: tuple[int, ...], index: int, location: Location) -> None:
    """``len(value)`` is one of ``accepted``: one count, or a ranking candidate's compact and full counts."""
    if len(value) not in accepted:
        expected = " or ".join(map(str, accepted))
        raise InvalidRequest(
            ErrorKind.WRONG_COUNT,
            f"{location.prefix(index)}{field!r} must have {expected} entries, got {len(value)}",
            field=field,
            row=location.row(index),
            expected=accepted[0] if len(accepted) == 1 else expected,
            got=len(value),
        )


def _check_lengths(lengths: list[int], num_values: int, index: int, location: Location) -> None:
    """Lengths are non-negative and add up to the number of ids (checked on Python ints: no overflow)."""
    if min(lengths, default=0) < 0:
        position = next(i for i, length in enumerate(lengths) if length < 0)
        raise InvalidRequest(
            ErrorKind.NEGATIVE_LENGTH,
            f"{location.prefix(index)}{LENGTHS_FIELD}[{position}] is negative",
            field=LENGTHS_FIELD,
            row=location.row(index),
            expected="integer >= 0",
            got=lengths[position],
        )
    total = sum(lengths)
    if total != num_values:
        raise InvalidRequest(
            ErrorKind.LENGTH_MISMATCH,
            f"{location.prefix(index)}{VALUES_FIELD!r} has {num_values} ids but {LENGTHS_FIELD!r} adds up to {total}",
            field=VALUES_FIELD,
            row=location.row(index),
            expected=total,
            got=num_values,
        )


def _invalid_category(row: int, name: str, value: Any, location: Location) -> InvalidRequest:
    return InvalidRequest(
        ErrorKind.INVALID_CATEGORY,
        f"{location.prefix(row)}{name} must be 8 hex digits (like '05db9164'), empty or null, "
        f"got {json_type(value)} {value!r}",
        field=name,
        row=location.row(row),
        expected="string of 8 hex digits, empty or null",
        got=value,
    )


def _decoded_or_error(
    decode: Callable[[list, bool], RowsRequest], rows: list, single_row: bool
) -> RowsRequest | InvalidRequest:
    try:
        return decode(rows, single_row)
    except InvalidRequest as error:
        return error


def _well_formed_raw_values(ints: list, categories: list) -> tuple[np.ndarray, np.ndarray] | None:
    """Raw integers (float64, NaN for null) and parsed categories, flat, if all are well formed; else None.

    C-speed passes over all values; an integer at or beyond ±2^63, a wrong type or a
    bad category gives None, for the row-by-row check to name.
    """
    if not (set(map(type, ints)) <= _RAW_INT_TYPES and set(map(type, categories)) <= _RAW_CATEGORY_TYPES):
        return None
    try:
        dense = np.array(ints, dtype=np.float64)  # None is NaN
        parsed = parse_categories([value or "" for value in categories])
    except (OverflowError, CategoryFormatError):
        return None
    if (np.abs(dense) >= 2.0**63).any():
        return None
    return dense, parsed


def _values(rows: list[dict], names: Sequence[str]) -> list:
    """The values of ``names`` in each row, row after row, looked up at C speed (``itemgetter``)."""
    if len(names) <= 1:
        return [row[name] for row in rows for name in names]
    return list(chain.from_iterable(map(itemgetter(*names), rows)))


def _given_twice(name: str, row: int) -> InvalidRequest:
    """A ranking request's feature given both in the context and in a candidate."""
    return InvalidRequest(
        ErrorKind.DUPLICATE_FIELD,
        f"row {row}: {name!r} is given both in {CONTEXT_FIELD!r} and in the row: give it once",
        field=name,
        row=row,
    )


def parse_json(body: bytes | bytearray | str | dict | list | None, validator: RowValidator) -> Any:
    """The JSON value of a request body; TorchServe may hand over bytes or an already-parsed value.

    Text with more arrays and objects than ``validator``'s row limit allows is refused unparsed.
    """
    if body is None:
        body = b""
    if not isinstance(body, (bytes, bytearray, str)):
        return body
    return values.parse_json(body, validator, EMPTY_BODY, "the request body is not valid JSON")


def encode_scores(logits: np.ndarray, scores: np.ndarray, single_row: bool) -> bytes:
    """``{"score": p, "logit": z}``, or ``{"predictions": [...]}`` of those, in row order."""
    predictions = [
        {"score": score, "logit": logit} for score, logit in zip(scores.tolist(), logits.tolist(), strict=True)
    ]
    return orjson.dumps(predictions[0] if single_row else {"predictions": predictions})


def encode_error(error: InvalidRequest) -> bytes:
    return orjson.dumps(error.to_body())
