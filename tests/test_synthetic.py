import json
from pathlib import Path

import numpy as np
import pytest

from handler.json_rows import RequestDecoder
from model_factory.config import DLRMConfig
from model_factory.features import Preprocessing
from training.criteo import metadata_path, read_raw_rows
from training.synthetic import PlantedClickModel, random_inputs, request_rows, write_tsv


@pytest.fixture(scope="module")
def planted() -> PlantedClickModel:
    return PlantedClickModel(seed=0)


def test_generation_is_deterministic(planted: PlantedClickModel) -> None:
    first, p_first = planted.sample(1000, np.random.default_rng(5))
    again, p_again = PlantedClickModel(seed=0).sample(1000, np.random.default_rng(5))
    np.testing.assert_array_equal(first.categories, again.categories)
    np.testing.assert_array_equal(p_first, p_again)


def test_rows_look_like_criteo(planted: PlantedClickModel) -> None:
    rows, probabilities = planted.sample(50_000, np.random.default_rng(1))
    assert 0.2 < rows.labels.mean() < 0.3  # Criteo's click rate is about a quarter
    assert np.isnan(rows.ints).any() and (rows.ints[:, 1] < 0).any()  # missing values, negative int_1
    assert (rows.categories == -1).any()
    _, counts = np.unique(rows.categories[:, 0], return_counts=True)
    counts = np.sort(counts)[::-1]
    assert counts[0] > 50 * np.median(counts)  # heavy-tailed category frequencies
    assert ((probabilities > 0) & (probabilities < 1)).all()


def test_tsv_round_trips_through_the_reader_with_planted_auc(tmp_path: Path, planted: PlantedClickModel) -> None:
    path = tmp_path / "train.tsv.gz"
    metadata = write_tsv(path, 3000, planted, seed=9, chunk_rows=1000)
    rng = np.random.default_rng(9)
    expected = np.concatenate([planted.sample(1000, rng)[0].categories for _ in range(3)])  # the same draws
    read = np.concatenate([rows.categories for rows in read_raw_rows([path])])
    np.testing.assert_array_equal(read, expected)
    assert json.loads(metadata_path(path).read_text()) == metadata
    assert 0.6 < metadata["planted_auc"] <= 1.0
    assert metadata["rows"] == 3000


def test_random_inputs_follow_the_reference_generator(small_config: DLRMConfig) -> None:
    rng = np.random.default_rng(0)
    sizes = np.asarray(small_config.num_embeddings_per_feature)
    for distribution in ("uniform", "gaussian"):
        dense, lengths, values = random_inputs(small_config, 200, rng, distribution, num_indices_per_lookup=3)
        assert dense.shape == (200, 13) and dense.dtype == np.float32
        assert (lengths == 3).all() and len(values) == 200 * 26 * 3
        tables = np.repeat(np.tile(np.arange(26), 200), lengths.ravel())
        assert ((values >= 0) & (values < sizes[tables])).all()
    _, lengths, _ = random_inputs(small_config, 500, rng, num_indices_per_lookup=4, fixed_lookups=False)
    assert lengths.min() == 1 and lengths.max() == 4


def test_request_rows_are_valid_requests(small_config: DLRMConfig) -> None:
    dense, lengths, values = random_inputs(small_config, 20, np.random.default_rng(3), num_indices_per_lookup=2)
    rows = list(request_rows(dense, lengths, values))
    decoded = RequestDecoder(small_config, Preprocessing()).decode({"instances": rows})
    np.testing.assert_array_equal(decoded.rows.values, values)
    np.testing.assert_array_equal(decoded.rows.lengths, lengths)
