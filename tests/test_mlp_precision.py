"""The MLPs' precision (``--quantize-mlp``): bf16 scores, archives, batches, rankings and the default per shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from torch import nn
from torchrec.models.dlrm import DLRM

import build_mar
from handler.predictor import DLRMPredictor
from model_archive.contents import extracted
from model_factory.artifact import WEIGHTS_FILE, ModelArtifact, Provenance, load_model, write_artifact
from model_factory.config import DLRMConfig, preset
from model_factory.factory import build_dlrm, init_weights
from model_factory.features import rows_to_kjt
from model_factory.quantization import Bf16Linear, MlpDtype, QuantizationSpec, native_bf16, quantize_mlps
from servers.torchserve import TorchServeProcess
from tests.archives import build_archive
from tests.test_ranking import SPARSE, logits, ranking
from training.synthetic import random_inputs, request_rows

# bf16 keeps 8 bits of mantissa: the trained reference model's probabilities moved by at most 0.01
# (docs/quantization.md); the small random model's, whose logits are near 0, by about 4e-5.
BF16_TOLERANCE = 1e-3


def bf16_model(config: DLRMConfig, seed: int = 7) -> DLRM:
    model = init_weights(build_dlrm(config), seed=seed)
    quantize_mlps(model, MlpDtype.BF16)
    return model.eval()


def probabilities(model: nn.Module, config: DLRMConfig, rows: int = 64, seed: int = 0) -> torch.Tensor:
    return scores(model, config, *random_inputs(config, rows, np.random.default_rng(seed), num_indices_per_lookup=2))


def scores(model: nn.Module, config: DLRMConfig, dense: np.ndarray, lengths: np.ndarray, values: np.ndarray):
    """Click probabilities of rows in the row-major request layout, in one forward."""
    with torch.inference_mode():
        logits = model(torch.from_numpy(dense), rows_to_kjt(config.sparse_feature_names, lengths, values))
    assert logits.dtype == torch.float32
    return torch.sigmoid(logits.squeeze(1))


def test_bf16_mlps_run_every_layer_but_the_logit_in_bf16(small_config: DLRMConfig) -> None:
    model = bf16_model(small_config)
    for arch in (model.dense_arch, model.over_arch):
        layers = [module for module in arch.modules() if isinstance(module, Bf16Linear | nn.Linear)]
        assert all(layer.weight.dtype == torch.bfloat16 for layer in layers if isinstance(layer, Bf16Linear))
        assert [layer.float_output for layer in layers if isinstance(layer, Bf16Linear)][-1]  # leaves the MLP fp32
    assert type(model.over_arch.model[-1]) is nn.Linear and model.over_arch.model[-1].weight.dtype == torch.float32
    assert not any(isinstance(module, nn.Linear) for module in model.dense_arch.modules())


def test_bf16_mlp_scores_stay_close_to_fp32(small_config: DLRMConfig) -> None:
    fp32 = init_weights(build_dlrm(small_config), seed=7).eval()
    difference = (probabilities(bf16_model(small_config), small_config) - probabilities(fp32, small_config)).abs()
    assert 0 < difference.max().item() < BF16_TOLERANCE


def test_a_row_s_bf16_score_does_not_depend_on_its_batch(small_config: DLRMConfig) -> None:
    """What the rollout gate needs (served scores within 1e-4 of those recorded at build, batched otherwise);
    int8's dynamic quantization, one activation scale per forward, cannot give it."""
    model = bf16_model(small_config)
    dense, lengths, values = random_inputs(small_config, 48, np.random.default_rng(3), num_indices_per_lookup=2)
    ends = np.cumsum(lengths.sum(axis=1))
    starts = ends - lengths.sum(axis=1)
    alone = [
        scores(model, small_config, dense[row : row + 1], lengths[row : row + 1], values[starts[row] : ends[row]])
        for row in range(len(dense))
    ]
    together = scores(model, small_config, dense, lengths, values)
    np.testing.assert_allclose(torch.cat(alone).numpy(), together.numpy(), rtol=0, atol=1e-6)


def test_bf16_mlp_artifacts_keep_fp32_weights_and_load_as_bf16(small_config: DLRMConfig, tmp_path: Path) -> None:
    spec = QuantizationSpec(mlp=MlpDtype.BF16)
    write_artifact(tmp_path, ModelArtifact(small_config, Provenance(False, 7), quantization=spec),
                   init_weights(build_dlrm(small_config), seed=7))  # fmt: skip
    assert json.loads((tmp_path / "model_config.json").read_text())["quantization"]["mlp"] == "bf16"
    weights = torch.load(tmp_path / WEIGHTS_FILE, weights_only=True)
    assert {weights[key].dtype for key in weights if key.startswith(("dense_arch", "over_arch"))} == {torch.float32}
    loaded, artifact = load_model(tmp_path)
    assert artifact.quantization.mlp == MlpDtype.BF16
    assert torch.equal(probabilities(loaded, small_config), probabilities(bf16_model(small_config), small_config))


@pytest.mark.parametrize("context_names", [SPARSE[:13], SPARSE], ids=["13-sparse", "all-sparse"])
def test_rankings_with_bf16_mlps_score_as_the_expanded_rows(context_names: list[str]) -> None:
    config = preset("small")
    artifact = ModelArtifact(config, Provenance(False, 5), quantization=QuantizationSpec(mlp=MlpDtype.BF16))
    predictor = DLRMPredictor(bf16_model(config, seed=5), artifact, torch.device("cpu"), max_rows=64)
    body, expanded = ranking(context_names, candidates=37, seed=len(context_names))
    ranked, plain = logits(predictor, body, {"instances": expanded})
    np.testing.assert_allclose(ranked, plain, rtol=0, atol=1e-5)
    assert predictor.ranking.folded.cache_info().misses == 0  # a bf16 first layer is not split


def test_the_default_mlp_precision_follows_the_shape_and_the_cpu() -> None:
    reference = MlpDtype.BF16 if native_bf16() else MlpDtype.NONE
    assert build_mar.parse_args(["--preset", "criteo-kaggle"]).quantization.mlp == reference
    assert build_mar.parse_args(["--preset", "criteo-1tb", "--quantize", "int8"]).quantization.mlp == reference
    assert build_mar.parse_args(["--preset", "small"]).quantization.mlp == MlpDtype.NONE
    assert build_mar.parse_args(["--preset", "criteo-kaggle", "--quantize-mlp", "none"]).quantization.mlp == "none"


def test_a_bf16_mlp_archive_serves_its_in_process_scores(tmp_path: Path, small_config: DLRMConfig) -> None:
    """Built by build_mar.py, loaded by a TorchServe worker: the scores of the same archive loaded in process,
    one row alone as among 16."""
    store = tmp_path / "store"
    result = build_archive(store / "bf16.mar", "--seed", "5", "--quantize-mlp", "bf16")
    assert result.returncode == 0, result.stderr
    rows = list(request_rows(*random_inputs(small_config, 16, np.random.default_rng(1), num_indices_per_lookup=3)))
    with TorchServeProcess(store, "bf16=bf16.mar", tmp_path / "torchserve") as server:
        server.wait_ready("bf16")
        url = f"{server.endpoints.inference}/predictions/bf16"
        response = requests.post(url, json={"instances": rows}, timeout=60)
        assert response.status_code == 200, response.text
        served = [prediction["logit"] for prediction in response.json()["predictions"]]
        single = requests.post(url, json={"instances": rows[:1]}, timeout=60).json()["predictions"][0]["logit"]
        description = requests.get(f"{server.endpoints.management}/models/bf16?customized=true", timeout=60)
    assert description.json()[0]["customizedMetadata"]["quantization"]["mlp"] == "bf16"
    with extracted(store / "bf16.mar") as directory:
        predictor = DLRMPredictor.from_artifact(directory, torch.device("cpu"))
    (expected,) = predictor.predict_bodies([json.dumps({"instances": rows}).encode()]).responses
    assert served == pytest.approx([p["logit"] for p in json.loads(expected.body)["predictions"]], abs=1e-6)
    assert single == pytest.approx(served[0], abs=1e-6)
