import json

import numpy as np
import orjson
import pytest

from handler.errors import InvalidRequest
from handler.json_rows import RequestDecoder, RowsRequest, encode_error, encode_scores
from model_factory.config import DEFAULT_PRESET, DLRMConfig, preset
from model_factory.features import Preprocessing
from servers.torchserve import REPO_ROOT
from tests.bad_requests import bad_columnar_requests, bad_raw_requests, bad_requests, raw_row, row
from tests.rows import random_row

MAX_ROWS = 8


@pytest.fixture(scope="module")
def decoder(small_config: DLRMConfig) -> RequestDecoder:
    return RequestDecoder(small_config, Preprocessing(), max_rows=MAX_ROWS)


@pytest.mark.parametrize(
    "case", bad_requests(MAX_ROWS) + bad_raw_requests() + bad_columnar_requests(MAX_ROWS), ids=lambda case: case.name
)
def test_bad_requests_raise_the_documented_error(decoder: RequestDecoder, case) -> None:
    with pytest.raises(InvalidRequest) as raised:
        decoder.decode(case.body)
    error = raised.value
    assert (error.status, error.kind) == (case.status, case.kind)
    body = orjson.loads(encode_error(error))
    assert body["code"] == case.status and body["type"] == case.kind
    assert body.get("field") == case.field
    assert body.get("row") == case.row
    assert body["message"]


def test_out_of_range_error_names_feature_and_bounds(decoder: RequestDecoder) -> None:
    body = json.dumps(row(**{"id_list_features.values": [0] * 25 + [35]}))
    with pytest.raises(InvalidRequest) as raised:
        decoder.decode(body)
    assert raised.value.to_body() == {
        "code": 400,
        "type": "id_out_of_range",
        "message": "row 0: id_list_features.values[25] = 35 is out of range for feature cat_25 (table of 35 rows)",
        "field": "id_list_features.values",
        "row": 0,
        "expected": "integer in [0, 35)",
        "got": 35,
    }


def test_missing_body_is_415(decoder: RequestDecoder) -> None:
    for body in (None, b"", ""):
        with pytest.raises(InvalidRequest) as raised:
            decoder.decode(body)
        assert raised.value.status == 415


def test_decodes_one_row_exactly(decoder: RequestDecoder) -> None:
    lengths = [0, 2, 3] + [1] * 23
    values = [9, 8, 7, 6, 5] + [2] * 23
    request = decoder.decode(
        json.dumps(row(**{"id_list_features.lengths": lengths, "id_list_features.values": values}))
    )
    assert request.single_row and request.num_rows == 1
    assert request.rows.dense.dtype == np.float32 and request.rows.dense.shape == (1, 13)
    assert request.rows.lengths.tolist() == [lengths]
    assert request.rows.values.dtype == np.int64 and request.rows.values.tolist() == values


def test_accepts_bytes_str_and_parsed_bodies(decoder: RequestDecoder) -> None:
    value = row()
    decoded = [decoder.decode(body) for body in (json.dumps(value).encode(), json.dumps(value), value)]
    assert all(np.array_equal(d.rows.values, decoded[0].rows.values) for d in decoded)


def test_instances_keep_row_order(decoder: RequestDecoder) -> None:
    rows = [row(float_features=[float(i)] * 13) for i in range(5)]
    request = decoder.decode(json.dumps({"instances": rows}))
    assert not request.single_row
    assert request.rows.dense[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_ids_beyond_float32_precision_stay_exact() -> None:
    big = 2**24 + 1  # float32 would round this to 2**24
    config = DLRMConfig(
        num_embeddings_per_feature=(2**40,) * 26,
        embedding_dim=4,
        dense_arch_layer_sizes=(4,),
        over_arch_layer_sizes=(1,),
    )
    request = RequestDecoder(config, Preprocessing()).decode(
        json.dumps(row(**{"id_list_features.values": [big] * 25 + [2**40 - 1]}))
    )
    assert request.rows.values.tolist() == [big] * 25 + [2**40 - 1]


def test_integers_are_accepted_as_dense_values(decoder: RequestDecoder) -> None:
    request = decoder.decode(json.dumps(row(float_features=[1] * 13)))
    assert request.rows.dense.tolist() == [[1.0] * 13]


def test_huge_integer_dense_value_is_non_finite(decoder: RequestDecoder) -> None:
    with pytest.raises(InvalidRequest) as raised:
        decoder.decode(row(float_features=[10**400] + [0.0] * 12))  # only a pre-parsed body can hold this
    assert raised.value.kind == "non_finite"


def test_encode_scores_shapes() -> None:
    assert orjson.loads(encode_scores(np.array([0.0]), np.array([0.5]), single_row=True)) == {
        "score": 0.5,
        "logit": 0.0,
    }
    assert orjson.loads(encode_scores(np.array([0.0, 1.0]), np.array([0.5, 0.7]), single_row=False)) == {
        "predictions": [{"score": 0.5, "logit": 0.0}, {"score": 0.7, "logit": 1.0}]
    }


JSON_ROW_SAMPLES = sorted(p for p in (REPO_ROOT / "sample_data").glob("*.json") if not p.name.startswith("sample_oip"))


@pytest.mark.parametrize("path", JSON_ROW_SAMPLES, ids=lambda p: p.name)
def test_shipped_samples_are_valid_for_their_model(path) -> None:
    """Every JSON-rows sample decodes for the default model; the reference example's sample for criteo-1tb.

    The OIP samples (``sample_oip*.json``) are checked by tests/test_oip_served.py.
    """
    model = "criteo-1tb" if path.name.startswith("reference_") else DEFAULT_PRESET
    request = RequestDecoder(preset(model), Preprocessing()).decode(path.read_bytes())
    assert request.num_rows >= 1
    if model == "criteo-1tb":
        assert request.rows.values[0] == 45_821_459  # exact: float32 would make it 45,821,460


def test_raw_row_goes_through_the_shared_preprocessing(decoder: RequestDecoder, small_config: DLRMConfig) -> None:
    body = raw_row(int_0=None, int_1=-3, int_2=0, int_3=9, cat_0="05DB9164", cat_1="", cat_2=None)
    del body["cat_3"]  # absent means missing, like null and ""
    request = decoder.decode(json.dumps(body))
    assert request.single_row and request.num_rows == 1
    np.testing.assert_allclose(request.rows.dense[0, :4], [0.0, 0.0, 0.0, np.log(10)], rtol=1e-6)
    np.testing.assert_allclose(request.rows.dense[0, 4], np.log1p(4), rtol=1e-6)
    assert request.rows.lengths.tolist() == [[1] * 26]
    assert request.rows.values[:4].tolist() == [0x05DB9164 % 10_000, 0, 0, 0]
    expected_cat_4 = (0x05DB9164 + 4) % small_config.num_embeddings_per_feature[4]
    assert request.rows.values[4] == expected_cat_4


def test_raw_instances_and_empty_raw_row(decoder: RequestDecoder) -> None:
    request = decoder.decode(json.dumps({"instances": [raw_row(), raw_row(int_0=5), {"cat_0": None}]}))
    assert request.num_rows == 3 and not request.single_row
    assert request.rows.values[2 * 26 : 3 * 26].tolist() == [0] * 26  # all missing → row 0 of every table


def assert_same_request(decoded: RowsRequest | InvalidRequest, alone: RowsRequest) -> None:
    assert isinstance(decoded, RowsRequest)
    assert decoded.single_row == alone.single_row
    for name in ("dense", "lengths", "values"):
        np.testing.assert_array_equal(getattr(decoded.rows, name), getattr(alone.rows, name))


def test_a_batch_of_bodies_decodes_each_body_as_if_alone(decoder: RequestDecoder, small_config: DLRMConfig) -> None:
    """TorchServe's batch is decoded in one pass; each request still gets exactly its own rows, or its own error."""
    rng = np.random.default_rng(3)
    rows = [random_row(small_config, rng) for _ in range(5)]
    bodies = [
        json.dumps(rows[0]),
        json.dumps({"instances": rows[1:3]}),
        json.dumps(raw_row()),
        json.dumps(rows[3]),
    ]
    for decoded, body in zip(decoder.decode_many(bodies), bodies, strict=True):
        assert_same_request(decoded, decoder.decode(body))

    # A request that is only wrong in its second row: the combined pass fails, the error still names
    # that request's own row 1, and the requests around it decode as before.
    out_of_range = row(**{"id_list_features.values": [0] * 25 + [35]})
    batch = decoder.decode_many([*bodies[:2], json.dumps({"instances": [rows[4], out_of_range]}), *bodies[2:]])
    error = batch[2]
    assert isinstance(error, InvalidRequest)
    assert (error.kind, error.row, error.field) == ("id_out_of_range", 1, "id_list_features.values")
    for decoded, body in zip(batch[:2] + batch[3:], bodies, strict=True):
        assert_same_request(decoded, decoder.decode(body))
