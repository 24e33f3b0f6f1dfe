"""The background loader yields read_batches' batches; the fast TSV parser agrees with the exact one."""

from __future__ import annotations

import string
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchrec.datasets.utils import Batch

from model_factory.config import DLRMConfig
from model_factory.features import Preprocessing
from training.criteo import (
    NUM_CAT,
    NUM_FIELDS,
    NUM_INT,
    CriteoFormatError,
    RawRows,
    _parse_common,
    _parse_exactly,
    open_text,
    parse_lines,
    read_batches,
)
from training.loader import prefetched_batches
from training.synthetic import PlantedClickModel, write_tsv

PATH = Path("day_0")
FUZZ = settings(
    max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two files, one gzip, neither a whole number of batches long."""
    directory = tmp_path_factory.mktemp("criteo")
    paths = [directory / "a.tsv.gz", directory / "b.tsv"]
    write_tsv(paths[0], 1_030, PlantedClickModel(seed=0), seed=1)
    write_tsv(paths[1], 517, PlantedClickModel(seed=0), seed=2)
    return paths


def assert_same_batches(actual: list[Batch], expected: list[Batch]) -> None:
    assert len(actual) == len(expected)
    for mine, theirs in zip(actual, expected, strict=True):
        assert mine.sparse_features.keys() == theirs.sparse_features.keys()
        for tensor, reference in [
            (mine.dense_features, theirs.dense_features),
            (mine.labels, theirs.labels),
            (mine.sparse_features.values(), theirs.sparse_features.values()),
            (mine.sparse_features.lengths(), theirs.sparse_features.lengths()),
        ]:
            assert tensor.dtype == reference.dtype and torch.equal(tensor, reference)


@pytest.mark.parametrize(("workers", "rank", "world_size"), [(1, 0, 1), (2, 0, 1), (2, 1, 2), (1, 2, 3)])
def test_prefetched_batches_are_read_batches(
    files: list[Path], small_config: DLRMConfig, workers: int, rank: int, world_size: int
) -> None:
    expected = list(read_batches(files, 100, small_config, Preprocessing(), rank=rank, world_size=world_size))
    actual = prefetched_batches(
        files, 100, small_config, Preprocessing(), rank=rank, world_size=world_size, workers=workers, prefetch=2
    )
    assert_same_batches(list(actual), expected)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_line_reaches_the_caller_with_its_file_and_line(
    files: list[Path], tmp_path: Path, small_config: DLRMConfig, workers: int
) -> None:
    with open_text(files[1]) as source:
        lines = source.readlines()[:20]
    fields = lines[10].split("\t")
    lines[10] = "\t".join([fields[0], "1.5", *fields[2:]])
    path = tmp_path / "bad.tsv"
    path.write_text("".join(lines))
    received = []
    with pytest.raises(CriteoFormatError) as error:
        for batch in prefetched_batches([path], 4, small_config, Preprocessing(), workers=workers):
            received.append(batch)
    assert str(error.value) == f"{path}:11: int_0 must be an integer, got '1.5'"
    assert_same_batches(received, list(islice(read_batches([path], 4, small_config, Preprocessing()), 2)))


def test_workers_and_prefetch_must_be_positive(files: list[Path], small_config: DLRMConfig) -> None:
    with pytest.raises(ValueError, match="must be at least 1"):
        next(prefetched_batches(files, 100, small_config, Preprocessing(), workers=0))


# ---------------------------------------------------------------- the fast parser against the exact one

HEX_8 = st.text(alphabet=string.hexdigits, min_size=8, max_size=8)
PLAIN_LABELS = st.sampled_from(["0", "1"])
PLAIN_INTS = st.one_of(st.just(""), st.integers(-(10**18) + 1, 10**18 - 1).map(str))
PLAIN_CATEGORIES = st.one_of(st.just(""), HEX_8)
PLAIN_ENDINGS = st.sampled_from(["\n", "\r\n", ""])
# Spellings next to the plain ones: valid only to the exact parser, or not at all.
ODD_LABELS = st.sampled_from(["", "2", "01", "00", "-0", "-1", " 1", "1 ", "x", "1\r"])
ODD_INTS = st.one_of(
    st.sampled_from(["-", "--1", "-0", "007", "+3", " 7", "7 ", "1.5", "1_000", "1e3", "0x1f", "٣", "\x00", "\r"]),
    st.sampled_from(["9223372036854775807", "-9223372036854775808", "9223372036854775808", "-9223372036854775809"]),
    st.integers(-(2**64), 2**64).map(str),
)
ODD_CATEGORIES = st.one_of(
    st.sampled_from(["05db916x", " 5db9164", "05db 164", "05db9164 ", "5db9164", "005db9164", "é5db9164", "05db\n164"]),
    st.text(alphabet=string.hexdigits + " xg-\r\n", min_size=6, max_size=10),
)
ODD_ENDINGS = st.sampled_from(["\r", "\r\r\n", "\n\n", "\n\r"])


@st.composite
def lines(draw: st.DrawFn, plain: bool) -> list[str]:
    """1-6 TSV lines; unless ``plain``, each with up to 2 fields or its line end oddly spelt, and 1 in 50 a field
    short or long."""
    chunk = []
    for _ in range(draw(st.integers(1, 6))):
        fields = [draw(PLAIN_LABELS)]
        fields += [draw(PLAIN_INTS) for _ in range(NUM_INT)]
        fields += [draw(PLAIN_CATEGORIES) for _ in range(NUM_CAT)]
        ending = draw(PLAIN_ENDINGS)
        for _ in range(0 if plain else draw(st.integers(0, 2))):
            position = draw(st.integers(0, NUM_FIELDS))
            if position == NUM_FIELDS:
                ending = draw(ODD_ENDINGS)
            else:
                fields[position] = draw(
                    ODD_LABELS if position == 0 else ODD_INTS if position <= NUM_INT else ODD_CATEGORIES
                )
        if not plain:
            fields = draw(st.sampled_from([fields] * 48 + [fields[:-1], [*fields, ""]]))
        chunk.append("\t".join(fields) + ending)
    return chunk


def assert_same_rows(actual: RawRows, expected: RawRows) -> None:
    for mine, theirs in [
        (actual.labels, expected.labels),
        (actual.ints, expected.ints),
        (actual.categories, expected.categories),
    ]:
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        np.testing.assert_array_equal(mine, theirs)


@FUZZ
@given(lines(plain=True))
def test_the_fast_parser_takes_plain_rows(chunk: list[str]) -> None:
    fast = _parse_common(chunk)
    assert fast is not None
    assert_same_rows(fast, _parse_exactly(chunk, PATH, 1))


@FUZZ
@given(lines(plain=False))
def test_parse_lines_equals_the_exact_parser(chunk: list[str]) -> None:
    """Whatever the fast path accepts the exact parser accepts alike; what it rejects gets the exact error."""
    fast = _parse_common(chunk)
    try:
        exact = _parse_exactly(chunk, PATH, 7)
    except CriteoFormatError as error:
        assert fast is None
        with pytest.raises(CriteoFormatError) as raised:
            parse_lines(chunk, PATH, 7)
        assert str(raised.value) == str(error)
        return
    assert_same_rows(parse_lines(chunk, PATH, 7), exact)
    if fast is not None:
        assert_same_rows(fast, exact)


PLAIN_FIELDS = ["1", *["3"] * NUM_INT, *["05db9164"] * NUM_CAT]


@pytest.mark.parametrize(
    ("position", "text", "ending"),
    [
        (0, "01", "\n"),
        (0, "-0", "\n"),
        (1, "-0", "\n"),
        (1, "-007", "\n"),
        (1, "9223372036854775807", "\n"),
        (1, "-9223372036854775808", "\n"),
        (1, "3", "\r\r\n"),
        (1, "3", "\r"),
        (1, "3", "\n\n"),
    ],
)
def test_valid_odd_spellings_read_as_the_exact_parser_reads_them(position: int, text: str, ending: str) -> None:
    fields = PLAIN_FIELDS.copy()
    fields[position] = text
    chunk = ["\t".join(PLAIN_FIELDS) + "\n", "\t".join(fields) + ending]
    rows = parse_lines(chunk, PATH, 1)
    assert_same_rows(rows, _parse_exactly(chunk, PATH, 1))
    assert [rows.labels[1], rows.ints[1, 0]] == [float(int(fields[0])), float(int(fields[1]))]


def test_the_fast_parser_reads_a_whole_generated_file_alike(files: list[Path]) -> None:
    with open_text(files[0]) as source:
        chunk = source.readlines()
    fast = _parse_common(chunk)
    assert fast is not None
    assert_same_rows(fast, _parse_exactly(chunk, files[0], 1))
