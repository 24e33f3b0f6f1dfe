"""dlrm_client without a server: its request bodies as the handler's own OIP codec reads them, and back."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from dlrm_client.client import (
    HEADER_LENGTH,
    Tensor,
    decode_response,
    encode_request,
    model_input_tensors,
    raw_row_tensors,
)
from handler.oip import OipCodec
from handler.rows import RowValidator
from model_factory.config import DLRMConfig
from model_factory.features import Preprocessing
from training.synthetic import random_inputs


@pytest.fixture(scope="module")
def codec(small_config: DLRMConfig) -> OipCodec:
    return OipCodec(small_config, Preprocessing(), RowValidator(small_config, max_rows=64), "dlrm", "1.0")


def test_bytes_elements_are_length_prefixed_little_endian() -> None:
    body, headers = encode_request([Tensor("cat_features", "BYTES", (1, 3), ["ab", "", "é"])], binary=True)
    header_length = int(headers[HEADER_LENGTH])
    header = orjson.loads(body[:header_length])
    assert header["inputs"] == [
        {"name": "cat_features", "datatype": "BYTES", "shape": [1, 3], "parameters": {"binary_data_size": 16}}
    ]
    assert header["parameters"] == {"binary_data_output": True}
    assert body[header_length:] == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_model_inputs_decode_exactly_in_the_handler(codec: OipCodec, small_config: DLRMConfig, binary: bool) -> None:
    dense, lengths, ids = random_inputs(small_config, 5, np.random.default_rng(3), num_indices_per_lookup=3)
    ids[0] = small_config.num_embeddings_per_feature[0] - 1  # the last row of a table
    body, headers = encode_request(model_input_tensors(dense, lengths, ids), binary=binary)
    if binary:
        # The inputs' bytes follow the JSON header in order: dense float32, lengths int64, ids int64.
        assert len(body) - int(headers[HEADER_LENGTH]) == dense.nbytes + 8 * lengths.size + 8 * ids.size
    else:
        assert HEADER_LENGTH not in headers and headers["Content-Type"] == "application/json"
    request = codec.decode(body, headers.get(HEADER_LENGTH))
    np.testing.assert_array_equal(request.rows.dense, dense)
    np.testing.assert_array_equal(request.rows.lengths, lengths)
    np.testing.assert_array_equal(request.rows.values, ids)
    assert request.outputs.binary == (frozenset({"score", "logit"}) if binary else frozenset())


def test_non_contiguous_and_narrow_arrays_are_sent_as_the_contract_types(codec: OipCodec, small_config) -> None:
    dense, lengths, ids = random_inputs(small_config, 4, np.random.default_rng(4))
    wide = np.asfortranarray(dense.astype(np.float64))  # float64, column-major
    body, headers = encode_request(model_input_tensors(wide, lengths.astype(np.int32), ids.astype(np.uint16)), True)
    request = codec.decode(body, headers[HEADER_LENGTH])
    np.testing.assert_array_equal(request.rows.dense, dense)
    np.testing.assert_array_equal(request.rows.values, ids)


def test_raw_rows_decode_alike_as_json_and_binary(codec: OipCodec) -> None:
    ints = [["8", "", "-3", *["0"] * 10], [None, 7, *[""] * 11]]
    cats = [["05db9164", *[""] * 25], [None, "FFFFFFFF", *["68fd1e64"] * 24]]
    decoded = []
    for binary in (False, True):
        body, headers = encode_request(raw_row_tensors(ints, cats), binary=binary)
        decoded.append(codec.decode(body, headers.get(HEADER_LENGTH)).rows)
    as_json, as_binary = decoded
    np.testing.assert_array_equal(as_json.dense, as_binary.dense)
    np.testing.assert_array_equal(as_json.values, as_binary.values)
    assert as_json.num_rows == 2 and as_json.dense[0, 0] == pytest.approx(np.log(9))


def test_ragged_raw_rows_and_float_ids_are_refused_before_sending(small_config: DLRMConfig) -> None:
    with pytest.raises(ValueError, match="different lengths"):
        raw_row_tensors([["1"] * 13, ["1"] * 12], [[""] * 26, [""] * 26])
    with pytest.raises(TypeError, match="2-D"):
        raw_row_tensors(["1"] * 13, [[""] * 26])
    dense, lengths, ids = random_inputs(small_config, 1, np.random.default_rng(5))
    with pytest.raises(TypeError, match="integers"):
        model_input_tensors(dense, lengths, ids.astype(np.float64))


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_responses_of_the_handler_decode_to_float32(codec: OipCodec, small_config, binary: bool) -> None:
    dense, lengths, ids = random_inputs(small_config, 3, np.random.default_rng(6))
    body, headers = encode_request(model_input_tensors(dense, lengths, ids), binary=binary)
    request = codec.decode(body, headers.get(HEADER_LENGTH))
    logits = np.array([-1.5, 0.0, 2.25], dtype=np.float32)
    scores = 1 / (1 + np.exp(-logits))
    encoded = codec.encode(request, logits, scores)
    assert (HEADER_LENGTH in encoded.headers) == binary
    outputs = decode_response(encoded.body, encoded.headers)
    assert set(outputs) == {"score", "logit"}
    np.testing.assert_array_equal(outputs["logit"], logits)
    np.testing.assert_array_equal(outputs["score"], scores.astype(np.float32))
    assert outputs["score"].dtype == np.float32
