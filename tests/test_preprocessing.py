"""Golden values of the one preprocessing shared by the data reader, the trainer and the server."""

import numpy as np
import pytest

from model_factory.features import MISSING_CATEGORY, CategoryFormatError, Preprocessing, parse_categories


def test_dense_missing_and_negative_become_zero_then_log1p() -> None:
    raw = np.array([[np.nan, -5.0, 0.0, 1.0, 9.0, 99.0]])
    expected = np.array([[0.0, 0.0, 0.0, 0.6931472, 2.3025851, 4.6051702]], dtype=np.float32)
    result = Preprocessing().dense(raw)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_hex_categories_parse_as_unsigned_32_bit() -> None:
    parsed = parse_categories(["05db9164", "FFFFFFFF", "ffffffff", "00000000", ""])
    assert parsed.tolist() == [0x05DB9164, 2**32 - 1, 2**32 - 1, 0, MISSING_CATEGORY]
    assert parsed[0] == 98_275_684


def test_categories_map_to_rows_by_modulo_and_missing_to_row_zero() -> None:
    raw = np.array([[98_275_684, 98_275_684, MISSING_CATEGORY, 2**32 - 1]])
    rows = Preprocessing().category_rows(raw, [10_000, 35, 7, 3])
    assert rows.tolist() == [[5684, 24, 0, 0]]  # 4294967295 % 3 == 0


@pytest.mark.parametrize("bad", ["05db916", "05db91640", "05db 164", "zzzzzzzz", "0x5db916"])
def test_malformed_categories_are_refused_with_their_position(bad: str) -> None:
    with pytest.raises(CategoryFormatError) as error:
        parse_categories(["05db9164", "", bad])
    assert error.value.index == 2
    assert error.value.value == bad


def test_only_the_supported_preprocessing_is_accepted() -> None:
    with pytest.raises(ValueError, match="unsupported preprocessing"):
        Preprocessing(dense_transform="standardize")
