"""Property-based fuzzing of the Open Inference Protocol codec through ``DLRMPredictor.predict``.

4,000 generated TorchServe batches of one to three OIP requests per run (the
``max_examples`` below), the same ones on every run (derandomized, no example database,
no shrinking): valid requests (model inputs, raw rows, or ranking requests with a context
row beside the candidates; JSON tensors flat and nested,
binary ones with the binary data extension, gRPC-shaped ones with base64 BYTES; chosen
outputs, as JSON or binary), near-valid ones (one to three mutations: shapes,
datatypes, binary sizes, binary parts truncated, extended or flipped, tensors dropped,
doubled or renamed, values out of range or not finite, row counts of 0 or beyond the
limit, header lengths changed), byte-level corruptions of all-binary requests,
arbitrary JSON and arbitrary bytes under random header lengths.

Every request is judged by :func:`judge`, an oracle written from the contract in
``handler/oip/``'s docstrings, not from the codec: it parses the body itself
(struct, not NumPy, for binary tensors), and for an accepted request computes the
rows the model must see, raw rows preprocessed by hand, a ranking request's candidates
with the context's ids and dense values written into every row. The predictor must answer
each request exactly so: a 200 whose outputs have the requested names, encodings and
shapes and whose scores equal an independent forward pass of the expected rows, or
the expected 4xx with a JSON error body (``error``, ``code``, ``type``); never an
exception, never a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import string
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from handler.errors import ErrorKind
from handler.predictor import DLRMPredictor, Request, Response
from model_factory.config import preset
from tests import fuzzing
from tests.rows import offline_logits

CONFIG = preset("small")
MAX_ROWS = 4
TABLE_SIZES = CONFIG.num_embeddings_per_feature
NUM_DENSE, NUM_SPARSE = CONFIG.num_dense_features, CONFIG.num_sparse_features
# The contract's names, spelled out here (not imported from handler.oip) so that the oracle stays independent.
DENSE, LENGTHS, IDS = "dense_features", "sparse_lengths", "sparse_ids"
RAW_INTS, RAW_CATEGORIES = "int_features", "cat_features"
CONTEXT_DENSE, CONTEXT_LENGTHS, CONTEXT_IDS = "context_dense_features", "context_sparse_lengths", "context_sparse_ids"
MODEL_INPUTS, RAW_INPUTS = (DENSE, LENGTHS, IDS), (RAW_INTS, RAW_CATEGORIES)
CONTEXT_INPUTS = (CONTEXT_DENSE, CONTEXT_LENGTHS, CONTEXT_IDS)
DATATYPES = {DENSE: ("FP32",), LENGTHS: ("INT32", "INT64"), IDS: ("INT64",), RAW_INTS: ("BYTES",)}
DATATYPES |= {RAW_CATEGORIES: ("BYTES",), CONTEXT_DENSE: ("FP32",), CONTEXT_LENGTHS: ("INT32", "INT64")}
DATATYPES[CONTEXT_IDS] = ("INT64",)
STRUCT_CODES = {"FP32": "f", "INT32": "i", "INT64": "q"}
INT_RANGES = {"INT32": 2**31, "INT64": 2**63}
# model_name and model_version: TorchServe's gRPC service adds them to the JSON it hands over.
TOP_LEVEL_KEYS = {"id", "parameters", "inputs", "outputs", "model_name", "model_version"}
TENSOR_KEYS = {"name", "datatype", "shape", "parameters", "data"}
OUTPUT_NAMES = ("score", "logit")
LENGTH_HEADER = "inference-header-content-length"
# The headers TorchServe hands a worker for POST /v2/models/{model}/infer (names lower-cased by the adapter).
OIP_ROUTE = {"explain": "False", "content-type": "application/json"}
HEX = set(string.hexdigits)
# Dense values up to this size must give finite scores (scores of larger ones are only checked for shape).
MODERATE_DENSE = 1e4


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        # A failing seed is reported as found: shrinking a seed only tries other unrelated requests.
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------- the oracle


class Refused(Exception):
    def __init__(self, status: int = 400) -> None:
        super().__init__(status)
        self.status = status


class WouldCrash(Exception):
    """A request the oracle refuses and which is known to crash the worker process (reported as a bug)."""


@dataclass(frozen=True)
class Accepted:
    """What the contract makes of a valid request: the model's rows and the response it asked for."""

    id: str
    dense: np.ndarray  # (N, 13) float32
    lengths: np.ndarray  # (N, 26) int64
    ids: list[int]
    outputs: list[tuple[str, bool]]  # (name, as binary) in response order

    @property
    def num_rows(self) -> int:
        return len(self.dense)


def judge(body: bytes, header_length: str | None, max_rows: int = MAX_ROWS, grpc: bool = False) -> Accepted | int:
    """The accepted request, or the 4xx status the contract gives ``body``; ``grpc``: it came from TorchServe's
    gRPC service, which base64-encodes BYTES elements."""
    try:
        return _judge(body, header_length, max_rows, grpc)
    except Refused as refused:
        return refused.status


def _judge(body: bytes, header_length: str | None, max_rows: int, grpc: bool) -> Accepted:
    if not body:
        raise Refused(415)
    json_part, binary = split_body(body, header_length)
    if not json_part:
        raise Refused(415)
    try:
        payload = orjson.loads(json_part)
    except orjson.JSONDecodeError:
        raise Refused() from None
    if type(payload) is not dict or not set(payload) <= TOP_LEVEL_KEYS:
        raise Refused()
    request_id = payload.get("id", "")
    inputs = payload.get("inputs")
    if type(request_id) is not str or type(inputs) is not list or not inputs:
        raise Refused()
    tensors: dict[str, tuple[list[int], list]] = {}
    offset = 0
    for described in inputs:
        name, shape, values, offset = tensor(described, binary, offset, grpc, max_rows)
        if name in tensors:
            raise Refused()
        tensors[name] = (shape, values)
    if binary is not None and offset != len(binary):
        raise Refused()
    outputs = requested_outputs(payload.get("parameters"), payload.get("outputs"))
    if set(tensors) & set(CONTEXT_INPUTS):
        return Accepted(request_id, *ranking_rows(tensors, max_rows), outputs)
    raw = bool(set(tensors) & set(RAW_INPUTS)) and not set(tensors) & set(MODEL_INPUTS)
    names = RAW_INPUTS if raw else MODEL_INPUTS
    if set(tensors) != set(names):
        raise Refused()
    # The row count (the first tensor's first dimension) is checked before the other shapes and the values.
    first_shape = tensors[names[0]][0]
    rows = first_shape[0] if first_shape else 0
    if rows == 0:
        raise Refused()
    if rows > max_rows:
        raise Refused(413)
    if raw:
        dense, lengths, ids = raw_rows(rows, *(tensors[name] for name in RAW_INPUTS))
    else:
        dense, lengths, ids = model_rows(rows, *(tensors[name] for name in MODEL_INPUTS))
    return Accepted(request_id, dense, lengths, ids, outputs)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes | None]:
    """The JSON header and the binary part: the header length must be 1 to 12 decimal digits, at least 1 and
    within the body."""
    if header_length is None:
        return body, None
    digits = header_length.strip(" \t")
    if not 1 <= len(digits) <= 12 or not digits.isascii() or not digits.isdigit():
        raise Refused()
    if not 1 <= int(digits) <= len(body):
        raise Refused()
    return body[: int(digits)], body[int(digits) :]


def tensor(
    described: Any, binary: bytes | None, offset: int, grpc: bool, max_rows: int
) -> tuple[str, list[int], list, int]:
    """One input: its name, shape, flat values and where the next binary part starts."""
    if type(described) is not dict:
        raise Refused()
    name = described.get("name")
    if type(name) is not str or name not in DATATYPES or not set(described) <= TENSOR_KEYS:
        raise Refused()
    datatype, shape = described.get("datatype"), described.get("shape")
    if type(datatype) is not str or datatype not in DATATYPES[name]:
        raise Refused()
    if type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape):
        raise Refused()
    if len(shape) == 2 and shape[0] > max_rows:  # a rows tensor's row count is checked before its data
        raise Refused(413)
    if len(shape) == 2 and shape[0] == 0:
        raise Refused()
    size = math.prod(shape)
    parameters = described.get("parameters", {})
    if type(parameters) is not dict:
        raise Refused()
    binary_size = parameters.get("binary_data_size")
    if binary_size is None:
        if "data" not in described:
            raise Refused()
        return name, shape, json_values(datatype, described["data"], size, grpc), offset
    if "data" in described or binary is None or type(binary_size) is not int or binary_size < 0:
        raise Refused()
    if offset + binary_size > len(binary):
        raise Refused()
    if name in RAW_INPUTS:  # binary BYTES elements are read one by one: their shape is checked before that
        rows = shape[0] if shape else 0
        if rows > max_rows:
            raise Refused(413)
        if shape != [rows, NUM_DENSE if name == RAW_INTS else NUM_SPARSE] or rows == 0:
            raise Refused()
    return name, shape, binary_values(datatype, binary[offset : offset + binary_size], size), offset + binary_size


def json_values(datatype: str, data: Any, size: int, grpc: bool) -> list:
    """JSON ``data``, flat or nested (lists at every level down to the scalars), as a flat list; BYTES
    elements from gRPC are base64 of UTF-8 text."""
    if type(data) is not list:
        raise Refused()
    while data and all(type(item) is list for item in data):
        data = [value for item in data for value in item]
    if len(data) != size:
        raise Refused()
    if datatype == "BYTES":
        if not all(type(value) is str for value in data):
            raise Refused()
        return [from_base64(value) for value in data] if grpc else data
    if datatype == "FP32":
        if not all(type(value) in (int, float) for value in data):
            raise Refused()
        return data
    limit = INT_RANGES[datatype]
    if not all(type(value) is int and -limit <= value < limit for value in data):
        raise Refused()
    return data


def from_base64(text: str) -> str:
    if not text.isascii():
        raise Refused()
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Refused() from None


def binary_values(datatype: str, raw: bytes, size: int) -> list:
    """Little-endian values filling ``raw`` exactly, or BYTES elements (4-byte length, then UTF-8)."""
    if datatype != "BYTES":
        code = STRUCT_CODES[datatype]
        if len(raw) != size * struct.calcsize(code):
            raise Refused()
        return list(struct.unpack(f"<{size}{code}", raw))
    elements, position = [], 0
    while position < len(raw):
        if position + 4 > len(raw):
            raise Refused()
        (length,) = struct.unpack_from("<I", raw, position)
        start, position = position + 4, position + 4 + length
        if position > len(raw):
            raise Refused()
        try:
            elements.append(raw[start:position].decode("utf-8"))
        except UnicodeDecodeError:
            raise Refused() from None
    if len(elements) != size:
        raise Refused()
    return elements


def requested_outputs(parameters: Any, outputs: Any) -> list[tuple[str, bool]]:
    """The outputs in response order, each with whether it goes as raw bytes (flags must be booleans)."""
    if parameters is not None and type(parameters) is not dict:
        raise Refused()
    all_binary = (parameters or {}).get("binary_data_output", False)
    if type(all_binary) is not bool:
        raise Refused()
    if outputs is None:
        return [(name, all_binary) for name in OUTPUT_NAMES]
    if type(outputs) is not list or not outputs:
        raise Refused()
    chosen: dict[str, bool] = {}
    for output in outputs:
        if type(output) is not dict or not any(output.get("name") == name for name in OUTPUT_NAMES):
            raise Refused()
        output_parameters = output.get("parameters", {})
        if type(output_parameters) is not dict:
            raise Refused()
        binary = output_parameters.get("binary_data", all_binary)
        if type(binary) is not bool:
            raise Refused()
        chosen[output["name"]] = chosen.get(output["name"], False) or binary
    return list(chosen.items())


def model_rows(
    rows: int, dense: tuple[list[int], list], lengths: tuple[list[int], list], ids: tuple[list[int], list]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    if dense[0] != [rows, NUM_DENSE] or lengths[0] != [rows, NUM_SPARSE] or len(ids[0]) != 1:
        raise Refused()
    with np.errstate(over="ignore"):
        dense_values = np.array([float(value) for value in dense[1]], dtype=np.float64).astype(np.float32)
    if not np.isfinite(dense_values).all():
        raise Refused()
    if min(lengths[1]) < 0:
        raise Refused()
    total, count = sum(lengths[1]), len(ids[1])
    if total != count:
        wrapped = (total + 2**63) % 2**64 - 2**63
        if wrapped == count:
            raise WouldCrash(f"sparse_lengths add up to {total}, {count} in int64 arithmetic: the number of ids")
        raise Refused()
    features = [
        feature for n, feature in zip(lengths[1], list(range(NUM_SPARSE)) * rows, strict=True) for _ in range(n)
    ]
    if not all(0 <= value < TABLE_SIZES[feature] for value, feature in zip(ids[1], features, strict=True)):
        raise Refused()
    return dense_values.reshape(rows, NUM_DENSE), np.array(lengths[1], np.int64).reshape(rows, NUM_SPARSE), ids[1]


def ranking_rows(tensors: dict[str, tuple[list[int], list]], max_rows: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A ranking request as the expanded rows it stands for: model inputs for the candidates (dense values
    per candidate or once, as context), and a context row whose ids every candidate shares (its own bags of
    those features empty)."""
    if set(tensors) - set(MODEL_INPUTS) - set(CONTEXT_INPUTS) or {DENSE, CONTEXT_DENSE} <= set(tensors):
        raise Refused()
    required = {CONTEXT_DENSE if CONTEXT_DENSE in tensors else DENSE, LENGTHS, IDS}
    if set(tensors) & {CONTEXT_LENGTHS, CONTEXT_IDS}:  # the context's ids come as a pair
        required |= {CONTEXT_LENGTHS, CONTEXT_IDS}
    if not required <= set(tensors):
        raise Refused()
    # The row count (the candidates' lengths' first dimension) is checked before the other shapes and the values.
    rows = tensors[LENGTHS][0][0] if tensors[LENGTHS][0] else 0
    if rows == 0:
        raise Refused()
    if rows > max_rows:
        raise Refused(413)
    context_dense = tensors.get(CONTEXT_DENSE, ([1, NUM_DENSE], [0.0] * NUM_DENSE))
    context_lengths = tensors.get(CONTEXT_LENGTHS, ([1, NUM_SPARSE], [0] * NUM_SPARSE))
    context = model_rows(1, context_dense, context_lengths, tensors.get(CONTEXT_IDS, ([0], [])))
    dense = tensors[DENSE] if DENSE in tensors else ([rows, NUM_DENSE], context_dense[1] * rows)
    dense_values, lengths, ids = model_rows(rows, dense, all_features(tensors[LENGTHS], context[1][0]), tensors[IDS])
    if ((lengths > 0) & (context[1] > 0)).any():
        raise Refused()
    shared = dict(zip(range(NUM_SPARSE), split_ids(context[1].T, context[2]), strict=True))
    own = [dict(zip(range(NUM_SPARSE), split_ids(row[:, None], row_ids), strict=True))
           for row, row_ids in zip(lengths, split_ids(lengths, ids), strict=True)]  # fmt: skip
    expanded = [value for row in own for feature in range(NUM_SPARSE) for value in row[feature] or shared[feature]]
    return dense_values, lengths + context[1], expanded


def all_features(lengths: tuple[list[int], list], context_lengths: np.ndarray) -> tuple[list[int], list]:
    """The candidates' lengths as ``[N, 26]``: as sent, or expanded from the compact form, ``[N, m]`` over the
    ``m`` features without context ids."""
    own = [int(n) == 0 for n in context_lengths]
    rows, width = (lengths[0][0], sum(own)) if lengths[0] else (0, 0)
    if lengths[0] != [rows, width] or width == NUM_SPARSE:
        return lengths
    values = iter(lengths[1])
    return [rows, NUM_SPARSE], [next(values) if is_own else 0 for _ in range(rows) for is_own in own]


def raw_rows(
    rows: int, ints: tuple[list[int], list], categories: tuple[list[int], list]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Raw Criteo rows preprocessed by the documented rules: log(max(x, 0) + 1), hex value modulo the table."""
    if ints[0] != [rows, NUM_DENSE] or categories[0] != [rows, NUM_SPARSE]:
        raise Refused()
    dense = []
    for text in ints[1]:
        digits = text.removeprefix("-")
        if text and not (digits and digits.isascii() and digits.isdigit() and -(2**63) <= int(text) < 2**63):
            raise Refused()
        dense.append(np.float32(math.log1p(max(float(int(text)), 0.0))) if text else np.float32(0.0))
    ids = []
    for position, text in enumerate(categories[1]):
        if text and (len(text) != 8 or not set(text) <= HEX):
            raise Refused()
        ids.append(int(text, 16) % TABLE_SIZES[position % NUM_SPARSE] if text else 0)
    return np.array(dense, np.float32).reshape(rows, NUM_DENSE), np.ones((rows, NUM_SPARSE), np.int64), ids


# ---------------------------------------------------------------- the check


@dataclass(frozen=True)
class OipRequest:
    """One request as the worker gets it: body, headers (lower-cased) and whether it came over gRPC."""

    body: bytes
    headers: dict[str, str]
    grpc: bool = False

    @property
    def as_request(self) -> Request:
        return Request(self.body, self.headers, self.grpc)

    def verdict(self, max_rows: int = MAX_ROWS) -> Accepted | int:
        return judge(self.body, self.headers.get(LENGTH_HEADER), max_rows, self.grpc)


def check(predictor: DLRMPredictor, requests: list[OipRequest]) -> None:
    """One TorchServe batch through the predictor: every response as the oracle says."""
    verdicts = []
    for request in requests:
        try:
            verdicts.append(request.verdict())
        except WouldCrash as crash:
            pytest.fail(f"this request would crash the worker (known bug: {crash}):\n{describe(request)}")
    try:
        result = predictor.predict([request.as_request for request in requests])
    except Exception as error:  # noqa: BLE001 - any exception is the failure being looked for
        pytest.fail(f"predict raised {error!r} on a batch of {len(requests)}; alone: {culprits(predictor, requests)}")
    scored: list[tuple[Accepted, dict[str, np.ndarray], str]] = []
    for request, verdict, response in zip(requests, verdicts, result.responses, strict=True):
        context = f"{describe(request)}\n-> {response.status} {response.body[:400]!r}"
        if isinstance(verdict, int):
            check_error(response, verdict, request.grpc, context)
        else:
            scored.append((verdict, outputs_of(response, verdict, context), context))
    check_scores(predictor, scored)


def culprits(predictor: DLRMPredictor, requests: list[OipRequest]) -> str:
    """The requests of a batch that raise alone, and what they raise."""
    found = []
    for request in requests:
        try:
            predictor.predict([request.as_request])
        except Exception as error:  # noqa: BLE001
            found.append(f"{error!r} on {describe(request)}")
    return "\n".join(found)


def describe(request: OipRequest) -> str:
    return f"headers={request.headers} grpc={request.grpc} body={request.body[:600]!r}"


def check_error(response: Response, status: int, grpc: bool, context: str) -> None:
    assert response.status == status, f"expected {status}: {context}"
    body = orjson.loads(response.body)
    if grpc:  # an OIP response whose one output, "error", holds the error body
        assert body["model_name"] == "dlrm" and isinstance(body["id"], str) and "model_version" in body, context
        (output,) = body["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("error", "BYTES", [1]), context
        body = output["data"][0]
    assert body["error"] and body["message"] and body["code"] == status, context
    assert body["type"] in set(ErrorKind) and body["type"] == response.error_kind, context


def outputs_of(response: Response, expected: Accepted, context: str) -> dict[str, np.ndarray]:
    """The outputs of a 200, checked for names, order, encodings and shapes, by name."""
    assert response.status == 200 and response.error_kind is None, f"refused a valid request: {context}"
    binary = any(as_binary for _, as_binary in expected.outputs)
    if binary:
        assert response.content_type == "application/octet-stream", context
        header_length = int(response.headers["Inference-Header-Content-Length"])
    else:
        assert response.content_type == "application/json" and not response.headers, context
        header_length = len(response.body)
    header, rest = orjson.loads(response.body[:header_length]), response.body[header_length:]
    assert (header["id"], header["model_name"], header["model_version"]) == (expected.id, "dlrm", "1.0"), context
    assert [output["name"] for output in header["outputs"]] == [name for name, _ in expected.outputs], context
    n, offset, values = expected.num_rows, 0, {}
    for output, (name, as_binary) in zip(header["outputs"], expected.outputs, strict=True):
        assert output["datatype"] == "FP32" and output["shape"] == [n], context
        if as_binary:
            assert "data" not in output and output["parameters"] == {"binary_data_size": 4 * n}, context
            values[name] = np.array(struct.unpack_from(f"<{n}f", rest, offset))
            offset += 4 * n
        else:
            assert len(output["data"]) == n, context
            values[name] = np.array(output["data"], dtype=np.float64)  # a NaN arrives as null: NaN again
    assert offset == len(rest), f"{len(rest) - offset} bytes after the binary outputs: {context}"
    return values


def check_scores(predictor: DLRMPredictor, scored: list[tuple[Accepted, dict[str, np.ndarray], str]]) -> None:
    """Scores of moderate rows are finite and equal an independent forward pass of the expected rows (all
    requests' rows in one pass)."""
    moderate = [item for item in scored if float(np.abs(item[0].dense).max()) <= MODERATE_DENSE]
    if not moderate:
        return
    rows = [
        {
            "float_features": expected.dense[row].tolist(),
            "id_list_features.lengths": expected.lengths[row].tolist(),
            "id_list_features.values": ids,
        }
        for expected, _, _ in moderate
        for row, ids in enumerate(split_ids(expected.lengths, expected.ids))
    ]
    all_logits = offline_logits(predictor.model, CONFIG, rows).astype(np.float64)
    start = 0
    for expected, values, context in moderate:
        logits = all_logits[start : start + expected.num_rows]
        start += expected.num_rows
        assert all(np.isfinite(array).all() for array in values.values()), f"non-finite scores: {context}"
        if "logit" in values:
            np.testing.assert_allclose(values["logit"], logits, rtol=1e-4, atol=1e-5, err_msg=context)
        if "score" in values:
            scores = 1 / (1 + np.exp(-logits))
            np.testing.assert_allclose(values["score"], scores, rtol=1e-4, atol=1e-6, err_msg=context)


def split_ids(lengths: np.ndarray, ids: list[int]) -> Iterator[list[int]]:
    start = 0
    for total in lengths.sum(axis=1).tolist():
        yield ids[start : start + total]
        start += total


# ---------------------------------------------------------------- building requests
# Requests come from a NumPy generator seeded by Hypothesis (element-wise Hypothesis draws cost 5-10x the
# time); they are functions of a seed so that tests/test_reliability.py sends the same kinds of requests.


@dataclass
class Plan:
    """A request before encoding: the JSON header (inputs with ``data`` or a ``binary_data_size``), and the
    binary part of each input sent as raw bytes, in order."""

    payload: dict[str, Any]
    chunks: list[bytes] = field(default_factory=list)
    binary: bool = False  # send the Inference-Header-Content-Length header (the binary data extension)
    grpc: bool = False


def encode_tensor(datatype: str, values: list) -> bytes:
    """Values as the binary data extension sends them: little-endian, BYTES elements length-prefixed."""
    if datatype == "BYTES":
        encoded = [value if isinstance(value, bytes) else value.encode() for value in values]
        return b"".join(struct.pack("<I", len(element)) + element for element in encoded)
    return struct.pack(f"<{len(values)}{STRUCT_CODES[datatype]}", *values)


def nested(values: list, shape: list[int]) -> list:
    """Flat values nested as ``shape``."""
    for size in reversed(shape[1:]):
        values = [values[start : start + size] for start in range(0, len(values), size)] if size else []
    return values


def encode(plan: Plan) -> OipRequest:
    header = json.dumps(plan.payload).encode()  # the json module: huge integers stay exact, NaN is a token
    if plan.grpc:
        return OipRequest(header, {}, grpc=True)
    if not plan.binary:
        return OipRequest(header, dict(OIP_ROUTE))
    headers = {**OIP_ROUTE, "content-type": "application/octet-stream", LENGTH_HEADER: str(len(header))}
    return OipRequest(header + b"".join(plan.chunks), headers)


def add_input(plan: Plan, rng: np.random.Generator, name: str, datatype: str, shape: list[int], values: list) -> None:
    """One input, as flat or nested JSON data, or (not over gRPC) as binary data."""
    described: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    how = rng.integers(3) if not plan.grpc else rng.integers(2)
    if how == 2:
        chunk = encode_tensor(datatype, values)
        described["parameters"] = {"binary_data_size": len(chunk)}
        plan.chunks.append(chunk)
        plan.binary = True
    else:
        if rng.integers(5) == 0:
            described["parameters"] = {}
        if plan.grpc and datatype == "BYTES":  # TorchServe's gRPC service hands over BYTES as base64
            values = [base64.b64encode(value.encode()).decode() for value in values]
        described["data"] = nested(values, shape) if how == 1 else values
    plan.payload["inputs"].append(described)


def dense_values(rng: np.random.Generator, count: int) -> list[float]:
    values = rng.normal(0.0, 2.0, count).astype(np.float32)
    edges = np.array([0.0, -0.0, 1.4e-45, 3.0, -7.5, 1e4, -1e4], dtype=np.float32)
    spots = rng.random(count) < 0.1
    values[spots] = rng.choice(edges, int(spots.sum()))
    return [float(value) for value in values]


def model_inputs(rng: np.random.Generator, rows: int) -> list[tuple[str, str, list[int], list]]:
    lengths = rng.integers(0, 4, size=(rows, NUM_SPARSE))
    lengths[rng.random(lengths.shape) < 0.5] = 1
    sizes = np.asarray(TABLE_SIZES)[np.repeat(np.tile(np.arange(NUM_SPARSE), rows), lengths.ravel())]
    ids = rng.integers(0, sizes)  # any id of its table, a third of them its first or last
    edge = rng.integers(6, size=ids.size)
    ids[edge == 0], ids[edge == 1] = 0, sizes[edge == 1] - 1
    return [
        (DENSE, "FP32", [rows, NUM_DENSE], dense_values(rng, rows * NUM_DENSE)),
        (LENGTHS, str(rng.choice(["INT32", "INT64"])), [rows, NUM_SPARSE], lengths.ravel().tolist()),
        (IDS, "INT64", [len(ids)], ids.tolist()),
    ]


def ranking_inputs(rng: np.random.Generator, rows: int) -> list[tuple[str, str, list[int], list]]:
    """Candidates' model inputs beside a context row: some features' ids (any number, also none) in the
    context, the candidates' bags of them empty (or, compact, absent: lengths over the other features only);
    the dense values per candidate or once, as context."""
    candidates = model_inputs(rng, rows)
    context = model_inputs(rng, 1)
    shared = rng.random(NUM_SPARSE) < 0.5
    (_, _, _, lengths), (_, _, _, ids) = candidates[1], candidates[2]
    (_, _, _, context_lengths), (_, _, _, context_ids) = context[1], context[2]
    kept_ids = [value for value, shared_id in zip(ids, np.repeat(np.tile(shared, rows), lengths), strict=True)
                if not shared_id]  # fmt: skip
    context_kept = [value for value, shared_id in zip(context_ids, np.repeat(shared, context_lengths), strict=True)
                    if shared_id]  # fmt: skip
    lengths = [0 if shared[index % NUM_SPARSE] else n for index, n in enumerate(lengths)]
    context_lengths = [n if shared[index] else 0 for index, n in enumerate(context_lengths)]
    if rng.integers(2):  # compact: only the features without context ids
        own = [n == 0 for n in context_lengths]
        compact = [n for index, n in enumerate(lengths) if own[index % NUM_SPARSE]]
        lengths_tensor = (LENGTHS, candidates[1][1], [rows, sum(own)], compact)
    else:
        lengths_tensor = candidates[1][:3] + (lengths,)
    tensors = [
        lengths_tensor,
        (IDS, "INT64", [len(kept_ids)], kept_ids),
        (CONTEXT_LENGTHS, context[1][1], [1, NUM_SPARSE], context_lengths),
        (CONTEXT_IDS, "INT64", [len(context_kept)], context_kept),
    ]
    return [candidates[0] if rng.integers(2) else (CONTEXT_DENSE, *context[0][1:]), *tensors]


def raw_inputs(rng: np.random.Generator, rows: int) -> list[tuple[str, str, list[int], list]]:
    """Raw Criteo rows: decimal integers across int64 or empty, 8 hex digits in either case or empty."""
    ints = []
    for _ in range(rows * NUM_DENSE):
        kind = rng.integers(5)
        value = [0, int(rng.integers(-5, 1000)), int(rng.integers(-(2**63), 2**63 - 1)), 2**63 - 1][kind % 4]
        ints.append("" if kind == 4 else str(value))
    categories = []
    for _ in range(rows * NUM_SPARSE):
        text = rng.bytes(4).hex()
        categories.append(["", text, text.upper()][rng.integers(3)])
    return [(RAW_INTS, "BYTES", [rows, NUM_DENSE], ints), (RAW_CATEGORIES, "BYTES", [rows, NUM_SPARSE], categories)]


def valid_plan(rng: np.random.Generator, rows: int | None = None) -> Plan:
    """A valid request of 1..MAX_ROWS rows: model inputs, raw rows or a ranking request (candidates and a
    context row), each input JSON or binary, in any order;
    an ``id`` or not; all outputs or some, as JSON or binary, by request or per output."""
    plan = Plan({"inputs": []}, grpc=rng.integers(6) == 0)
    rows = rows if rows is not None else int(rng.integers(1, MAX_ROWS + 1))
    tensors = [raw_inputs, ranking_inputs, model_inputs, model_inputs][rng.integers(4)](rng, rows)
    for index in rng.permutation(len(tensors)):
        add_input(plan, rng, *tensors[index])
    if plan.grpc and rng.integers(2):  # as TorchServe's gRPC service adds them
        plan.payload |= {"model_name": "dlrm", "model_version": "1.0"}
    if rng.integers(2):
        plan.payload["id"] = ["", "request-1", "é/✓", str(rng.integers(1 << 30))][rng.integers(4)]
    if rng.integers(3) == 0:
        plan.payload["parameters"] = {"binary_data_output": bool(rng.integers(2))}
    if rng.integers(3) == 0:
        names = rng.permutation(OUTPUT_NAMES)[: rng.integers(1, 3)]
        choices: list[dict[str, Any]] = [{}, {"binary_data": True}, {"binary_data": False}]
        plan.payload["outputs"] = [
            {"name": str(name), "parameters": choices[rng.integers(3)]} if rng.integers(2) else {"name": str(name)}
            for name in names
        ]
    return plan


def valid_request(seed: int) -> OipRequest:
    return encode(valid_plan(np.random.default_rng(seed)))


# ---------------------------------------------------------------- mutations

EDGE_NUMBERS: list[int | float] = [-1, 0, 1, 12, 13, 25, 26, 35, 9999, 10000, 2**31, 2**31 - 1, -(2**31) - 1]
EDGE_NUMBERS += [2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**63) - 1, 2**64, 3.0, -0.0, 0.5, 3.4028236e38, 1e39]
DATATYPE_NAMES: list[Any] = ["FP32", "FP64", "FP16", "INT8", "INT32", "INT64", "UINT64", "BYTES", "BOOL", "fp32"]
DATATYPE_NAMES += ["", None, 7]
NAMES: list[Any] = [*MODEL_INPUTS, *RAW_INPUTS, *CONTEXT_INPUTS, "score", "dense", "", None, 3, ["dense_features"], {}]
EXTRA_KEYS = ["id", "parameters", "outputs", "inputs", "data", "shape", "datatype", "name", "binary_data_size", "x"]
EXTRA_KEYS += ["model_name"]
BAD_TEXTS = ["", "1", "-", "+5", " 5", "1.5", "0x1f", "99999999999999999999", "05db9164", "05DB9164", "05db916g"]
BAD_TEXTS += ["5db9164", "05db91640", "٣", "é", "\x00"]
# Header values an HTTP client can send (latin-1): not numbers, a superscript digit, numbers of 4,400 digits.
HEADER_LENGTHS = ["", "-1", "abc", "1.5", " ", "0x10", "²", "1" * 4400, "0" * 4400 + "1", "NaN"]


def nasty_value(rng: np.random.Generator) -> Any:
    """What a mutation puts in place of a value: an edge number, any number, a wrong JSON type, a name,
    a datatype, a bad text, or a container."""
    kind = rng.integers(9)
    if kind < 2:
        return EDGE_NUMBERS[rng.integers(len(EDGE_NUMBERS))]
    if kind == 2:
        return int.from_bytes(rng.bytes(9), "big", signed=True) >> int(rng.integers(0, 72))
    if kind == 3:
        return float(rng.normal(0, 10.0 ** rng.integers(-300, 300)))
    if kind == 4:
        return [None, True, False, "".join(map(chr, rng.integers(1, 0x3000, rng.integers(0, 8))))][rng.integers(4)]
    if kind == 5:
        return NAMES[rng.integers(len(NAMES))]
    if kind == 6:
        return DATATYPE_NAMES[rng.integers(len(DATATYPE_NAMES))]
    if kind == 7:
        return BAD_TEXTS[rng.integers(len(BAD_TEXTS))]
    return [{}, [[1]], [None], [], [int(i) for i in rng.integers(-5, 30, rng.integers(0, 4))]][rng.integers(5)]


def mutated(rng: np.random.Generator, value: Any) -> Any:
    return fuzzing.mutated(rng, value, nasty_value, EXTRA_KEYS)


def binary_inputs(plan: Plan, inputs: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(chunk index, description) of the inputs sent as binary data whose chunk is still there."""
    described = [d for d in inputs if isinstance(d.get("parameters"), dict) and "binary_data_size" in d["parameters"]]
    return [(index, d) for index, d in enumerate(described) if index < len(plan.chunks)]


def mutate_plan(rng: np.random.Generator, plan: Plan) -> None:
    """One targeted change of a tensor's shape, datatype, binary size or bytes, of the set of inputs, or one
    value (in JSON or in the binary part) made invalid."""
    inputs = plan.payload.get("inputs") if isinstance(plan.payload, dict) else None
    if not isinstance(inputs, list) or not inputs or not all(isinstance(d, dict) for d in inputs):
        plan.payload = mutated(rng, plan.payload)  # an earlier mutation broke the structure: mutate JSON only
        return
    described = inputs[rng.integers(len(inputs))]
    binaries = binary_inputs(plan, inputs)
    kind = rng.integers(10)
    if kind == 0:  # shape: a dimension changed, added or dropped
        shape = list(described["shape"]) if isinstance(described.get("shape"), list) else []
        change = rng.integers(4)
        if change == 0 and shape and type(shape[0]) is int:
            shape[0] += int(rng.choice([-1, 1, MAX_ROWS]))
        elif change == 0 and shape and type(shape[-1]) is int:
            shape[-1] += int(rng.choice([-1, 1]))
        elif change == 1:
            shape.insert(int(rng.integers(len(shape) + 1)), int(rng.choice([0, 1, 2])))
        elif change == 2 and shape:
            shape.pop(int(rng.integers(len(shape))))
        else:
            shape = [int(rng.integers(0, 100))] + shape[1:]
        described["shape"] = shape
    elif kind == 1:
        described["datatype"] = DATATYPE_NAMES[rng.integers(len(DATATYPE_NAMES))]
    elif kind == 2 and binaries:  # a binary_data_size off by a few bytes, or not a size at all
        _, target = binaries[rng.integers(len(binaries))]
        size = target["parameters"]["binary_data_size"]
        size = size if type(size) is int else 52
        choices = [size + 1, size - 1, size + 4, size - 8, 0, -4, 2**40, str(size), float(size), True, None]
        target["parameters"]["binary_data_size"] = choices[rng.integers(len(choices))]
    elif kind == 3 and binaries:  # bytes cut from, added to or flipped in one binary part
        index, _ = binaries[rng.integers(len(binaries))]
        plan.chunks[index] = damaged(rng, plan.chunks[index])
        if rng.integers(2):  # its size follows, so only the shape or the contents are wrong
            binaries[index][1]["parameters"]["binary_data_size"] = len(plan.chunks[index])
    elif kind == 4:  # an input dropped, given twice, renamed, or a raw input added to model inputs
        change = rng.integers(4)
        if change == 0 and len(inputs) > 1:
            inputs.remove(described)
            chunk_of = {id(d): index for index, d in binaries}
            if id(described) in chunk_of:
                plan.chunks.pop(chunk_of[id(described)])
        elif change == 1 and "data" in described:
            inputs.append(dict(described))
        elif change == 2:
            described["name"] = NAMES[rng.integers(len(NAMES))]
        else:
            inputs.append({"name": RAW_INTS, "datatype": "BYTES", "shape": [1, NUM_DENSE], "data": ["1"] * 13})
    elif kind == 5 and "data" in described:  # JSON data sent as binary too, or nothing sent
        if rng.integers(2):
            described["parameters"] = {"binary_data_size": 4}
            plan.chunks.append(b"\0\0\0\0")
            plan.binary = not plan.grpc
        else:
            del described["data"]
    elif kind == 6 and "data" in described:  # one JSON value replaced
        described["data"] = mutated(rng, described["data"])
    elif kind == 7 and binaries:  # one binary value made invalid: NaN, infinity, negative, out of range, bad text
        index, target = binaries[rng.integers(len(binaries))]
        plan.chunks[index] = bad_binary_value(rng, target, plan.chunks[index])
    elif kind == 8:  # too many rows, or none
        replace_inputs(plan, rng, int(rng.choice([0, MAX_ROWS + 1, MAX_ROWS + 3])))
    else:
        plan.payload = mutated(rng, plan.payload)


def damaged(rng: np.random.Generator, chunk: bytes) -> bytes:
    data = bytearray(chunk)
    change = rng.integers(3)
    if change == 0:
        del data[len(data) - int(rng.integers(1, 9)) :]
    elif change == 1:
        data += rng.bytes(int(rng.integers(1, 9)))
    elif data:
        data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
    return bytes(data)


def bad_binary_value(rng: np.random.Generator, described: dict[str, Any], chunk: bytes) -> bytes:
    """``chunk`` with one value replaced by an invalid one (if it still parses as ``described`` says)."""
    datatype = described.get("datatype")
    if datatype == "BYTES":
        elements: list[bytes] = []
        position = 0
        while position + 4 <= len(chunk):
            (length,) = struct.unpack_from("<I", chunk, position)
            elements.append(chunk[position + 4 : position + 4 + length])
            position += 4 + length
        if not elements:
            return damaged(rng, chunk)
        elements[rng.integers(len(elements))] = [b"\xff\xfe", b"\xc3", "٣".encode(), b"12a", b"05db916g", b"-"][
            rng.integers(6)
        ]
        return encode_tensor("BYTES", elements)
    if datatype not in STRUCT_CODES or len(chunk) % struct.calcsize(STRUCT_CODES[datatype]) or not chunk:
        return damaged(rng, chunk)
    code = STRUCT_CODES[datatype]
    values = list(struct.unpack(f"<{len(chunk) // struct.calcsize(code)}{code}", chunk))
    limit = INT_RANGES.get(datatype, 0)
    replacements: list[float] = (
        [math.nan, math.inf, -math.inf, 3.4e38] if datatype == "FP32" else [-1, -limit, limit - 1, 10_000, 35]
    )
    values[rng.integers(len(values))] = replacements[rng.integers(len(replacements))]
    return struct.pack(f"<{len(values)}{code}", *values)


def replace_inputs(plan: Plan, rng: np.random.Generator, rows: int) -> None:
    """The plan's inputs regenerated for ``rows`` rows (zero rows: empty tensors)."""
    given = {d.get("name") for d in plan.payload["inputs"] if type(d.get("name")) is str}
    raw, ranking = bool(given & set(RAW_INPUTS)), bool(given & set(CONTEXT_INPUTS))
    fresh = Plan({**plan.payload, "inputs": []}, grpc=plan.grpc)
    if rows:
        tensors = (raw_inputs if raw else ranking_inputs if ranking else model_inputs)(rng, rows)
    else:
        names = RAW_INPUTS if raw else MODEL_INPUTS
        datatypes = ["BYTES", "BYTES"] if raw else ["FP32", "INT64", "INT64"]
        widths = [[0, NUM_DENSE], [0, NUM_SPARSE]] if raw else [[0, NUM_DENSE], [0, NUM_SPARSE], [0]]
        tensors = [(n, t, s, []) for n, t, s in zip(names, datatypes, widths, strict=True)]
        if ranking and not raw:  # a valid context beside no candidates
            tensors += [t for t in ranking_inputs(rng, 1) if t[0] in (CONTEXT_LENGTHS, CONTEXT_IDS)]
    for tensor_ in tensors:
        add_input(fresh, rng, *tensor_)
    plan.payload, plan.chunks, plan.binary = fresh.payload, fresh.chunks, fresh.binary


def mutate_encoded(rng: np.random.Generator, request: OipRequest) -> OipRequest:
    """The encoded request with its body cut, extended or flipped, or its header length changed or dropped."""
    body, headers = bytearray(request.body), dict(request.headers)
    change = rng.integers(6 if not request.grpc else 3)
    if change == 0 and body:
        del body[len(body) - int(rng.integers(1, min(len(body), 64) + 1)) :]
    elif change == 1:
        body += rng.bytes(int(rng.integers(1, 16)))
    elif change == 2 and body:
        body[rng.integers(len(body))] ^= 1 << int(rng.integers(8))
    elif change == 3:
        current = headers.get(LENGTH_HEADER, "")
        length = int(current) if current.isascii() and current.isdigit() and len(current) < 20 else len(body)
        choices = [length - 1, length + 1, length - 10, 0, len(body), len(body) + 1, int(rng.integers(0, 2**62))]
        headers[LENGTH_HEADER] = str(choices[rng.integers(len(choices))])
    elif change == 4:
        if LENGTH_HEADER in headers:
            del headers[LENGTH_HEADER]
        else:
            headers[LENGTH_HEADER] = str(len(body))
    else:
        text = headers.get(LENGTH_HEADER, str(len(body)))
        headers[LENGTH_HEADER] = [f" {text}", f"{text}\t", f"+{text}", f"0{text}", f"{text}.0"][rng.integers(5)]
    return OipRequest(bytes(body), headers, request.grpc)


def near_valid_request(seed: int) -> OipRequest:
    """A valid request after one to three mutations of its plan, then, a quarter of the time, of its bytes."""
    rng = np.random.default_rng(seed)
    plan = valid_plan(rng)
    for _ in range(rng.integers(1, 4)):
        mutate_plan(rng, plan)
    request = encode(plan)
    return mutate_encoded(rng, request) if rng.integers(4) == 0 else request


def corrupted_binary_request(seed: int) -> OipRequest:
    """A valid request with every input sent as binary data, then one to three byte-level damages: bytes cut,
    added or flipped anywhere in the body, or a header length that is wrong or not a number."""
    rng = np.random.default_rng(seed)
    plan = Plan({"inputs": []})
    rows = int(rng.integers(1, MAX_ROWS + 1))
    tensors = raw_inputs(rng, rows) if rng.integers(3) == 0 else model_inputs(rng, rows)
    for name, datatype, shape, values in tensors:
        chunk = encode_tensor(datatype, values)
        plan.payload["inputs"].append(
            {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(chunk)}}
        )
        plan.chunks.append(chunk)
    plan.binary = True
    request = encode(plan)
    for _ in range(rng.integers(1, 4)):
        request = mutate_encoded(rng, request)
    if rng.integers(8) == 0:
        request.headers[LENGTH_HEADER] = HEADER_LENGTHS[rng.integers(len(HEADER_LENGTHS))]
    return request


def random_json(rng: np.random.Generator, depth: int = 0) -> Any:
    """Any JSON value, with OIP's keys and names among its strings."""
    texts = [*MODEL_INPUTS, *RAW_INPUTS, "FP32", "INT64", "BYTES", "score", "", "05db9164", "7"]
    return fuzzing.random_json(rng, texts, EXTRA_KEYS, depth)


def random_payload(rng: np.random.Generator) -> Any:
    """Mostly an object with OIP's keys whose ``inputs`` are objects with a tensor's keys, any values."""
    if rng.integers(4) == 0:
        return random_json(rng)
    tensor_keys = ["name", "datatype", "shape", "parameters", "data", "x"]
    inputs = [
        {str(rng.choice(tensor_keys)): random_json(rng, 1) for _ in range(rng.integers(0, 6))}
        | ({"name": str(rng.choice([*MODEL_INPUTS, *RAW_INPUTS]))} if rng.integers(2) else {})
        for _ in range(rng.integers(0, 4))
    ]
    payload = {str(rng.choice(EXTRA_KEYS)): random_json(rng, 1) for _ in range(rng.integers(0, 3))}
    return payload | {"inputs": inputs} if rng.integers(4) else payload


def random_json_request(seed: int) -> OipRequest:
    """Arbitrary JSON, under the OIP route, over gRPC, or with a header length (JSON only, or a random one)."""
    rng = np.random.default_rng(seed)
    body = json.dumps(random_payload(rng)).encode()
    how = rng.integers(4)
    if how == 0:
        return OipRequest(body, {}, grpc=True)
    if how == 1:
        return OipRequest(body, dict(OIP_ROUTE))
    length = len(body) if how == 2 else int(rng.integers(0, len(body) + 3))
    return OipRequest(body + rng.bytes(int(rng.integers(0, 9))), {**OIP_ROUTE, LENGTH_HEADER: str(length)})


def random_bytes_request(body: bytes, length: int | None) -> OipRequest:
    headers = dict(OIP_ROUTE) if length is None else {**OIP_ROUTE, LENGTH_HEADER: str(length)}
    return OipRequest(body, headers)


# ---------------------------------------------------------------- the properties


seeds = st.integers(0, 2**32 - 1)


@pytest.fixture(scope="module")
def predictor(artifact_dir) -> Iterator[DLRMPredictor]:
    """The predictor, with one CPU thread: a few rows per forward pass run fastest so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield DLRMPredictor.from_artifact(artifact_dir, torch.device("cpu"), max_rows=MAX_ROWS)
    torch.set_num_threads(threads)


def batch_of(make, first: int, size: int) -> list[OipRequest]:
    return [make(seed) for seed in range(first, first + size)]


@fuzz_settings(300)
@given(seeds, st.integers(1, 3))
def test_valid_requests_are_scored_exactly(predictor: DLRMPredictor, first: int, size: int) -> None:
    requests = batch_of(valid_request, first, size)
    assert all(isinstance(request.verdict(), Accepted) for request in requests)
    check(predictor, requests)


@fuzz_settings(1_500)
@given(seeds, st.integers(1, 3))
def test_near_valid_requests_are_scored_or_get_the_right_4xx(predictor: DLRMPredictor, first: int, size: int) -> None:
    check(predictor, batch_of(near_valid_request, first, size))


@fuzz_settings(1_000)
@given(seeds)
def test_corrupted_binary_requests_are_scored_or_get_the_right_4xx(predictor: DLRMPredictor, seed: int) -> None:
    companion = [valid_request(seed)] if seed % 4 == 0 else []  # a valid request in the batch keeps its score
    check(predictor, [corrupted_binary_request(seed), *companion])


@fuzz_settings(600)
@given(seeds)
def test_arbitrary_json_gets_a_4xx_or_is_scored(predictor: DLRMPredictor, seed: int) -> None:
    check(predictor, [random_json_request(seed)])


@fuzz_settings(600)
@given(st.binary(max_size=300), st.none() | st.integers(0, 400))
def test_arbitrary_bytes_with_any_header_length_get_a_4xx(
    predictor: DLRMPredictor, body: bytes, length: int | None
) -> None:
    check(predictor, [random_bytes_request(body, length)])
