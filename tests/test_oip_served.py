"""End to end: the Open Inference Protocol (KServe v2) of the served archive, over REST and gRPC.

Every score is checked against :func:`tests.rows.offline_logits`, an independent
scorer of the same rows, and every client is a real one: this package's
``dlrm_client``, Triton's ``tritonclient.http`` and a gRPC stub compiled at test
time from the ``.proto`` inside TorchServe's own jar.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tritonclient.http as triton_http
import ts
from grpc_tools import protoc
from tritonclient.utils import InferenceServerException

from dlrm_client import DLRMClient, DLRMRequestError, Prediction
from dlrm_client.client import HEADER_LENGTH, decode_response, encode_request, model_input_tensors
from handler.json_rows import RequestDecoder
from handler.oip import OipCodec
from handler.rows import RowValidator
from model_factory.config import DEFAULT_PRESET, DLRMConfig, preset
from model_factory.features import Preprocessing
from servers.torchserve import REPO_ROOT, TorchServeProcess
from tests.archives import TEST_MAX_ROWS
from tests.bad_requests import raw_row
from tests.rows import offline_logits
from tests.test_server import prometheus_counter
from training.synthetic import random_inputs, request_rows

SAMPLE_OIP = REPO_ROOT / "sample_data" / "sample_oip.json"
SAMPLE_OIP_RANKING = REPO_ROOT / "sample_data" / "sample_oip_ranking.json"
SAMPLE_RAW = REPO_ROOT / "sample_data" / "sample_raw.json"
SAMPLE_INSTANCES = REPO_ROOT / "sample_data" / "sample_instances.json"
JAR = Path(ts.__file__).parent / "frontend" / "model-server.jar"
PROTO = "proto/open_inference_grpc.proto"
TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------- helpers


class Rows:
    """``N`` rows in the OIP layout (dense ``[N, 13]``, lengths ``[N, 26]``, ids ``[total]``), scored offline."""

    def __init__(self, served_model: Any, rows: int, seed: int) -> None:
        model, artifact = served_model
        rng = np.random.default_rng(seed)
        # The DLRM reference's random inputs, 1 to 3 ids per lookup (multi-hot) ...
        dense, lengths, ids = random_inputs(artifact.model, rows, rng, num_indices_per_lookup=3, fixed_lookups=False)
        # ... and about a fifth of the features empty, one row entirely.
        keep = rng.random(lengths.shape) > 0.2
        keep[min(1, rows - 1)] = False
        owner = np.repeat(np.arange(lengths.size), lengths.ravel())
        self.dense = dense
        self.lengths = np.where(keep, lengths, 0)
        self.ids = ids[keep.ravel()[owner]]
        self.json_rows = list(request_rows(self.dense, self.lengths, self.ids))
        self.logits = offline_logits(model, artifact.model, self.json_rows)
        self.scores = 1 / (1 + np.exp(-self.logits.astype(np.float64)))

    def assert_scored(self, logits: Any, scores: Any) -> None:
        np.testing.assert_allclose(np.asarray(logits, dtype=np.float64), self.logits, rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(np.asarray(scores, dtype=np.float64), self.scores, rtol=0, atol=TOLERANCE)


def infer_url(server: TorchServeProcess) -> str:
    return f"{server.endpoints.inference}/v2/models/dlrm/infer"


def oip_json(dense: np.ndarray, lengths: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
    """An OIP JSON request of model inputs, built by hand (flat row-major ``data``)."""
    tensors = (("dense_features", "FP32", dense), ("sparse_lengths", "INT64", lengths), ("sparse_ids", "INT64", ids))
    return {
        "inputs": [
            {"name": name, "datatype": datatype, "shape": list(values.shape), "data": values.ravel().tolist()}
            for name, datatype, values in tensors
        ]
    }


def binary_body(dense: np.ndarray, lengths: np.ndarray, ids: np.ndarray) -> tuple[bytes, dict[str, str]]:
    return encode_request(model_input_tensors(dense, lengths, ids), binary=True)


def raw_tables(rows: list[dict[str, Any]]) -> tuple[list[list[str]], list[list[str]]]:
    """Raw JSON rows (keyed by feature, missing ones absent or null) as the two OIP BYTES tables."""
    ints = [["" if row.get(f"int_{i}") is None else str(row[f"int_{i}"]) for i in range(13)] for row in rows]
    cats = [[row.get(f"cat_{i}") or "" for i in range(26)] for row in rows]
    return ints, cats


def worker_answer(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    return {name: outputs[name]["data"] for name in ("score", "logit")}


# ---------------------------------------------------------------------------------------------- dlrm_client


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_dlrm_client_scores_rows_like_the_offline_model(server: TorchServeProcess, served_model, binary: bool) -> None:
    rows = Rows(served_model, 12, seed=11)
    assert (rows.lengths == 0).any() and (rows.lengths > 1).any()
    with DLRMClient(server.endpoints.inference, binary=binary) as client:
        assert client.ready()
        prediction = client.predict(rows.dense, rows.lengths, rows.ids)
    assert isinstance(prediction, Prediction) and len(prediction) == 12
    assert prediction.score.dtype == prediction.logit.dtype == np.float32
    rows.assert_scored(prediction.logit, prediction.score)


def test_dlrm_client_raw_rows_score_like_json_raw_rows(server: TorchServeProcess, predict) -> None:
    rows = [
        json.loads(SAMPLE_RAW.read_text()),
        raw_row(),
        raw_row(int_1=None, int_2=-5, cat_3="", cat_4=None, cat_5="FFFFFFFF"),
        {},  # every feature missing
    ]
    expected = predict(json.dumps({"instances": rows}).encode())
    assert expected.status_code == 200, expected.text
    expected_logits = [p["logit"] for p in expected.json()["predictions"]]
    expected_scores = [p["score"] for p in expected.json()["predictions"]]
    ints, cats = raw_tables(rows)
    for binary in (False, True):
        with DLRMClient(server.endpoints.inference, binary=binary) as client:
            prediction = client.predict_raw(ints, cats)
        np.testing.assert_allclose(prediction.logit, expected_logits, rtol=0, atol=1e-6)
        np.testing.assert_allclose(prediction.score, expected_scores, rtol=0, atol=1e-6)


def test_dlrm_client_raises_the_servers_error(server: TorchServeProcess) -> None:
    dense, lengths, ids = random_inputs(preset(DEFAULT_PRESET), 3, np.random.default_rng(5))
    for binary in (False, True):
        with DLRMClient(server.endpoints.inference, binary=binary) as client:
            with pytest.raises(DLRMRequestError) as raised:
                client.predict(dense, lengths, ids[:-1])
            assert raised.value.status == 400
            assert raised.value.kind == "length_mismatch" and raised.value.field == "sparse_ids"
            assert raised.value.body["error"] == raised.value.body["message"]
            with pytest.raises(DLRMRequestError) as raised:
                client.predict_raw([["1"] * 13], [["05db916g"] * 26])
            assert (raised.value.status, raised.value.kind) == (400, "invalid_category")
    with (
        DLRMClient(server.endpoints.inference, model="nosuchmodel") as client,
        pytest.raises(DLRMRequestError) as raised,
    ):
        client.predict(dense, lengths, ids)
    assert raised.value.status == 404 and raised.value.body["code"] == 404


def test_health_endpoints(server: TorchServeProcess) -> None:
    base = server.endpoints.inference
    assert requests.get(f"{base}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert requests.get(f"{base}/v2/health/live", timeout=10).json() == {"live": True}
    server_metadata = requests.get(f"{base}/v2", timeout=10).json()
    assert server_metadata["name"] == "Torchserve" and "binary_tensor_data" in server_metadata["extensions"]
    with DLRMClient(base) as client:
        assert client.ready()
    with DLRMClient(base, model="nonexistent") as client:
        assert not client.ready()
    assert DLRMClient("http://127.0.0.1:9", timeout=2).ready() is False  # nothing listens on the discard port


def test_model_metadata_names_the_handlers_tensors(server: TorchServeProcess, served_model) -> None:
    """The frontend agent's route, answered from the archive's oip-metadata.json, matches what infer accepts."""
    _, artifact = served_model
    with DLRMClient(server.endpoints.inference) as client:
        metadata = client.metadata()
    assert metadata == {
        "name": "dlrm",
        "versions": ["1.0"],
        "platform": "pytorch_torchrec",
        "inputs": [
            {"name": "dense_features", "datatype": "FP32", "shape": [-1, artifact.model.num_dense_features]},
            {"name": "sparse_lengths", "datatype": "INT64", "shape": [-1, artifact.model.num_sparse_features]},
            {"name": "sparse_ids", "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [
            {"name": "score", "datatype": "FP32", "shape": [-1]},
            {"name": "logit", "datatype": "FP32", "shape": [-1]},
        ],
    }
    base = f"{server.endpoints.inference}/v2/models/dlrm"
    assert requests.get(f"{base}/versions/1.0", timeout=10).json() == metadata
    assert requests.get(f"{base}/versions/1.0/ready", timeout=10).json() == {"name": "dlrm", "ready": True}


def test_readiness_is_false_while_the_workers_restart(model_store: Path, tmp_path: Path) -> None:
    """Unlike TorchServe's /v2/health/ready and /ping (true while every worker is dead and restarting), the
    agent's routes say "not ready" (4xx) until a worker has the model loaded again, and then it answers."""
    paths = ("/v2/health/ready", "/v2/models/dlrm/ready")
    with TorchServeProcess(model_store, "dlrm=dlrm.mar", tmp_path / "torchserve") as server, requests.Session() as http:
        server.wait_ready()
        assert all(http.get(server.endpoints.inference + path, timeout=10).status_code == 200 for path in paths)
        for pid in server.worker_pids():
            os.kill(pid, signal.SIGKILL)
        for expected in (400, 200):  # not ready, then ready again
            deadline = time.monotonic() + 120
            while {http.get(server.endpoints.inference + path, timeout=10).status_code for path in paths} != {expected}:
                assert time.monotonic() < deadline, f"no {expected} from {paths}\n{server.log_tail()}"
                time.sleep(0.05)
            if expected == 400:
                assert http.get(f"{server.endpoints.inference}/ping", timeout=10).json()["status"] == "Healthy"
        with DLRMClient(server.endpoints.inference) as client:
            assert client.ready()
            assert (
                len(client.predict(np.zeros((1, 13), np.float32), np.ones((1, 26), np.int64), np.zeros(26, np.int64)))
                == 1
            )


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/v2/models/nonexistent", 404, "Model not found: nonexistent"),
        ("GET", "/v2/models/nonexistent/ready", 404, "Model not found: nonexistent"),
        ("GET", "/v2/models/dlrm/versions/9.9", 404, "Model version: 9.9 does not exist for model: dlrm"),
        ("GET", "/v2/models/dlrm/versions/9.9/ready", 404, "Model version: 9.9 does not exist for model: dlrm"),
        ("GET", "/v2/models/dlrm/stats", 404, "no such route"),
        ("POST", "/v2/models/dlrm", 405, "use GET"),
        ("DELETE", "/v2/models/dlrm/ready", 405, "use GET"),
        ("POST", "/v2/models/dlrm/versions/1.0/infer", 501, "/v2/models/dlrm/infer serves the default version"),
    ],
)
def test_model_routes_refuse_with_an_oip_error(server: TorchServeProcess, method, path, status, message) -> None:
    response = requests.request(method, server.endpoints.inference + path, timeout=10)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


# ---------------------------------------------------------------------------------------------- tritonclient


@pytest.fixture()
def triton(server: TorchServeProcess) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(url=f"{server.endpoints.host}:{server.endpoints.ports.inference}")
    yield client
    client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_infer(triton: triton_http.InferenceServerClient, served_model, binary: bool) -> None:
    assert triton.is_server_ready() and triton.is_server_live() and triton.is_model_ready("dlrm")
    metadata = triton.get_model_metadata("dlrm")
    assert [tensor["name"] for tensor in metadata["inputs"]] == ["dense_features", "sparse_lengths", "sparse_ids"]
    assert not triton.is_model_ready("nonexistent")
    rows = Rows(served_model, 9, seed=13)
    inputs = [
        triton_http.InferInput("dense_features", list(rows.dense.shape), "FP32"),
        triton_http.InferInput("sparse_lengths", list(rows.lengths.shape), "INT64"),
        triton_http.InferInput("sparse_ids", list(rows.ids.shape), "INT64"),
    ]
    for tensor, values in zip(inputs, (rows.dense, rows.lengths.astype(np.int64), rows.ids), strict=True):
        tensor.set_data_from_numpy(values, binary_data=binary)
    outputs = [triton_http.InferRequestedOutput(name, binary_data=binary) for name in ("score", "logit")]
    result = triton.infer("dlrm", inputs, outputs=outputs, request_id="triton-1")
    assert result.get_response()["id"] == "triton-1"
    for output in result.get_response()["outputs"]:
        assert ("parameters" in output) == binary and ("data" in output) != binary
    rows.assert_scored(result.as_numpy("logit"), result.as_numpy("score"))


def test_tritonclient_http_gets_the_error_message(triton: triton_http.InferenceServerClient) -> None:
    dense = np.zeros((2, 13), dtype=np.float32)
    tensor = triton_http.InferInput("dense_features", [2, 13], "FP32")
    tensor.set_data_from_numpy(dense, binary_data=True)
    with pytest.raises(InferenceServerException) as raised:
        triton.infer("dlrm", [tensor])
    assert raised.value.status() == "400"
    assert "sparse_lengths" in raised.value.message()  # the OIP body's "error", as Triton's client reads it


# ---------------------------------------------------------------------------------------------- gRPC


@pytest.fixture(scope="module")
def oip_grpc(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """TorchServe's own OIP service definition, compiled from its jar with grpc_tools.protoc.

    Its package is ``org.pytorch.serve.grpc.openinference``, not KServe's ``inference``
    (pytorch/serve#3394), so no prebuilt KServe or Triton stub can call it.
    """
    directory = tmp_path_factory.mktemp("oip_grpc")
    with zipfile.ZipFile(JAR) as jar:
        (directory / "open_inference_grpc.proto").write_bytes(jar.read(PROTO))
    arguments = ["protoc", f"-I{directory}", f"--python_out={directory}", f"--grpc_python_out={directory}"]
    assert protoc.main([*arguments, "open_inference_grpc.proto"]) == 0
    sys.path.insert(0, str(directory))  # the generated _grpc module imports its _pb2 module by plain name
    try:
        messages = importlib.import_module("open_inference_grpc_pb2")
        services = importlib.import_module("open_inference_grpc_pb2_grpc")
    finally:
        sys.path.remove(str(directory))
    return SimpleNamespace(messages=messages, services=services)


@pytest.fixture(scope="module")
def grpc_stub(server: TorchServeProcess, oip_grpc: SimpleNamespace) -> Iterator[Any]:
    channel = grpc.insecure_channel(f"{server.endpoints.host}:{server.endpoints.ports.grpc_inference}")
    yield oip_grpc.services.GRPCInferenceServiceStub(channel)
    channel.close()


def grpc_request(messages: ModuleType, request_id: str, **tensors: tuple[str, list[int], str, list]) -> Any:
    """A ``ModelInferRequest``: name=(datatype, shape, contents field, values) for each input."""
    request = messages.ModelInferRequest(model_name="dlrm", id=request_id)
    for name, (datatype, shape, field, values) in tensors.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        getattr(tensor.contents, field).extend(values)
    return request


def model_inputs_request(messages: ModuleType, rows: Rows, request_id: str, lengths_type: str = "INT64") -> Any:
    lengths_field = "int64_contents" if lengths_type == "INT64" else "int_contents"
    return grpc_request(
        messages,
        request_id,
        dense_features=("FP32", list(rows.dense.shape), "fp32_contents", rows.dense.ravel().tolist()),
        sparse_lengths=(lengths_type, list(rows.lengths.shape), lengths_field, rows.lengths.ravel().tolist()),
        sparse_ids=("INT64", list(rows.ids.shape), "int64_contents", rows.ids.tolist()),
    )


def grpc_error(response: Any) -> dict[str, Any]:
    """The JSON error body of an ``error`` BYTES output (one JSON object, encoded once)."""
    assert [output.name for output in response.outputs] == ["error"], response
    (element,) = response.outputs[0].contents.bytes_contents
    body = json.loads(element)
    assert isinstance(body, dict), body
    return body


def test_grpc_health(grpc_stub: Any, oip_grpc: SimpleNamespace) -> None:
    messages = oip_grpc.messages
    assert grpc_stub.ServerLive(messages.ServerLiveRequest(), timeout=10).live
    assert grpc_stub.ServerReady(messages.ServerReadyRequest(), timeout=10).ready
    assert grpc_stub.ModelReady(messages.ModelReadyRequest(name="dlrm"), timeout=10).ready


@pytest.mark.parametrize("lengths_type", ["INT64", "INT32"])
def test_grpc_model_infer_with_typed_contents(grpc_stub: Any, oip_grpc: SimpleNamespace, served_model, lengths_type):
    rows = Rows(served_model, 7, seed=17)
    response = grpc_stub.ModelInfer(model_inputs_request(oip_grpc.messages, rows, "grpc-1", lengths_type), timeout=30)
    outputs = {output.name: output for output in response.outputs}
    assert set(outputs) == {"score", "logit"}, response
    assert response.id == "grpc-1" and response.model_name == "dlrm"
    assert all(list(output.shape) == [7] and output.datatype == "FP32" for output in outputs.values())
    rows.assert_scored(outputs["logit"].contents.fp32_contents, outputs["score"].contents.fp32_contents)


def test_grpc_raw_rows_with_bytes_contents(grpc_stub: Any, oip_grpc: SimpleNamespace, predict) -> None:
    rows = [json.loads(SAMPLE_RAW.read_text()), raw_row(int_1=None, cat_3="")]
    expected = [p["logit"] for p in predict(json.dumps({"instances": rows}).encode()).json()["predictions"]]
    ints, cats = raw_tables(rows)
    request = grpc_request(
        oip_grpc.messages,
        "grpc-raw",
        int_features=("BYTES", [2, 13], "bytes_contents", [text.encode() for row in ints for text in row]),
        cat_features=("BYTES", [2, 26], "bytes_contents", [text.encode() for row in cats for text in row]),
    )
    response = grpc_stub.ModelInfer(request, timeout=30)
    outputs = {output.name: output for output in response.outputs}
    assert set(outputs) == {"score", "logit"}, response
    np.testing.assert_allclose(outputs["logit"].contents.fp32_contents, expected, rtol=0, atol=1e-6)


def test_grpc_malformed_request_gets_an_error_output(
    server: TorchServeProcess, grpc_stub: Any, oip_grpc: SimpleNamespace, served_model
) -> None:
    pids = server.worker_pids()
    rows = Rows(served_model, 5, seed=19)
    request = model_inputs_request(oip_grpc.messages, rows, "grpc-bad")
    request.inputs[0].shape[:] = [1, 65]  # the 65 dense values as one row of 65
    response = grpc_stub.ModelInfer(request, timeout=30)  # OK status: the error is an output
    error = grpc_error(response)
    assert (error["code"], error["type"], error["field"]) == (400, "wrong_shape", "dense_features")
    assert error["error"] == error["message"]
    # The worker survived and still answers.
    good = grpc_stub.ModelInfer(model_inputs_request(oip_grpc.messages, rows, "grpc-good"), timeout=30)
    assert {output.name for output in good.outputs} == {"score", "logit"}, good
    assert server.worker_pids() == pids


# ---------------------------------------------------------------------------------------------- REST errors


def _json_case(changes: Callable[[dict[str, Any]], None]) -> tuple[bytes, dict[str, str]]:
    dense, lengths, ids = random_inputs(preset(DEFAULT_PRESET), 2, np.random.default_rng(23))
    body = oip_json(dense, lengths, ids)
    changes(body)
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def _binary_case(
    change_arrays: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
    change_body: Callable[[bytes], bytes] | None = None,
) -> tuple[bytes, dict[str, str]]:
    dense, lengths, ids = random_inputs(preset(DEFAULT_PRESET), 2, np.random.default_rng(29))
    if change_arrays:
        change_arrays(dense, lengths, ids)
    body, headers = binary_body(dense, lengths, ids)
    return (change_body(body) if change_body else body), headers


def _input(body: dict[str, Any], name: str) -> dict[str, Any]:
    return next(tensor for tensor in body["inputs"] if tensor["name"] == name)


def _set_nan(dense: np.ndarray, lengths: np.ndarray, ids: np.ndarray) -> None:
    dense[1, 4] = np.nan


def _set_too_large_id(dense: np.ndarray, lengths: np.ndarray, ids: np.ndarray) -> None:
    ids[-1] = 35  # the last id is row 1's cat_25, whose table has 35 rows


def _too_many_rows() -> tuple[bytes, dict[str, str]]:
    dense, lengths, ids = random_inputs(preset(DEFAULT_PRESET), TEST_MAX_ROWS + 1, np.random.default_rng(31))
    return binary_body(dense, lengths, ids)


# (name, body and headers, status, type, field)
ERROR_CASES: list[tuple[str, Callable[[], tuple[bytes, dict[str, str]]], int, str, str]] = [
    (
        "unknown tensor",
        lambda: _json_case(lambda b: b["inputs"].append({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]})),
        400, "unknown_field", "x",
    ),
    ("missing tensor", lambda: _json_case(lambda b: b["inputs"].pop()), 400, "missing_field", "sparse_ids"),
    (
        "wrong datatype",
        lambda: _json_case(lambda b: _input(b, "dense_features").update(datatype="FP64")),
        400, "wrong_datatype", "dense_features",
    ),
    (
        "float ids",
        lambda: _json_case(lambda b: _input(b, "sparse_ids").update(datatype="FP32")),
        400, "wrong_datatype", "sparse_ids",
    ),
    (
        "shape not matching the rows",
        lambda: _json_case(lambda b: _input(b, "sparse_lengths").update(shape=[1, 52])),
        400, "wrong_shape", "sparse_lengths",
    ),
    (
        "data not matching the shape",
        lambda: _json_case(lambda b: _input(b, "dense_features").update(shape=[3, 13])),
        400, "wrong_count", "dense_features",
    ),
    (
        "dense beyond float32",
        lambda: _json_case(lambda b: _input(b, "dense_features")["data"].__setitem__(0, 1e39)),
        400, "non_finite", "dense_features",
    ),
    (
        "lengths not matching the ids",
        lambda: _json_case(lambda b: _input(b, "sparse_lengths")["data"].__setitem__(0, 2)),
        400, "length_mismatch", "sparse_ids",
    ),
    (
        "binary sizes do not add up",
        lambda: _binary_case(change_body=lambda body: body + b"\0" * 8),
        400, "invalid_binary", "binary_data_size",
    ),
    (
        "truncated binary body",
        lambda: _binary_case(change_body=lambda body: body[:-8]),
        400, "invalid_binary", "sparse_ids",
    ),
    ("binary NaN dense value", lambda: _binary_case(change_arrays=_set_nan), 400, "non_finite", "dense_features"),
    ("id out of range", lambda: _binary_case(change_arrays=_set_too_large_id), 400, "id_out_of_range", "sparse_ids"),
    ("too many rows", _too_many_rows, 413, "too_many_rows", "dense_features"),
    (
        "header length beyond the body",
        lambda: (_binary_case()[0], {HEADER_LENGTH: "99999", "Content-Type": "application/octet-stream"}),
        400, "invalid_binary", "Inference-Header-Content-Length",
    ),
]  # fmt: skip


def test_invalid_oip_requests_get_their_documented_4xx(server: TorchServeProcess) -> None:
    pids = server.worker_pids()
    session = requests.Session()
    failures = []
    for name, make, status, kind, field in ERROR_CASES:
        body, headers = make()
        response = session.post(infer_url(server), data=body, headers=headers, timeout=30)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        answer = response.json()
        got = (response.status_code, answer.get("type"), answer.get("field"))
        if got != (status, kind, field) or not answer.get("error") or answer.get("code") != status:
            failures.append((name, got, answer))
    assert not failures, failures
    # Still serving, by the same workers.
    dense, lengths, ids = random_inputs(preset(DEFAULT_PRESET), 1, np.random.default_rng(37))
    assert session.post(infer_url(server), json=oip_json(dense, lengths, ids), timeout=30).status_code == 200
    session.close()
    assert server.worker_pids() == pids


def test_oip_request_without_json_content_type_is_415(server: TorchServeProcess) -> None:
    """As ``/predictions``: a form-encoded body (curl ``--data`` without ``-H``) is refused with 415, not a 5xx."""
    response = requests.post(
        infer_url(server),
        data=SAMPLE_OIP.read_bytes(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=30,
    )
    assert response.status_code == 415, response.text
    assert response.json()["type"] == "empty_body"


# ---------------------------------------------------------------------------------------------- batching


def test_mixed_formats_batched_together_each_get_their_own_rows(server: TorchServeProcess, served_model) -> None:
    """OIP binary, OIP JSON, JSON instances and single JSON rows in the same batches, and one invalid request."""
    rows = Rows(served_model, 2 * 12 + 3, seed=41)
    row_slices = [slice(2 * i, 2 * i + 2) for i in range(12)] + [slice(24 + i, 25 + i) for i in range(3)]
    ends = np.concatenate([[0], np.cumsum(rows.lengths.sum(axis=1))])

    def part(rows_slice: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start, stop, _ = rows_slice.indices(len(rows.dense))
        return rows.dense[rows_slice], rows.lengths[rows_slice], rows.ids[ends[start] : ends[stop]]

    def oip_binary(rows_slice: slice) -> list[float]:
        body, headers = binary_body(*part(rows_slice))
        response = requests.post(infer_url(server), data=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == "application/octet-stream"
        return decode_response(response.content, response.headers)["logit"].tolist()

    def oip_json_request(rows_slice: slice) -> list[float]:
        response = requests.post(infer_url(server), json=oip_json(*part(rows_slice)), timeout=60)
        return worker_answer(response)["logit"]

    def instances(rows_slice: slice) -> list[float]:
        response = requests.post(
            f"{server.endpoints.inference}/predictions/dlrm", json={"instances": rows.json_rows[rows_slice]}, timeout=60
        )
        assert response.status_code == 200, response.text
        return [p["logit"] for p in response.json()["predictions"]]

    def single_row(rows_slice: slice) -> list[float]:
        (row,) = rows.json_rows[rows_slice]
        response = requests.post(f"{server.endpoints.inference}/predictions/dlrm", json=row, timeout=60)
        assert response.status_code == 200, response.text
        return [response.json()["logit"]]

    senders = [oip_binary, oip_json_request, instances] * 4 + [single_row] * 3
    bad_body, bad_headers = _binary_case(change_arrays=_set_too_large_id)

    def send(index: int) -> Any:
        if index == len(senders):
            return requests.post(infer_url(server), data=bad_body, headers=bad_headers, timeout=60)
        return senders[index](row_slices[index])

    batches_before = prometheus_counter(server, "DLRMBatches")
    requests_before = prometheus_counter(server, "DLRMRequests")
    with ThreadPoolExecutor(max_workers=len(senders) + 1) as pool:
        answers = list(pool.map(send, range(len(senders) + 1)))
    for index, rows_slice in enumerate(row_slices):
        np.testing.assert_allclose(answers[index], rows.logits[rows_slice], rtol=0, atol=TOLERANCE, err_msg=str(index))
    bad = answers[-1]
    assert bad.status_code == 400 and bad.json()["type"] == "id_out_of_range", bad.text
    handled = prometheus_counter(server, "DLRMRequests") - requests_before
    batches = prometheus_counter(server, "DLRMBatches") - batches_before
    assert handled == len(senders) + 1
    assert batches < handled / 2, f"expected dynamic batching, got {batches} batches for {handled} requests"


# ---------------------------------------------------------------------------------------------- sample_data


def test_sample_oip_request_decodes_for_the_default_model_and_is_served(predict, server, served_model) -> None:
    config: DLRMConfig = preset(DEFAULT_PRESET)
    codec = OipCodec(config, Preprocessing(), RowValidator(config, max_rows=TEST_MAX_ROWS), "dlrm", "1.0")
    request = codec.decode(SAMPLE_OIP.read_bytes())
    assert request.num_rows == 2
    assert (request.rows.lengths == 0).any() and (request.rows.lengths > 1).any()
    # The same rows as sample_instances.json's, in the other format.
    instances = RequestDecoder(config, Preprocessing()).decode(SAMPLE_INSTANCES.read_bytes())
    np.testing.assert_array_equal(request.rows.values, instances.rows.values)
    np.testing.assert_array_equal(request.rows.dense, instances.rows.dense)
    response = requests.post(
        infer_url(server), data=SAMPLE_OIP.read_bytes(), headers={"Content-Type": "application/json"}, timeout=30
    )
    answer = worker_answer(response)
    assert response.json()["id"] == json.loads(SAMPLE_OIP.read_text())["id"]
    model, artifact = served_model
    rows = list(request_rows(request.rows.dense, request.rows.lengths, request.rows.values))
    np.testing.assert_allclose(answer["logit"], offline_logits(model, artifact.model, rows), rtol=0, atol=TOLERANCE)


def test_sample_oip_ranking_scores_as_its_expanded_rows(server) -> None:
    """sample_oip_ranking.json: sample_oip.json's two rows with the first row's 13 first sparse features as
    context (compact candidate lengths); its first candidate is sample_oip.json's first row."""

    def post(body: bytes) -> dict[str, Any]:
        return worker_answer(
            requests.post(infer_url(server), data=body, headers={"Content-Type": "application/json"}, timeout=30)
        )

    ranked = post(SAMPLE_OIP_RANKING.read_bytes())
    tensors = {tensor["name"]: tensor for tensor in json.loads(SAMPLE_OIP_RANKING.read_text())["inputs"]}
    assert tensors["sparse_lengths"]["shape"] == [2, 13]
    context_ids = tensors["context_sparse_ids"]["data"]
    own = np.asarray(tensors["sparse_lengths"]["data"])
    ids = np.asarray(tensors["sparse_ids"]["data"])
    per_row = np.split(ids, [own[0].sum()])
    expanded = model_input_tensors(
        tensors["dense_features"]["data"],
        np.hstack([np.ones((2, 13), dtype=np.int64), own]),
        np.concatenate([np.concatenate([context_ids, row_ids]) for row_ids in per_row]),
    )
    plain = post(encode_request(expanded, binary=False)[0])
    np.testing.assert_allclose(ranked["logit"], plain["logit"], rtol=0, atol=TOLERANCE)
    original = post(SAMPLE_OIP.read_bytes())
    np.testing.assert_allclose(ranked["logit"][0], original["logit"][0], rtol=0, atol=TOLERANCE)
