import dataclasses
import json

import pytest

from model_factory.config import (
    CRITEO_1TB_NUM_EMBEDDINGS,
    PRESETS,
    ConfigError,
    DLRMConfig,
    capped_table_sizes,
    preset,
)
from model_factory.factory import build_dlrm, summarize


def test_presets_are_valid_and_named(small_config: DLRMConfig) -> None:
    assert set(PRESETS) == {"small", "criteo-kaggle", "criteo-1tb"}
    assert preset("small") == small_config


def test_criteo_1tb_matches_the_reference_model_size() -> None:
    config = preset("criteo-1tb")
    assert config.num_embeddings_per_feature == CRITEO_1TB_NUM_EMBEDDINGS
    assert sum(config.num_embeddings_per_feature) == 177_944_275
    total = summarize(build_dlrm(config))[-1]
    assert total.parameters == 11_389_195_777


def test_kaggle_caps_every_table() -> None:
    config = preset("criteo-kaggle")
    assert max(config.num_embeddings_per_feature) == 100_000
    assert config.num_embeddings_per_feature[5] == 3  # small tables stay as they are
    assert capped_table_sizes(10)[:3] == (10, 10, 10)


def test_json_round_trip(small_config: DLRMConfig) -> None:
    text = json.dumps(small_config.to_dict())
    assert DLRMConfig.from_json(text) == small_config
    assert isinstance(DLRMConfig.from_json(text).num_embeddings_per_feature, tuple)


def _changed(config: DLRMConfig, **changes) -> dict:
    return {**config.to_dict(), **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dense_arch_layer_sizes": [64, 32]}, "must equal embedding_dim (16)"),
        ({"num_embeddings_per_feature": [10] * 25}, "25 entries but there are 26 sparse features"),
        ({"num_embeddings_per_feature": [10] * 25 + [0]}, "num_embeddings_per_feature[25] must be a positive integer"),
        ({"embedding_dim": -4, "dense_arch_layer_sizes": [8, -4]}, "embedding_dim[0] must be a positive integer"),
        ({"over_arch_layer_sizes": [64, 2]}, "last over_arch_layer_sizes entry must be 1"),
        ({"over_arch_layer_sizes": [64.0, 1]}, "over_arch_layer_sizes[0] must be a positive integer"),
        ({"sparse_feature_names": ["a"] * 26}, "sparse_feature_names contains duplicates"),
        ({"dense_feature_names": ["int_0", "cat_0"]}, "both dense and sparse"),
        ({"colour": "blue"}, "unknown model config keys ['colour']"),
    ],
)
def test_invalid_configs_are_refused_with_a_clear_message(small_config: DLRMConfig, changes, message) -> None:
    with pytest.raises(ConfigError) as error:
        DLRMConfig.from_dict(_changed(small_config, **changes))
    assert message in str(error.value)


def test_missing_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r"missing required keys \['dense_arch_layer_sizes', 'embedding_dim'"):
        DLRMConfig.from_dict({"num_embeddings_per_feature": [1] * 26})


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


def test_config_is_immutable(small_config: DLRMConfig) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        small_config.embedding_dim = 8  # type: ignore[misc]
