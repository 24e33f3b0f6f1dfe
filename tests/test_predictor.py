import json

import numpy as np
import orjson
import pytest
import torch

from handler.predictor import DLRMPredictor
from model_factory.config import DLRMConfig
from tests.rows import offline_logits, random_row


@pytest.fixture(scope="module")
def predictor(artifact_dir) -> DLRMPredictor:
    return DLRMPredictor.from_artifact(artifact_dir, torch.device("cpu"), max_rows=16)


def test_scores_match_an_independent_offline_forward(predictor: DLRMPredictor, small_config: DLRMConfig) -> None:
    rng = np.random.default_rng(0)
    rows = [random_row(small_config, rng) for _ in range(10)]
    result = predictor.predict_bodies([json.dumps({"instances": rows})])
    predictions = orjson.loads(result.responses[0].body)["predictions"]
    expected = offline_logits(predictor.model, small_config, rows)
    assert [p["logit"] for p in predictions] == pytest.approx(expected.tolist(), abs=1e-6)
    assert [p["score"] for p in predictions] == pytest.approx((1 / (1 + np.exp(-expected))).tolist(), abs=1e-6)
    assert result.rows == 10


def test_a_batch_gives_each_request_its_own_rows_and_isolates_bad_ones(
    predictor: DLRMPredictor, small_config: DLRMConfig
) -> None:
    rng = np.random.default_rng(1)
    rows = [random_row(small_config, rng) for _ in range(4)]
    bodies = [
        json.dumps(rows[0]),
        b"{broken",
        json.dumps({"instances": rows[1:3]}),
        json.dumps({"instances": []}),
        json.dumps(rows[3]),
    ]
    result = predictor.predict_bodies(bodies)
    assert [r.status for r in result.responses] == [200, 400, 200, 400, 200]
    assert [r.error_kind for r in result.responses] == [None, "invalid_json", None, "empty_instances", None]
    one_by_one = [offline_logits(predictor.model, small_config, [r])[0] for r in rows]
    assert orjson.loads(result.responses[0].body)["logit"] == pytest.approx(one_by_one[0], abs=1e-6)
    pair = orjson.loads(result.responses[2].body)["predictions"]
    assert [p["logit"] for p in pair] == pytest.approx(one_by_one[1:3], abs=1e-6)
    assert orjson.loads(result.responses[4].body)["logit"] == pytest.approx(one_by_one[3], abs=1e-6)
    assert result.rows == 4


def test_an_all_invalid_batch_runs_no_forward(predictor: DLRMPredictor, monkeypatch: pytest.MonkeyPatch) -> None:
    forwards: list[int] = []
    monkeypatch.setattr(predictor, "forward", lambda parts, contexts=None: forwards.append(len(parts)))
    result = predictor.predict_bodies([b"[]", b"nope"])
    assert [r.status for r in result.responses] == [400, 400]
    assert result.rows == 0
    assert forwards == []
