"""Quantized tables sharded table-wise over several ranks (TorchRec's inference sharding): same logits, the setting.

TorchRec's inference sharding also runs with every rank on the CPU, so the
sharding itself, the row copy and the predictor's path are checked here without
a GPU; the tests marked ``gpu`` shard over the GPUs present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torchrec.distributed.types import ShardingPlan

from build_mar import parse_args
from handler.dlrm_handler import select_device
from handler.predictor import DLRMPredictor
from handler.settings import ServingSettings, SettingsError
from model_archive.contents import MODEL_YAML, serving_settings
from model_factory.artifact import ModelArtifact, Provenance, load_model, write_artifact
from model_factory.config import ConfigError, preset
from model_factory.factory import table_name
from model_factory.features import rows_to_kjt
from model_factory.random_tables import random_quantized_model
from model_factory.sharding import load_sharded_model, shard_tables
from tests.archives import QUANTIZATION_SPECS, build_archive
from tests.test_ranking import SPARSE, logits, ranking
from training.synthetic import random_inputs

CONFIG = preset("small")
TABLES = "sparse_arch.embedding_bag_collection"
SPECS = ["int8", "mixed"]  # mixed: int8, int4 and fp16 tables
TOLERANCE = 1e-5
CPU = torch.device("cpu")


def write_quantized(directory: Path, name: str, seed: int = 4) -> Path:
    spec = QUANTIZATION_SPECS[name]
    artifact = ModelArtifact(CONFIG, Provenance(trained=False, seed=seed), quantization=spec)
    write_artifact(directory, artifact, random_quantized_model(CONFIG, spec, seed=seed))
    return directory


def batch_logits(model: nn.Module, device: torch.device, rows: int = 64) -> np.ndarray:
    dense, lengths, values = random_inputs(CONFIG, rows, np.random.default_rng(1), num_indices_per_lookup=3)
    sparse = rows_to_kjt(CONFIG.sparse_feature_names, lengths, values).to(device)
    with torch.inference_mode():
        return model(torch.from_numpy(dense).to(device), sparse).squeeze(1).cpu().numpy()


def ranks_of(plan: ShardingPlan) -> dict[str, list[int]]:
    """Each table's ranks in TorchRec's plan, checking that it is table-wise."""
    tables = plan.plan[TABLES]
    assert {sharding.sharding_type for sharding in tables.values()} == {"table_wise"}
    return {name: sharding.ranks for name, sharding in tables.items()}


def tbe_tables(model: nn.Module) -> list[tuple[torch.device, set[str]]]:
    """The device and tables of every TBE in the model: where the rows really are."""
    placed = []
    for module in model.modules():
        if isinstance(module, IntNBitTableBatchedEmbeddingBagsCodegen):
            weights = module.weights_dev if module.weights_dev.numel() else module.weights_host
            placed.append((weights.device, {spec[0] for spec in module.embedding_specs}))
    return placed


@pytest.mark.parametrize("name", SPECS)
def test_tables_shard_over_two_cpu_ranks_with_the_same_logits(name: str, tmp_path: Path) -> None:
    model, _ = load_model(write_quantized(tmp_path, name))
    expected = batch_logits(model, CPU)
    sharded, plan = shard_tables(model, 2, CPU)
    ranks = ranks_of(plan)
    assert sorted(ranks) == sorted(table_name(feature) for feature in CONFIG.sparse_feature_names)
    assert all(len(table_ranks) == 1 for table_ranks in ranks.values())
    per_rank = {rank: {table for table, (only,) in ranks.items() if only == rank} for rank in (0, 1)}
    assert all(0 < len(tables) < len(ranks) for tables in per_rank.values()), per_rank
    # Each TBE TorchRec built holds the tables of one rank only.
    assert all(any(tables <= per_rank[rank] for rank in per_rank) for _, tables in tbe_tables(sharded))
    np.testing.assert_allclose(batch_logits(sharded, CPU), expected, rtol=0, atol=TOLERANCE)


def test_the_predictor_serves_sharded_tables_like_unsharded(tmp_path: Path) -> None:
    """Through DLRMPredictor.from_artifact, as the handler loads an archive with the setting: plain rows and a
    ranking request (one context, its embeddings added to each candidate's)."""
    directory = write_quantized(tmp_path, "mixed")
    plain = DLRMPredictor.from_artifact(directory, CPU)
    sharded = DLRMPredictor.from_artifact(directory, CPU, shard_tables_gpus=2)
    body, expanded = ranking(SPARSE[:13], candidates=40, seed=3)
    bodies = (body, {"instances": expanded})
    for got, expected in zip(logits(sharded, *bodies), logits(plain, *bodies), strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)


def test_fp32_tables_are_not_sharded(artifact_dir: Path) -> None:
    model, _ = load_model(artifact_dir)
    with pytest.raises(ConfigError, match="only quantized tables can be sharded"):
        shard_tables(model, 2, CPU)


def test_a_worker_with_fewer_gpus_than_asked_fails_to_load(tmp_path: Path) -> None:
    directory = write_quantized(tmp_path, "int8")
    asked = max(2, torch.cuda.device_count() + 1)
    device = select_device(gpu_id=None, shard_tables_gpus=asked)
    assert device == torch.device("cuda", 0)  # whatever GPU TorchServe assigned, and even with no GPU at all
    message = f"shards its tables over {asked} GPUs .*, but this process sees {torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match=message):
        DLRMPredictor.from_artifact(directory, device, shard_tables_gpus=asked)
    with pytest.raises(ConfigError, match="inputs on cuda:0"):
        load_sharded_model(directory, 2, torch.device("cuda", 1))


def test_the_setting_travels_in_model_config_yaml() -> None:
    settings = ServingSettings(workers=1, shard_tables_gpus=4)
    assert settings.to_model_yaml()["handler"]["shard_tables_gpus"] == 4
    assert ServingSettings.from_model_yaml(settings.to_model_yaml()) == settings
    assert "shard_tables_gpus" not in ServingSettings().to_model_yaml()["handler"]
    assert ServingSettings(shard_tables_gpus=1).shard_tables_gpus == 1  # 1 is off: any number of workers


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"shard_tables_gpus": 2}, "workers must be 1 when shard_tables_gpus is 2: a worker sharding its tables uses"),
        ({"shard_tables_gpus": -1, "workers": 1}, "shard_tables_gpus must not be negative"),
    ],
)
def test_out_of_range_sharding_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        ServingSettings(**values)


def test_build_mar_writes_the_setting(tmp_path: Path) -> None:
    flags = ["--quantize", "int8", "--workers", "1", "--shard-tables-gpus", "2", "--archive-format", "no-archive"]
    assert parse_args(flags).serving == ServingSettings(workers=1, shard_tables_gpus=2)
    result = build_archive(tmp_path / "dlrm.mar", *flags)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((tmp_path / "dlrm" / MODEL_YAML).read_text())["handler"]["shard_tables_gpus"] == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantize", "int8"], "workers must be 1 when shard_tables_gpus is 2"),
        (["--workers", "1", "--quantize", "none"], "it needs --quantize other than none"),
        (["--workers", "1", "--quantize", "int8", "--quantize-mlp", "int8"], "not --quantize-mlp int8"),
    ],
)
def test_build_mar_refuses_a_sharding_that_cannot_load(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--shard-tables-gpus", "2", *flags])
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------- GPUs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SPECS)
def test_tables_shard_over_every_gpu(name: str, tmp_path: Path) -> None:
    """Over all the GPUs present (one is enough to run TorchRec's sharded path): each rank's tables on its GPU,
    the logits those of the unsharded model on cuda:0 (same kernels) and, within the GPU-vs-CPU tolerance of the
    other GPU tests, of the CPU model."""
    gpus = torch.cuda.device_count()
    first = torch.device("cuda", 0)
    directory = write_quantized(tmp_path, name)
    cpu_model, _ = load_model(directory)
    gpu_model, _ = load_model(directory, first)
    model, _ = load_model(directory)
    sharded, plan = shard_tables(model, gpus, first)
    ranks = ranks_of(plan)
    assert {rank for table_ranks in ranks.values() for rank in table_ranks} == set(range(gpus))
    for device, tables in tbe_tables(sharded):
        assert device.type == "cuda"
        assert all(ranks[table] == [device.index] for table in tables)
    logits_sharded = batch_logits(sharded, first)
    np.testing.assert_allclose(logits_sharded, batch_logits(gpu_model, first), rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(logits_sharded, batch_logits(cpu_model, CPU), rtol=0, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 GPUs to shard over")
def test_an_archive_with_the_setting_serves_sharded_over_the_gpus(tmp_path: Path) -> None:
    """build_mar.py --shard-tables-gpus N, loaded as the handler loads it: the tables on cuda:0..N-1, the scores
    of the CPU model (plain rows and a ranking request)."""
    gpus = torch.cuda.device_count()
    flags = ["--quantize", "int8", "--workers", "1", "--shard-tables-gpus", str(gpus), "--archive-format", "no-archive"]
    result = build_archive(tmp_path / "dlrm.mar", "--seed", "6", *flags)
    assert result.returncode == 0, result.stderr
    directory = tmp_path / "dlrm"
    settings = serving_settings(directory)
    device = select_device(gpu_id=1, shard_tables_gpus=settings.shard_tables_gpus)
    sharded = DLRMPredictor.from_artifact(directory, device, shard_tables_gpus=settings.shard_tables_gpus)
    assert {device for device, _ in tbe_tables(sharded.model)} == {torch.device("cuda", i) for i in range(gpus)}
    plain = DLRMPredictor.from_artifact(directory, CPU)
    body, expanded = ranking(SPARSE[:13], candidates=40, seed=3)
    bodies = (body, {"instances": expanded})
    for got, expected in zip(logits(sharded, *bodies), logits(plain, *bodies), strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
