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
import subprocess
import sys
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from handler.predictor import DLRMPredictor, Request, Response
from model_factory.config import DLRMConfig
from servers.torchserve import REPO_ROOT
from tests.bad_oip_requests import (
    LENGTH_HEADER,
    OIP_ROUTE,
    bad_oip_requests,
    binary_request,
    one_row,
    payload,
    raw_inputs,
    tensor,
)
from tests.bad_requests import BadRequest, raw_row
from tests.rows import random_row

MAX_ROWS = 8


@pytest.fixture(scope="module")
def predictor(artifact_dir) -> DLRMPredictor:
    return DLRMPredictor.from_artifact(artifact_dir, torch.device("cpu"), max_rows=MAX_ROWS)


# ---------------------------------------------------------------- building requests


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


def check_error(response: Response, case: BadRequest) -> dict[str, Any]:
    assert (response.status, response.error_kind) == (case.status, case.kind), response.body
    body = orjson.loads(response.body)
    assert list(body)[0] == "error" and body["error"] == body["message"] and body["message"]
    assert (body["code"], body["type"]) == (case.status, case.kind)
    assert body.get("field") == case.field
    assert body.get("row") == case.row
    return body


@pytest.mark.parametrize("case", bad_oip_requests(MAX_ROWS), ids=lambda case: case.name)
def test_bad_requests_get_the_documented_error(predictor: DLRMPredictor, case: BadRequest) -> None:
    check_error(infer(predictor, case.body, case.headers), case)


@pytest.mark.parametrize(
    "case",
    [case for case in bad_oip_requests(MAX_ROWS) if case.headers is None and b'"BYTES"' not in case.body],
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


# ---------------------------------------------------------------- regressions: each failed before its fix


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
