"""No request can hurt another, in-process: whatever one request of a batch holds, or whatever fails while
it is handled, every other request gets its own answer, and every refused request costs little.

The served counterparts (real TorchServe, concurrent clients, memory of a worker) are in
tests/test_hostile_traffic.py.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import orjson
import pytest
import torch

from handler.predictor import DLRMPredictor, Request
from handler.rows import JSON_CONTAINER_SLACK, JSON_CONTAINERS_PER_ROW
from model_factory.config import DLRMConfig
from tests.rows import offline_logits, random_row
from tests.test_oip import OIP_ROUTE, binary_request, infer, one_row, payload, raw_inputs, tensor

MAX_ROWS = 8
T = TypeVar("T")


@pytest.fixture(scope="module")
def predictor(artifact_dir) -> DLRMPredictor:
    return DLRMPredictor.from_artifact(artifact_dir, torch.device("cpu"), max_rows=MAX_ROWS)


def good_rows(config: DLRMConfig, count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [random_row(config, rng) for _ in range(count)]


def assert_scored(predictor: DLRMPredictor, config: DLRMConfig, rows: list[dict[str, Any]], responses: list) -> None:
    expected = offline_logits(predictor.model, config, rows)
    assert [r.status for r in responses] == [200] * len(rows)
    assert [orjson.loads(r.body)["logit"] for r in responses] == pytest.approx(expected.tolist(), abs=1e-5)


def refused_with_peak_memory(call: Callable[[], T]) -> tuple[T, int]:
    """``call()``'s result and the most memory Python allocated while it ran (deterministic, unlike a clock):
    a refusal that parses or reads the body allocates tens of MiB."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def reference_ranking_with_empty_compact_lengths(config: DLRMConfig) -> dict[str, Any]:
    """A reference-format ranking whose context has ids of all 26 features: a candidate's compact lengths are
    then ``[]``. With a malformed second candidate, the row-by-row check ran ``min([])`` (a ValueError that
    left the handler and failed the whole batch with TorchServe's 503)."""
    context = {
        "id_list_features.lengths": [1] * config.num_sparse_features,
        "id_list_features.values": [0] * config.num_sparse_features,
    }
    candidate = {"float_features": [0.5] * config.num_dense_features, "id_list_features.lengths": []}
    return {
        "context": context,
        "instances": [candidate | {"id_list_features.values": []}, candidate | {"id_list_features.values": "x"}],
    }


def test_an_empty_compact_candidate_is_checked_like_any_other(predictor: DLRMPredictor, small_config) -> None:
    body = reference_ranking_with_empty_compact_lengths(small_config)
    rows = good_rows(small_config, 2)
    result = predictor.predict_bodies([json.dumps(rows[0]), json.dumps(body), json.dumps(rows[1])])
    assert_scored(predictor, small_config, rows, [result.responses[0], result.responses[2]])
    error = orjson.loads(result.responses[1].body)
    assert (result.responses[1].status, error["type"], error["row"]) == (400, "wrong_type", 1)
    valid = {**body, "instances": body["instances"][:1]}
    (alone,) = predictor.predict_bodies([json.dumps(valid)]).responses
    assert alone.status == 200, alone.body


def test_a_bug_in_one_request_s_decode_fails_only_that_request(
    predictor: DLRMPredictor, small_config, monkeypatch
) -> None:
    """The guard is structural: any exception while decoding one request (here one injected into the raw-row
    decoder, which one body of the batch reaches) is that request's 500; the others are scored."""

    def broken(*args: Any) -> Any:
        raise RuntimeError("an injected bug")

    monkeypatch.setattr(predictor.decoder, "_decode_raw_rows", broken)
    rows = good_rows(small_config, 3)
    raw = {f"int_{i}": 1 for i in range(13)} | {f"cat_{i}": "05db9164" for i in range(26)}
    bodies = [json.dumps(rows[0]), json.dumps(raw), json.dumps(rows[1]), json.dumps({"instances": rows[2:]})]
    responses = predictor.predict_bodies(bodies).responses
    assert responses[1].status == 500
    assert orjson.loads(responses[1].body)["type"] == "internal_error"
    assert_scored(predictor, small_config, rows[:2], [responses[0], responses[2]])
    assert orjson.loads(responses[3].body)["predictions"][0]["logit"] == pytest.approx(
        offline_logits(predictor.model, small_config, rows[2:])[0], abs=1e-5
    )


def test_a_forward_that_fails_for_one_request_fails_only_that_request(
    predictor: DLRMPredictor, small_config, monkeypatch
) -> None:
    """Should the batch's forward pass fail, each request runs alone: only the one that fails gets a 500."""
    forward = predictor.forward
    poisoned = 0.25  # the first dense value of the request the injected bug fails on

    def failing_forward(parts, contexts=None):
        if any(part.dense[0, 0] == poisoned for part in parts):
            raise RuntimeError("an injected bug")
        return forward(parts, contexts)

    monkeypatch.setattr(predictor, "forward", failing_forward)
    rows = good_rows(small_config, 3, seed=1)
    bad = {**rows[0], "float_features": [poisoned] * small_config.num_dense_features}
    bodies = [json.dumps(rows[0]), json.dumps(bad), json.dumps(rows[1]), payload(one_row())]
    responses = predictor.predict_bodies(bodies).responses
    assert [r.status for r in responses] == [200, 500, 200, 200]
    assert_scored(predictor, small_config, rows[:2], [responses[0], responses[2]])


def test_the_describe_header_of_an_inference_request_is_not_a_describe_request() -> None:
    """TorchServe copies every client header into an inference request, and marks every REST inference
    request with ``explain``; its own describe request (management API) has no such mark."""
    client = {"describe": "True", "explain": "False", "url_path": "", "content-type": "application/json"}
    assert not Request(b"{}", client).is_describe
    assert not Request(b"{}", {"describe": "True", **OIP_ROUTE}).is_describe
    assert not Request(b"{}", {}, grpc=True).is_describe
    assert Request(None, {"describe": "True"}).is_describe


def test_a_json_body_of_more_arrays_than_rows_is_refused_unparsed(predictor: DLRMPredictor) -> None:
    """4 MiB of ``[[], [], ...]`` parses into ~100 MiB of Python objects in a third of a second: refused
    before that, by counting brackets, with a 413 that says why."""
    body = b'{"instances": [' + b"[]," * (4 * 2**20 // 3 - 10) + b"[]]}"
    (response,), peak = refused_with_peak_memory(lambda: predictor.predict_bodies([body]).responses)
    error = orjson.loads(response.body)
    assert (response.status, error["type"]) == (413, "too_many_rows")
    assert "arrays and objects" in error["message"]
    assert peak < 2**20, f"refusing allocated {peak / 2**20:.1f} MiB: the body was parsed"
    oip_body = payload([tensor("dense_features", "FP32", [1, 13], [[0.5]] * 13)] * 3 + [{}] * 10_000)
    oip_response = infer(predictor, oip_body)
    assert (oip_response.status, orjson.loads(oip_response.body)["type"]) == (413, "too_many_rows")


def test_the_bracket_limit_admits_the_largest_valid_requests(predictor: DLRMPredictor, small_config) -> None:
    """Every form at ``max_rows`` rows stays under the limit: reference rows (one object and three arrays
    each, the most per row), and OIP tensors nested as their shapes."""
    rows = good_rows(small_config, MAX_ROWS, seed=2)
    body = json.dumps({"instances": rows}).encode()
    assert body.count(b"[") + body.count(b"{") <= JSON_CONTAINERS_PER_ROW * MAX_ROWS + JSON_CONTAINER_SLACK
    nested = {
        "inputs": [
            tensor("dense_features", "FP32", [MAX_ROWS, 13], [row["float_features"] for row in rows]),
            tensor("sparse_lengths", "INT64", [MAX_ROWS, 26], [row["id_list_features.lengths"] for row in rows]),
            tensor("sparse_ids", "INT64", [-1], [v for row in rows for v in row["id_list_features.values"]]),
        ]
    }
    nested["inputs"][2]["shape"] = [len(nested["inputs"][2]["data"])]
    responses = predictor.predict([Request(body), Request(orjson.dumps(nested), OIP_ROUTE)]).responses
    assert [r.status for r in responses] == [200, 200], [r.body[:200] for r in responses]


def test_a_bytes_tensor_of_the_wrong_shape_is_refused_before_its_elements_are_read(predictor: DLRMPredictor) -> None:
    """4 MiB of 4-byte BYTES elements took seconds of Python per request: the shape is checked first."""
    count = 4 * 2**20 // 4 - 64
    inputs = [
        {"name": "int_features", "datatype": "BYTES", "shape": [1, count], "data": [""] * count},
        {"name": "cat_features", "datatype": "BYTES", "shape": [1, 26], "data": [""] * 26},
    ]
    body, headers = binary_request(inputs, names=("int_features",))
    assert len(body) > 4 * 2**20 - 1024
    started = time.perf_counter()
    response, peak = refused_with_peak_memory(lambda: infer(predictor, body, headers))
    elapsed = time.perf_counter() - started
    error = orjson.loads(response.body)
    assert (response.status, error["type"], error["field"]) == (400, "wrong_shape", "int_features")
    assert peak < 2**20, f"refusing allocated {peak / 2**20:.1f} MiB: the elements were read"
    assert elapsed < 1.0, f"refusing took {elapsed:.3f} s"


def test_an_integer_text_beyond_python_s_digit_limit_is_a_400(predictor: DLRMPredictor) -> None:
    """``int()`` refuses texts of over 4,300 digits with a ValueError of its own (a 500 with a traceback)."""
    inputs = raw_inputs([{"int_0": 1}])
    inputs[0]["data"][0] = "9" * 5000
    response = infer(predictor, payload(inputs))
    error = orjson.loads(response.body)
    assert (response.status, error["type"], error["field"]) == (400, "non_integer", "int_features")
    inputs[0]["data"][0] = "0" * 30 + "7"  # leading zeros are no reason to refuse a small integer
    response = infer(predictor, payload(inputs))
    assert response.status == 200, response.body
