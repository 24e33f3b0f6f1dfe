"""The Open Inference Protocol (KServe v2) for the DLRM: tensors in, ``score`` and ``logit`` out.

TorchServe 0.12 routes ``POST /v2/models/{model}/infer`` (REST) and gRPC
``ModelInfer`` to the handler; the gRPC service hands over the request as the
same JSON, built from the typed ``contents``. One request is columnar:

==================  ===============  ==================  ==========================================
input               datatype         shape               what
==================  ===============  ==================  ==========================================
``dense_features``  FP32             ``[N, 13]``         dense features, transformed as in training
``sparse_lengths``  INT32 or INT64   ``[N, 26]``         ids per row and feature (0 and >1 allowed)
``sparse_ids``      INT64            ``[total]``         the ids, row-major: row 0's ``cat_0`` ids,
                                                         its ``cat_1`` ids, ..., then row 1's
``int_features``    BYTES            ``[N, 13]``         raw Criteo rows instead: decimal integers,
``cat_features``    BYTES            ``[N, 26]``         8 hex digits; ``""`` is missing
==================  ===============  ==================  ==========================================

A ranking request (one user, ``N`` candidates) adds a context row beside the model
inputs: ``context_sparse_lengths`` (INT32 or INT64 ``[1, 26]``) and
``context_sparse_ids`` (INT64 ``[total]``), the features whose ids all candidates
share, looked up once. The candidates' ``sparse_lengths`` are either ``[N, 26]``
(0 where the context has ids: ids on both sides are refused) or, compact,
``[N, m]``: only the ``m`` features the context has no ids for, in schema order.
The dense features come either per candidate (``dense_features``) or once, as
``context_dense_features`` (FP32 ``[1, 13]``), copied into every row.

Outputs ``score`` (click probability) and ``logit``, FP32 ``[N]``: both unless
the request's ``outputs`` names some; as raw bytes when the request asks
(``"parameters": {"binary_data_output": true}``, or ``binary_data`` per output).
Tensors travel as JSON ``data`` or, with the binary data extension, as raw
little-endian bytes after a JSON header whose length the
``Inference-Header-Content-Length`` header gives (``binary_data_size`` per input).

Errors are the JSON rows' error bodies with OIP's ``error`` key first.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import orjson

from handler import torchserve, values
from handler.codec import Received, Response
from handler.errors import ErrorKind, InvalidRequest, json_type
from handler.rows import FeatureRows, FieldNames, RowValidator, preprocessed
from handler.values import NUMBER_TYPES, STRING_TYPES, BeyondRange
from model_factory.config import DLRMConfig
from model_factory.features import Preprocessing

DENSE_INPUT = "dense_features"
LENGTHS_INPUT = "sparse_lengths"
IDS_INPUT = "sparse_ids"
RAW_INTS_INPUT = "int_features"
RAW_CATEGORIES_INPUT = "cat_features"
CONTEXT_DENSE_INPUT = "context_dense_features"
CONTEXT_LENGTHS_INPUT = "context_sparse_lengths"
CONTEXT_IDS_INPUT = "context_sparse_ids"
MODEL_INPUTS = (DENSE_INPUT, LENGTHS_INPUT, IDS_INPUT)
RAW_INPUTS = (RAW_INTS_INPUT, RAW_CATEGORIES_INPUT)
CONTEXT_INPUTS = (CONTEXT_DENSE_INPUT, CONTEXT_LENGTHS_INPUT, CONTEXT_IDS_INPUT)
SCORE_OUTPUT = "score"
LOGIT_OUTPUT = "logit"
OUTPUTS = (SCORE_OUTPUT, LOGIT_OUTPUT)
FIELD_NAMES = FieldNames(dense=DENSE_INPUT, lengths=LENGTHS_INPUT, values=IDS_INPUT)
CONTEXT_FIELD_NAMES = FieldNames(dense=CONTEXT_DENSE_INPUT, lengths=CONTEXT_LENGTHS_INPUT, values=CONTEXT_IDS_INPUT)
# The binary data extension's header: the length of the JSON part of the body.
# Written into every archive by build_mar.py, answered by the frontend agent (frontend_agent/).
METADATA_FILE = "oip-metadata.json"
PLATFORM = "pytorch_torchrec"

HEADER_LENGTH = "inference-header-content-length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

# Little-endian element types of the datatypes the inputs accept; BYTES elements are length-prefixed.
_NUMPY_TYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}
_ALLOWED_DATATYPES = {
    DENSE_INPUT: ("FP32",),
    LENGTHS_INPUT: ("INT32", "INT64"),
    IDS_INPUT: ("INT64",),
    RAW_INTS_INPUT: ("BYTES",),
    RAW_CATEGORIES_INPUT: ("BYTES",),
    CONTEXT_DENSE_INPUT: ("FP32",),
    CONTEXT_LENGTHS_INPUT: ("INT32", "INT64"),
    CONTEXT_IDS_INPUT: ("INT64",),
}
_JSON_TYPES: dict[str, tuple[frozenset[type], str]] = {
    "FP32": (NUMBER_TYPES, "number"),
    "INT32": (values.INT_TYPES, "integer"),
    "INT64": (values.INT_TYPES, "integer"),
    "BYTES": (STRING_TYPES, "string"),
}
# model_name and model_version: TorchServe's gRPC service adds them to the JSON it hands over.
_TOP_LEVEL_KEYS = frozenset({"id", "parameters", "inputs", "outputs", "model_name", "model_version"})
_TENSOR_KEYS = frozenset({"name", "datatype", "shape", "parameters", "data"})
_BYTES_PREFIX = struct.Struct("<I")
_HEADER_LENGTH = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class Tensor:
    """One input as received: its data as a flat NumPy array (numbers) or list of strings (BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[str]


@dataclass(frozen=True)
class OutputRequest:
    """Which outputs a request wants, and which of them as raw bytes."""

    names: tuple[str, ...] = OUTPUTS
    binary: frozenset[str] = frozenset()


@dataclass(frozen=True)
class OipRequest:
    """The rows of one OIP request, and how to answer it; ``context``: a ranking request's shared row."""

    id: str
    rows: FeatureRows
    outputs: OutputRequest
    context: FeatureRows | None = None

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows


def model_metadata(config: DLRMConfig) -> dict[str, Any]:
    """The tensors of OIP model metadata (``GET /v2/models/{m}``); the frontend agent adds name and versions.

    It lists the columnar inputs, each with its widest datatype: the protocol's metadata
    cannot say "these inputs, or else the raw-row ones", so those are documented instead.
    """
    shapes = {
        DENSE_INPUT: [-1, config.num_dense_features],
        LENGTHS_INPUT: [-1, config.num_sparse_features],
        IDS_INPUT: [-1],
    }
    return {
        "platform": PLATFORM,
        "inputs": [
            {"name": name, "datatype": _ALLOWED_DATATYPES[name][-1], "shape": shapes[name]} for name in MODEL_INPUTS
        ],
        "outputs": [{"name": name, "datatype": "FP32", "shape": [-1]} for name in OUTPUTS],
    }


class OipCodec:
    """Decodes OIP requests into validated rows and encodes scores as OIP responses, for one model."""

    def __init__(
        self, config: DLRMConfig, preprocessing: Preprocessing, validator: RowValidator, name: str, version: str
    ) -> None:
        self.config = config
        self.preprocessing = preprocessing
        self.validator = validator
        self.name = name
        self.version = version
        self.num_dense = config.num_dense_features
        self.num_sparse = config.num_sparse_features
        self._raw_widths = {RAW_INTS_INPUT: self.num_dense, RAW_CATEGORIES_INPUT: self.num_sparse}

    # ------------------------------------------------------------------ the codec

    def decodes_together(self, received: Received) -> bool:
        return False

    def decode_batch(self, batch: Sequence[Received]) -> list[OipRequest | InvalidRequest]:
        """Each request decoded alone (its body parsed already when it came by ``/predictions``)."""
        results: list[OipRequest | InvalidRequest] = []
        for received in batch:
            request = received.request
            try:
                results.append(self.decode(received.body, request.headers.get(HEADER_LENGTH), request.grpc))
            except InvalidRequest as error:
                results.append(error)
        return results

    # ------------------------------------------------------------------ requests

    def decode(
        self, body: bytes | bytearray | dict | None, header_length: str | None = None, grpc: bool = False
    ) -> OipRequest:
        """One request: a JSON body, an already-parsed one, or a binary-extension body with its header length.

        ``grpc``: TorchServe's gRPC service handed it over, BYTES elements base64-encoded.
        """
        payload, binary = _split_body(body, header_length, self.validator)
        if not isinstance(payload, dict):
            raise InvalidRequest(
                ErrorKind.INVALID_BODY,
                f"an inference request must be a JSON object, got {json_type(payload)}",
                expected="object",
                got=json_type(payload),
            )
        unknown = sorted(payload.keys() - _TOP_LEVEL_KEYS)
        if unknown:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"unknown key {unknown[0]!r} in the request; it has {sorted(_TOP_LEVEL_KEYS)}",
                field=unknown[0],
            )
        request_id = payload.get("id", "")
        if not isinstance(request_id, str):
            raise _wrong_type("id", "string", request_id)
        tensors = self._tensors(payload.get("inputs"), binary, grpc)
        outputs = _output_request(payload.get("parameters"), payload.get("outputs"))
        if tensors.keys() & set(CONTEXT_INPUTS):
            rows, context = self._ranking_rows(tensors)
            return OipRequest(id=request_id, rows=rows, outputs=outputs, context=context)
        return OipRequest(id=request_id, rows=self._rows(tensors), outputs=outputs)

    def _tensors(self, inputs: Any, binary: memoryview | None, grpc: bool) -> dict[str, Tensor]:
        if inputs is None:
            raise InvalidRequest(ErrorKind.MISSING_FIELD, "the request has no 'inputs'", field="inputs")
        if not isinstance(inputs, list) or not inputs:
            raise InvalidRequest(
                ErrorKind.WRONG_TYPE,
                f"'inputs' must be a non-empty array of tensors, got {json_type(inputs)}",
                field="inputs",
                expected="non-empty array",
                got=json_type(inputs),
            )
        tensors: dict[str, Tensor] = {}
        offset = 0
        for described in inputs:
            tensor, offset = self._tensor(described, binary, offset, grpc)
            if tensor.name in tensors:
                raise InvalidRequest(
                    ErrorKind.UNKNOWN_FIELD, f"input {tensor.name!r} is given twice", field=tensor.name
                )
            tensors[tensor.name] = tensor
        if binary is not None and offset != len(binary):
            raise InvalidRequest(
                ErrorKind.INVALID_BINARY,
                f"the body has {len(binary)} bytes after the JSON header but the inputs' binary_data_size "
                f"add up to {offset}",
                field="binary_data_size",
                expected=offset,
                got=len(binary),
            )
        return tensors

    def _tensor(self, described: Any, binary: memoryview | None, offset: int, grpc: bool) -> tuple[Tensor, int]:
        """One input tensor, with its data from JSON or from ``binary`` at ``offset``; and the next offset."""
        if not isinstance(described, dict):
            raise _wrong_type("inputs", "object", described)
        name = described.get("name")
        if not isinstance(name, str) or name not in _ALLOWED_DATATYPES:
            known = ", ".join(MODEL_INPUTS + RAW_INPUTS + CONTEXT_INPUTS)
            field = name if isinstance(name, str) else "name"
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD, f"unknown input {name!r}: the inputs are {known}", field=field, got=name
            )
        unknown = sorted(described.keys() - _TENSOR_KEYS)
        if unknown:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD, f"input {name!r} has an unknown key {unknown[0]!r}", field=name
            )
        datatype = described.get("datatype")
        if datatype not in _ALLOWED_DATATYPES[name]:
            allowed = " or ".join(_ALLOWED_DATATYPES[name])
            raise InvalidRequest(
                ErrorKind.WRONG_DATATYPE,
                f"input {name!r} must have datatype {allowed}, got {datatype!r}",
                field=name,
                expected=allowed,
                got=datatype,
            )
        shape = _shape(name, described.get("shape"))
        if len(shape) == 2:  # a rows tensor: refuse too many rows before reading its data
            self.validator.check_row_count(shape[0], name)
        size = math.prod(shape)
        parameters = described.get("parameters", {})
        if not isinstance(parameters, dict):
            raise _wrong_type(f"{name}.parameters", "object", parameters)
        binary_size = parameters.get("binary_data_size")
        if binary_size is not None:
            if "data" in described:
                raise InvalidRequest(
                    ErrorKind.INVALID_BINARY,
                    f"input {name!r} has both 'data' and a binary_data_size: send one",
                    field=name,
                )
            if binary is None:
                raise InvalidRequest(
                    ErrorKind.INVALID_BINARY,
                    f"input {name!r} has a binary_data_size but the request has no "
                    "Inference-Header-Content-Length header",
                    field=name,
                )
            if type(binary_size) is not int or binary_size < 0:
                raise _wrong_type(f"{name}.parameters.binary_data_size", "integer >= 0", binary_size)
            end = offset + binary_size
            if end > len(binary):
                raise InvalidRequest(
                    ErrorKind.INVALID_BINARY,
                    f"input {name!r} needs {binary_size} bytes from offset {offset} of the binary data, "
                    f"but only {len(binary) - offset} are left: the body is truncated",
                    field=name,
                    expected=binary_size,
                    got=len(binary) - offset,
                )
            if name in self._raw_widths:  # binary BYTES are read element by element: check the shape before that
                rows = shape[0] if shape else 0
                self.validator.check_row_count(rows, name)
                _check_shape_of(name, shape, (rows, self._raw_widths[name]))
            return Tensor(name, datatype, shape, _binary_data(name, datatype, binary[offset:end], size)), end
        if "data" not in described:
            raise InvalidRequest(
                ErrorKind.MISSING_FIELD, f"input {name!r} has neither 'data' nor a binary_data_size", field=name
            )
        data = _json_data(name, datatype, described["data"], size)
        if grpc and isinstance(data, list):
            data = _from_base64(name, data)
        return Tensor(name, datatype, shape, data), offset

    def _rows(self, tensors: dict[str, Tensor]) -> FeatureRows:
        given = set(tensors)
        names = MODEL_INPUTS if given & set(MODEL_INPUTS) or not given & set(RAW_INPUTS) else RAW_INPUTS
        extra = sorted(given - set(names))
        if extra:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"input {extra[0]!r} cannot be combined with {', '.join(names)}: send model inputs "
                f"({', '.join(MODEL_INPUTS)}) or raw rows ({', '.join(RAW_INPUTS)})",
                field=extra[0],
            )
        missing = [name for name in names if name not in tensors]
        if missing:
            raise InvalidRequest(ErrorKind.MISSING_FIELD, f"the request lacks input {missing[0]!r}", field=missing[0])
        if names == RAW_INPUTS:
            return self._raw_rows(tensors[RAW_INTS_INPUT], tensors[RAW_CATEGORIES_INPUT])
        dense, lengths, ids = (tensors[name] for name in MODEL_INPUTS)
        rows = dense.shape[0] if dense.shape else 0
        self.validator.check_row_count(rows, DENSE_INPUT)
        _check_shape(dense, (rows, self.num_dense))
        return self._model_rows(np.asarray(dense.data).reshape(dense.shape), lengths, ids)

    def _model_rows(self, dense: np.ndarray, lengths: Tensor, ids: Tensor) -> FeatureRows:
        """``len(dense)`` rows of model inputs with these lengths and ids, checked by the shared rules."""
        _check_shape(lengths, (len(dense), self.num_sparse))
        if len(ids.shape) != 1:
            raise _shape_error(ids, "[total]")
        features = FeatureRows(
            dense=dense,
            lengths=np.asarray(lengths.data, dtype=np.int64).reshape(lengths.shape),
            values=np.asarray(ids.data),
        )
        return self.validator.check(features, FIELD_NAMES)

    def _ranking_rows(self, tensors: dict[str, Tensor]) -> tuple[FeatureRows, FeatureRows]:
        """A ranking request's candidates and context row: each sparse feature's ids in one of the two, the
        dense features per candidate (``dense_features``) or once (``context_dense_features``)."""
        extra = sorted(tensors.keys() - set(MODEL_INPUTS) - set(CONTEXT_INPUTS))
        if extra:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"input {extra[0]!r} cannot be combined with context inputs: a ranking request sends model "
                f"inputs ({', '.join(MODEL_INPUTS)}) beside {', '.join(CONTEXT_INPUTS)}",
                field=extra[0],
            )
        if DENSE_INPUT in tensors and CONTEXT_DENSE_INPUT in tensors:
            raise InvalidRequest(
                ErrorKind.DUPLICATE_FIELD,
                f"the dense features are given both as {DENSE_INPUT!r} and as {CONTEXT_DENSE_INPUT!r}: send one",
                field=CONTEXT_DENSE_INPUT,
            )
        required = [CONTEXT_DENSE_INPUT if CONTEXT_DENSE_INPUT in tensors else DENSE_INPUT, LENGTHS_INPUT, IDS_INPUT]
        if tensors.keys() & {CONTEXT_LENGTHS_INPUT, CONTEXT_IDS_INPUT}:  # the context's ids come as a pair
            required += [CONTEXT_LENGTHS_INPUT, CONTEXT_IDS_INPUT]
        missing = next((name for name in required if name not in tensors), None)
        if missing is not None:
            raise InvalidRequest(ErrorKind.MISSING_FIELD, f"the request lacks input {missing!r}", field=missing)
        lengths, ids = tensors[LENGTHS_INPUT], tensors[IDS_INPUT]
        rows = lengths.shape[0] if lengths.shape else 0
        self.validator.check_row_count(rows, LENGTHS_INPUT)
        context = self._context_row(tensors)
        own = int((context.lengths[0] == 0).sum())
        if lengths.shape not in ((rows, self.num_sparse), (rows, own)):
            raise _shape_error(
                lengths, f"[{rows}, {self.num_sparse}] or [{rows}, {own}] (the features without context ids)"
            )
        dense = None
        if DENSE_INPUT in tensors:
            _check_shape(tensors[DENSE_INPUT], (rows, self.num_dense))
            dense = np.asarray(tensors[DENSE_INPUT].data).reshape(rows, self.num_dense)
        if len(ids.shape) != 1:
            raise _shape_error(ids, "[total]")
        lengths_array = np.asarray(lengths.data).reshape(lengths.shape)
        candidates = self.validator.ranking_rows(
            context, dense, lengths_array, np.asarray(ids.data), FIELD_NAMES, CONTEXT_LENGTHS_INPUT
        )
        return candidates, context

    def _context_row(self, tensors: dict[str, Tensor]) -> FeatureRows:
        """The one context row: its dense values (zeros when the candidates carry them) and its sparse ids."""
        dense = np.zeros((1, self.num_dense), dtype=np.float32)
        if CONTEXT_DENSE_INPUT in tensors:
            _check_shape(tensors[CONTEXT_DENSE_INPUT], (1, self.num_dense))
            dense = np.asarray(tensors[CONTEXT_DENSE_INPUT].data).reshape(1, self.num_dense)
        lengths, ids = np.zeros((1, self.num_sparse), dtype=np.int64), np.zeros(0, dtype=np.int64)
        if CONTEXT_LENGTHS_INPUT in tensors:
            _check_shape(tensors[CONTEXT_LENGTHS_INPUT], (1, self.num_sparse))
            if len(tensors[CONTEXT_IDS_INPUT].shape) != 1:
                raise _shape_error(tensors[CONTEXT_IDS_INPUT], "[total]")
            lengths = np.asarray(tensors[CONTEXT_LENGTHS_INPUT].data, dtype=np.int64).reshape(1, self.num_sparse)
            ids = np.asarray(tensors[CONTEXT_IDS_INPUT].data)
        return self.validator.check(FeatureRows(dense, lengths, ids), CONTEXT_FIELD_NAMES)

    def _raw_rows(self, ints: Tensor, categories: Tensor) -> FeatureRows:
        rows = ints.shape[0] if ints.shape else 0
        self.validator.check_row_count(rows, RAW_INTS_INPUT)
        _check_shape(ints, (rows, self.num_dense))
        _check_shape(categories, (rows, self.num_sparse))
        assert isinstance(ints.data, list) and isinstance(categories.data, list)  # BYTES tensors
        raw_ints = np.full(len(ints.data), np.nan)
        for index, text in enumerate(ints.data):
            if text:
                value = values.decimal_int64(text)
                if value is None:
                    row, position = divmod(index, self.num_dense)
                    raise InvalidRequest(
                        ErrorKind.NON_INTEGER,
                        f"row {row}: {RAW_INTS_INPUT}[{position}] ({self.config.dense_feature_names[position]}) "
                        f"must be a decimal integer within int64 or empty, got {text!r}",
                        field=RAW_INTS_INPUT,
                        row=row,
                        expected="decimal integer or empty",
                        got=text,
                    )
                raw_ints[index] = value
        parsed = values.categories(categories.data, self.num_sparse, self._invalid_category)
        return preprocessed(
            self.preprocessing, self.validator.table_sizes, raw_ints.reshape(rows, self.num_dense), parsed
        )

    def _invalid_category(self, row: int, position: int, text: str) -> InvalidRequest:
        return InvalidRequest(
            ErrorKind.INVALID_CATEGORY,
            f"row {row}: {RAW_CATEGORIES_INPUT}[{position}] ({self.config.sparse_feature_names[position]}) "
            f"must be 8 hex digits (like '05db9164') or empty, got {text!r}",
            field=RAW_CATEGORIES_INPUT,
            row=row,
            expected="string of 8 hex digits or empty",
            got=text,
        )

    # ------------------------------------------------------------------ responses

    def encode(self, request: OipRequest, logits: np.ndarray, scores: np.ndarray) -> Response:
        """The OIP response: JSON tensors, or a JSON header followed by the binary ones."""
        values = {SCORE_OUTPUT: scores.astype("<f4", copy=False), LOGIT_OUTPUT: logits.astype("<f4", copy=False)}
        outputs: list[dict[str, Any]] = []
        chunks: list[bytes] = []
        for name in request.outputs.names:
            output: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": [len(values[name])]}
            if name in request.outputs.binary:
                raw = values[name].tobytes()
                output["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                output["data"] = values[name]
            outputs.append(output)
        header = orjson.dumps(
            {"model_name": self.name, "model_version": self.version, "id": request.id, "outputs": outputs},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        if not chunks:
            return Response(200, header, JSON_CONTENT_TYPE)
        return Response(
            200,
            b"".join([header, *chunks]),
            BINARY_CONTENT_TYPE,
            {"Inference-Header-Content-Length": str(len(header))},
        )

    def encode_error(self, error: InvalidRequest, request: torchserve.Request) -> Response:
        """The error body with OIP's ``error`` key; over gRPC, as the ``error`` output TorchServe 0.12 needs."""
        body = error.to_body(oip=True)
        encoded = torchserve.grpc_error(body, self.name, self.version) if request.grpc else orjson.dumps(body)
        return Response(error.status, encoded, error_kind=error.kind)


def _split_body(
    body: bytes | bytearray | dict | None, header_length: str | None, validator: RowValidator
) -> tuple[Any, memoryview | None]:
    """The JSON part of a body, parsed (unless it is larger than any valid request's: ``validator``), and the
    binary part (None without the binary data extension)."""
    if isinstance(body, dict):
        return body, None
    if body is None:  # TorchServe parsed a form-encoded body itself: no JSON reached the handler
        raise InvalidRequest(
            ErrorKind.EMPTY_BODY,
            "the request has no JSON body: send it with 'Content-Type: application/json' "
            "(or application/octet-stream with the binary data extension)",
            expected="application/json body",
        )
    if header_length is None or not len(body):
        return _parse_json(body, validator), None
    length = header_length.strip()
    if not _HEADER_LENGTH.fullmatch(length) or not 0 < int(length) <= len(body):
        raise InvalidRequest(
            ErrorKind.INVALID_BINARY,
            f"Inference-Header-Content-Length must be the byte length of the JSON header, at most the body's "
            f"{len(body)} bytes, got {header_length!r}",
            field="Inference-Header-Content-Length",
            expected=f"integer in [1, {len(body)}]",
            got=header_length,
        )
    view = memoryview(body)
    return _parse_json(view[: int(length)], validator), view[int(length) :]


def _parse_json(text: bytes | bytearray | memoryview, validator: RowValidator) -> Any:
    return values.parse_json(
        text, validator, "the request has no body: send an inference request as JSON", "the request's JSON is not valid"
    )


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise InvalidRequest(
            ErrorKind.WRONG_SHAPE,
            f"input {name!r} needs a shape, an array of integers >= 0, got {shape!r}",
            field=name,
            expected="array of integers >= 0",
            got=json_type(shape) if not isinstance(shape, list) else str(shape),
        )
    return tuple(shape)


def _check_shape(tensor: Tensor, expected: tuple[int, ...]) -> None:
    _check_shape_of(tensor.name, tensor.shape, expected)


def _check_shape_of(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if shape != expected:
        raise _shape_error_of(name, shape, str(list(expected)))


def _shape_error(tensor: Tensor, expected: str) -> InvalidRequest:
    return _shape_error_of(tensor.name, tensor.shape, expected)


def _shape_error_of(name: str, shape: tuple[int, ...], expected: str) -> InvalidRequest:
    return InvalidRequest(
        ErrorKind.WRONG_SHAPE,
        f"input {name!r} must have shape {expected}, got {list(shape)}",
        field=name,
        expected=expected,
        got=str(list(shape)),
    )


def _json_data(name: str, datatype: str, data: Any, size: int) -> np.ndarray | list[str]:
    """A tensor's JSON ``data`` (flat, or nested as its shape), type-checked and flattened."""
    if not isinstance(data, list):
        raise _wrong_type(f"{name}.data", "array", data)
    if data and type(data[0]) is list:  # nested rows: flatten one level at a time
        while data and type(data[0]) is list:
            if not all(type(item) is list for item in data):
                raise _wrong_type(f"{name}.data", "array nested as the shape", data)
            data = list(chain.from_iterable(data))
    if len(data) != size:
        raise InvalidRequest(
            ErrorKind.WRONG_COUNT,
            f"input {name!r} has {len(data)} values but its shape holds {size}",
            field=name,
            expected=size,
            got=len(data),
        )
    allowed, what = _JSON_TYPES[datatype]
    values.check_types(data, allowed, what, f"{name}.data", name)
    if datatype == "BYTES":
        return data
    if datatype == "FP32":
        return values.float32(data)
    try:
        return values.integers([data], _NUMPY_TYPES[datatype], len(data))
    except BeyondRange as beyond:
        raise InvalidRequest(
            ErrorKind.ID_OUT_OF_RANGE if name == IDS_INPUT else ErrorKind.NON_INTEGER,
            f"{name}.data[{beyond.position}] = {beyond.value} does not fit {datatype}",
            field=name,
            expected=f"integer that fits {datatype}",
            got=str(beyond.value),
        ) from None


def _from_base64(name: str, elements: list[str]) -> list[str]:
    """BYTES elements as TorchServe's gRPC service passes them (base64), as text."""
    try:
        return [base64.b64decode(element, validate=True).decode("utf-8") for element in elements]
    except ValueError:  # binascii.Error and UnicodeDecodeError among them
        raise InvalidRequest(
            ErrorKind.INVALID_BINARY, f"input {name!r} has a BYTES element that is not UTF-8 text", field=name
        ) from None


def _binary_data(name: str, datatype: str, raw: memoryview, size: int) -> np.ndarray | list[str]:
    """A tensor's raw little-endian bytes as a (read-only, zero-copy) array, or BYTES elements as strings."""
    if datatype == "BYTES":
        return _bytes_elements(name, raw, size)
    itemsize = _NUMPY_TYPES[datatype].itemsize
    if len(raw) != size * itemsize:
        raise InvalidRequest(
            ErrorKind.INVALID_BINARY,
            f"input {name!r} of shape holding {size} {datatype} values needs {size * itemsize} bytes, "
            f"its binary_data_size is {len(raw)}",
            field=name,
            expected=size * itemsize,
            got=len(raw),
        )
    return np.frombuffer(raw, dtype=_NUMPY_TYPES[datatype])


def _bytes_elements(name: str, raw: memoryview, size: int) -> list[str]:
    """BYTES elements: each a 4-byte little-endian length, then that many bytes (UTF-8 text here)."""
    elements, offset = [], 0
    for _ in range(size):
        if offset + 4 > len(raw):
            break
        (length,) = _BYTES_PREFIX.unpack_from(raw, offset)
        start, offset = offset + 4, offset + 4 + length
        if offset > len(raw):
            break
        try:
            elements.append(bytes(raw[start:offset]).decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidRequest(
                ErrorKind.INVALID_BINARY, f"input {name!r} element {len(elements)} is not UTF-8 text", field=name
            ) from None
    if len(elements) != size or offset != len(raw):
        raise InvalidRequest(
            ErrorKind.INVALID_BINARY,
            f"input {name!r} must hold {size} length-prefixed BYTES elements in exactly its binary_data_size "
            f"({len(raw)} bytes)",
            field=name,
            expected=size,
            got=len(elements),
        )
    return elements


def _output_request(parameters: Any, outputs: Any) -> OutputRequest:
    if parameters is not None and not isinstance(parameters, dict):
        raise _wrong_type("parameters", "object", parameters)
    all_binary = _flag("parameters.binary_data_output", (parameters or {}).get("binary_data_output", False))
    if outputs is None:
        return OutputRequest(OUTPUTS, frozenset(OUTPUTS) if all_binary else frozenset())
    if not isinstance(outputs, list) or not outputs:
        raise _wrong_type("outputs", "non-empty array of {name, parameters}", outputs)
    names, binary = [], set()
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in OUTPUTS:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"unknown output {name!r}: the outputs are {', '.join(OUTPUTS)}",
                field="outputs",
                got=name if isinstance(name, str) else json_type(output),
            )
        output_parameters = output.get("parameters", {})
        if not isinstance(output_parameters, dict):
            raise _wrong_type(f"outputs.{name}.parameters", "object", output_parameters)
        names.append(name)
        if _flag(f"outputs.{name}.parameters.binary_data", output_parameters.get("binary_data", all_binary)):
            binary.add(name)
    return OutputRequest(tuple(dict.fromkeys(names)), frozenset(binary))


def _flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type(field, "true or false", value)
    return value


def _wrong_type(field: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        ErrorKind.WRONG_TYPE,
        f"{field!r} must be {expected}, got {json_type(value)}",
        field=field,
        expected=expected,
        got=json_type(value),
    )
