"""Invalid Open Inference Protocol requests and the error each must produce, beside tests/bad_requests.py's
JSON rows; with the helpers that build OIP requests, JSON or with the binary data extension."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from tests.bad_requests import BadRequest, raw_row

LENGTH_HEADER = "inference-header-content-length"
# The headers TorchServe hands a worker for POST /v2/models/{model}/infer (names lower-cased by the adapter).
OIP_ROUTE = {"explain": "False", "content-type": "application/json"}
DENSE_ROW = [0.5] * 13
ONE_HOT = [1] * 26


def tensor(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def one_row(**changes: Any) -> list[dict[str, Any]]:
    """The model inputs of one valid row, with inputs replaced (by name) or changed (``dense_features=None``
    drops the input)."""
    inputs = {
        "dense_features": tensor("dense_features", "FP32", [1, 13], list(DENSE_ROW)),
        "sparse_lengths": tensor("sparse_lengths", "INT64", [1, 26], list(ONE_HOT)),
        "sparse_ids": tensor("sparse_ids", "INT64", [26], [0] * 26),
    }
    for name, value in changes.items():
        if value is None:
            del inputs[name]
        else:
            inputs[name] = value if isinstance(value, dict) else {**inputs[name], "data": value}
    return list(inputs.values())


def raw_inputs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Raw rows (the JSON raw-row format: absent or null is missing) as BYTES inputs: decimal texts, hex texts."""
    ints = ["" if row.get(f"int_{i}") is None else str(row[f"int_{i}"]) for row in rows for i in range(13)]
    categories = [row.get(f"cat_{i}") or "" for row in rows for i in range(26)]
    return [
        tensor("int_features", "BYTES", [len(rows), 13], ints),
        tensor("cat_features", "BYTES", [len(rows), 26], categories),
    ]


def payload(inputs: list[Any], **top: Any) -> bytes:
    return json.dumps({"inputs": inputs, **top}).encode()


def raw_bytes(datatype: str, values: list) -> bytes:
    """Values as the binary data extension sends them: little-endian; BYTES as a 4-byte length, then the bytes."""
    if datatype == "BYTES":
        encoded = [value if isinstance(value, bytes) else value.encode() for value in values]
        return b"".join(struct.pack("<I", len(element)) + element for element in encoded)
    code = {"FP32": "f", "INT32": "i", "INT64": "q"}[datatype]
    return struct.pack(f"<{len(values)}{code}", *values)


def binary_request(
    inputs: list[dict[str, Any]], names: tuple[str, ...] | None = None, **top: Any
) -> tuple[bytes, dict[str, str]]:
    """Body and headers with the inputs ``names`` (all by default) sent as binary data after the JSON header."""
    described, chunks = [], []
    for item in inputs:
        if names is None or item["name"] in names:
            chunk = raw_bytes(item["datatype"], item["data"])
            item = {k: v for k, v in item.items() if k != "data"} | {"parameters": {"binary_data_size": len(chunk)}}
            chunks.append(chunk)
        described.append(item)
    header = payload(described, **top)
    headers = {**OIP_ROUTE, "content-type": "application/octet-stream", LENGTH_HEADER: str(len(header))}
    return header + b"".join(chunks), headers


def binary_case(name: str, inputs: list[dict[str, Any]], kind: str, field: str | None, **options: Any) -> BadRequest:
    """A case sent with the binary data extension; ``edit(body, headers)`` changes it after encoding."""
    body, headers = binary_request(inputs, options.pop("names", None))
    edit = options.pop("edit", None)
    if edit is not None:
        body, headers = edit(body, headers)
    return BadRequest(name, body, options.pop("status", 400), kind, field, options.pop("row", None), headers)


def with_header(value: str) -> Callable[[bytes, dict[str, str]], tuple[bytes, dict[str, str]]]:
    """An edit for :func:`binary_case`: the header length replaced by ``value``."""
    return lambda body, headers: (body, {**headers, LENGTH_HEADER: value})


def rows_of(count: int, raw: bool = False) -> list[dict[str, Any]]:
    if raw:
        return raw_inputs([raw_row()] * count)
    return [
        tensor("dense_features", "FP32", [count, 13], DENSE_ROW * count),
        tensor("sparse_lengths", "INT64", [count, 26], ONE_HOT * count),
        tensor("sparse_ids", "INT64", [26 * count], [0] * 26 * count),
    ]


def bad_oip_requests(max_rows: int) -> list[BadRequest]:
    """Every documented OIP client error, as TorchServe hands a worker the request (``OIP_ROUTE`` headers
    unless a case gives its own): the request and its tensors, the binary data extension, values, rows,
    raw rows, outputs and the body."""
    ids_with = lambda position, value: [*[0] * position, value, *[0] * (25 - position)]  # noqa: E731
    dense = one_row()[0]
    two_rows_nan = rows_of(2)
    two_rows_nan[0] = {**two_rows_nan[0], "data": DENSE_ROW + [0.5] * 5 + [float("nan")] + [0.5] * 7}
    raw = lambda **changes: raw_inputs([raw_row(**changes)])  # noqa: E731
    return [
        # the request and its tensors
        BadRequest("unknown tensor", payload([*one_row(), tensor("extra", "FP32", [1], [1.0])]), 400, "unknown_field",
                   "extra"),
        BadRequest("missing tensor", payload(one_row(sparse_ids=None)), 400, "missing_field", "sparse_ids"),
        BadRequest("duplicate tensor", payload([*one_row(), dense]), 400, "unknown_field", "dense_features"),
        BadRequest("unknown tensor key", payload(one_row(dense_features={**dense, "extra": 1})), 400, "unknown_field",
                   "dense_features"),
        BadRequest("dense INT64", payload(one_row(dense_features={**dense, "datatype": "INT64"})), 400,
                   "wrong_datatype", "dense_features"),
        BadRequest("dense FP64", payload(one_row(dense_features={**dense, "datatype": "FP64"})), 400, "wrong_datatype",
                   "dense_features"),
        BadRequest("lengths FP32", payload(one_row(sparse_lengths=tensor("sparse_lengths", "FP32", [1, 26], ONE_HOT))),
                   400, "wrong_datatype", "sparse_lengths"),
        BadRequest("ids INT32", payload(one_row(sparse_ids=tensor("sparse_ids", "INT32", [26], [0] * 26))), 400,
                   "wrong_datatype", "sparse_ids"),
        BadRequest("raw ints INT64", payload([tensor("int_features", "INT64", [1, 13], [1] * 13), raw()[1]]), 400,
                   "wrong_datatype", "int_features"),
        BadRequest("datatype missing",
                   payload(one_row(dense_features={k: v for k, v in dense.items() if k != "datatype"})), 400,
                   "wrong_datatype", "dense_features"),
        BadRequest("dense [1, 12]",
                   payload(one_row(dense_features=tensor("dense_features", "FP32", [1, 12], [0.5] * 12))), 400,
                   "wrong_shape", "dense_features"),
        BadRequest("lengths [1, 25]", payload(one_row(
            sparse_lengths=tensor("sparse_lengths", "INT64", [1, 25], [1] * 25),
            sparse_ids=tensor("sparse_ids", "INT64", [25], [0] * 25))),
            400, "wrong_shape", "sparse_lengths"),
        BadRequest("ids 2-D", payload(one_row(sparse_ids=tensor("sparse_ids", "INT64", [1, 26], [0] * 26))), 400,
                   "wrong_shape", "sparse_ids"),
        BadRequest("dense 3-D", payload(one_row(dense_features={**dense, "shape": [1, 13, 1]})), 400, "wrong_shape",
                   "dense_features"),
        BadRequest("raw cats [1, 25]", payload([raw()[0], tensor("cat_features", "BYTES", [1, 25], [""] * 25)]), 400,
                   "wrong_shape", "cat_features"),
        BadRequest("shape not a list", payload(one_row(dense_features={**dense, "shape": 13})), 400, "wrong_shape",
                   "dense_features"),
        BadRequest("negative dimension", payload(one_row(dense_features={**dense, "shape": [-1, 13]})), 400,
                   "wrong_shape", "dense_features"),
        BadRequest("data count vs shape", payload(one_row(dense_features=[0.5] * 12)), 400, "wrong_count",
                   "dense_features"),
        BadRequest("nested data count vs shape", payload(one_row(sparse_lengths=[[1] * 25])), 400, "wrong_count",
                   "sparse_lengths"),
        BadRequest("BYTES count vs shape", payload([raw()[0], {**raw()[1], "data": [""] * 25}]), 400, "wrong_count",
                   "cat_features"),
        BadRequest("data not a list", payload(one_row(dense_features=0.5)), 400, "wrong_type", "dense_features.data"),
        BadRequest("neither data nor binary_data_size", payload(one_row(
            dense_features={k: v for k, v in dense.items() if k != "data"})), 400, "missing_field", "dense_features"),
        # the binary data extension
        binary_case("binary: too many bytes", one_row(), "invalid_binary", "binary_data_size",
                    edit=lambda body, headers: (body + b"\0" * 4, headers)),
        binary_case("binary: too few bytes (truncated body)", one_row(), "invalid_binary", "sparse_ids",
                    edit=lambda body, headers: (body[:-8], headers)),
        binary_case("binary: size not the shape's", one_row(dense_features=[0.5] * 12), "invalid_binary",
                    "dense_features", names=("dense_features",)),
        binary_case("binary: INT32 lengths size not the shape's",
                    one_row(sparse_lengths=tensor("sparse_lengths", "INT32", [1, 26], [1] * 27)),
                    "invalid_binary", "sparse_lengths"),
        binary_case("binary: BYTES elements short of their size", raw(), "invalid_binary", "cat_features",
                    edit=lambda body, headers: (body[:-3], headers)),
        binary_case("binary: BYTES elements beyond the shape", [raw()[0], {**raw()[1], "data": [""] * 27}],
                    "invalid_binary", "cat_features"),
        binary_case("header length not a number", one_row(), "invalid_binary", "Inference-Header-Content-Length",
                    edit=with_header("12a")),
        binary_case("header length negative", one_row(), "invalid_binary", "Inference-Header-Content-Length",
                    edit=with_header("-1")),
        binary_case("header length larger than the body", one_row(), "invalid_binary",
                    "Inference-Header-Content-Length", edit=lambda body, headers: (body, {
                        **headers, LENGTH_HEADER: str(len(body) + 1)})),
        binary_case("header length cuts the JSON", one_row(), "invalid_json", None, edit=lambda body, headers: (
            body, {**headers, LENGTH_HEADER: str(int(headers[LENGTH_HEADER]) - 1)})),
        binary_case("both data and binary_data_size", one_row(), "invalid_binary", "dense_features",
                    edit=lambda body, headers: (body.replace(b'"parameters"', b'"data": [], "parameters"', 1), {
                        **headers, LENGTH_HEADER: str(int(headers[LENGTH_HEADER]) + len(b'"data": [], '))})),
        BadRequest("binary_data_size without the header",
                   binary_request(one_row(), ("dense_features",))[0][:-52], 400, "invalid_binary", "dense_features"),
        binary_case("binary_data_size not an integer", one_row(), "wrong_type",
                    "dense_features.parameters.binary_data_size", names=("dense_features",),
                    edit=lambda body, headers: (body.replace(b": 52}", b": 5.2}", 1), {
                        **headers, LENGTH_HEADER: str(int(headers[LENGTH_HEADER]) + 1)})),
        # values
        binary_case("NaN dense (binary FP32)", one_row(dense_features=[float("nan")] + [0.5] * 12), "non_finite",
                    "dense_features", row=0),
        binary_case("infinite dense (binary FP32)", one_row(dense_features=[0.5] * 12 + [float("-inf")]),
                    "non_finite", "dense_features", row=0),
        binary_case("NaN dense in the second row", two_rows_nan, "non_finite", "dense_features", row=1),
        BadRequest("dense beyond float32 (JSON)", payload(one_row(dense_features=[1e39] + [0.5] * 12)), 400,
                   "non_finite", "dense_features", 0),
        BadRequest("dense string", payload(one_row(dense_features=["0.5"] + [0.5] * 12)), 400, "non_numeric",
                   "dense_features"),
        BadRequest("dense boolean", payload(one_row(dense_features=[True] + [0.5] * 12)), 400, "non_numeric",
                   "dense_features"),
        BadRequest("dense null", payload(one_row(dense_features=[None] + [0.5] * 12)), 400, "non_numeric",
                   "dense_features"),
        BadRequest("negative id", payload(one_row(sparse_ids=ids_with(3, -1))), 400, "id_out_of_range",
                   "sparse_ids", 0),
        BadRequest("id = table size", payload(one_row(sparse_ids=ids_with(25, 35))), 400, "id_out_of_range",
                   "sparse_ids", 0),
        BadRequest("id beyond int64 (JSON)", payload(one_row(sparse_ids=ids_with(0, 2**63))), 400, "id_out_of_range",
                   "sparse_ids"),
        binary_case("negative id (binary)", one_row(sparse_ids=ids_with(7, -(2**63))), "id_out_of_range",
                    "sparse_ids", row=0),
        BadRequest("id out of range in the second row",
                   payload([*rows_of(2)[:2], tensor("sparse_ids", "INT64", [52], [0] * 51 + [35])]), 400,
                   "id_out_of_range", "sparse_ids", 1),
        BadRequest("float id", payload(one_row(sparse_ids=ids_with(2, 2.0))), 400, "non_integer", "sparse_ids"),
        BadRequest("boolean id", payload(one_row(sparse_ids=ids_with(2, True))), 400, "non_integer", "sparse_ids"),
        BadRequest("string id", payload(one_row(sparse_ids=ids_with(2, "2"))), 400, "non_integer", "sparse_ids"),
        BadRequest("float length", payload(one_row(sparse_lengths=[1.0] + [1] * 25)), 400, "non_integer",
                   "sparse_lengths"),
        BadRequest("boolean length", payload(one_row(sparse_lengths=[True] + [1] * 25)), 400, "non_integer",
                   "sparse_lengths"),
        BadRequest("string length (INT32)", payload(one_row(
            sparse_lengths=tensor("sparse_lengths", "INT32", [1, 26], ["1"] + [1] * 25))), 400, "non_integer",
            "sparse_lengths"),
        BadRequest("length beyond INT32", payload(one_row(
            sparse_lengths=tensor("sparse_lengths", "INT32", [1, 26], [2**31] + [1] * 25))), 400, "non_integer",
            "sparse_lengths"),
        BadRequest("length beyond int64 (JSON)", payload(one_row(sparse_lengths=[2**63] + [1] * 25)), 400,
                   "non_integer", "sparse_lengths"),
        BadRequest("lengths do not add up to the ids", payload(one_row(sparse_ids=tensor("sparse_ids", "INT64", [25],
                   [0] * 25))), 400, "length_mismatch", "sparse_ids"),
        BadRequest("negative length", payload(one_row(sparse_lengths=[2, -1] + [1] * 24)), 400, "negative_length",
                   "sparse_lengths", 0),
        binary_case("negative length (binary INT32)",
                    one_row(sparse_lengths=tensor("sparse_lengths", "INT32", [1, 26], [2, -1] + [1] * 24)),
                    "negative_length", "sparse_lengths", row=0),
        # rows
        BadRequest("no rows", payload([tensor("dense_features", "FP32", [0, 13], []),
                                   tensor("sparse_lengths", "INT64", [0, 26], []),
                                   tensor("sparse_ids", "INT64", [0], [])]), 400, "empty_instances",
                   "dense_features"),
        BadRequest("no raw rows", payload([tensor("int_features", "BYTES", [0, 13], []),
                                       tensor("cat_features", "BYTES", [0, 26], [])]), 400, "empty_instances",
                   "int_features"),
        BadRequest("too many rows", payload(rows_of(max_rows + 1)), 413, "too_many_rows", "dense_features"),
        binary_case("too many rows (binary)", rows_of(max_rows + 1), "too_many_rows", "dense_features", status=413),
        BadRequest("too many raw rows", payload(rows_of(max_rows + 1, raw=True)), 413, "too_many_rows", "int_features"),
        # raw rows
        BadRequest("model and raw inputs mixed", payload([*one_row(), raw()[0]]), 400, "unknown_field", "int_features"),
        BadRequest("raw and one model input", payload([*raw(), one_row()[0]]), 400, "unknown_field", "cat_features"),
        BadRequest("raw input missing", payload([raw()[1]]), 400, "missing_field", "int_features"),
        BadRequest("raw integer not decimal", payload(raw(int_3="1.5")), 400, "non_integer", "int_features", 0),
        BadRequest("raw integer hex", payload(raw(int_3="0x1f")), 400, "non_integer", "int_features", 0),
        BadRequest("raw integer with a sign", payload(raw(int_3="+5")), 400, "non_integer", "int_features", 0),
        BadRequest("raw integer beyond int64", payload(raw(int_3=str(2**63))), 400, "non_integer", "int_features", 0),
        BadRequest("raw integer not a string", payload([{**raw()[0], "data": [1] * 13}, raw()[1]]), 400, "non_integer",
                   "int_features"),
        BadRequest("raw category not hex", payload(raw(cat_7="05db916g")), 400, "invalid_category", "cat_features", 0),
        BadRequest("raw category of 7 digits", payload(raw(cat_7="5db9164")), 400, "invalid_category",
                   "cat_features", 0),
        BadRequest("raw category in the second row", payload(raw_inputs([raw_row(), raw_row(cat_0="xyz")])), 400,
                   "invalid_category", "cat_features", 1),
        binary_case("raw integer not UTF-8", [{**raw()[0], "data": [b"\xff"] + ["1"] * 12}, raw()[1]],
                    "invalid_binary", "int_features"),
        binary_case("raw category not UTF-8", [raw()[0], {**raw()[1], "data": [b"\xc3"] + [""] * 25}],
                    "invalid_binary", "cat_features"),
        # outputs
        BadRequest("unknown output", payload(one_row(), outputs=[{"name": "probability"}]), 400, "unknown_field",
                   "outputs"),
        BadRequest("outputs not a list", payload(one_row(), outputs={"name": "score"}), 400, "wrong_type", "outputs"),
        BadRequest("outputs empty", payload(one_row(), outputs=[]), 400, "wrong_type", "outputs"),
        BadRequest("parameters not an object", payload(one_row(), parameters=[1]), 400, "wrong_type", "parameters"),
        # the body
        BadRequest("invalid JSON", b'{"inputs": [', 400, "invalid_json"),
        BadRequest("JSON array", b"[]", 400, "invalid_body"),
        BadRequest("empty body", b"", 415, "empty_body"),
        BadRequest("unknown top-level key", payload(one_row(), extra=1), 400, "unknown_field", "extra"),
        BadRequest("id not a string", payload(one_row(), id=7), 400, "wrong_type", "id"),
        BadRequest("no inputs", b'{"id": "x"}', 400, "missing_field", "inputs"),
        BadRequest("inputs empty", payload([]), 400, "wrong_type", "inputs"),
        BadRequest("input not an object", payload([7]), 400, "wrong_type", "inputs"),
    ]  # fmt: skip
