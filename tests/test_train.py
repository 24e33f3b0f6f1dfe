"""A short real training run on planted synthetic data, archived and served by a real TorchServe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from model_archive.contents import model_artifact
from model_factory.artifact import load_model, read_artifact
from model_factory.config import DLRMConfig
from model_factory.features import Preprocessing
from servers.torchserve import TorchServeProcess
from tests.archives import build_archive
from tests.rows import raw_request_row
from training.criteo import read_batches
from training.distributed import init_process_group
from training.synthetic import PlantedClickModel, write_tsv
from training.train import (
    LearningRatePolicy,
    Loss,
    TrainingConfig,
    build_sharded_model,
    loss_function,
    make_optimizer,
    plain_state_dict,
    train,
    train_step,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("synthetic")
    planted = PlantedClickModel(seed=0)
    paths = {"train": directory / "train.tsv.gz", "validation": directory / "validation.tsv"}
    write_tsv(paths["train"], 60_000, planted, seed=1)
    write_tsv(paths["validation"], 10_000, planted, seed=2)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path], small_config: DLRMConfig) -> Path:
    output = tmp_path_factory.mktemp("runs") / "small-synthetic"
    train(
        TrainingConfig(
            model=small_config,
            train_paths=(data["train"],),
            validation_paths=(data["validation"],),
            output=output,
            epochs=2,
            batch_size=512,
            schedule=LearningRatePolicy(warmup_steps=20, decay_start=150, decay_steps=90),
            progress=False,
        )
    )
    return output


def test_training_beats_random_and_records_its_metrics(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["auc"] > 0.7, metrics
    assert metrics["rows_seen"] == 120_000 and metrics["validation_rows"] == 10_000
    assert 0.5 < metrics["auc"] <= metrics["planted_auc"] + 0.01
    assert metrics["logloss"] < 0.6 and 0.5 < metrics["accuracy"] <= 1.0
    provenance = read_artifact(trained).provenance
    assert provenance.trained and provenance.metrics == metrics


def test_table_updates_are_row_wise(data: dict[str, Path], small_config: DLRMConfig, tmp_path: Path) -> None:
    """One step changes exactly the table rows its batch looked up: cost does not scale with table size."""
    config = TrainingConfig(small_config, (data["train"],), (data["validation"],), tmp_path, batch_size=64)
    model, _ = build_sharded_model(config, init_process_group())
    optimizer = make_optimizer(model, config)
    batch = next(read_batches([data["train"]], 64, small_config, Preprocessing()))
    before = plain_state_dict(model)
    train_step(model, optimizer, loss_function(Loss.BCE, 1.0), batch)
    after = plain_state_dict(model)
    for feature in ("cat_0", "cat_5", "cat_19"):
        key = f"sparse_arch.embedding_bag_collection.embedding_bags.t_{feature}.weight"
        changed = set(torch.nonzero((after[key] != before[key]).any(dim=1)).flatten().tolist())
        looked_up = set(batch.sparse_features[feature].values().tolist())
        assert changed == looked_up, feature
    dense_key = "dense_arch.model._mlp.0._linear.weight"
    assert not torch.equal(after[dense_key], before[dense_key])


def test_learning_rate_policy() -> None:
    policy = LearningRatePolicy(warmup_steps=4, decay_start=10, decay_steps=10)
    assert [policy.multiplier(s) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    assert policy.multiplier(15) == pytest.approx(0.25)
    assert policy.multiplier(20) == policy.multiplier(99) == 0.0
    assert LearningRatePolicy().multiplier(10**6) == 1.0


def test_losses() -> None:
    logits, labels = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    bce = loss_function(Loss.BCE, 3.0)(logits, labels)
    wbce = loss_function(Loss.WBCE, 3.0)(logits, labels)
    mse = loss_function(Loss.MSE, 3.0)(logits, labels)
    assert wbce > bce
    assert mse == pytest.approx(((0.5 - 1) ** 2 + torch.sigmoid(torch.tensor(2.0)).item() ** 2) / 2)


def test_served_raw_rows_equal_offline_scores(
    trained: Path, data: dict[str, Path], small_config: DLRMConfig, tmp_path: Path
) -> None:
    """Raw TSV rows sent as JSON get exactly the scores the reader + model give offline."""
    store = tmp_path / "store"
    result = build_archive(store / "dlrm.mar", "--checkpoint", str(trained))
    assert result.returncode == 0, result.stderr
    lines = data["validation"].read_text().splitlines()[:40]
    rows = [raw_request_row(line) for line in lines]
    model, artifact = load_model(trained)
    batch = next(read_batches([data["validation"]], 40, small_config, Preprocessing()))  # the file's first 40 rows
    with torch.no_grad():
        offline = model(batch.dense_features, batch.sparse_features).squeeze(1).numpy()[:40]

    with TorchServeProcess(store, "dlrm=dlrm.mar", tmp_path / "torchserve") as server:
        server.wait_ready()
        url = f"{server.endpoints.inference}/predictions/dlrm"
        single = [requests.post(url, json=row, timeout=30).json()["logit"] for row in rows[:5]]
        assert single == pytest.approx(offline[:5].tolist(), abs=1e-5)
        response = requests.post(url, json={"instances": rows}, timeout=30)
        assert response.status_code == 200, response.text
        assert [p["logit"] for p in response.json()["predictions"]] == pytest.approx(offline.tolist(), abs=1e-5)
        description = requests.get(f"{server.endpoints.management}/models/dlrm?customized=true", timeout=30).json()
        metadata = description[0]["customizedMetadata"]
        assert metadata["provenance"]["trained"] is True
        assert artifact.provenance.metrics is not None
        assert metadata["provenance"]["metrics"]["auc"] == artifact.provenance.metrics["auc"]
        assert metadata["preprocessing"] == {
            "dense_transform": "log1p",
            "category_hashing": "hex-mod",
            "missing_category_row": 0,
        }
    archived_metrics = model_artifact(store / "dlrm.mar").provenance.metrics
    assert archived_metrics is not None and archived_metrics["auc"] > 0.7
    assert np.isfinite(offline).all()
