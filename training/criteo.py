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
from torchrec.datasets.utils import Batch

from model_factory.config import DLRMConfig
from model_factory.features import (
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
    """Parse a chunk of TSV lines; ``first_line`` is the 1-based line number of ``lines[0]``."""
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
    paths: Iterable[Path], batch_size: int, config: DLRMConfig, preprocessing: Preprocessing
) -> Iterator[Batch]:
    """TorchRec batches of ``batch_size`` rows (the last one may be smaller), streaming from the files."""
    chunk_lines = max(batch_size, _CHUNK_LINES // batch_size * batch_size)
    pending: RawRows | None = None
    for chunk in read_raw_rows(paths, chunk_lines):
        rows = chunk if pending is None else _concat(pending, chunk)
        full = len(rows) // batch_size * batch_size
        for start in range(0, full, batch_size):
            yield to_batch(_slice(rows, start, start + batch_size), config, preprocessing)
        pending = _slice(rows, full, len(rows)) if full < len(rows) else None
    if pending is not None:
        yield to_batch(pending, config, preprocessing)


def _slice(rows: RawRows, start: int, stop: int) -> RawRows:
    return RawRows(rows.labels[start:stop], rows.ints[start:stop], rows.categories[start:stop])


def _concat(first: RawRows, second: RawRows) -> RawRows:
    return RawRows(
        np.concatenate([first.labels, second.labels]),
        np.concatenate([first.ints, second.ints]),
        np.concatenate([first.categories, second.categories]),
    )
