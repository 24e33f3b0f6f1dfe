"""Table-batched tables (fp32, fp16, int8, int4) and int8 MLPs: layouts, exact round trips, accuracy, serving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from handler.predictor import DLRMPredictor
from model_archive.contents import extracted
from model_factory.artifact import TABLES_FILE, ModelArtifact, Provenance, load_model, write_artifact
from model_factory.config import ConfigError, DLRMConfig, preset
from model_factory.factory import build_dlrm, init_weights, summarize
from model_factory.features import rows_to_kjt
from model_factory.quantization import MlpDtype, QuantizationSpec, TableDtype, quantize_model_tables
from model_factory.random_tables import random_quantized_model
from model_factory.tbe import table_file_layout, table_views
from servers.torchserve import TorchServeProcess
from tests.archives import QUANTIZATION_SPECS, build_archive
from training.synthetic import random_inputs, request_rows

SPECS = QUANTIZATION_SPECS


def scores(model, config: DLRMConfig, seed: int = 0, rows: int = 64) -> torch.Tensor:
    dense, lengths, values = random_inputs(config, rows, np.random.default_rng(seed), num_indices_per_lookup=2)
    with torch.inference_mode():
        logits = model(torch.from_numpy(dense), rows_to_kjt(config.sparse_feature_names, lengths, values))
    return torch.sigmoid(logits.squeeze(1))


def test_row_layouts_of_the_criteo_1tb_tables() -> None:
    config = preset("criteo-1tb")
    for dtype, row_bytes, gigabytes in (
        (TableDtype.FP32, 256, 45.55),
        (TableDtype.INT8, 68, 12.10),
        (TableDtype.INT4, 36, 6.41),
        (TableDtype.FP16, 128, 22.78),
    ):
        tables = [table for part in table_file_layout(config, QuantizationSpec(dtype)).tbes for table in part.tables]
        assert {table.row_bytes for table in tables} == {row_bytes}
        total = sum(table.rows * table.row_bytes for table in tables)
        assert total / 1e9 == pytest.approx(gigabytes, abs=0.01)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_quantized_artifacts_round_trip_exactly(name: str, small_config: DLRMConfig, tmp_path: Path) -> None:
    spec = SPECS[name]
    model = quantize_model_tables(init_weights(build_dlrm(small_config), seed=1), small_config, spec)
    artifact = ModelArtifact(small_config, Provenance(trained=False, seed=1), quantization=spec)
    write_artifact(tmp_path, artifact, model)
    loaded, loaded_artifact = load_model(tmp_path)
    assert loaded_artifact.quantization == spec
    original_views = table_views(model.sparse_arch.embedding_bag_collection)
    loaded_views = table_views(loaded.sparse_arch.embedding_bag_collection)
    assert all(torch.equal(original_views[table], loaded_views[table]) for table in original_views)
    if spec.mlp == MlpDtype.NONE:
        assert torch.equal(scores(model.eval(), small_config), scores(loaded, small_config))


@pytest.mark.parametrize(("name", "tolerance"), [("fp16", 1e-3), ("int8", 2e-2), ("int4", 0.15), ("int8+mlp", 0.15)])
def test_quantized_scores_stay_close_to_fp32(name: str, tolerance: float, artifact_dir: Path) -> None:
    fp32, artifact = load_model(artifact_dir)
    reference = scores(fp32, artifact.model)
    model = init_weights(build_dlrm(artifact.model), seed=7)  # the artifact's weights: seed 7 (conftest)
    quantized = quantize_model_tables(model, artifact.model, SPECS[name])
    if SPECS[name].mlp == MlpDtype.INT8:
        from model_factory.quantization import quantize_mlps  # noqa: PLC0415

        quantize_mlps(quantized)
    difference = (scores(quantized.eval(), artifact.model) - reference).abs().max().item()
    assert 0 < difference < tolerance


def test_fp32_table_batched_tables_score_exactly_as_torchrec_s_own_modules(artifact_dir: Path) -> None:
    """One FBGEMM lookup for all tables instead of one ``EmbeddingBag`` per table: the same sums, bit for bit."""
    modules, artifact = load_model(artifact_dir)
    table_batched = quantize_model_tables(
        init_weights(build_dlrm(artifact.model), seed=7), artifact.model, SPECS["fp32"]
    )  # the artifact's weights: seed 7 (conftest)
    assert type(table_batched.sparse_arch.embedding_bag_collection).__module__.startswith("torchrec.quant")
    assert torch.equal(scores(table_batched.eval(), artifact.model), scores(modules, artifact.model))


def test_random_quantized_tables_are_seeded_bounded_and_never_fp32(small_config: DLRMConfig) -> None:
    spec = QuantizationSpec(TableDtype.INT8, per_table={"cat_1": TableDtype.INT4, "cat_2": TableDtype.FP16})
    model = random_quantized_model(small_config, spec, seed=3)
    again = random_quantized_model(small_config, spec, seed=3)
    other = random_quantized_model(small_config, spec, seed=4)
    views = table_views(model.sparse_arch.embedding_bag_collection)
    assert all(torch.equal(views[t], table_views(again.sparse_arch.embedding_bag_collection)[t]) for t in views)
    assert not torch.equal(views["t_cat_0"], table_views(other.sparse_arch.embedding_bag_collection)["t_cat_0"])
    assert not any(
        isinstance(p, torch.nn.Parameter) and p.dim() == 2 and p.shape[0] >= 10_000 for p in model.parameters()
    )
    module = model.sparse_arch.embedding_bag_collection._emb_modules[0]
    for (_, rows, _, _, _), (data, scale, bias) in zip(
        module.embedding_specs, module.split_embedding_weights_with_scale_bias(2), strict=True
    ):
        bound = (1 / rows) ** 0.5
        if scale is None:  # fp16 values
            values = data.contiguous().view(torch.float16)
            assert values.abs().max() <= bound * 1.001 and values.abs().sum() > 0
        else:
            assert data.sum() > 0  # never zero-filled
            assert torch.allclose(bias.float(), torch.tensor(-bound), rtol=1e-3)
            assert scale.float().max() * (255 if data.shape[1] == 16 else 15) <= 2 * bound * 1.01
    assert torch.isfinite(scores(model.eval(), small_config)).all()


def test_summary_measures_int4_tables_where_fbgemm_keeps_them(small_config: DLRMConfig) -> None:
    model = random_quantized_model(small_config, QuantizationSpec(TableDtype.INT4), seed=0)
    sparse = {row.name: row for row in summarize(model)}["sparse_arch"]
    assert sparse.parameters == sum(small_config.num_embeddings_per_feature) * small_config.embedding_dim
    rows = sum(small_config.num_embeddings_per_feature)
    assert rows * 12 <= sparse.bytes <= rows * 12 + 26 * 64  # 8 bytes of codes + 4 of scale/bias per row


def test_a_truncated_tables_file_is_refused(small_config: DLRMConfig, tmp_path: Path) -> None:
    spec = QuantizationSpec(TableDtype.INT8)
    artifact = ModelArtifact(small_config, Provenance(trained=False, seed=0), quantization=spec)
    write_artifact(tmp_path, artifact, random_quantized_model(small_config, spec, seed=0))
    with open(tmp_path / TABLES_FILE, "r+b") as tables:
        tables.truncate(1000)
    with pytest.raises(ConfigError, match="holds 1000 bytes"):
        load_model(tmp_path)


def test_mixing_fp32_and_quantized_tables_is_refused(small_config: DLRMConfig) -> None:
    with pytest.raises(ConfigError, match="quantize every table or none"):
        ModelArtifact(
            small_config, Provenance(False, 0), quantization=QuantizationSpec(per_table={"cat_0": TableDtype.INT8})
        )
    with pytest.raises(ConfigError, match="unknown features"):
        ModelArtifact(
            small_config,
            Provenance(False, 0),
            quantization=QuantizationSpec(TableDtype.INT8, {"cat_99": TableDtype.INT4}),
        )


def test_ids_above_2_to_the_24_hit_their_own_rows(tmp_path: Path) -> None:
    """Ids float32 cannot represent (2**24 + 1 rounds to 2**24) reach distinct rows, served and in-process."""
    big = 2**24
    config = DLRMConfig(
        num_embeddings_per_feature=(big + 2,),
        embedding_dim=2,
        dense_arch_layer_sizes=(2,),
        over_arch_layer_sizes=(4, 1),
        dense_feature_names=("int_0",),
        sparse_feature_names=("cat_0",),
    )
    spec = QuantizationSpec(TableDtype.INT8)
    model = random_quantized_model(config, spec, seed=0)
    (data, _, _) = model.sparse_arch.embedding_bag_collection._emb_modules[0].split_embedding_weights_with_scale_bias(
        2
    )[0]
    data[big].fill_(0)  # the lowest value in every dimension ...
    data[big + 1].fill_(255)  # ... and the highest: rows that must give different scores
    with torch.no_grad():  # a positive dense embedding, so the interaction (and the score) sees the sparse row
        model.dense_arch.model._mlp[-1]._linear.bias.fill_(1.0)
    store = tmp_path / "store"
    write_artifact(store / "dlrm", ModelArtifact(config, Provenance(False, 0), quantization=spec), model)

    predictor = DLRMPredictor.from_artifact(store / "dlrm", torch.device("cpu"))
    bodies = [
        json.dumps({"float_features": [0.5], "id_list_features.lengths": [1], "id_list_features.values": [i]})
        for i in (big, big + 1)
    ]
    in_process = [json.loads(response.body)["logit"] for response in predictor.predict_bodies(bodies).responses]
    assert in_process[0] != in_process[1]
    with torch.inference_mode():
        for identifier, logit in zip((big, big + 1), in_process, strict=True):
            sparse = rows_to_kjt(["cat_0"], np.array([[1]]), np.array([identifier]))
            assert logit == pytest.approx(model.eval()(torch.tensor([[0.5]]), sparse).item(), abs=1e-6)

    # The same through TorchServe, from an unzipped (no-archive) model directory.
    result = build_archive(
        store / "served.mar", "--config", str(_write_config(tmp_path, config)), "--quantize", "int8",
        "--archive-format", "no-archive",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (store / "served" / TABLES_FILE).write_bytes((store / "dlrm" / TABLES_FILE).read_bytes())  # our edited rows
    (store / "served" / "weights.pt").write_bytes((store / "dlrm" / "weights.pt").read_bytes())
    with TorchServeProcess(store, "dlrm=served", tmp_path / "torchserve") as server:
        server.wait_ready()
        url = f"{server.endpoints.inference}/predictions/dlrm"
        headers = {"Content-Type": "application/json"}
        served = [requests.post(url, data=body, headers=headers, timeout=30).json()["logit"] for body in bodies]
    assert served == pytest.approx(in_process, abs=1e-6)


def _write_config(directory: Path, config: DLRMConfig) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    return path


def test_quantized_archives_serve_like_in_process(tmp_path: Path, small_config: DLRMConfig) -> None:
    """int8 (zipped), fp32 table-batched, int4 and int8 tables + int8 MLPs (unzipped) through one real TorchServe."""
    store = tmp_path / "store"
    builds = {
        "int8": ["--quantize", "int8"],
        "fp32": ["--quantize", "fp32", "--archive-format", "no-archive"],
        "int4": ["--quantize", "int4", "--archive-format", "no-archive"],
        "int8mlp": ["--quantize", "int8", "--quantize-mlp", "int8", "--archive-format", "no-archive"],
    }
    for name, flags in builds.items():
        result = build_archive(store / f"{name}.mar", "--seed", "5", *flags)
        assert result.returncode == 0, result.stderr
    rows = list(request_rows(*random_inputs(small_config, 16, np.random.default_rng(1), num_indices_per_lookup=3)))
    models = "int8=int8.mar fp32=fp32 int4=int4 int8mlp=int8mlp"
    with TorchServeProcess(store, models, tmp_path / "torchserve") as server:
        for name in builds:
            server.wait_ready(name)
        for name in builds:
            response = requests.post(f"{server.endpoints.inference}/predictions/{name}", json={"instances": rows})
            assert response.status_code == 200, response.text
            served = [p["logit"] for p in response.json()["predictions"]]
            with extracted(store / f"{name}.mar") as directory:
                predictor = DLRMPredictor.from_artifact(directory, torch.device("cpu"))
            expected = json.loads(predictor.predict_bodies([json.dumps({"instances": rows})]).responses[0].body)
            assert served == pytest.approx([p["logit"] for p in expected["predictions"]], abs=1e-5)
            description = requests.get(f"{server.endpoints.management}/models/{name}?customized=true").json()[0]
            assert description["customizedMetadata"]["quantization"]["tables"] == builds[name][1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["fp32", "fp16", "int8", "int4"])
def test_quantized_tables_on_gpu_match_cpu(name: str, small_config: DLRMConfig, tmp_path: Path) -> None:
    spec = SPECS[name]
    artifact = ModelArtifact(small_config, Provenance(trained=False, seed=2), quantization=spec)
    write_artifact(tmp_path, artifact, random_quantized_model(small_config, spec, seed=2))
    cpu = DLRMPredictor.from_artifact(tmp_path, torch.device("cpu"))
    gpu = DLRMPredictor.from_artifact(tmp_path, torch.device("cuda", 0))
    rows = list(request_rows(*random_inputs(small_config, 32, np.random.default_rng(0), num_indices_per_lookup=2)))
    body = [json.dumps({"instances": rows})]
    cpu_logits = [p["logit"] for p in json.loads(cpu.predict_bodies(body).responses[0].body)["predictions"]]
    gpu_logits = [p["logit"] for p in json.loads(gpu.predict_bodies(body).responses[0].body)["predictions"]]
    assert gpu_logits == pytest.approx(cpu_logits, abs=1e-3)
