import numpy as np
import pytest
import torch

from model_factory.features import (
    DENSE_FEATURE_NAMES,
    SPARSE_FEATURE_NAMES,
    feature_major,
    feature_major_on_device,
    rows_to_kjt,
)


def test_schema_uses_torchrec_criteo_names() -> None:
    assert tuple(f"int_{i}" for i in range(13)) == DENSE_FEATURE_NAMES
    assert tuple(f"cat_{i}" for i in range(26)) == SPARSE_FEATURE_NAMES


def test_rows_to_kjt_transposes_row_major_ids_to_key_major() -> None:
    # row 0: a=[1], b=[2, 3];  row 1: a=[], b=[4];  row 2: a=[5, 6], b=[]
    lengths = np.array([[1, 2], [0, 1], [2, 0]])
    values = np.array([1, 2, 3, 4, 5, 6])
    kjt = rows_to_kjt(["a", "b"], lengths, values)
    per_key = kjt.to_dict()
    assert per_key["a"].lengths().tolist() == [1, 0, 2]
    assert per_key["a"].values().tolist() == [1, 5, 6]
    assert per_key["b"].lengths().tolist() == [2, 1, 0]
    assert per_key["b"].values().tolist() == [2, 3, 4]
    assert kjt.values().dtype == torch.int64


def test_single_row_needs_no_reordering() -> None:
    kjt = rows_to_kjt(["a", "b", "c"], np.array([[2, 0, 1]]), np.array([7, 8, 9]))
    assert kjt.values().tolist() == [7, 8, 9]
    assert kjt.lengths().tolist() == [2, 0, 1]


@pytest.mark.parametrize("shape", [(1, 3), (2, 2), (7, 5), (64, 26)])
@pytest.mark.parametrize(("min_ids", "max_ids"), [(1, 1), (0, 1), (0, 3), (0, 0)])  # one-hot, at most one, any
def test_feature_major_matches_a_per_feature_gather(shape: tuple[int, int], min_ids: int, max_ids: int) -> None:
    rng = np.random.default_rng(shape[0] * 10 + max_ids)
    lengths = rng.integers(min_ids, max_ids + 1, size=shape)
    values = rng.integers(0, 1000, size=int(lengths.sum()))
    per_row = np.split(values, np.cumsum(lengths.sum(axis=1))[:-1])
    expected = [
        v
        for feature in range(shape[1])
        for row, ids in enumerate(per_row)
        for v in np.split(ids, np.cumsum(lengths[row])[:-1])[feature]
    ]
    kjt_lengths, kjt_values = feature_major(lengths, values)
    assert kjt_values.tolist() == expected
    assert kjt_lengths.tolist() == lengths.T.ravel().tolist()

    on_device_lengths, on_device_values = feature_major_on_device(torch.from_numpy(lengths), torch.from_numpy(values))
    assert on_device_values.tolist() == expected
    assert on_device_lengths.tolist() == kjt_lengths.tolist()
