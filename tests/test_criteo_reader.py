import gzip
from pathlib import Path

import numpy as np
import pytest

from model_factory.config import DLRMConfig
from model_factory.features import Preprocessing
from tests.rows import raw_request_row
from training.criteo import CriteoFormatError, read_batches, read_raw_rows

CATS = ["05db9164", "38a947a1", "", "c0d61a5c"] + ["0000000a"] * 22
LINES = [
    "\t".join(["1", "5", "", "-2"] + ["3"] * 10 + CATS),
    "\t".join(["0"] + [""] * 13 + [""] * 26),
    "\t".join(["0", "0", "1", "2"] + ["4"] * 10 + list(reversed(CATS))),
]


def write(path: Path, lines: list[str]) -> Path:
    text = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as output:
            output.write(text)
    else:
        path.write_text(text)
    return path


def test_missing_values_are_nan_and_minus_one(tmp_path: Path) -> None:
    (rows,) = read_raw_rows([write(tmp_path / "day_0", LINES)])
    assert rows.labels.tolist() == [1.0, 0.0, 0.0]
    assert rows.ints[0, :3].tolist()[0] == 5 and np.isnan(rows.ints[0, 1]) and rows.ints[0, 2] == -2
    assert np.isnan(rows.ints[1]).all()
    assert rows.categories[0, :4].tolist() == [0x05DB9164, 0x38A947A1, -1, 0xC0D61A5C]
    assert (rows.categories[1] == -1).all()


def test_gzip_reads_the_same_as_plain(tmp_path: Path) -> None:
    (plain,) = read_raw_rows([write(tmp_path / "train.txt", LINES)])
    (packed,) = read_raw_rows([write(tmp_path / "train.txt.gz", LINES)])
    np.testing.assert_array_equal(plain.categories, packed.categories)
    np.testing.assert_array_equal(plain.ints, packed.ints)


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("1\t2\t3", "expected 40 tab-separated fields (label, 13 integers, 26 categories), got 3"),
        ("\t".join(["2"] + ["1"] * 13 + CATS), "label must be 0 or 1, got '2'"),
        ("\t".join(["", *["1"] * 13, *CATS]), "label is empty"),
        ("\t".join(["1", "1.5"] + ["1"] * 12 + CATS), "int_0 must be an integer, got '1.5'"),
        ("\t".join(["1", "1", " 7"] + ["1"] * 11 + CATS), "int_1 must be an integer, got ' 7'"),
        ("\t".join(["1"] + ["1"] * 13 + ["05db916x"] + CATS[1:]), "cat_0: expected 8 hex digits, got '05db916x'"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write(tmp_path / "bad.tsv", [LINES[0], LINES[1], bad_line])
    with pytest.raises(CriteoFormatError) as error:
        list(read_raw_rows([path]))
    assert str(error.value) == f"{path}:3: {message}"


def test_line_numbers_count_across_chunks(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.tsv", [LINES[0]] * 7 + ["0\tx"])
    with pytest.raises(CriteoFormatError, match=r"bad.tsv:8: "):
        list(read_raw_rows([path], chunk_lines=3))


def test_batches_stream_across_files_with_a_partial_last_batch(tmp_path: Path, small_config: DLRMConfig) -> None:
    first = write(tmp_path / "a.tsv", LINES * 3)
    second = write(tmp_path / "b.tsv.gz", LINES)
    batches = list(read_batches([first, second], 5, small_config, Preprocessing()))
    assert [b.labels.numel() for b in batches] == [5, 5, 2]
    assert [b.sparse_features.lengths().sum().item() for b in batches] == [5 * 26, 5 * 26, 2 * 26]


def test_batches_apply_the_shared_preprocessing(tmp_path: Path, small_config: DLRMConfig) -> None:
    (batch,) = read_batches([write(tmp_path / "a.tsv", LINES)], 3, small_config, Preprocessing())
    np.testing.assert_allclose(batch.dense_features[0, :3].numpy(), [np.log(6), 0.0, 0.0], rtol=1e-6)
    per_feature = batch.sparse_features.to_dict()
    assert per_feature["cat_0"].values().tolist() == [0x05DB9164 % 10_000, 0, 0x0000000A]
    assert per_feature["cat_3"].values().tolist() == [0xC0D61A5C % 7413, 0, 0x0000000A]
    assert per_feature["cat_2"].values().tolist() == [0, 0, 0x0000000A % 10_000]  # missing → row 0


def test_raw_request_row_keeps_present_values_only() -> None:
    row = raw_request_row(LINES[0])
    assert row["int_0"] == 5 and "int_1" not in row and row["int_2"] == -2
    assert row["cat_0"] == "05db9164" and "cat_2" not in row
    assert raw_request_row(LINES[1]) == {}
