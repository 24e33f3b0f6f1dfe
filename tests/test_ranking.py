"""Ranking requests (one context, N candidates): the expanded rows' scores, batching, errors; in-process and served."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
import pytest
import requests
import torch

from dlrm_client import DLRMClient
from dlrm_client.client import Tensor, decode_response, encode_request, model_input_tensors, ranking_tensors
from handler.errors import ErrorKind
from handler.predictor import DLRMPredictor, Request
from model_factory.artifact import ModelArtifact, Provenance, write_artifact
from model_factory.config import preset
from model_factory.quantization import MlpDtype, QuantizationSpec, quantize_mlps
from model_factory.random_tables import random_quantized_model
from servers.torchserve import REPO_ROOT, TorchServeProcess
from tests.archives import QUANTIZATION_SPECS
from tests.rows import columnar
from training.criteo import request_row
from training.synthetic import PlantedClickModel, format_tsv, random_inputs

CONFIG = preset("small")
SAMPLE = REPO_ROOT / "sample_data" / "sample_ranking.json"
SAMPLE_COLUMNAR = REPO_ROOT / "sample_data" / "sample_ranking_columnar.json"
JSON = {"Content-Type": "application/json"}
REFERENCE_SAMPLE = REPO_ROOT / "sample_data" / "sample_reference_ranking.json"
SAMPLE_ROW = REPO_ROOT / "sample_data" / "sample_data.json"
TOLERANCE = 1e-5


def planted_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Raw Criteo rows of the planted synthetic data (realistic values, some missing), null for missing."""
    sample, _ = PlantedClickModel(seed=0).sample(count, np.random.default_rng(seed))
    return [request_row(line, CONFIG) for line in format_tsv(sample).splitlines()]


def ranking(context_names: list[str], candidates: int, seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A ranking body (one user's values of ``context_names``) and the same candidates fully expanded."""
    user, *rows = planted_rows(candidates + 1, seed)
    context = {name: user[name] for name in context_names}
    own = [{name: value for name, value in row.items() if name not in context} for row in rows]
    return {"context": context, "instances": own}, [row | context for row in own]


def logits(predictor: DLRMPredictor, *bodies: Any) -> list[Any]:
    """Each body's logits (or its error body), from one batch."""
    result = predictor.predict_bodies([orjson.dumps(body) for body in bodies])
    answers: list[Any] = []
    for response in result.responses:
        body = orjson.loads(response.body)
        if response.status != 200:
            answers.append(body | {"status": response.status})
        else:
            answers.append(logits_of(body))
    return answers


def logits_of(answer: dict[str, Any]) -> np.ndarray:
    """The logits of a 200 answer: one row's, ``predictions``' or the columnar ``outputs``'."""
    if "outputs" in answer:
        return np.array(answer["outputs"]["logit"])
    return np.array([prediction["logit"] for prediction in answer.get("predictions", [answer])])


MODELS = ["none", "fp32", "int8", "mixed", "int8+mlp"]
# int8 MLPs quantize activations with one scale per forward: their scores depend on the batch.
FLOAT_MLPS = [model for model in MODELS if model != "int8+mlp"]


@pytest.fixture(scope="module", params=MODELS)
def predictor(request: pytest.FixtureRequest, artifact_dir) -> DLRMPredictor:
    if request.param == "none":
        return DLRMPredictor.from_artifact(artifact_dir, torch.device("cpu"), max_rows=64)
    spec: QuantizationSpec = QUANTIZATION_SPECS[request.param]
    artifact = ModelArtifact(CONFIG, Provenance(trained=False, seed=5), quantization=spec)
    model = random_quantized_model(CONFIG, spec, seed=5).eval()
    if spec.mlp == MlpDtype.INT8:
        quantize_mlps(model)
    return DLRMPredictor(model, artifact, torch.device("cpu"), max_rows=64)


SPARSE = list(CONFIG.sparse_feature_names)
DENSE = list(CONFIG.dense_feature_names)


@pytest.mark.parametrize(
    "context_names",
    [SPARSE[:13], SPARSE[::2] + DENSE[:4], DENSE, SPARSE, DENSE + SPARSE, []],
    ids=["13-sparse", "mixed", "all-dense", "all-sparse", "everything", "empty"],
)
def test_scores_equal_the_expanded_rows(predictor: DLRMPredictor, context_names: list[str]) -> None:
    body, expanded = ranking(context_names, candidates=37, seed=len(context_names))
    ranked, plain = logits(predictor, body, {"instances": expanded})
    np.testing.assert_allclose(ranked, plain, rtol=0, atol=TOLERANCE)


def test_the_context_is_folded_into_float_first_layers_only(predictor: DLRMPredictor) -> None:
    """The equality tests above cover both ways: the split interaction (float MLPs, cached per context set)
    and, for an int8 first layer, the context's vectors broadcast into TorchRec's own interaction."""
    body, _ = ranking(SPARSE[:13], candidates=3, seed=4)
    predictor.ranking.folded.cache_clear()
    logits(predictor, body, body)
    folds = predictor.ranking.folded.cache_info()
    if predictor.artifact.quantization.mlp == MlpDtype.NONE:
        assert (folds.misses, folds.hits) == (1, 1)
    else:
        assert folds.misses == 0


@pytest.mark.parametrize("predictor", FLOAT_MLPS, indirect=True)
def test_a_batch_of_rankings_and_other_formats_each_get_their_own_rows(predictor: DLRMPredictor) -> None:
    """Requests of different N and different contexts in one forward, between plain requests and a bad one
    (float MLPs: their scores do not depend on the batch)."""
    first, first_expanded = ranking(SPARSE[:13], candidates=5, seed=1)
    second, second_expanded = ranking(SPARSE[7:20] + DENSE[:2], candidates=11, seed=2)
    single = first_expanded[0]
    bad = {"context": {"cat_0": "nothex!!"}, "instances": [dict.fromkeys(DENSE + SPARSE[1:])]}
    answers = logits(
        predictor,
        first,
        {"instances": second_expanded},
        bad,
        second,
        single,
        {"instances": first_expanded},
        columnar(second),
    )
    ranked_first, plain_second, error, ranked_second, _, plain_first, columnar_second = answers
    assert isinstance(error, dict) and error["type"] == ErrorKind.INVALID_CATEGORY
    np.testing.assert_allclose(ranked_first, plain_first, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(ranked_second, plain_second, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(columnar_second, plain_second, rtol=0, atol=TOLERANCE)
    alone = logits(predictor, first)[0]
    np.testing.assert_allclose(ranked_first, alone, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(
    "context_names", [SPARSE[:13], SPARSE[::2] + DENSE[:4], []], ids=["13-sparse", "mixed", "no-context"]
)
def test_columnar_bodies_score_as_their_rows(predictor: DLRMPredictor, context_names: list[str]) -> None:
    """``inputs`` (a ranking's candidates, or expanded rows) scores as the rows it transposes to, and answers
    columnar: ``outputs`` with one score and one logit per row."""
    body, expanded = ranking(context_names, candidates=23, seed=40 + len(context_names))
    if not context_names:
        del body["context"]
    ranked, ranked_columns, plain_columns = logits(predictor, body, columnar(body), columnar({"instances": expanded}))
    np.testing.assert_allclose(ranked_columns, ranked, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(plain_columns, ranked, rtol=0, atol=TOLERANCE)
    (response,) = predictor.predict_bodies([orjson.dumps(columnar(body))]).responses
    outputs = orjson.loads(response.body)["outputs"]
    assert set(outputs) == {"score", "logit"} and len(outputs["score"]) == len(expanded)
    np.testing.assert_allclose(outputs["score"], 1 / (1 + np.exp(-np.array(outputs["logit"]))), rtol=1e-6)


LENGTHS, IDS = "id_list_features.lengths", "id_list_features.values"


def reference_ranking(
    shared: np.ndarray, candidates: int, seed: int, dense_in_context: bool = False, compact: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ranking body in the reference format, 1-3 ids per lookup (the context's ids of the ``shared``
    features, from a user row; candidates' lengths compact or over all 26), and its expanded rows."""
    rng = np.random.default_rng(seed)
    dense, lengths, ids = random_inputs(CONFIG, candidates + 1, rng, num_indices_per_lookup=3, fixed_lookups=False)
    cells = np.split(ids, np.cumsum(lengths.ravel())[:-1])  # the ids of each (row, feature), row-major

    def ids_of(row: int, features: np.ndarray) -> list[int]:
        return [int(i) for f in np.flatnonzero(features) for i in cells[row * len(SPARSE) + f]]

    context: dict[str, Any] = {LENGTHS: np.where(shared, lengths[0], 0).tolist(), IDS: ids_of(0, shared)}
    if dense_in_context:
        context["float_features"] = dense[0].tolist()
    instances, expanded = [], []
    for row in range(1, candidates + 1):
        own_lengths = lengths[row][~shared] if compact else np.where(shared, 0, lengths[row])
        own: dict[str, Any] = {LENGTHS: own_lengths.tolist(), IDS: ids_of(row, ~shared)}
        row_dense = dense[0 if dense_in_context else row].tolist()
        instances.append(own if dense_in_context else own | {"float_features": row_dense})
        merged = [int(i) for f in range(len(SPARSE)) for i in cells[(0 if shared[f] else row) * len(SPARSE) + f]]
        row_lengths = np.where(shared, lengths[0], lengths[row]).tolist()
        expanded.append({"float_features": row_dense, LENGTHS: row_lengths, IDS: merged})
    return {"context": context, "instances": instances}, {"instances": expanded}


FIRST_13 = np.arange(len(SPARSE)) < 13


@pytest.mark.parametrize(
    ("shared", "dense_in_context", "compact"),
    [
        (FIRST_13, False, True),
        (FIRST_13, False, False),
        (np.arange(len(SPARSE)) % 3 == 0, True, True),
        (np.ones(len(SPARSE), dtype=bool), False, True),
        (np.zeros(len(SPARSE), dtype=bool), True, True),
    ],
    ids=["13-sparse", "13-sparse-full-lengths", "dense-and-every-third", "all-sparse", "dense-only"],
)
def test_reference_format_rankings_score_as_expanded_rows(
    predictor: DLRMPredictor, shared: np.ndarray, dense_in_context: bool, compact: bool
) -> None:
    """Multi-hot ids, the context's dense values or each candidate's, compact or full candidate lengths;
    the candidates as rows and as columns."""
    body, expanded = reference_ranking(
        shared, candidates=23, seed=int(shared.sum()), dense_in_context=dense_in_context, compact=compact
    )
    ranked, plain, ranked_columns = logits(predictor, body, expanded, columnar(body))
    np.testing.assert_allclose(ranked, plain, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(ranked_columns, plain, rtol=0, atol=TOLERANCE)


def test_reference_format_candidates_may_mix_compact_and_full_lengths(predictor: DLRMPredictor) -> None:
    body, expanded = reference_ranking(FIRST_13, candidates=6, seed=9)
    full, _ = reference_ranking(FIRST_13, candidates=6, seed=9, compact=False)
    body["instances"][::2] = full["instances"][::2]
    ranked, plain = logits(predictor, body, expanded)
    np.testing.assert_allclose(ranked, plain, rtol=0, atol=TOLERANCE)


def _with(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``body`` with the entry at ``path`` replaced (``...``: deleted)."""
    copy = orjson.loads(orjson.dumps(body))
    *parents, last = path
    target = copy
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return copy


@pytest.mark.parametrize(
    ("path", "value", "kind", "field", "message"),
    [
        (
            ("instances", 2, LENGTHS),
            [1] + [0] * 13 + [1] * 12,
            ErrorKind.DUPLICATE_FIELD,
            LENGTHS,
            "row 2: cat_0 has ids both in 'context' and in",
        ),
        (
            ("instances", 1, LENGTHS),
            [1] * 12,
            ErrorKind.WRONG_COUNT,
            LENGTHS,
            "row 1: 'id_list_features.lengths' must have 13 or 26 entries, got 12",
        ),
        (
            ("context", "float_features"),
            [0.5] * 13,
            ErrorKind.DUPLICATE_FIELD,
            "float_features",
            "row 0: 'float_features' is given both in 'context' and in the row",
        ),
        (
            ("instances", 0, "float_features"),
            ...,
            ErrorKind.MISSING_FIELD,
            "float_features",
            "row 0: missing field 'float_features'",
        ),
        (("context", IDS), ..., ErrorKind.MISSING_FIELD, IDS, "context: missing field"),
        (("context", "cat_0"), "05db9164", ErrorKind.UNKNOWN_FIELD, "cat_0", "context: unknown field 'cat_0'"),
        (
            ("context", LENGTHS),
            [1] * 13,
            ErrorKind.WRONG_COUNT,
            LENGTHS,
            "context: 'id_list_features.lengths' must have 26 entries",
        ),
        (
            ("context", IDS, 0),
            10**6,
            ErrorKind.ID_OUT_OF_RANGE,
            IDS,
            "context: id_list_features.values[0] = 1000000 is out of range for feature cat_0",
        ),
        (
            ("instances", 3, IDS, 0),
            -1,
            ErrorKind.ID_OUT_OF_RANGE,
            IDS,
            "row 3: id_list_features.values[0] = -1 is out of range for feature cat_13",
        ),
        (
            ("instances", 3, IDS, 0),
            1.0,
            ErrorKind.NON_INTEGER,
            IDS,
            "row 3: id_list_features.values[0] must be a JSON integer",
        ),
        (
            ("instances", 4, "float_features", 5),
            "1",
            ErrorKind.NON_NUMERIC,
            "float_features",
            "row 4: float_features[5]",
        ),
    ],
)
def test_invalid_reference_format_rankings_get_a_4xx_naming_the_field(
    predictor: DLRMPredictor, path: tuple[Any, ...], value: Any, kind: ErrorKind, field: str, message: str
) -> None:
    body, _ = reference_ranking(FIRST_13, candidates=5, seed=3)
    body["context"][LENGTHS] = [1] * 13 + [0] * 13  # one id per context feature, so that positions are known
    body["context"][IDS] = body["context"][IDS][:0] + [0] * 13
    for row in body["instances"]:  # and one per candidate feature
        row[LENGTHS], row[IDS] = [1] * 13, [0] * 13
    (error,) = logits(predictor, _with(body, path, value))
    assert isinstance(error, dict)
    assert (error["status"], error["type"], error.get("field")) == (400, kind, field), error
    assert message in error["message"], error["message"]


def one_hot_oip_case(candidates: int) -> tuple[list[Tensor], list[Tensor]]:
    """A ranking request of one id per feature, the 13 first sparse features as context, and its expanded rows."""
    rng = np.random.default_rng(0)
    dense, lengths, ids = random_inputs(CONFIG, candidates + 1, rng, num_indices_per_lookup=1, fixed_lookups=True)
    ids = ids.reshape(lengths.shape)
    shared = np.arange(len(SPARSE)) < 13
    expanded_ids = np.where(shared, ids[:1], ids[1:])
    expanded = model_input_tensors(dense[1:], lengths[1:], expanded_ids.ravel())
    own_lengths = np.where(shared, 0, lengths[1:])
    context_lengths = np.where(shared, lengths[:1], 0)
    request = ranking_tensors(own_lengths, ids[1:, ~shared].ravel(), context_lengths, ids[0, shared], dense=dense[1:])
    return request, expanded


def test_oip_request_bytes_shrink_with_the_context() -> None:
    """Binary tensors, 500 candidates, one id per feature, 13 of 26 sparse features as context: the compact
    lengths drop the context's columns (0.56 of the bytes; 0.78 with [N, 26] lengths)."""
    request, expanded = one_hot_oip_case(500)
    sizes = [len(encode_request(tensors, True)[0]) for tensors in (request, full_lengths(request), expanded)]
    assert sizes[0] <= 0.6 * sizes[2] < sizes[1]


def test_one_hot_oip_rankings_score_as_expanded_rows_and_name_a_bad_id(predictor: DLRMPredictor) -> None:
    """One id per feature: every candidate's ids of the same features (the validation's one-hot path)."""
    request, expanded = one_hot_oip_case(40)
    np.testing.assert_allclose(
        oip_logits(predictor, request, True), oip_logits(predictor, expanded, True), rtol=0, atol=TOLERANCE
    )
    ids = next(np.asarray(t.data) for t in request if t.name == "sparse_ids").copy()
    ids[13 * 7 + 2] = 10**9  # row 7's third own feature: cat_15
    bad = [Tensor(t.name, t.datatype, t.shape, ids) if t.name == "sparse_ids" else t for t in request]
    error = oip_logits(predictor, bad, True)
    assert (error["status"], error["type"], error["field"]) == (400, "id_out_of_range", "sparse_ids")
    assert error["message"].startswith("row 7: sparse_ids[2] = 1000000000 is out of range for feature cat_15")


@pytest.mark.parametrize(
    ("body", "kind", "field", "message"),
    [
        (
            {"context": {"cat_0": "05db9164"}, "instances": [{"cat_0": "05db9164"}]},
            ErrorKind.DUPLICATE_FIELD,
            "cat_0",
            "row 0: 'cat_0' is given both in 'context' and in the row",
        ),
        ({"context": {"cat_99": "05db9164"}, "instances": [{}]}, ErrorKind.UNKNOWN_FIELD, "cat_99", "context: unknown"),
        ({"context": [], "instances": [{}]}, ErrorKind.WRONG_TYPE, "context", "must be an object"),
        ({"context": {}}, ErrorKind.MISSING_FIELD, "instances", "needs 'instances'"),
        ({"context": {}, "instances": [], "extra": 1}, ErrorKind.UNKNOWN_FIELD, "extra", "got 'extra'"),
        ({"context": {}, "instances": []}, ErrorKind.EMPTY_INSTANCES, "instances", ""),
        ({"context": {}, "instances": {}}, ErrorKind.WRONG_TYPE, "instances", "must be a list"),
        ({"context": {"int_3": 1.5}, "instances": [{}]}, ErrorKind.NON_INTEGER, "int_3", "context: int_3 must be"),
        ({"context": {"cat_2": "xyz"}, "instances": [{}]}, ErrorKind.INVALID_CATEGORY, "cat_2", "context: cat_2"),
    ],
)
def test_invalid_ranking_requests_get_a_4xx_naming_the_field(
    predictor: DLRMPredictor, body: dict[str, Any], kind: ErrorKind, field: str, message: str
) -> None:
    (error,) = logits(predictor, body)
    assert isinstance(error, dict)
    assert (error["status"], error["type"], error.get("field")) == (400, kind, field), error
    assert message in error["message"]


@pytest.mark.parametrize(
    "context_names", [SPARSE[:13], SPARSE, DENSE[:5] + SPARSE[::2]], ids=["13-sparse", "all-sparse", "mixed"]
)
def test_a_feature_absent_from_both_sides_is_missing_as_in_a_plain_raw_row(
    predictor: DLRMPredictor, context_names: list[str]
) -> None:
    """Logged Criteo rows leave a missing value's field empty, which the raw-row form leaves out (as
    tests/rows.py's raw_request_row does): a ranking request built from such rows scores as its expanded rows,
    as rows and as columns. The same feature on both sides stays a ``duplicate_field``."""
    body, expanded = ranking(context_names, candidates=9, seed=20 + len(context_names))
    present = lambda row: {name: value for name, value in row.items() if value is not None}  # noqa: E731
    logged: dict[str, Any] = {
        "context": present(body["context"]),
        "instances": [present(row) for row in body["instances"]],
    }
    absent = [
        name
        for row in logged["instances"]
        for name in DENSE + SPARSE
        if name not in row and name not in logged["context"]
    ]
    assert absent, "the planted rows have missing values"
    ranked, ranked_columns, plain = logits(
        predictor, logged, columnar(logged), {"instances": [present(row) for row in expanded]}
    )
    assert not any(isinstance(answer, dict) for answer in (ranked, ranked_columns)), (ranked, ranked_columns)
    np.testing.assert_allclose(ranked, plain, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(ranked_columns, plain, rtol=0, atol=TOLERANCE)
    name, value = next(iter(logged["context"].items()))
    twice = {**logged, "instances": [{**logged["instances"][0], name: value}]}
    (error,) = logits(predictor, twice)
    assert (error["status"], error["type"], error["field"], error["row"]) == (400, "duplicate_field", name, 0)


def test_candidates_without_a_sparse_feature_of_their_own_decode_row_by_row(predictor: DLRMPredictor) -> None:
    """An integer at the int64 limit takes raw rows off the fast path (as a float64 it is 2^63): with every sparse
    feature in the context, the row-by-row path parses no category at all."""
    body, expanded = ranking(SPARSE, candidates=3, seed=6)
    body["instances"][1]["int_0"] = expanded[1]["int_0"] = 2**63 - 1
    ranked, plain = logits(predictor, body, {"instances": expanded})
    assert not isinstance(ranked, dict), ranked
    np.testing.assert_allclose(ranked, plain, rtol=0, atol=TOLERANCE)


def test_too_many_candidates_is_413(predictor: DLRMPredictor) -> None:
    body, _ = ranking(SPARSE[:13], candidates=65, seed=4)
    (error,) = logits(predictor, body)
    assert isinstance(error, dict) and (error["status"], error["type"]) == (413, ErrorKind.TOO_MANY_ROWS)


# ---------------------------------------------------------------------------------------------- served


def served_logits(server: TorchServeProcess, body: dict[str, Any]) -> np.ndarray:
    response = requests.post(f"{server.endpoints.inference}/predictions/dlrm", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return logits_of(response.json())


def test_served_rankings_batched_together_score_as_expanded_rows(server: TorchServeProcess) -> None:
    """Rankings of different sizes and contexts, sent at once so TorchServe batches them with expanded rows."""
    contexts = [SPARSE[:13], SPARSE[13:] + DENSE[:3], DENSE, SPARSE[::3]]
    cases = [ranking(contexts[i % 4], candidates=1 + 7 * i, seed=100 + i) for i in range(8)]
    bodies = [body for body, _ in cases] + [{"instances": expanded} for _, expanded in cases]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: served_logits(server, body), bodies))
    for index in range(len(cases)):
        np.testing.assert_allclose(answers[index], answers[len(cases) + index], rtol=0, atol=TOLERANCE)


def test_served_ranking_errors_and_the_sample(server: TorchServeProcess) -> None:
    url = f"{server.endpoints.inference}/predictions/dlrm"
    body, _ = ranking(SPARSE[:13], candidates=3, seed=7)
    body["instances"][1]["cat_0"] = "05db9164"  # cat_0 is in the context too
    refused = requests.post(url, json=body, timeout=30)
    assert refused.status_code == 400
    assert refused.json() | {"message": ""} == {
        "code": 400,
        "type": "duplicate_field",
        "message": "",
        "field": "cat_0",
        "row": 1,
    }
    sample = json.loads(SAMPLE.read_text())
    expanded = {"instances": [row | sample["context"] for row in sample["instances"]]}
    np.testing.assert_allclose(served_logits(server, sample), served_logits(server, expanded), rtol=0, atol=TOLERANCE)


def test_served_columnar_ranking_sample_and_an_error(server: TorchServeProcess) -> None:
    """sample_ranking_columnar.json is sample_ranking.json's request as columns: the same scores, columnar."""
    url = f"{server.endpoints.inference}/predictions/dlrm"
    sample = json.loads(SAMPLE_COLUMNAR.read_text())
    assert sample == columnar(json.loads(SAMPLE.read_text()))
    answer = requests.post(url, data=SAMPLE_COLUMNAR.read_bytes(), headers=JSON, timeout=30)
    assert answer.status_code == 200, answer.text
    outputs = answer.json()["outputs"]
    assert len(outputs["score"]) == len(outputs["logit"]) == 4
    np.testing.assert_allclose(
        outputs["logit"], served_logits(server, json.loads(SAMPLE.read_text())), rtol=0, atol=TOLERANCE
    )
    sample["inputs"]["cat_20"] = sample["inputs"]["cat_20"][:3]
    refused = requests.post(url, json=sample, timeout=30)
    assert refused.status_code == 400
    assert (refused.json()["type"], refused.json()["field"], refused.json()["got"]) == ("wrong_count", "cat_20", 3)


def test_served_reference_format_ranking_sample_and_an_error(server: TorchServeProcess) -> None:
    """sample_reference_ranking.json: sample_oip_ranking.json's request as JSON rows; its first candidate is
    sample_data.json's row."""
    sample = json.loads(REFERENCE_SAMPLE.read_text())
    context = sample["context"]
    expanded = {
        "instances": [
            {
                "float_features": row["float_features"],
                LENGTHS: context[LENGTHS][:13] + row[LENGTHS],
                IDS: context[IDS] + row[IDS],
            }
            for row in sample["instances"]
        ]
    }
    ranked = served_logits(server, sample)
    np.testing.assert_allclose(ranked, served_logits(server, expanded), rtol=0, atol=TOLERANCE)
    single = requests.post(
        f"{server.endpoints.inference}/predictions/dlrm", json=json.loads(SAMPLE_ROW.read_text()), timeout=30
    ).json()
    np.testing.assert_allclose(ranked[0], single["logit"], rtol=0, atol=TOLERANCE)
    sample["instances"][1][LENGTHS] = [1] * 26  # ids for the context's features too, but not as many ids
    refused = requests.post(f"{server.endpoints.inference}/predictions/dlrm", json=sample, timeout=30)
    assert refused.status_code == 400
    assert refused.json()["type"] == "length_mismatch"
    sample["instances"][1][LENGTHS] = [1] * 12
    refused = requests.post(f"{server.endpoints.inference}/predictions/dlrm", json=sample, timeout=30)
    assert (refused.status_code, refused.json()["type"], refused.json()["expected"]) == (400, "wrong_count", "13 or 26")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tables", ["none", "fp32", "int8"])
def test_rankings_on_gpu_score_as_expanded_rows_on_cpu(tables: str, artifact_dir, tmp_path) -> None:
    if tables == "none":
        directory = artifact_dir
    else:
        spec = QUANTIZATION_SPECS[tables]
        artifact = ModelArtifact(CONFIG, Provenance(trained=False, seed=5), quantization=spec)
        write_artifact(tmp_path, artifact, random_quantized_model(CONFIG, spec, seed=5))
        directory = tmp_path
    cpu = DLRMPredictor.from_artifact(directory, torch.device("cpu"), max_rows=64)
    gpu = DLRMPredictor.from_artifact(directory, torch.device("cuda", 0), max_rows=64)
    body, expanded = ranking(SPARSE[:13] + DENSE[:2], candidates=50, seed=9)
    reference_body, reference_expanded = reference_ranking(FIRST_13, 50, seed=9, dense_in_context=True)
    ranked, reference_ranked = logits(gpu, body, reference_body)  # multi-hot: the general KJT reordering
    plain, reference_plain = logits(cpu, {"instances": expanded}, reference_expanded)
    np.testing.assert_allclose(ranked, plain, rtol=0, atol=1e-3)  # GPU kernels sum in another order
    np.testing.assert_allclose(reference_ranked, reference_plain, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------- Open Inference Protocol


def oip_case(rows: int, shared: np.ndarray, seed: int) -> tuple[list[Tensor], list[Tensor], np.ndarray]:
    """A ranking request's tensors (the ``shared`` sparse features' ids in the context row, multi-hot, some
    empty), the same rows expanded as plain model inputs, and the expanded rows' dense values."""
    rng = np.random.default_rng(seed)
    dense, lengths, ids = random_inputs(CONFIG, rows + 1, rng, num_indices_per_lookup=3, fixed_lookups=False)
    owner = np.repeat(np.arange(lengths.size), lengths.ravel())  # (row, feature) cell of each id
    cells = lengths.size // (rows + 1)
    context_ids, own_ids = ids[owner < cells], ids[owner >= cells]
    context_lengths, own_lengths = lengths[:1].copy(), lengths[1:].copy()
    context_lengths[:, ~shared] = 0
    context_ids = context_ids[shared[owner[owner < cells]]]
    feature_of = owner[owner >= cells] % cells
    own_ids = own_ids[~shared[feature_of]]
    own_lengths[:, shared] = 0
    ranking = ranking_tensors(own_lengths, own_ids, context_lengths, context_ids, dense=dense[1:])
    # Expanded: each row's ids of every feature, the context's where shared.
    expanded_lengths = np.where(shared, context_lengths, own_lengths)
    per_cell_own = np.split(own_ids, np.cumsum(own_lengths.ravel())[:-1])
    per_feature_context = np.split(context_ids, np.cumsum(context_lengths.ravel())[:-1])
    expanded_ids = np.concatenate(
        [
            per_feature_context[f] if shared[f] else per_cell_own[r * cells + f]
            for r in range(rows)
            for f in range(cells)
        ]
        + [np.zeros(0, dtype=np.int64)]
    )
    return ranking, model_input_tensors(dense[1:], expanded_lengths, expanded_ids), dense[1:]


def full_lengths(tensors: list[Tensor]) -> list[Tensor]:
    """The request with the candidates' ``sparse_lengths`` as ``[N, 26]`` (0 for the context's features), not
    in the compact form the client sends."""
    by_name = {tensor.name: np.asarray(tensor.data) for tensor in tensors}
    own = by_name["context_sparse_lengths"].reshape(-1) == 0
    compact = by_name["sparse_lengths"]
    full = np.zeros((len(compact), own.size), dtype=np.int64)
    full[:, own] = compact
    return [Tensor(t.name, t.datatype, full.shape, full) if t.name == "sparse_lengths" else t for t in tensors]


def oip_logits(predictor: DLRMPredictor, tensors: list[Tensor], binary: bool) -> Any:
    body, headers = encode_request(tensors, binary)
    (response,) = predictor.predict([Request(body, {key.lower(): value for key, value in headers.items()})]).responses
    if response.status != 200:
        return orjson.loads(response.body) | {"status": response.status}
    return decode_response(response.body, response.headers)["logit"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("context_dense", [False, True], ids=["own-dense", "context-dense"])
@pytest.mark.parametrize("compact", [True, False], ids=["compact-lengths", "full-lengths"])
def test_oip_rankings_score_as_expanded_rows(
    predictor: DLRMPredictor, binary: bool, context_dense: bool, compact: bool
) -> None:
    shared = np.arange(len(SPARSE)) % 2 == 0
    ranking_request, expanded, dense = oip_case(rows=23, shared=shared, seed=int(binary) + 2 * int(context_dense))
    lengths_shape = next(tensor.shape for tensor in ranking_request if tensor.name == "sparse_lengths")
    assert lengths_shape == (23, (~shared).sum())  # the client's form
    if not compact:
        ranking_request = full_lengths(ranking_request)
    if context_dense:  # every candidate with the first row's dense values
        dense[:] = dense[:1]
        ranking_request[0] = Tensor("context_dense_features", "FP32", (1, len(DENSE)), dense[:1].copy())
        expanded[0] = Tensor("dense_features", "FP32", dense.shape, dense)
    ranked = oip_logits(predictor, ranking_request, binary)
    plain = oip_logits(predictor, expanded, binary)
    np.testing.assert_allclose(ranked, plain, rtol=0, atol=TOLERANCE)


def test_invalid_oip_rankings_get_a_4xx_naming_the_input(predictor: DLRMPredictor) -> None:
    shared = np.zeros(len(SPARSE), dtype=bool)
    shared[:3] = True
    ranking_request, _, dense = oip_case(rows=4, shared=shared, seed=5)
    arrays = {tensor.name: np.asarray(tensor.data) for tensor in ranking_request}
    context_lengths = arrays["context_sparse_lengths"]
    own_lengths = next(np.asarray(t.data) for t in full_lengths(ranking_request) if t.name == "sparse_lengths")

    def refused(tensors: list[Tensor]) -> tuple[str, str | None, str]:
        error = oip_logits(predictor, tensors, binary=True)
        assert isinstance(error, dict) and error["status"] == 400, error
        return error["type"], error.get("field"), error["message"]

    both_dense = [*ranking_request, Tensor("context_dense_features", "FP32", (1, len(DENSE)), dense[:1])]
    assert refused(both_dense)[:2] == ("duplicate_field", "context_dense_features")
    without_ids = [t for t in ranking_request if t.name != "context_sparse_ids"]
    assert refused(without_ids)[:2] == ("missing_field", "context_sparse_ids")
    overlapping = own_lengths.copy()
    overlapping[2, 1] = 1  # cat_1 is the context's
    position = int(own_lengths.ravel()[: 2 * len(SPARSE) + 1].sum())  # where row 2's cat_1 ids go
    ids = np.insert(arrays["sparse_ids"], position, 0)
    clash = [t for t in ranking_request if t.name not in ("sparse_lengths", "sparse_ids")]
    clash += [
        Tensor("sparse_lengths", "INT64", overlapping.shape, overlapping),
        Tensor("sparse_ids", "INT64", ids.shape, ids),
    ]
    kind, field, message = refused(clash)
    assert (kind, field) == ("duplicate_field", "sparse_lengths") and message.startswith("row 2: cat_1 has ids both")
    narrow = [t for t in ranking_request if t.name != "sparse_lengths"]
    narrow.append(Tensor("sparse_lengths", "INT64", (4, 22), own_lengths[:, 4:]))
    kind, field, message = refused(narrow)
    assert (kind, field) == ("wrong_shape", "sparse_lengths") and "[4, 26] or [4, 23]" in message
    two_rows = np.repeat(context_lengths, 2, axis=0)
    bad_shape = [t for t in ranking_request if t.name != "context_sparse_lengths"]
    bad_shape.append(Tensor("context_sparse_lengths", "INT64", two_rows.shape, two_rows))
    assert refused(bad_shape)[:2] == ("wrong_shape", "context_sparse_lengths")
    too_large = arrays["context_sparse_ids"].copy()
    too_large[0] = 10**9
    out_of_range = [t for t in ranking_request if t.name != "context_sparse_ids"]
    out_of_range.append(Tensor("context_sparse_ids", "INT64", too_large.shape, too_large))
    assert refused(out_of_range)[:2] == ("id_out_of_range", "context_sparse_ids")
    own_ids = arrays["sparse_ids"].copy()
    own_ids[-1] = 10**9  # the last candidate's last id: cat_25's
    bad_candidate = [t for t in ranking_request if t.name != "sparse_ids"]
    bad_candidate.append(Tensor("sparse_ids", "INT64", own_ids.shape, own_ids))
    kind, field, message = refused(bad_candidate)
    assert (kind, field) == ("id_out_of_range", "sparse_ids") and message.startswith("row 3: ")
    assert "for feature cat_25" in message


def test_served_oip_ranking_through_the_client(server: TorchServeProcess) -> None:
    shared = np.arange(len(SPARSE)) < 13
    ranking_request, expanded, dense = oip_case(rows=30, shared=shared, seed=11)
    by_name = {tensor.name: tensor.data for tensor in ranking_request}
    with DLRMClient(server.endpoints.inference) as client:
        ranked = client.predict_ranking(
            by_name["sparse_lengths"],
            by_name["sparse_ids"],
            by_name["context_sparse_lengths"],
            by_name["context_sparse_ids"],
            dense=dense,
        )
        plain = client.predict(*(tensor.data for tensor in expanded))
    np.testing.assert_allclose(ranked.logit, plain.logit, rtol=0, atol=TOLERANCE)
