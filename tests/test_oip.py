"""The Open Inference Protocol codec (handler/oip/) through ``DLRMPredictor``, in-process.

Valid requests in every encoding the contract allows (JSON tensors flat and nested,
INT32 and INT64 lengths, binary inputs, binary outputs, chosen outputs, raw BYTES
rows) must give the scores the JSON rows format gives for the same rows; every
documented client error must give its status, ``type`` and ``field`` in a body with
OIP's ``error`` key, and over gRPC an answer TorchServe can convert.
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from handler.predictor import DLRMPredictor, Request, Response
from model_factory.config import DLRMConfig
from servers.torchserve import REPO_ROOT
from tests.bad_requests import BadRequest, raw_row
from tests.rows import random_row

MAX_ROWS = 8
LENGTH_HEADER = "inference-header-content-length"
# The headers TorchServe hands a worker for POST /v2/models/{model}/infer (names lower-cased by the adapter).
OIP_ROUTE = {"explain": "False", "content-type": "application/json"}
DENSE_ROW = [0.5] * 13
ONE_HOT = [1] * 26


@pytest.fixture(scope="module")
def predictor(artifact_dir) -> DLRMPredictor:
    return DLRMPredictor.from_artifact(artifact_dir, torch.device("cpu"), max_rows=MAX_ROWS)


# ---------------------------------------------------------------- building requests


def tensor(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def model_inputs(rows: list[dict[str, Any]], lengths_type: str = "INT64", nested: bool = False) -> list[dict[str, Any]]:
    """The three model inputs of reference-format rows, flat or nested as their shapes."""
    dense = [row["float_features"] for row in rows]
    lengths = [row["id_list_features.lengths"] for row in rows]
    ids = [value for row in rows for value in row["id_list_features.values"]]
    flat = lambda values: [v for row in values for v in row]  # noqa: E731
    return [
        tensor("dense_features", "FP32", [len(rows), 13], dense if nested else flat(dense)),
        tensor("sparse_lengths", lengths_type, [len(rows), 26], lengths if nested else flat(lengths)),
        tensor("sparse_ids", "INT64", [len(ids)], ids),
    ]


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


def infer(predictor: DLRMPredictor, body: bytes, headers: dict[str, str] | None = None, grpc: bool = False) -> Response:
    headers = ({} if grpc else OIP_ROUTE) if headers is None else headers
    (response,) = predictor.predict([Request(body, headers, grpc)]).responses
    return response


def outputs(response: Response) -> dict[str, np.ndarray]:
    """The outputs of a 200 by name, from JSON data or from the binary part."""
    assert response.status == 200, response.body[:500]
    if response.content_type == "application/octet-stream":
        length = int(response.headers["Inference-Header-Content-Length"])
    else:
        assert response.content_type == "application/json" and not response.headers
        length = len(response.body)
    header, rest = orjson.loads(response.body[:length]), response.body[length:]
    values, offset = {}, 0
    for output in header["outputs"]:
        assert output["datatype"] == "FP32" and len(output["shape"]) == 1
        if "data" in output:
            values[output["name"]] = np.array(output["data"], dtype=np.float32)
        else:
            size = output["parameters"]["binary_data_size"]
            values[output["name"]] = np.frombuffer(rest[offset : offset + size], dtype="<f4")
            offset += size
        assert values[output["name"]].shape == tuple(output["shape"])
    assert offset == len(rest)
    return values


def rows_scores(predictor: DLRMPredictor, body: dict[str, Any]) -> dict[str, np.ndarray]:
    """Scores and logits of the JSON rows format (``POST /predictions``) for ``{"instances": [...]}``."""
    (response,) = predictor.predict_bodies([json.dumps(body)]).responses
    assert response.status == 200, response.body
    predictions = orjson.loads(response.body)["predictions"]
    return {name: np.array([p[name] for p in predictions], dtype=np.float32) for name in ("score", "logit")}


def assert_same_outputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def rows(small_config: DLRMConfig) -> list[dict[str, Any]]:
    """Three reference rows with multi-hot and empty features."""
    rng = np.random.default_rng(11)
    return [random_row(small_config, rng) for _ in range(3)]


# ---------------------------------------------------------------- valid requests


def test_json_tensors_score_as_the_json_rows_format(predictor: DLRMPredictor, rows: list[dict[str, Any]]) -> None:
    expected = rows_scores(predictor, {"instances": rows})
    for lengths_type in ("INT32", "INT64"):
        for nested in (False, True):
            response = infer(predictor, payload(model_inputs(rows, lengths_type, nested)))
            header = orjson.loads(response.body)
            assert (header["model_name"], header["model_version"], header["id"]) == ("dlrm", "1.0", "")
            assert [(o["name"], o["shape"]) for o in header["outputs"]] == [("score", [3]), ("logit", [3])]
            assert_same_outputs(outputs(response), expected)


@pytest.mark.parametrize(
    "names",
    [None, ("dense_features",), ("sparse_lengths", "sparse_ids")],
    ids=["all binary", "dense binary", "sparse binary"],
)
@pytest.mark.parametrize("lengths_type", ["INT32", "INT64"])
def test_binary_inputs_score_as_json_ones(
    predictor: DLRMPredictor, rows: list[dict[str, Any]], names: tuple[str, ...] | None, lengths_type: str
) -> None:
    expected = outputs(infer(predictor, payload(model_inputs(rows, lengths_type))))
    body, headers = binary_request(model_inputs(rows, lengths_type), names)
    response = infer(predictor, body, headers)
    assert response.content_type == "application/json"  # outputs as JSON unless asked for as binary
    assert_same_outputs(outputs(response), expected)


def test_binary_outputs_on_request(predictor: DLRMPredictor, rows: list[dict[str, Any]]) -> None:
    expected = outputs(infer(predictor, payload(model_inputs(rows))))
    response = infer(predictor, payload(model_inputs(rows), parameters={"binary_data_output": True}))
    assert response.content_type == "application/octet-stream"
    length = int(response.headers["Inference-Header-Content-Length"])
    header = orjson.loads(response.body[:length])
    assert [o["parameters"] for o in header["outputs"]] == [{"binary_data_size": 12}] * 2
    assert all("data" not in o for o in header["outputs"])
    assert len(response.body) == length + 24
    got = outputs(response)
    for name in ("score", "logit"):
        np.testing.assert_array_equal(got[name], expected[name])  # float32 both ways: bit for bit


def test_binary_data_per_output(predictor: DLRMPredictor, rows: list[dict[str, Any]]) -> None:
    expected = outputs(infer(predictor, payload(model_inputs(rows))))
    requested = [{"name": "logit", "parameters": {"binary_data": True}}, {"name": "score"}]
    response = infer(predictor, payload(model_inputs(rows), outputs=requested))
    length = int(response.headers["Inference-Header-Content-Length"])
    header = orjson.loads(response.body[:length])
    assert [o["name"] for o in header["outputs"]] == ["logit", "score"]  # the request's order
    assert "data" not in header["outputs"][0] and "data" in header["outputs"][1]
    got = outputs(response)
    assert list(got) == ["logit", "score"]
    for name in ("score", "logit"):
        np.testing.assert_array_equal(got[name], expected[name])

    # binary_data per output overrides binary_data_output
    requested = [{"name": "score", "parameters": {"binary_data": False}}, {"name": "logit"}]
    body = payload(model_inputs(rows), outputs=requested, parameters={"binary_data_output": True})
    response = infer(predictor, body)
    header = orjson.loads(response.body[: int(response.headers["Inference-Header-Content-Length"])])
    assert ["data" in o for o in header["outputs"]] == [True, False]


@pytest.mark.parametrize("names", [["score"], ["logit"], ["logit", "score"]])
def test_only_the_requested_outputs(predictor: DLRMPredictor, rows: list[dict[str, Any]], names: list[str]) -> None:
    expected = outputs(infer(predictor, payload(model_inputs(rows))))
    response = infer(predictor, payload(model_inputs(rows), outputs=[{"name": name} for name in names]))
    got = outputs(response)
    assert list(got) == names
    for name in names:
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.parametrize("request_id", ["", "request-42", "é/✓ 7"])
def test_id_is_echoed(predictor: DLRMPredictor, rows: list[dict[str, Any]], request_id: str) -> None:
    response = infer(predictor, payload(model_inputs(rows), id=request_id))
    assert orjson.loads(response.body)["id"] == request_id
    body, headers = binary_request(model_inputs(rows), id=request_id)
    assert orjson.loads(infer(predictor, body, headers).body)["id"] == request_id


RAW_ROWS = [
    raw_row(),
    raw_row(int_0=None, int_1=-3, int_2=0, int_3=2**63 - 1, cat_0="05DB9164", cat_1="", cat_2=None),
    {"int_4": 7, "cat_3": "c0d61a5c"},  # the rest missing
]


@pytest.mark.parametrize("binary", [False, True], ids=["json BYTES", "binary BYTES"])
def test_raw_rows_decode_as_the_json_raw_row_format(predictor: DLRMPredictor, binary: bool) -> None:
    inputs = raw_inputs(RAW_ROWS)
    body, headers = binary_request(inputs) if binary else (payload(inputs), dict(OIP_ROUTE))
    oip_rows = predictor.oip.decode(body, headers.get(LENGTH_HEADER)).rows
    json_rows = predictor.decoder.decode(json.dumps({"instances": RAW_ROWS})).rows
    for name in ("dense", "lengths", "values"):
        np.testing.assert_array_equal(getattr(oip_rows, name), getattr(json_rows, name), err_msg=name)
    expected = rows_scores(predictor, {"instances": RAW_ROWS})
    assert_same_outputs(outputs(infer(predictor, body, headers)), expected)


def test_codec_decodes_model_inputs_exactly(predictor: DLRMPredictor, rows: list[dict[str, Any]]) -> None:
    for lengths_type in ("INT32", "INT64"):
        decoded = predictor.oip.decode(payload(model_inputs(rows, lengths_type)))
        assert decoded.num_rows == 3 and decoded.id == ""
        assert decoded.rows.dense.dtype == np.float32
        assert decoded.rows.dense.tolist() == np.array([r["float_features"] for r in rows], np.float32).tolist()
        assert decoded.rows.lengths.dtype == np.int64
        assert decoded.rows.lengths.tolist() == [r["id_list_features.lengths"] for r in rows]
        assert decoded.rows.values.tolist() == [v for r in rows for v in r["id_list_features.values"]]


def test_edge_dense_values_decode_exactly_from_json_and_binary(predictor: DLRMPredictor) -> None:
    dense = [0.0, -0.0, 1.4e-45, 3.4028234e38, -3.4028234e38, 1e-30, 7.0, 0.1, 1, 2, 3, 4, 5]
    inputs = one_row(dense_features=dense)
    json_decoded = predictor.oip.decode(payload(inputs))
    body, headers = binary_request(inputs)
    binary_decoded = predictor.oip.decode(body, headers[LENGTH_HEADER])
    expected = np.array(dense, dtype=np.float32)
    np.testing.assert_array_equal(json_decoded.rows.dense[0], expected)
    np.testing.assert_array_equal(binary_decoded.rows.dense[0], expected)


def test_a_batch_mixes_formats_and_isolates_bad_requests(predictor: DLRMPredictor, rows: list[dict[str, Any]]) -> None:
    body, headers = binary_request(model_inputs(rows[:2]))
    requests = [
        Request(payload(model_inputs(rows[2:])), OIP_ROUTE),
        Request(json.dumps({"instances": rows[:2]}).encode(), {}),
        Request(payload(one_row(sparse_ids=[-1] + [0] * 25)), OIP_ROUTE),
        Request(body, headers),
        Request(payload(model_inputs(rows[2:])), {}, grpc=True),
        Request(b"{", {}, grpc=True),
    ]
    responses = predictor.predict(requests).responses
    assert [r.status for r in responses] == [200, 200, 400, 200, 200, 400]
    expected = rows_scores(predictor, {"instances": rows})
    assert_same_outputs(outputs(responses[0]), {k: v[2:] for k, v in expected.items()})
    assert_same_outputs(outputs(responses[3]), {k: v[:2] for k, v in expected.items()})
    assert_same_outputs(outputs(responses[4]), {k: v[2:] for k, v in expected.items()})
    assert orjson.loads(responses[1].body)["predictions"][1]["logit"] == pytest.approx(float(expected["logit"][1]))


def test_model_name_and_version_are_accepted(predictor: DLRMPredictor) -> None:
    """TorchServe's gRPC service adds them to the JSON it hands over."""
    response = infer(predictor, payload(one_row(), model_name="dlrm", model_version="1.0"))
    assert response.status == 200


def test_oip_bodies_on_the_predictions_route_are_oip(predictor: DLRMPredictor) -> None:
    """``/predictions`` (TorchServe adds ``url_path``) takes an OIP body too, and answers it in OIP."""
    headers = {"explain": "False", "url_path": "predictions/dlrm", "content-type": "application/json"}
    assert "outputs" in orjson.loads(infer(predictor, payload(one_row()), headers).body)
    error = infer(predictor, payload(one_row(sparse_ids=None)), headers)
    assert error.status == 400 and list(orjson.loads(error.body))[0] == "error"


# ---------------------------------------------------------------- gRPC


def test_grpc_valid_request_gets_the_rest_response(predictor: DLRMPredictor, rows: list[dict[str, Any]]) -> None:
    body = payload(model_inputs(rows), id="g-1")
    assert infer(predictor, body, grpc=True).body == infer(predictor, body).body


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[]", payload(one_row(sparse_ids=None)), payload(one_row(sparse_ids=[0] * 25 + [35]))],
    ids=["empty", "invalid json", "array", "missing input", "id out of range"],
)
def test_grpc_errors_are_oip_responses_with_an_error_output(predictor: DLRMPredictor, body: bytes) -> None:
    """TorchServe 0.12 converts every answer of the handler to a ModelInferResponse: an error must be one too."""
    rest = infer(predictor, body)
    response = infer(predictor, body, grpc=True)
    assert response.status == rest.status >= 400 and response.error_kind == rest.error_kind
    converted = orjson.loads(response.body)
    assert set(converted) == {"id", "model_name", "model_version", "outputs"}
    assert (converted["model_name"], converted["model_version"], converted["id"]) == ("dlrm", "1.0", "")
    (output,) = converted["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("error", "BYTES", [1])
    # TorchServe writes each BYTES element as its JSON text: the error object goes as it is, encoded once.
    assert output["data"] == [orjson.loads(rest.body)]


# ---------------------------------------------------------------- errors


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


def bad_oip_requests() -> list[BadRequest]:
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
        BadRequest("too many rows", payload(rows_of(MAX_ROWS + 1)), 413, "too_many_rows", "dense_features"),
        binary_case("too many rows (binary)", rows_of(MAX_ROWS + 1), "too_many_rows", "dense_features", status=413),
        BadRequest("too many raw rows", payload(rows_of(MAX_ROWS + 1, raw=True)), 413, "too_many_rows", "int_features"),
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


def check_error(response: Response, case: BadRequest) -> dict[str, Any]:
    assert (response.status, response.error_kind) == (case.status, case.kind), response.body
    body = orjson.loads(response.body)
    assert list(body)[0] == "error" and body["error"] == body["message"] and body["message"]
    assert (body["code"], body["type"]) == (case.status, case.kind)
    assert body.get("field") == case.field
    assert body.get("row") == case.row
    return body


@pytest.mark.parametrize("case", bad_oip_requests(), ids=lambda case: case.name)
def test_bad_requests_get_the_documented_error(predictor: DLRMPredictor, case: BadRequest) -> None:
    check_error(infer(predictor, case.body, case.headers), case)


@pytest.mark.parametrize(
    "case",
    [case for case in bad_oip_requests() if case.headers is None and b'"BYTES"' not in case.body],
    ids=lambda case: case.name,
)
def test_bad_requests_over_grpc_carry_the_same_error(predictor: DLRMPredictor, case: BadRequest) -> None:
    """JSON requests without BYTES inputs (gRPC hands those over base64-encoded: tested below)."""
    response = infer(predictor, case.body, grpc=True)
    assert (response.status, response.error_kind) == (case.status, case.kind)
    (output,) = orjson.loads(response.body)["outputs"]
    assert output["name"] == "error"
    assert output["data"] == [orjson.loads(infer(predictor, case.body).body)]


def base64_inputs(inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """BYTES inputs as TorchServe's gRPC service hands them over: each element base64-encoded."""
    encode = lambda value: base64.b64encode(value.encode()).decode()  # noqa: E731
    return [{**item, "data": [encode(value) for value in item["data"]]} for item in inputs]


def test_grpc_raw_rows_arrive_base64_encoded(predictor: DLRMPredictor) -> None:
    inputs = base64_inputs(raw_inputs(RAW_ROWS))
    body = payload(inputs, model_name="dlrm", model_version="1.0")  # as TorchServe's gRPC service builds it
    expected = rows_scores(predictor, {"instances": RAW_ROWS})
    assert_same_outputs(outputs(infer(predictor, body, grpc=True)), expected)
    # the same texts over REST are not decimal integers and hex digits
    assert infer(predictor, payload(inputs)).error_kind == "non_integer"


@pytest.mark.parametrize(
    "element, kind",
    [("MS41", "non_integer"), ("MQ", "invalid_binary"), ("1 2", "invalid_binary"), ("/w==", "invalid_binary")],
    ids=["base64 of '1.5'", "bad padding", "not base64", "base64 of a non-UTF-8 byte"],
)
def test_grpc_raw_rows_with_bad_base64_are_a_400(predictor: DLRMPredictor, element: str, kind: str) -> None:
    ints, categories = base64_inputs(raw_inputs([raw_row()]))
    ints["data"][3] = element
    response = infer(predictor, payload([ints, categories]), grpc=True)
    assert (response.status, response.error_kind) == (400, kind)
    (output,) = orjson.loads(response.body)["outputs"]
    assert output["data"][0]["field"] == "int_features"


# ---------------------------------------------------------------- bugs found: these fail until handler/ is fixed


def test_a_non_ascii_bytes_element_over_grpc_is_a_400(predictor: DLRMPredictor) -> None:
    """``base64.b64decode`` raises a plain ValueError (not binascii.Error) for non-ASCII text, which
    ``_from_base64`` does not catch: a 500 "internal_error" instead of the 400."""
    ints, categories = base64_inputs(raw_inputs([raw_row()]))
    ints["data"][3] = "é"
    response = infer(predictor, payload([ints, categories]), grpc=True)
    assert (response.status, response.error_kind) == (400, "invalid_binary")


@pytest.mark.parametrize("name", [[], {}, ["dense_features"]], ids=["[]", "{}", "[name]"])
def test_an_unhashable_input_name_is_a_400(predictor: DLRMPredictor, name: Any) -> None:
    """``name not in _ALLOWED_DATATYPES`` (a dict) raises TypeError for a list or object name: a 500
    (``internal_error``) instead of the 400."""
    body = payload([*one_row(), tensor(name, "FP32", [1], [1.0])])
    response = infer(predictor, body)
    assert (response.status, response.error_kind) == (400, "unknown_field")


@pytest.mark.parametrize(
    "value", ["²", "1" * 4400, "0" * 4400 + "12"], ids=["superscript two", "4400 digits", "4400 leading zeros"]
)
def test_a_header_length_python_cannot_convert_is_a_400(predictor: DLRMPredictor, value: str) -> None:
    """``str.isdigit`` accepts '²' (latin-1, so an HTTP header can carry it) and numbers of any length, but
    ``int()`` refuses both ('invalid literal', 'Exceeds the limit (4300 digits)'): a ValueError, a 500
    instead of the 400."""
    body, headers = binary_request(one_row())
    response = infer(predictor, body, {**headers, LENGTH_HEADER: value})
    assert (response.status, response.error_kind) == (400, "invalid_binary")


CRASH_SCRIPT = """
import json, sys
from handler.errors import InvalidRequest
from handler.oip import OipCodec
from handler.rows import RowValidator
from model_factory.config import preset
from model_factory.features import Preprocessing

config = preset("small")
codec = OipCodec(config, Preprocessing(), RowValidator(config, 8), "dlrm", "1.0")
try:
    codec.decode(sys.stdin.buffer.read())
except InvalidRequest as error:
    print(json.dumps(error.to_body(oip=True)))
else:
    print(json.dumps({"accepted": True}))
"""


def test_lengths_whose_int64_sum_wraps_to_the_id_count_are_a_400() -> None:
    """Four lengths of 2**62 add up to 2**64, which ``lengths.sum()`` (int64) wraps to 0: with no ids the sum
    check passes and ``np.repeat`` in ``RowValidator.check_ids`` gets counts of 2**62 and kills the process
    (SIGSEGV), so one request restarts the worker. Run in a subprocess for that reason."""
    body = payload(one_row(sparse_lengths=[2**62] * 4 + [0] * 22, sparse_ids=tensor("sparse_ids", "INT64", [0], [])))
    result = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT], input=body, capture_output=True, cwd=REPO_ROOT, timeout=120
    )
    assert result.returncode == 0, f"the decoder died with {result.returncode}: {result.stderr[-500:]!r}"
    error = orjson.loads(result.stdout)
    assert (error["code"], error["type"], error["field"]) == (400, "length_mismatch", "sparse_ids")


def test_dense_values_near_float32_max_give_numeric_scores(predictor: DLRMPredictor) -> None:
    """The contract accepts any finite float32 dense value, but 3.4e38 makes the forward pass NaN and the 200
    carries ``null`` in FP32 outputs, which OIP clients cannot read: a 4xx or a finite score is expected."""
    response = infer(predictor, payload(one_row(dense_features=[3.4e38] * 13)))
    if response.status == 200:
        header = orjson.loads(response.body)
        assert all(isinstance(v, float) for output in header["outputs"] for v in output["data"]), response.body
        assert all(np.isfinite(output["data"]).all() for output in header["outputs"]), response.body
    else:
        assert 400 <= response.status < 500
