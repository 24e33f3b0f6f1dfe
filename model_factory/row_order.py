"""Table rows in descending order of how often the training rows looked their ids up.

Lookups are skewed: a small share of each table's rows takes almost every lookup.
In id order (Criteo's ids are hashed) those rows are spread over all of a table's
pages, so a worker whose tables do not fit in memory needs nearly every page
resident to serve them. In frequency order they are the table's first rows,
packed in the fewest pages: the prefix :mod:`model_factory.residency` keeps
resident.

- ``frequencies.pt``: per table, one int64 count per row (0 for ids never seen),
  written by the trainer beside its artifact and by ``python -m
  training.frequencies`` from Criteo TSV files; :func:`save_frequencies`,
  :func:`load_frequencies`.
- :func:`row_order`: a table's ids in row order, by descending count, ties by id
  (deterministic); :func:`remap`: the row of each id, what FBGEMM's TBEs map ids
  through before their lookup (:mod:`model_factory.tbe`).
- :class:`FrequencyOrder`: what an archive records of the counts, per table the
  rows and lookups of each power-of-two range of counts (a few dozen numbers,
  not a count per row): how hot each prefix of the table is.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_factory.config import ConfigError, DLRMConfig
from model_factory.factory import table_name
from model_factory.files import replacing

FREQUENCIES_FILE = "frequencies.pt"
# Row numbers are stored as int32: 4 bytes per id, and tables of up to 2**31 - 1 rows.
REMAP_DTYPE = torch.int32
MAX_ORDERED_ROWS = torch.iinfo(REMAP_DTYPE).max


def save_frequencies(path: Path, counts: Mapping[str, torch.Tensor]) -> None:
    """Write ``{table name: int64 count per row}`` to ``path``, replacing any file there whole."""
    with replacing(path) as file:
        torch.save(dict(counts), file)


def load_frequencies(path: Path, config: DLRMConfig) -> dict[str, torch.Tensor]:
    """The counts in ``path`` (a frequencies file, or a directory holding ``frequencies.pt``) for ``config``'s tables.

    Loaded with ``weights_only`` and memory-mapped; a :class:`ConfigError` says
    what does not match ``config``: a missing or unknown table, a count per row
    of another table size, counts that are not non-negative int64.
    """
    if path.is_dir():
        path = path / FREQUENCIES_FILE
    try:
        counts = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise ConfigError(f"cannot read the frequencies {path}: {error}") from error
    if not isinstance(counts, dict):
        raise ConfigError(f"{path} holds a {type(counts).__name__}, not a count per row of each table")
    expected = {
        table_name(feature): rows
        for feature, rows in zip(config.sparse_feature_names, config.num_embeddings_per_feature, strict=True)
    }
    if set(counts) != set(expected):
        missing, unknown = sorted(set(expected) - set(counts)), sorted(set(counts) - set(expected))
        raise ConfigError(f"{path} does not count this model's tables: missing {missing}, unknown {unknown}")
    for name, rows in expected.items():
        table = counts[name]
        if not isinstance(table, torch.Tensor) or table.dtype != torch.int64 or tuple(table.shape) != (rows,):
            described = f"{table.dtype} {tuple(table.shape)}" if isinstance(table, torch.Tensor) else type(table)
            raise ConfigError(f"{path}: {name} must be {rows} int64 counts (one per row), got {described}")
        if rows and int(table.min()) < 0:
            raise ConfigError(f"{path}: {name} has negative counts")
    return {name: counts[name] for name in expected}


def row_order(counts: torch.Tensor) -> torch.Tensor:
    """A table's ids in row order: descending count, ties by ascending id (a stable sort)."""
    if counts.numel() > MAX_ORDERED_ROWS:
        raise ConfigError(f"a table of {counts.numel()} rows cannot be frequency-ordered: row numbers are int32")
    return torch.sort(counts, descending=True, stable=True).indices


def remap(order: torch.Tensor) -> torch.Tensor:
    """The row of each id (the inverse of :func:`row_order`'s permutation), as :data:`REMAP_DTYPE`."""
    rows = torch.empty(order.numel(), dtype=REMAP_DTYPE)
    rows[order] = torch.arange(order.numel(), dtype=REMAP_DTYPE)
    return rows


@dataclass(frozen=True)
class Level:
    """The rows of a frequency-ordered table counted ``count`` to ``2 * count - 1`` times, and their lookups."""

    count: int
    rows: int
    lookups: int


def levels(counts: torch.Tensor) -> tuple[Level, ...]:
    """A table's counts summarised by power of two, hottest first; rows never seen belong to no level.

    In frequency order each level is a run of rows following the hotter ones, so
    the rows of the first ``n`` levels are the table's first rows.
    """
    seen = counts[counts > 0]
    _, exponents = torch.frexp(seen.double())  # exact: counts below 2**53 are exact doubles
    power = (exponents - 1).long()  # floor(log2(count))
    size = int(power.max()) + 1 if seen.numel() else 0
    rows = torch.bincount(power, minlength=size)
    lookups = torch.zeros(size, dtype=torch.int64).index_add_(0, power, seen)
    return tuple(
        Level(count=2**power, rows=int(rows[power]), lookups=int(lookups[power]))
        for power in reversed(range(size))
        if rows[power]
    )


@dataclass(frozen=True)
class FrequencyOrder:
    """What an archive records of the counts its tables are ordered by: each table's :func:`levels`."""

    tables: dict[str, tuple[Level, ...]]

    @classmethod
    def of(cls, counts: Mapping[str, torch.Tensor]) -> FrequencyOrder:
        return cls({name: levels(table) for name, table in counts.items()})

    def to_dict(self) -> dict[str, Any]:
        return {
            "tables": {
                name: [[level.count, level.rows, level.lookups] for level in table]
                for name, table in self.tables.items()
            }
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrequencyOrder:
        """The summary :meth:`to_dict` wrote; ``KeyError``, ``TypeError`` or ``ValueError`` for anything else."""
        return cls(
            {
                str(name): tuple(Level(int(count), int(rows), int(lookups)) for count, rows, lookups in table)
                for name, table in data["tables"].items()
            }
        )
