"""The Criteo feature schema and its preprocessing: one source of truth for training and serving.

TorchRec's Criteo names are used unchanged (``int_0..int_12`` dense,
``cat_0..cat_25`` sparse) so that TorchRec's datasets, the trainer, the archive
and the request decoder all agree on which column feeds which table.

Raw Criteo values become model inputs like this (the DLRM reference's rules):

- integer features: missing → 0, negative → 0, then ``log(x + 1)``;
- categorical features: an 8-hex-digit string is read as an unsigned 32-bit
  integer and mapped to row ``value % num_embeddings`` of its feature's table;
  a missing (absent, null or empty) value maps to row ``missing_category_row``.

The TSV reader, the trainer and the request decoder all call
:class:`Preprocessing`, and the archive stores its settings next to the model
config, so a served score equals the offline score of the same raw row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

DENSE_FEATURE_NAMES: tuple[str, ...] = tuple(DEFAULT_INT_NAMES)
SPARSE_FEATURE_NAMES: tuple[str, ...] = tuple(DEFAULT_CAT_NAMES)

# Marks a missing categorical value in raw integer form (parsed hex values are >= 0).
MISSING_CATEGORY = -1
HEX_DIGITS = 8
_HEX_VALUE = re.compile(r"[0-9a-fA-F]{8}")
_HEX_RUN = re.compile(r"[0-9a-fA-F]*")


class CategoryFormatError(ValueError):
    """A categorical value is not 8 hex digits; ``index`` is its position in the parsed sequence."""

    def __init__(self, index: int, value: object) -> None:
        super().__init__(f"expected {HEX_DIGITS} hex digits, got {value!r}")
        self.index = index
        self.value = value


def parse_categories(values: Sequence[str]) -> np.ndarray:
    """Raw categorical strings → unsigned 32-bit integers (int64); ``""`` (missing) → ``MISSING_CATEGORY``.

    Vectorised: one pass measures the strings, one regex pass validates them
    joined, one ``bytes.fromhex`` decodes them; only an invalid input pays for a
    search of the culprit.
    """
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    present = lengths > 0
    joined = "".join(values)
    if (lengths[present] != HEX_DIGITS).any() or not _HEX_RUN.fullmatch(joined):
        bad = next(i for i, value in enumerate(values) if value and not _HEX_VALUE.fullmatch(value))
        raise CategoryFormatError(bad, values[bad])
    parsed = np.full(len(values), MISSING_CATEGORY, dtype=np.int64)
    parsed[present] = np.frombuffer(bytes.fromhex(joined), dtype=">u4")
    return parsed


@dataclass(frozen=True)
class Preprocessing:
    """Raw Criteo values → model inputs. Stored in every archive; see the module docstring for the rules."""

    dense_transform: str = "log1p"
    category_hashing: str = "hex-mod"
    missing_category_row: int = 0

    def __post_init__(self) -> None:
        if self.dense_transform != "log1p" or self.category_hashing != "hex-mod":
            raise ValueError(
                f"unsupported preprocessing {self.dense_transform!r}/{self.category_hashing!r}: "
                "this version implements 'log1p' and 'hex-mod'"
            )
        if self.missing_category_row != 0:
            raise ValueError("missing_category_row must be 0, the one row every table has")

    def dense(self, raw: np.ndarray) -> np.ndarray:
        """``(rows, 13)`` raw integers as float64 with NaN for missing → float32 model inputs."""
        return np.log1p(np.clip(np.nan_to_num(raw, nan=0.0), 0.0, None)).astype(np.float32)

    def category_rows(self, raw: np.ndarray, num_embeddings: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(rows, 26)`` parsed categories (``MISSING_CATEGORY`` for missing) → table row indices."""
        rows = raw % np.asarray(num_embeddings, dtype=np.int64)
        rows[raw == MISSING_CATEGORY] = self.missing_category_row
        return rows


def feature_major(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-major sparse features → the feature-major order of a ``KeyedJaggedTensor``.

    ``lengths`` is ``(rows, features)``: ``lengths[r, f]`` ids of feature ``f`` in
    row ``r``; ``values`` lists row 0's ids of feature 0, then of feature 1, ...,
    then row 1's. Returns ``(lengths, values)`` as TorchRec stores them: all rows
    of feature 0, then all rows of feature 1, ... Each id moves by the shift of
    its (row, feature) segment: one scatter, no sort. One id per feature (Criteo's
    one-hot rows) is a plain transpose; at most one (one-hot rows beside a ranking
    request's context, missing ids) is a gather by each id's row-major rank.

    >>> feature_major(np.array([[1, 2], [0, 1]]), np.array([10, 20, 21, 30]))
    (array([1, 0, 2, 1]), array([10, 20, 21, 30]))
    """
    rows, features = lengths.shape
    flat = lengths.ravel()
    if rows <= 1:
        return flat, values
    if values.size == flat.size and (flat == 1).all():
        return flat, values.reshape(rows, features).T.ravel()
    if flat.max() <= 1:
        present = lengths.astype(bool)
        rank = np.cumsum(flat).reshape(rows, features) - 1
        return lengths.T.ravel(), values[rank.T[present.T]]
    target_lengths = lengths.T.ravel()
    target_starts = np.cumsum(target_lengths) - target_lengths
    source_starts = np.cumsum(flat) - flat
    shift = target_starts.reshape(features, rows).T.ravel() - source_starts
    reordered = np.empty_like(values)
    reordered[np.arange(values.size) + np.repeat(shift, flat)] = values
    return target_lengths, reordered


def feature_major_on_device(lengths: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`feature_major` with torch ops, where the tensors are (a GPU): no host round trip, no sync.

    ``repeat_interleave`` is told its output size, so nothing waits for the
    device to report a length; there is no one-hot shortcut for the same reason.
    """
    rows, features = lengths.shape
    flat = lengths.reshape(-1)
    target_lengths = lengths.t().reshape(-1)
    target_starts = torch.cumsum(target_lengths, 0) - target_lengths
    source_starts = torch.cumsum(flat, 0) - flat
    shift = target_starts.reshape(features, rows).t().reshape(-1) - source_starts
    destination = torch.arange(values.numel(), device=values.device) + torch.repeat_interleave(
        shift, flat, output_size=values.numel()
    )
    return target_lengths, torch.empty_like(values).index_copy_(0, destination, values)


def rows_to_kjt(keys: Sequence[str], lengths: np.ndarray, values: np.ndarray) -> KeyedJaggedTensor:
    """TorchRec's ``KeyedJaggedTensor`` from row-major sparse features (see :func:`feature_major`).

    ``lengths`` is ``(rows, len(keys))``; the KJT shares memory with the reordered arrays.
    """
    kjt_lengths, kjt_values = feature_major(lengths, values)
    return KeyedJaggedTensor(
        keys=list(keys),
        values=torch.from_numpy(np.require(kjt_values, np.int64, ["C", "W"])),
        lengths=torch.from_numpy(np.require(kjt_lengths, np.int64, ["C", "W"])),
    )
