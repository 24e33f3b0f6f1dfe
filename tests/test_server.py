"""End to end: build_mar.py's archive served by a real TorchServe on loopback ports, queried over HTTP."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from handler.json_rows import RequestDecoder
from servers.torchserve import REPO_ROOT, TorchServeProcess
from tests.archives import TEST_MAX_ROWS
from tests.bad_requests import bad_columnar_requests, bad_raw_requests, bad_requests, raw_row, row
from tests.rows import offline_logits, random_row

SAMPLE = REPO_ROOT / "sample_data" / "sample_data.json"


def expected_logit(served_model, rows) -> list[float]:
    model, artifact = served_model
    return offline_logits(model, artifact.model, rows).tolist()


def prometheus_counter(server: TorchServeProcess, name: str) -> float:
    text = requests.get(f"{server.endpoints.metrics}/metrics", timeout=10).text
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)]
    return sum(values)


def test_sample_data_gets_a_click_probability(predict, served_model) -> None:
    response = predict(SAMPLE.read_bytes())
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"score", "logit"}
    assert 0.0 <= body["score"] <= 1.0
    assert body["score"] == pytest.approx(1 / (1 + np.exp(-body["logit"])), abs=1e-6)
    assert body["logit"] == pytest.approx(expected_logit(served_model, [json.loads(SAMPLE.read_text())])[0], abs=1e-5)


def test_multi_hot_and_empty_features(predict, served_model) -> None:
    lengths = [0, 3, 1, 0, 2] + [1] * 21
    values = [4, 5, 6, 7, 8, 9] + [1] * 21
    body = row(**{"id_list_features.lengths": lengths, "id_list_features.values": values})
    response = predict(json.dumps(body).encode())
    assert response.status_code == 200, response.text
    assert response.json()["logit"] == pytest.approx(expected_logit(served_model, [body])[0], abs=1e-5)
    all_empty = row(**{"id_list_features.lengths": [0] * 26, "id_list_features.values": []})
    response = predict(json.dumps(all_empty).encode())
    assert response.status_code == 200, response.text
    assert response.json()["logit"] == pytest.approx(expected_logit(served_model, [all_empty])[0], abs=1e-5)


def test_instances_come_back_in_order(predict, served_model) -> None:
    _, artifact = served_model
    rng = np.random.default_rng(42)
    rows = [random_row(artifact.model, rng) for _ in range(TEST_MAX_ROWS)]
    response = predict(json.dumps({"instances": rows}).encode())
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["logit"] for p in predictions] == pytest.approx(expected_logit(served_model, rows), abs=1e-5)


def test_raw_rows_are_scored_like_their_preprocessed_form(predict, served_model) -> None:
    """A raw row and the reference row holding its preprocessed values get the same score."""
    _, artifact = served_model
    raw = raw_row(int_1=None, cat_3="")
    decoded = RequestDecoder(artifact.model, artifact.preprocessing).decode(raw)
    reference = row(
        float_features=decoded.rows.dense[0].tolist(),
        **{"id_list_features.lengths": [1] * 26, "id_list_features.values": decoded.rows.values.tolist()},
    )
    raw_response = predict(json.dumps({"instances": [raw, raw_row()]}).encode())
    assert raw_response.status_code == 200, raw_response.text
    first = raw_response.json()["predictions"][0]["logit"]
    # The same values in a batch of 2 rows and of 1: the MLPs' GEMM kernels may round differently (~1e-8).
    assert first == pytest.approx(predict(json.dumps(reference).encode()).json()["logit"], abs=1e-6)
    assert first == pytest.approx(expected_logit(served_model, [reference])[0], abs=1e-5)


def test_concurrent_requests_are_batched_and_each_gets_its_own_score(server, served_model) -> None:
    _, artifact = served_model
    rng = np.random.default_rng(7)
    rows = [random_row(artifact.model, rng) for _ in range(48)]
    batches_before = prometheus_counter(server, "DLRMBatches")
    requests_before = prometheus_counter(server, "DLRMRequests")

    def post(row_body: dict) -> float:
        response = requests.post(f"{server.endpoints.inference}/predictions/dlrm", json=row_body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["logit"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        logits = list(pool.map(post, rows))
    assert logits == pytest.approx(expected_logit(served_model, rows), abs=1e-5)
    batches = prometheus_counter(server, "DLRMBatches") - batches_before
    handled = prometheus_counter(server, "DLRMRequests") - requests_before
    assert handled == 48
    assert batches < handled / 2, f"expected dynamic batching, got {batches} batches for {handled} requests"


CASES = bad_requests(TEST_MAX_ROWS) + bad_raw_requests() + bad_columnar_requests(TEST_MAX_ROWS)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input_gets_a_4xx_json_error(predict, case) -> None:
    response = predict(case.body)
    assert response.status_code == case.status, response.text
    body = response.json()
    assert body["type"] == case.kind
    assert body.get("field") == case.field
    assert body.get("row") == case.row


def test_workers_survive_bad_input(server, predict) -> None:
    pids = server.worker_pids()
    for case in CASES:
        assert 400 <= predict(case.body).status_code < 500
    assert predict(SAMPLE.read_bytes()).status_code == 200
    assert server.worker_pids() == pids


def test_bad_requests_batched_with_good_ones_do_not_spoil_them(server, served_model) -> None:
    _, artifact = served_model
    rng = np.random.default_rng(9)
    good = [json.dumps(random_row(artifact.model, rng)).encode() for _ in range(16)]
    bodies = [body for pair in zip(good, CASES, strict=False) for body in (pair[0], pair[1].body)]

    def post(body: bytes) -> requests.Response:
        return requests.post(
            f"{server.endpoints.inference}/predictions/dlrm",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )

    batches_before = prometheus_counter(server, "DLRMBatches")
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(post, bodies))
    assert prometheus_counter(server, "DLRMBatches") - batches_before < len(bodies) / 2
    good_logits = [r.json()["logit"] for r in responses[0::2]]
    assert all(r.status_code == 200 for r in responses[0::2])
    assert good_logits == pytest.approx(expected_logit(served_model, [json.loads(b) for b in good]), abs=1e-5)
    assert [r.status_code for r in responses[1::2]] == [case.status for case in CASES[:16]]


def test_form_encoded_body_is_415(predict) -> None:
    response = predict(SAMPLE.read_bytes(), content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert response.json()["type"] == "empty_body"


def test_json_bodies_reach_the_handler_as_sent(server, predict) -> None:
    """config.properties' ``decode_input_request=false``: the worker passes bodies on as bytes and the
    predictor parses each once, by the JSON specification. With the worker's own parse, ``null`` arrived as
    no body (415), a NaN token as a float (the standard json module accepts it), and every invalid body
    logged a traceback."""
    null = predict(b"null")
    assert (null.status_code, null.json()["type"]) == (400, "invalid_body")
    nan = json.loads(SAMPLE.read_text())
    nan_body = json.dumps(nan).replace(str(nan["float_features"][0]), "NaN", 1).encode()
    assert b"NaN" in nan_body
    assert predict(nan_body).json()["type"] == "invalid_json"
    assert predict(b'{"instances": [').json()["type"] == "invalid_json"
    assert "Failed json decoding" not in (Path(server.log_dir) / "model_log.log").read_text()


def test_body_over_max_request_size_is_413(predict) -> None:
    response = predict(b'{"instances": [' + b" " * (5 * 2**20) + b"]}")
    assert response.status_code == 413


def test_model_description_says_the_weights_are_untrained(server) -> None:
    description = requests.get(f"{server.endpoints.management}/models/dlrm?customized=true", timeout=30).json()[0]
    metadata = description["customizedMetadata"]
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    assert metadata["provenance"]["trained"] is False
    assert metadata["weights"].startswith("UNTRAINED")
    assert metadata["device"] == "cpu"
    assert description["batchSize"] == 16


def test_worker_log_warns_about_untrained_weights(server) -> None:
    log = (Path(server.log_dir) / "model_log.log").read_text()
    assert "UNTRAINED: deterministic random weights (seed 3)" in log
