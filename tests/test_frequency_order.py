"""Frequency-ordered tables: the counts, the ordered archive and its remap, scores equal to the id-ordered one.

The trainer records how often its first epoch looked up each row (``frequencies.pt``) and the standalone
pass counts the same from the TSV files; ``build_mar.py --frequencies`` writes each table's rows hottest
first with the id → row remap in ``tables.bin``, which FBGEMM's TBEs apply before every lookup. Scores must
be exactly those of the id-ordered archive, for every table dtype and every way a request reaches the model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest
import requests
import torch

from dlrm_client.client import encode_request, model_input_tensors, raw_row_tensors
from handler.predictor import DLRMPredictor, Request
from model_archive.build import BuildOptions, write_model_artifact
from model_archive.contents import extracted
from model_factory.artifact import CONFIG_FILE, load_model
from model_factory.config import DLRMConfig
from model_factory.factory import table_name
from model_factory.features import Preprocessing
from model_factory.quantization import QuantizationSpec, TableDtype
from model_factory.row_order import (
    FREQUENCIES_FILE,
    FrequencyOrder,
    Level,
    levels,
    load_frequencies,
    remap,
    row_order,
    save_frequencies,
)
from model_factory.tbe import table_remaps, table_views
from servers.torchserve import REPO_ROOT, TorchServeProcess
from tests.archives import QUANTIZATION_SPECS, build_archive
from tests.rows import columnar, random_row
from tests.test_ranking import JSON, SPARSE, oip_case, planted_rows, ranking
from training.checkpoint import checkpoint_dirs
from training.criteo import read_raw_rows
from training.synthetic import PlantedClickModel, format_tsv, random_inputs, write_tsv
from training.train import TrainingConfig, train

TRAIN_ROWS = 20_000
BATCH = 512
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("synthetic")
    planted = PlantedClickModel(seed=0)
    paths = {"train": directory / "train.tsv.gz", "validation": directory / "validation.tsv"}
    write_tsv(paths["train"], TRAIN_ROWS, planted, seed=1)
    write_tsv(paths["validation"], 2_000, planted, seed=2)
    return paths


@pytest.fixture(scope="module")
def standalone(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m training.frequencies`` over the training file, as a user runs it."""
    output = tmp_path_factory.mktemp("standalone")
    command = [sys.executable, "-m", "training.frequencies", "--preset", "small", "--train", str(data["train"])]
    result = subprocess.run([*command, "--output", str(output)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"counted {TRAIN_ROWS * 26:,} lookups" in result.stdout
    return output / FREQUENCIES_FILE


def bincounts(path: Path, config: DLRMConfig) -> dict[str, torch.Tensor]:
    """The counts computed independently: NumPy's bincount of each column of preprocessed rows."""
    rows = np.concatenate(
        [
            Preprocessing().category_rows(chunk.categories, config.num_embeddings_per_feature)
            for chunk in read_raw_rows([path])
        ]
    )
    return {
        table_name(feature): torch.from_numpy(np.bincount(rows[:, column], minlength=size))
        for column, (feature, size) in enumerate(
            zip(config.sparse_feature_names, config.num_embeddings_per_feature, strict=True)
        )
    }


def assert_same_counts(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def run_training(data: dict[str, Path], config: DLRMConfig, output: Path, **options) -> None:
    train(
        TrainingConfig(
            model=config,
            train_paths=(data["train"],),
            validation_paths=(data["validation"],),
            output=output,
            batch_size=BATCH,
            progress=False,
            **options,
        )
    )


def test_the_standalone_pass_counts_every_training_row(
    standalone: Path, data: dict[str, Path], small_config: DLRMConfig
) -> None:
    assert_same_counts(load_frequencies(standalone, small_config), bincounts(data["train"], small_config))


@pytest.fixture(scope="module")
def run(data: dict[str, Path], small_config: DLRMConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer output of two epochs: weights.pt, DCP checkpoints and frequencies.pt."""
    output = tmp_path_factory.mktemp("runs") / "small"
    run_training(data, small_config, output, epochs=2)
    return output


def test_the_trainer_records_what_the_standalone_pass_counts(
    standalone: Path, run: Path, small_config: DLRMConfig
) -> None:
    """Two epochs: the frequencies are one pass over the training rows, not two."""
    assert_same_counts(load_frequencies(run, small_config), load_frequencies(standalone, small_config))


def test_a_run_resumed_within_its_first_epoch_still_counts_every_row(
    standalone: Path, data: dict[str, Path], small_config: DLRMConfig, tmp_path: Path
) -> None:
    """The batches a resumed run skips are read, and counted; it writes frequencies.pt when the epoch ends."""
    output = tmp_path / "run"
    run_training(data, small_config, output, checkpoint_every=30, loader_workers=0)
    mid_epoch, end = checkpoint_dirs(output)
    shutil.rmtree(end)
    (output / FREQUENCIES_FILE).unlink()
    run_training(data, small_config, output, checkpoint_every=30, loader_workers=0, resume=True)
    assert checkpoint_dirs(output)[0] == mid_epoch
    assert_same_counts(load_frequencies(output, small_config), load_frequencies(standalone, small_config))


def test_two_ranks_record_the_counts_of_every_rank_summed(
    standalone: Path, data: dict[str, Path], small_config: DLRMConfig, tmp_path: Path
) -> None:
    """torchrun, 2 gloo ranks (~30 s): each counts its part of every global batch, rank 0 writes the sum. The last
    global batch (32 rows) is rank 0's alone: rank 1 has none, and both stop there."""
    assert TRAIN_ROWS % BATCH < BATCH // 2
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "training.train",
        "--preset", "small", "--train", str(data["train"]), "--validation", str(data["validation"]),
        "--output", str(tmp_path / "run"), "--batch-size", str(BATCH // 2), "--loader-workers", "0", "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_counts(load_frequencies(tmp_path / "run", small_config), load_frequencies(standalone, small_config))


def test_rows_are_ordered_by_descending_count_ties_by_id() -> None:
    counts = torch.tensor([3, 0, 7, 3, 1, 0, 7, 12], dtype=torch.int64)
    order = row_order(counts)
    assert order.tolist() == [7, 2, 6, 0, 3, 4, 1, 5]
    rows = remap(order)
    assert rows.dtype == torch.int32
    assert torch.equal(order[rows.long()], torch.arange(8))  # the remap is the order's inverse
    # Counts by power of two, hottest first: 12 | 7, 7 | 3, 3 | 1; never-seen rows belong to none.
    assert levels(counts) == (Level(8, 1, 12), Level(4, 2, 14), Level(2, 2, 6), Level(1, 1, 1))
    assert levels(torch.zeros(4, dtype=torch.int64)) == ()


# The ordered archive: rows hottest first, the remap, and exactly the id-ordered archive's answers.


def zipf_counts(config: DLRMConfig, seed: int) -> dict[str, torch.Tensor]:
    """Skewed counts over scattered ids (as hashed ids are), with ties and ids never seen."""
    generator = torch.Generator().manual_seed(seed)
    counts = {}
    for feature, rows in zip(config.sparse_feature_names, config.num_embeddings_per_feature, strict=True):
        by_rank = (1000 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.1).floor().long()
        counts[table_name(feature)] = by_rank[torch.randperm(rows, generator=generator)]
    return counts


@pytest.fixture(scope="module")
def frequencies(small_config: DLRMConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("frequencies") / FREQUENCIES_FILE
    save_frequencies(path, zipf_counts(small_config, seed=0))
    return path


def build_pair(root: Path, frequencies: Path, **options) -> tuple[Path, Path]:
    """The artifact ``build_mar.py`` would archive with ``options``, without and with ``frequencies``."""
    pair = root / "id-ordered", root / "frequency-ordered"
    write_model_artifact(BuildOptions(**options), pair[0])
    write_model_artifact(BuildOptions(**options, frequencies=frequencies), pair[1])
    return pair


def requests_of_every_kind(config: DLRMConfig) -> list[Request]:
    """Multi-hot reference rows, raw rows, rankings (rows and columns), and OIP JSON and binary tensors:
    plain, ranking and raw; every table's ids spread over its whole range."""
    rng = np.random.default_rng(5)
    reference = {"instances": [random_row(config, rng, max_ids=4) for _ in range(48)]}
    raw = {"instances": planted_rows(24, seed=6)}
    body, _ = ranking(SPARSE[:13], candidates=40, seed=7)
    dense, lengths, ids = random_inputs(config, 32, rng, num_indices_per_lookup=3, fixed_lookups=False)
    oip_ranking, _, _ = oip_case(rows=30, shared=np.arange(26) % 3 == 0, seed=8)
    raw_rows = [line.split("\t") for line in format_tsv(PlantedClickModel(seed=0).sample(8, rng)[0]).splitlines()]
    tensors = [
        model_input_tensors(dense, lengths, ids),
        oip_ranking,
        raw_row_tensors([row[1:14] for row in raw_rows], [row[14:] for row in raw_rows]),
    ]
    bodies = [reference, reference["instances"][0], raw, body, columnar(body)]
    requests = [Request(orjson.dumps(body)) for body in bodies]
    for tensor_set in tensors:
        for binary in (False, True):
            encoded, headers = encode_request(tensor_set, binary)
            requests.append(Request(encoded, {key.lower(): value for key, value in headers.items()}))
    return requests


def answers(predictor: DLRMPredictor, requests: list[Request]) -> list[tuple[int, bytes]]:
    """Each request's status and body, from one batch of all of them and from each alone."""
    together = [(response.status, response.body) for response in predictor.predict(requests).responses]
    alone = [(answer.status, answer.body) for request in requests for answer in predictor.predict([request]).responses]
    return together + alone


@pytest.mark.parametrize("name", sorted(QUANTIZATION_SPECS))
def test_every_request_is_answered_exactly_as_by_the_id_ordered_archive(
    name: str, frequencies: Path, small_config: DLRMConfig, tmp_path: Path
) -> None:
    """Every table dtype (fp32 table-batched, fp16, int8, int4, mixed, int8 with int8 MLPs): byte-identical
    responses in every wire format, multi-hot rows and rankings included."""
    id_ordered, ordered = build_pair(tmp_path, frequencies, seed=3, quantization=QUANTIZATION_SPECS[name])
    requests = requests_of_every_kind(small_config)
    expected = answers(DLRMPredictor.from_artifact(id_ordered, CPU), requests)
    assert [status for status, _ in expected] == [200] * 2 * len(requests)
    assert answers(DLRMPredictor.from_artifact(ordered, CPU), requests) == expected


def test_the_ordered_file_holds_each_table_hottest_first_and_its_remap(
    frequencies: Path, small_config: DLRMConfig, tmp_path: Path
) -> None:
    id_ordered, ordered = build_pair(tmp_path, frequencies, seed=3, quantization=QUANTIZATION_SPECS["mixed"])
    counts = load_frequencies(frequencies, small_config)
    id_model, id_artifact = load_model(id_ordered)
    model, artifact = load_model(ordered)
    assert (id_artifact.format_version, artifact.format_version) == (2, 3)
    assert artifact.frequency_order == FrequencyOrder.of(counts)
    assert "frequency_order" not in json.loads((id_ordered / CONFIG_FILE).read_text())
    layout = artifact.table_file()
    (part,) = layout.tbes  # one TBE: its rows as in the id-ordered file, then its remap on the next page
    assert part == replace(id_artifact.table_file().tbes[0], remap_offset=-(-part.size // 4096) * 4096)
    assert layout.size - 4 * sum(small_config.num_embeddings_per_feature) == part.remap_offset
    id_views = table_views(id_model.sparse_arch.embedding_bag_collection)
    views = table_views(model.sparse_arch.embedding_bag_collection)
    remaps = table_remaps(model.sparse_arch.embedding_bag_collection)
    for name, table_counts in counts.items():
        order = row_order(table_counts)
        assert torch.equal(views[name], id_views[name][order]), name
        assert torch.equal(table_counts[order], table_counts.sort(descending=True).values), name
        assert torch.equal(remaps[name], remap(order)), name
    assert table_remaps(id_model.sparse_arch.embedding_bag_collection) == {}


@pytest.mark.parametrize("kind", ["weights.pt", "DCP checkpoint"])
def test_a_trained_checkpoint_ordered_by_its_own_frequencies_scores_as_id_ordered(
    kind: str, run: Path, small_config: DLRMConfig, tmp_path: Path
) -> None:
    """The trainer's output, by its frequencies.pt: from weights.pt, and from its DCP checkpoint (read table by
    table, each quantized and ordered as it is written)."""
    checkpoint = run if kind == "weights.pt" else checkpoint_dirs(run)[-1]
    config = {} if kind == "weights.pt" else {"preset": "small"}
    id_ordered, ordered = build_pair(
        tmp_path, run, checkpoint=checkpoint, quantization=QuantizationSpec(TableDtype.INT8), **config
    )
    requests = requests_of_every_kind(small_config)
    expected = answers(DLRMPredictor.from_artifact(id_ordered, CPU), requests)
    assert answers(DLRMPredictor.from_artifact(ordered, CPU), requests) == expected


def test_sharded_ordered_tables_score_as_sharded_id_ordered_ones(
    frequencies: Path, small_config: DLRMConfig, tmp_path: Path
) -> None:
    """Sharded over two CPU ranks (TorchRec's inference sharding builds its own TBEs): each gets its tables'
    remaps."""
    id_ordered, ordered = build_pair(tmp_path, frequencies, seed=4, quantization=QUANTIZATION_SPECS["mixed"])
    requests = requests_of_every_kind(small_config)
    expected = answers(DLRMPredictor.from_artifact(id_ordered, CPU, shard_tables_gpus=2), requests)
    assert [status for status, _ in expected] == [200] * 2 * len(requests)
    assert answers(DLRMPredictor.from_artifact(ordered, CPU, shard_tables_gpus=2), requests) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["fp32", "fp16", "int8", "int4", "mixed"])
def test_ordered_tables_on_gpu_score_as_id_ordered_ones(
    name: str, frequencies: Path, small_config: DLRMConfig, tmp_path: Path
) -> None:
    """On a GPU the file is streamed and the remap copied to the device, where FBGEMM's kernel applies it."""
    id_ordered, ordered = build_pair(tmp_path, frequencies, seed=3, quantization=QUANTIZATION_SPECS[name])
    gpu = torch.device("cuda", 0)
    requests = requests_of_every_kind(small_config)
    expected = answers(DLRMPredictor.from_artifact(id_ordered, gpu), requests)
    assert [status for status, _ in expected] == [200] * 2 * len(requests)
    assert answers(DLRMPredictor.from_artifact(ordered, gpu), requests) == expected


def test_build_mar_serves_an_ordered_archive_as_the_id_ordered_one_in_process(
    run: Path, small_config: DLRMConfig, tmp_path: Path
) -> None:
    """build_mar.py --frequencies RUN, zipped, served by a real TorchServe: the id-ordered archive's scores."""
    store = tmp_path / "store"
    built = {
        name: build_archive(store / f"{name}.mar", "--checkpoint", str(run), "--quantize", "int8", *extra)
        for name, extra in (("ordered", ["--frequencies", str(run)]), ("plain", []))
    }
    assert all(result.returncode == 0 for result in built.values()), [result.stderr for result in built.values()]
    assert "rows in descending training frequency" in built["ordered"].stdout
    with extracted(store / "plain.mar") as directory:
        predictor = DLRMPredictor.from_artifact(directory, CPU)
    body = {"instances": [random_row(small_config, np.random.default_rng(1)) for _ in range(16)]}
    (expected,) = predictor.predict_bodies([orjson.dumps(body)]).responses
    rank, _ = ranking(SPARSE[:13], candidates=20, seed=2)
    (expected_rank,) = predictor.predict_bodies([orjson.dumps(rank)]).responses
    with TorchServeProcess(store, "dlrm=ordered.mar", tmp_path / "torchserve") as server:
        server.wait_ready()
        url = f"{server.endpoints.inference}/predictions/dlrm"
        served = requests.post(url, data=orjson.dumps(body), headers=JSON, timeout=30)
        served_rank = requests.post(url, data=orjson.dumps(rank), headers=JSON, timeout=30)
    assert served.status_code == 200, served.text
    assert served.json() == orjson.loads(expected.body)
    assert served_rank.json() == orjson.loads(expected_rank.body)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "none"], "frequency order applies to table-batched tables (tables.bin): give --quantize"),
        (["--preset", "criteo-kaggle"], "t_cat_0 must be 100000 int64 counts (one per row), got torch.int64 (10000,)"),
        (["--frequencies", "missing.pt"], "cannot read the frequencies missing.pt"),
    ],
)
def test_frequencies_that_cannot_order_the_tables_are_refused(
    args: list[str], message: str, frequencies: Path, tmp_path: Path
) -> None:
    result = build_archive(tmp_path / "dlrm.mar", "--frequencies", str(frequencies), *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not (tmp_path / "dlrm.mar").exists()
