"""Frequency-ordered tables: the counts, the ordered archive and its remap, scores equal to the id-ordered one.

The trainer records how often its first epoch looked up each row (``frequencies.pt``) and the standalone
pass counts the same from the TSV files; ``build_mar.py --frequencies`` writes each table's rows hottest
first with the id → row remap in ``tables.bin``, which FBGEMM's TBEs apply before every lookup. Scores must
be exactly those of the id-ordered archive, for every table dtype and every way a request reaches the model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model_factory.config import DLRMConfig
from model_factory.factory import table_name
from model_factory.features import Preprocessing
from model_factory.row_order import FREQUENCIES_FILE, Level, levels, load_frequencies, remap, row_order
from servers.torchserve import REPO_ROOT
from training.checkpoint import checkpoint_dirs
from training.criteo import read_raw_rows
from training.synthetic import PlantedClickModel, write_tsv
from training.train import TrainingConfig, train

TRAIN_ROWS = 20_000
BATCH = 512


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


def test_the_trainer_records_what_the_standalone_pass_counts(
    standalone: Path, data: dict[str, Path], small_config: DLRMConfig, tmp_path: Path
) -> None:
    """Two epochs: the frequencies are one pass over the training rows, not two."""
    run_training(data, small_config, tmp_path / "run", epochs=2)
    assert_same_counts(load_frequencies(tmp_path / "run", small_config), load_frequencies(standalone, small_config))


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
