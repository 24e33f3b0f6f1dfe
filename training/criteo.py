"""Streaming reader for Criteo's raw click logs (Kaggle ``train.txt``, Terabyte ``day_N``).

Each line is ``label \\t int_0 .. int_12 \\t cat_0 .. cat_25``: a 0/1 label, 13
integers and 26 categorical values of 8 hex digits, tab-separated, an empty field
meaning missing. Files may be gzip-compressed (``.gz``).

The reader never loads a file into memory: it parses chunks of lines with NumPy
(column-wise, not value by value) and yields TorchRec ``Batch`` objects with the
features already preprocessed by :class:`~model_factory.features.Preprocessing`,
the same code the server applies to raw rows.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torchrec.datasets.utils import Batch

from model_factory.config import DLRMConfig
from model_factory.features import (
    HEX_DIGITS,
    MISSING_CATEGORY,
    CategoryFormatError,
    Preprocessing,
    parse_categories,
    rows_to_kjt,
)

NUM_INT = 13
NUM_CAT = 26
NUM_FIELDS = 1 + NUM_INT + NUM_CAT
_CHUNK_LINES = 65_536
# A data file may have a JSON description beside it (synthetic files record their planted AUC there).
METADATA_SUFFIX = ".meta.json"
_DECIMAL = re.compile(r"-?[0-9]+")
_DECIMAL_COLUMN = re.compile(r"(?:-?[0-9]*\t)*-?[0-9]*")


class CriteoFormatError(ValueError):
    """A malformed line; the message names the file, the line number and the field."""


@dataclass(frozen=True)
class RawRows:
    """Parsed but not yet preprocessed rows: float64 integers (NaN = missing), int64 categories (-1 = missing)."""

    labels: np.ndarray
    ints: np.ndarray
    categories: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def metadata_path(path: Path) -> Path:
    """Where the description of the data file ``path`` is: ``train.tsv`` → ``train.tsv.meta.json``."""
    return path.with_name(path.name + METADATA_SUFFIX)


def open_text(path: Path) -> TextIO:
    return gzip.open(path, "rt", newline="\n") if path.suffix == ".gz" else open(path, newline="\n")


def parse_lines(lines: list[str], path: Path, first_line: int) -> RawRows:
    """Parse a chunk of TSV lines; ``first_line`` is the 1-based line number of ``lines[0]``.

    Splitting lines into Python strings cost most of the reading time (the trainer
    waited on it), so a chunk is first parsed as one byte array by
    :func:`_parse_common`, which accepts only the plain spelling of valid rows.
    Anything else it hands, the whole chunk, to :func:`_parse_exactly`: a
    malformed line then gets its precise error, and a rare valid spelling (a
    label ``01``, an integer of more than 18 digits) its value.
    """
    rows = _parse_common(lines)
    return rows if rows is not None else _parse_exactly(lines, path, first_line)


# The most digits the fast path reads in an integer: 18 cannot overflow int64.
_COMMON_DIGITS = 18
_TAB, _LINE_FEED, _CARRIAGE_RETURN, _MINUS, _ZERO = b"\t\n\r-0"
# Past the last line, so that an 8-byte window from the start of an empty last field stays in the buffer.
_PADDING = "\0" * HEX_DIGITS


def _parse_common(lines: list[str]) -> RawRows | None:
    """The rows of a chunk in which every line is valid and plainly spelt, else ``None``.

    Works on the chunk's bytes with NumPy: the tab positions give every field's
    start and length; integers are decoded a digit position at a time across all
    fields, categories by one ``bytes.fromhex``. It is never more lenient than
    :func:`_parse_exactly`: a label is ``0`` or ``1``, an integer ``-?[0-9]+``
    of at most 18 digits, a category empty or 8 hex digits, a line ends in at
    most ``\\r\\n``.
    """
    text = "".join([*lines, _PADDING])
    if not lines or not text.isascii():  # ASCII: character offsets are byte offsets
        return None
    data = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    ends = np.cumsum(np.fromiter(map(len, lines), dtype=np.int64, count=len(lines)))
    starts = np.concatenate([[0], ends[:-1]])
    # Strip "\n" or "\r\n" from each line; any other line break, within a line or a third at its end, fails.
    breaks = (data == _LINE_FEED) | (data == _CARRIAGE_RETURN)
    stops = ends.copy()
    for _ in range(2):
        stops -= (stops > starts) & breaks[stops - 1]
    if np.count_nonzero(breaks) != (ends - stops).sum():
        return None
    # NUM_FIELDS - 1 tabs per line in all, each line's share (in order) within it: then each line has that many.
    tab_positions = np.flatnonzero(data == _TAB)
    if tab_positions.size != len(lines) * (NUM_FIELDS - 1):
        return None
    tabs = tab_positions.reshape(len(lines), NUM_FIELDS - 1)
    if (tabs[:, 0] < starts).any() or (tabs[:, -1] >= stops).any():
        return None
    field_starts = np.concatenate([starts[:, None], tabs + 1], axis=1)
    field_lengths = np.concatenate([tabs, stops[:, None]], axis=1) - field_starts
    labels = data[starts] - _ZERO  # uint8: bytes below "0" wrap to large values
    if (field_lengths[:, 0] != 1).any() or (labels > 1).any():
        return None
    integers = slice(1, 1 + NUM_INT)
    ints = _common_integers(data, field_starts[:, integers], field_lengths[:, integers])
    categories = _common_categories(data, field_starts[:, 1 + NUM_INT :], field_lengths[:, 1 + NUM_INT :])
    if ints is None or categories is None:
        return None
    return RawRows(labels=labels.astype(np.float32), ints=ints, categories=categories)


def _common_integers(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
    """Fields of ``-?[0-9]+`` (at most 18 digits) or empty → float64 (NaN where empty), else ``None``."""
    negative = data[starts] == _MINUS
    starts, lengths = starts + negative, lengths - negative  # the digits after a sign
    width = int(lengths.max())
    if width > _COMMON_DIGITS:
        return None
    valid = ~negative | (lengths > 0)
    values = np.zeros(starts.shape, dtype=np.int64)
    for position in range(width):
        digits = data[starts + position] - _ZERO  # uint8: non-digits wrap to >= 10
        inside = position < lengths
        valid &= ~inside | (digits < 10)
        values = np.where(inside, values * 10 + digits, values)
    if not valid.all():
        return None
    parsed = np.where(negative, -values, values).astype(np.float64)
    parsed[lengths == 0] = np.nan
    return parsed


def _common_categories(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
    """Fields of 8 hex digits or empty → unsigned 32-bit values as int64 (``MISSING_CATEGORY`` where empty),
    else ``None``: :func:`~model_factory.features.parse_categories`' rule, on bytes.

    ``bytes.fromhex`` decodes all fields at once; it would skip whitespace, but then
    it yields fewer than 4 bytes per field, which fails the length check.
    """
    present = lengths == HEX_DIGITS
    if not (present | (lengths == 0)).all():
        return None
    fields = sliding_window_view(data, HEX_DIGITS)[starts[present]]
    try:
        decoded = bytes.fromhex(fields.tobytes().decode("ascii"))
    except ValueError:
        return None
    if len(decoded) != 4 * len(fields):
        return None
    values = np.full(starts.shape, MISSING_CATEGORY, dtype=np.int64)
    values[present] = np.frombuffer(decoded, dtype=">u4")
    return values


def _parse_exactly(lines: list[str], path: Path, first_line: int) -> RawRows:
    """The reference parser: a valid chunk's rows, or its first error as ``file:line: field, message``."""
    fields = [line.rstrip("\r\n").split("\t") for line in lines]
    for offset, row in enumerate(fields):
        if len(row) != NUM_FIELDS:
            raise CriteoFormatError(
                f"{path}:{first_line + offset}: expected {NUM_FIELDS} tab-separated fields "
                f"(label, {NUM_INT} integers, {NUM_CAT} categories), got {len(row)}"
            )
    columns = list(zip(*fields, strict=True))
    labels = _parse_integer_column(columns[0], path, first_line, "label", allow_missing=False)
    bad_label = np.flatnonzero((labels != 0) & (labels != 1))
    if bad_label.size:
        line = first_line + int(bad_label[0])
        raise CriteoFormatError(f"{path}:{line}: label must be 0 or 1, got {columns[0][bad_label[0]]!r}")
    ints = np.stack(
        [
            _parse_integer_column(columns[1 + i], path, first_line, f"int_{i}", allow_missing=True)
            for i in range(NUM_INT)
        ],
        axis=1,
    )
    categories = np.empty((len(lines), NUM_CAT), dtype=np.int64)
    for i in range(NUM_CAT):
        try:
            categories[:, i] = parse_categories(columns[1 + NUM_INT + i])
        except CategoryFormatError as error:
            raise CriteoFormatError(f"{path}:{first_line + error.index}: cat_{i}: {error}") from None
    return RawRows(labels=labels.astype(np.float32), ints=ints, categories=categories)


def _parse_integer_column(
    column: tuple[str, ...], path: Path, first_line: int, name: str, allow_missing: bool
) -> np.ndarray:
    """Decimal integers → float64 (NaN where empty, if allowed).

    One regex pass over the joined column validates the syntax strictly (NumPy
    alone would accept ``" 12"`` or ``"1_000"``); NumPy then converts; Python
    looks at single values only to name a culprit.
    """
    values = np.array(column)
    missing = values == ""
    if missing.any() and not allow_missing:
        line = first_line + int(np.flatnonzero(missing)[0])
        raise CriteoFormatError(f"{path}:{line}: {name} is empty")
    try:
        if not _DECIMAL_COLUMN.fullmatch("\t".join(column)):
            raise ValueError
        parsed = np.where(missing, "0", values).astype(np.int64).astype(np.float64)
    except (ValueError, OverflowError):
        offset, value = next((i, v) for i, v in enumerate(column) if v and not _is_int64(v))
        raise CriteoFormatError(f"{path}:{first_line + offset}: {name} must be an integer, got {value!r}") from None
    parsed[missing] = np.nan
    return parsed


def _is_int64(text: str) -> bool:
    return bool(_DECIMAL.fullmatch(text)) and -(2**63) <= int(text) < 2**63


def request_row(line: str, config: DLRMConfig) -> dict[str, int | str | None]:
    """One TSV line (its label dropped) as a raw-row request of ``/predictions``: every feature keyed by
    ``config``'s names, null for missing. The line is not validated: parse it with :func:`parse_lines` first."""
    fields = line.rstrip("\r\n").split("\t")
    row: dict[str, int | str | None] = {
        name: int(text) if text else None
        for name, text in zip(config.dense_feature_names, fields[1 : 1 + NUM_INT], strict=True)
    }
    row |= {name: text or None for name, text in zip(config.sparse_feature_names, fields[1 + NUM_INT :], strict=True)}
    return row


def read_raw_rows(paths: Iterable[Path], chunk_lines: int = _CHUNK_LINES) -> Iterator[RawRows]:
    """Chunks of parsed rows from the files in order, streaming."""
    for path in paths:
        with open_text(path) as lines:
            line_number = 1
            while chunk := list(islice(lines, chunk_lines)):
                yield parse_lines(chunk, path, line_number)
                line_number += len(chunk)


def to_batch(rows: RawRows, config: DLRMConfig, preprocessing: Preprocessing) -> Batch:
    """Preprocess raw rows into a TorchRec ``Batch`` (one id per categorical feature)."""
    category_rows = preprocessing.category_rows(rows.categories, config.num_embeddings_per_feature)
    return Batch(
        dense_features=torch.from_numpy(preprocessing.dense(rows.ints)),
        sparse_features=rows_to_kjt(config.sparse_feature_names, np.ones_like(category_rows), category_rows.ravel()),
        labels=torch.from_numpy(rows.labels),
    )


def read_batches(
    paths: Iterable[Path],
    batch_size: int,
    config: DLRMConfig,
    preprocessing: Preprocessing,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Batch]:
    """This rank's TorchRec batches of ``batch_size`` rows (the last one may be smaller), streaming from the files.

    The files are one stream of global batches of ``batch_size × world_size``
    lines; rank ``rank`` takes the ``rank``-th ``batch_size`` lines of each and
    parses only those, so the ranks of a ``torchrun`` job split every global
    batch between them and ``world_size = 1`` reads everything. The stream's
    last global batch may leave a rank a short batch, or none. Lines are parsed
    a batch at a time, which also keeps NumPy's working set in cache.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
    for segments in _line_batches(paths, batch_size * world_size):
        mine = _cut(segments, rank * batch_size, (rank + 1) * batch_size)
        if mine:
            parsed = [parse_lines(lines, path, first_line) for path, first_line, lines in mine]
            yield to_batch(parsed[0] if len(parsed) == 1 else _concat(parsed), config, preprocessing)


# Consecutive lines of one file: its path, the 1-based number of the first line, the lines.
_Segment = tuple[Path, int, list[str]]


def _line_batches(paths: Iterable[Path], size: int) -> Iterator[list[_Segment]]:
    """The files' lines in groups of ``size`` (the last may be smaller), each group as one segment per file."""
    group: list[_Segment] = []
    count = 0
    for path in paths:
        with open_text(path) as lines:
            line_number = 1
            while lines_read := list(islice(lines, size - count)):
                group.append((path, line_number, lines_read))
                line_number += len(lines_read)
                count += len(lines_read)
                if count == size:
                    yield group
                    group, count = [], 0
    if group:
        yield group


def _cut(segments: list[_Segment], start: int, stop: int) -> list[_Segment]:
    """Lines ``[start, stop)`` of a group of segments, as segments."""
    cut, offset = [], 0
    for path, first_line, lines in segments:
        low, high = max(start - offset, 0), min(stop - offset, len(lines))
        if low < high:
            cut.append((path, first_line + low, lines[low:high]))
        offset += len(lines)
    return cut


def _concat(parts: list[RawRows]) -> RawRows:
    return RawRows(
        np.concatenate([part.labels for part in parts]),
        np.concatenate([part.ints for part in parts]),
        np.concatenate([part.categories for part in parts]),
    )
