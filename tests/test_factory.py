import numpy as np
import pytest
import torch

from model_factory.config import DLRMConfig, preset
from model_factory.factory import build_dlrm, format_summary, init_weights, load_weights, summarize
from model_factory.features import rows_to_kjt
from training.synthetic import random_inputs


def test_building_on_meta_allocates_nothing() -> None:
    model = build_dlrm(preset("criteo-1tb"))  # 45 GB in fp32 if it were allocated
    assert all(p.is_meta for p in model.parameters())


def test_random_init_is_deterministic_per_seed(small_config: DLRMConfig) -> None:
    first = init_weights(build_dlrm(small_config), seed=1).state_dict()
    again = init_weights(build_dlrm(small_config), seed=1).state_dict()
    other = init_weights(build_dlrm(small_config), seed=2).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_init_fills_every_table_within_torchrec_bounds(small_config: DLRMConfig) -> None:
    model = init_weights(build_dlrm(small_config), seed=0)
    tables = model.sparse_arch.embedding_bag_collection.embedding_bags
    for name, size in zip(small_config.sparse_feature_names, small_config.num_embeddings_per_feature, strict=True):
        weight = tables[f"t_{name}"].weight
        bound = (1 / size) ** 0.5
        assert weight.abs().max() <= bound
        assert weight.abs().sum() > 0  # never zero-filled


def test_init_leaves_the_global_rng_alone(small_config: DLRMConfig) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init_weights(build_dlrm(small_config), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_load_weights_is_strict(small_config: DLRMConfig) -> None:
    state = init_weights(build_dlrm(small_config), seed=0).state_dict()
    other_shape = DLRMConfig.from_dict({**small_config.to_dict(), "over_arch_layer_sizes": [32, 1]})
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        load_weights(build_dlrm(other_shape), state)


def test_loaded_model_reproduces_the_saved_one(small_config: DLRMConfig) -> None:
    source = init_weights(build_dlrm(small_config), seed=5)
    loaded = load_weights(build_dlrm(small_config), source.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def test_summary_counts_each_component(small_config: DLRMConfig) -> None:
    rows = {row.name: row for row in summarize(build_dlrm(small_config))}
    expected_tables = sum(small_config.num_embeddings_per_feature) * small_config.embedding_dim
    assert rows["sparse_arch"].parameters == expected_tables
    assert rows["sparse_arch"].bytes == expected_tables * 4
    assert rows["dense_arch"].parameters == 13 * 64 + 64 + 64 * 16 + 16
    assert rows["total"].parameters == sum(rows[n].parameters for n in ("sparse_arch", "dense_arch", "over_arch"))
    text = format_summary(list(rows.values()))
    assert "sparse_arch" in text and f"{expected_tables:,}" in text


def test_initialised_model_scores_like_its_reloaded_copy(small_config: DLRMConfig) -> None:
    """Materialising keeps buffers computed at construction (the interaction's index pairs)."""
    model = init_weights(build_dlrm(small_config), seed=4)
    assert torch.equal(model.inter_arch.triu_indices, torch.triu_indices(27, 27, offset=1))
    reloaded = load_weights(build_dlrm(small_config), model.state_dict())
    dense, lengths, values = random_inputs(small_config, 8, np.random.default_rng(0), num_indices_per_lookup=2)
    sparse = rows_to_kjt(small_config.sparse_feature_names, lengths, values)
    with torch.no_grad():
        assert torch.equal(model(torch.from_numpy(dense), sparse), reloaded(torch.from_numpy(dense), sparse))
