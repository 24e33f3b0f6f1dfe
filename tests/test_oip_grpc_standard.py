"""End to end: the Open Inference Protocol's standard gRPC service, and the readiness and metadata it shares with REST.

Standard clients call ``inference.GRPCInferenceService`` (KServe's and Triton's
package), which TorchServe 0.12 does not serve: the frontend agent adds it
(``frontend_agent/``, docs/torchserve-internals.md). Every client here is a real
one: Triton's ``tritonclient.grpc``, which sends and reads raw tensor contents,
and the standard service's generated stub that ships with it, for typed contents
and for hand-made requests.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from model_factory.config import DEFAULT_PRESET, preset
from servers.torchserve import TorchServeProcess
from tests.archives import TEST_MAX_ROWS
from tests.bad_requests import raw_row
from tests.test_oip_served import SAMPLE_RAW, TOLERANCE, Rows, oip_json, raw_tables
from training.synthetic import random_inputs

TORCHSERVE_SERVICE = "org.pytorch.serve.grpc.openinference.GRPCInferenceService"
METADATA_FILE = "oip-metadata.json"


def grpc_address(server: TorchServeProcess) -> str:
    return f"{server.endpoints.host}:{server.endpoints.ports.grpc_inference}"


@pytest.fixture(scope="module")
def triton(server: TorchServeProcess) -> Iterator[triton_grpc.InferenceServerClient]:
    with triton_grpc.InferenceServerClient(grpc_address(server)) as client:
        yield client


@pytest.fixture(scope="module")
def channel(server: TorchServeProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_address(server)) as opened:
        yield opened


def triton_inputs(**tensors: tuple[str, np.ndarray]) -> list[triton_grpc.InferInput]:
    """name=(datatype, array) as tritonclient's inputs (their elements go in raw_input_contents)."""
    inputs = []
    for name, (datatype, array) in tensors.items():
        tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def model_inputs(rows: Rows, lengths_type: str = "INT64") -> list[triton_grpc.InferInput]:
    lengths = rows.lengths.astype(np.int64 if lengths_type == "INT64" else np.int32)
    return triton_inputs(
        dense_features=("FP32", rows.dense.astype(np.float32)),
        sparse_lengths=(lengths_type, lengths),
        sparse_ids=("INT64", rows.ids.astype(np.int64)),
    )


def http_answer(server: TorchServeProcess, rows: Rows) -> dict[str, list[float]]:
    """The same rows' score and logit from the REST route (OIP JSON)."""
    body = oip_json(rows.dense, rows.lengths, rows.ids)
    response = requests.post(f"{server.endpoints.inference}/v2/models/dlrm/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return {output["name"]: output["data"] for output in response.json()["outputs"]}


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a call that must fail."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


# ---------------------------------------------------------------------------------------------- health, metadata


def test_standard_service_answers_health_and_metadata(server: TorchServeProcess, triton, served_model) -> None:
    _, artifact = served_model
    # The agent's byte-level patches found what they patch (docs/torchserve-internals.md).
    assert "dlrm frontend agent:" not in (server.workdir / "torchserve.out").read_text()
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("dlrm")
    assert triton.is_model_ready("dlrm", model_version="1.0")
    metadata = triton.get_server_metadata()
    assert metadata.name == "Torchserve" and "binary_tensor_data" in metadata.extensions
    model = triton.get_model_metadata("dlrm")
    tensors = {
        "inputs": [(tensor.name, tensor.datatype, list(tensor.shape)) for tensor in model.inputs],
        "outputs": [(tensor.name, tensor.datatype, list(tensor.shape)) for tensor in model.outputs],
    }
    assert (model.name, list(model.versions), model.platform) == ("dlrm", ["1.0"], "pytorch_torchrec")
    assert tensors == {
        "inputs": [
            ("dense_features", "FP32", [-1, artifact.model.num_dense_features]),
            ("sparse_lengths", "INT64", [-1, artifact.model.num_sparse_features]),
            ("sparse_ids", "INT64", [-1]),
        ],
        "outputs": [("score", "FP32", [-1]), ("logit", "FP32", [-1])],
    }
    rest = requests.get(f"{server.endpoints.inference}/v2/models/dlrm", timeout=10).json()
    assert tensors == {key: [(t["name"], t["datatype"], t["shape"]) for t in rest[key]] for key in tensors}
    for call in (lambda: triton.get_model_metadata("nonexistent"), lambda: triton.is_model_ready("nonexistent")):
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == "StatusCode.NOT_FOUND" and "nonexistent" in raised.value.message()
    with pytest.raises(InferenceServerException) as raised:
        triton.is_model_ready("dlrm", model_version="9.9")
    assert raised.value.status() == "StatusCode.NOT_FOUND"


# ---------------------------------------------------------------------------------------------- ModelInfer


@pytest.mark.parametrize("lengths_type", ["INT64", "INT32"])
def test_tritonclient_scores_as_the_http_route(server: TorchServeProcess, triton, served_model, lengths_type) -> None:
    rows = Rows(served_model, 9, seed=43)
    result = triton.infer("dlrm", model_inputs(rows, lengths_type), request_id="standard-1")
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("standard-1", "dlrm", "1.0")
    assert [(output.name, output.datatype, list(output.shape)) for output in response.outputs] == [
        ("score", "FP32", [9]),
        ("logit", "FP32", [9]),
    ]
    score, logit = result.as_numpy("score"), result.as_numpy("logit")
    assert score.dtype == logit.dtype == np.float32
    rows.assert_scored(logit, score)
    http = http_answer(server, rows)
    np.testing.assert_allclose(score, http["score"], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(logit, http["logit"], rtol=0, atol=TOLERANCE)


def test_tritonclient_raw_rows_as_bytes(triton, predict) -> None:
    rows = [json.loads(SAMPLE_RAW.read_text()), raw_row(int_1=None, cat_3=""), {}]
    expected = predict(json.dumps({"instances": rows}).encode())
    assert expected.status_code == 200, expected.text
    ints, cats = raw_tables(rows)
    result = triton.infer(
        "dlrm",
        triton_inputs(
            int_features=("BYTES", np.array([[text.encode() for text in row] for row in ints], dtype=np.object_)),
            cat_features=("BYTES", np.array([[text.encode() for text in row] for row in cats], dtype=np.object_)),
        ),
    )
    expected_logits = [prediction["logit"] for prediction in expected.json()["predictions"]]
    np.testing.assert_allclose(result.as_numpy("logit"), expected_logits, rtol=0, atol=1e-6)


def test_typed_contents_are_served_and_torchserves_own_service_still_answers(channel, served_model) -> None:
    """A request with typed contents (KServe's client can send either) over the standard service, answered in raw
    contents; the same request over TorchServe's own service on the same port, answered in typed contents."""
    rows = Rows(served_model, 4, seed=47)
    request = service_pb2.ModelInferRequest(model_name="dlrm", id="typed")
    request.inputs.add(name="dense_features", datatype="FP32", shape=rows.dense.shape)
    request.inputs[-1].contents.fp32_contents.extend(rows.dense.ravel().tolist())
    request.inputs.add(name="sparse_lengths", datatype="INT64", shape=rows.lengths.shape)
    request.inputs[-1].contents.int64_contents.extend(rows.lengths.ravel().tolist())
    request.inputs.add(name="sparse_ids", datatype="INT64", shape=rows.ids.shape)
    request.inputs[-1].contents.int64_contents.extend(rows.ids.tolist())

    standard = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    raw = dict(zip((output.name for output in standard.outputs), standard.raw_output_contents, strict=True))
    rows.assert_scored(np.frombuffer(raw["logit"], "<f4"), np.frombuffer(raw["score"], "<f4"))

    torchserves = channel.unary_unary(
        f"/{TORCHSERVE_SERVICE}/ModelInfer",
        request_serializer=service_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=service_pb2.ModelInferResponse.FromString,
    )(request, timeout=30)
    typed = {output.name: output.contents.fp32_contents for output in torchserves.outputs}
    assert not torchserves.raw_output_contents
    rows.assert_scored(typed["logit"], typed["score"])


# ---------------------------------------------------------------------------------------------- errors


def _raw_request(change: Callable[[Any], object] | None = None) -> Any:
    """A valid request in raw contents, as tritonclient sends it, with ``change`` applied to it."""
    dense, lengths, ids = random_inputs(preset(DEFAULT_PRESET), 2, np.random.default_rng(53))
    request = service_pb2.ModelInferRequest(model_name="dlrm")
    for name, datatype, values in (
        ("dense_features", "FP32", dense.astype("<f4")),
        ("sparse_lengths", "INT64", lengths.astype("<i8")),
        ("sparse_ids", "INT64", ids.astype("<i8")),
    ):
        request.inputs.add(name=name, datatype=datatype, shape=values.shape)
        request.raw_input_contents.append(values.tobytes())
    if change:
        change(request)
    return request


def _truncated_bytes() -> Any:
    request = service_pb2.ModelInferRequest(model_name="dlrm", raw_input_contents=[b"\x05\x00\x00\x00abc"])
    request.inputs.add(name="int_features", datatype="BYTES", shape=[1, 13])
    return request


def _set_raw(index: int, values: np.ndarray) -> Callable[[Any], None]:
    return lambda request: request.raw_input_contents.__setitem__(index, values.tobytes())


# The agent's own refusals: (name, request, status, what the message says).
AGENT_REFUSALS: list[tuple[str, Callable[[], Any], grpc.StatusCode, str]] = [
    (
        "raw contents shorter than the shape",
        lambda: _raw_request(lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0][:-4])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input dense_features has 100 bytes of raw contents; its shape holds 26 elements of 4 bytes",
    ),
    (
        "a raw tensor missing",
        lambda: _raw_request(lambda r: r.raw_input_contents.pop()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents holds 2 tensors for 3 inputs",
    ),
    (
        "raw and typed contents together",
        lambda: _raw_request(lambda r: r.inputs[2].contents.int64_contents.append(1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input sparse_ids has both contents and raw_input_contents",
    ),
    (
        "truncated raw BYTES", _truncated_bytes, grpc.StatusCode.INVALID_ARGUMENT,
        "raw BYTES contents end inside element 0 of 13",
    ),
    (
        "FP16 raw contents",
        lambda: _raw_request(lambda r: setattr(r.inputs[0], "datatype", "FP16")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "datatype FP16 is not served in raw contents",
    ),
    (
        "no such model", lambda: _raw_request(lambda r: setattr(r, "model_name", "nonexistent")),
        grpc.StatusCode.NOT_FOUND, "Model not found: nonexistent",
    ),
    (
        "no model name", lambda: _raw_request(lambda r: setattr(r, "model_name", "")),
        grpc.StatusCode.INVALID_ARGUMENT, "the model name is required",
    ),
]  # fmt: skip

# The handler's refusals: (name, request, error type, field), its JSON error body as the INVALID_ARGUMENT message.
HANDLER_REFUSALS: list[tuple[str, Callable[[], Any], str, str]] = [
    (
        "wrong shape", lambda: _raw_request(lambda r: r.inputs[0].shape.__setitem__(slice(None), [1, 26])),
        "wrong_shape", "dense_features",
    ),
    (
        "id out of range",  # the last id is row 1's cat_25, whose table has 35 rows
        lambda: _raw_request(_set_raw(2, np.concatenate([np.zeros(51, "<i8"), [35]]).astype("<i8"))),
        "id_out_of_range", "sparse_ids",
    ),
    (
        "negative length", lambda: _raw_request(_set_raw(1, np.full(52, -1, "<i8"))),
        "negative_length", "sparse_lengths",
    ),
]  # fmt: skip


def test_invalid_requests_fail_with_a_status(server: TorchServeProcess, triton, channel) -> None:
    """Unlike TorchServe's own service (an OK answer with an ``error`` output), a refused request fails the call:
    the agent's own checks of raw contents, and the handler's checks with its JSON error body as the message."""
    pids = server.worker_pids()
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    failures = []
    for name, make, status, message in AGENT_REFUSALS:
        code, details = refusal(lambda: stub.ModelInfer(make(), timeout=30))  # noqa: B023 (called at once)
        if code != status or message not in details:
            failures.append((name, code, details))
    for name, make, kind, field in HANDLER_REFUSALS:
        code, details = refusal(lambda: stub.ModelInfer(make(), timeout=30))  # noqa: B023 (called at once)
        body = json.loads(details)
        expected = (grpc.StatusCode.INVALID_ARGUMENT, 400, kind, field, body["message"])
        if (code, body["code"], body["type"], body.get("field"), body["error"]) != expected:
            failures.append((name, code, body))
    assert not failures, failures
    dense, lengths, ids = random_inputs(preset(DEFAULT_PRESET), TEST_MAX_ROWS + 1, np.random.default_rng(59))
    too_many = triton_inputs(
        dense_features=("FP32", dense), sparse_lengths=("INT64", lengths), sparse_ids=("INT64", ids)
    )
    with pytest.raises(InferenceServerException) as raised:
        triton.infer("dlrm", too_many)
    assert raised.value.status() == "StatusCode.RESOURCE_EXHAUSTED", raised.value
    assert json.loads(raised.value.message())["type"] == "too_many_rows"
    # Still served, by the same workers.
    assert stub.ModelInfer(_raw_request(), timeout=30).raw_output_contents
    assert server.worker_pids() == pids


# ---------------------------------------------------------------------------------------------- other servers


def wait_live(server: TorchServeProcess, timeout: float = 120.0) -> None:
    """Until the inference API answers over REST and gRPC (a server whose models are not loaded, or none)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{server.endpoints.inference}/v2/health/live", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)
    with grpc.insecure_channel(grpc_address(server)) as opened:
        grpc.channel_ready_future(opened).result(timeout=max(deadline - time.monotonic(), 1))


def test_not_ready_without_a_model(tmp_path: Path) -> None:
    """The start-up archive failed to load: nothing is registered, so nothing can be served, so not ready."""
    store = tmp_path / "store"
    store.mkdir()
    with TorchServeProcess(store, "dlrm=missing.mar", tmp_path / "torchserve") as server:
        wait_live(server)
        response = requests.get(f"{server.endpoints.inference}/v2/health/ready", timeout=10)
        assert (response.status_code, response.json()) == (400, {"ready": False})
        with triton_grpc.InferenceServerClient(grpc_address(server)) as client:
            assert client.is_server_live() and not client.is_server_ready()


def test_models_without_readable_tensor_metadata(tmp_path: Path, model_store: Path) -> None:
    """A co-hosted archive without oip-metadata.json has metadata with no tensors (as KServe's server answers for a
    model that declares none), not an error; one with a broken file is a 500 that names no filesystem path."""
    store = tmp_path / "store"
    store.mkdir()
    with zipfile.ZipFile(model_store / "dlrm.mar") as original:
        for name, metadata in (("legacy", None), ("broken", b"{not json")):
            with zipfile.ZipFile(store / f"{name}.mar", "w") as archive:
                for entry in original.infolist():
                    if entry.filename != METADATA_FILE:
                        archive.writestr(entry.filename, original.read(entry), entry.compress_type)
                if metadata is not None:
                    archive.writestr(METADATA_FILE, metadata)
        assert METADATA_FILE in original.namelist()
    with TorchServeProcess(store, "legacy=legacy.mar broken=broken.mar", tmp_path / "torchserve") as server:
        server.wait_ready("legacy")
        server.wait_ready("broken")
        response = requests.get(f"{server.endpoints.inference}/v2/models/legacy", timeout=10)
        expected = {"name": "legacy", "versions": ["1.0"], "platform": "", "inputs": [], "outputs": []}
        assert (response.status_code, response.json()) == (200, expected)
        broken = requests.get(f"{server.endpoints.inference}/v2/models/broken", timeout=10)
        assert broken.status_code == 500 and METADATA_FILE in broken.json()["error"]
        assert "/" not in broken.json()["error"], broken.text
        with triton_grpc.InferenceServerClient(grpc_address(server)) as client:
            legacy = client.get_model_metadata("legacy")
            assert (legacy.name, list(legacy.versions), legacy.platform) == ("legacy", ["1.0"], "")
            assert not legacy.inputs and not legacy.outputs
            with pytest.raises(InferenceServerException) as raised:
                client.get_model_metadata("broken")
            assert raised.value.status() == "StatusCode.INTERNAL" and "/" not in raised.value.message()
