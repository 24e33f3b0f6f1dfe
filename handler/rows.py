"""The request contract: decoded values → validated model rows, the same rules for every wire format.

A wire format (``json_rows``, ``oip``) turns a request into arrays with the help of
:mod:`handler.values` and checks what only it can see (JSON keys and counts, tensor datatypes
and shapes); this module turns those arrays into :class:`FeatureRows` and checks what every
format shares: finite dense values, non-negative lengths that add up to the ids, ids within
their tables, and a ranking request's rules (its context row, its candidates' compact or full
lengths, each feature's ids on one side only). Raw Criteo rows become model rows here too,
through the archive's preprocessing. Errors name the field as the client's format spells it
(:class:`FieldNames`) and the rows as a :class:`~handler.errors.Location`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from handler.errors import ROWS, ErrorKind, InvalidRequest, Location
from model_factory.config import DLRMConfig
from model_factory.features import Preprocessing


@dataclass(frozen=True)
class FeatureRows:
    """Model inputs of ``N`` rows in the row-major layout of requests.

    ``dense``: ``(N, num_dense)`` float32. ``lengths``: ``(N, num_sparse)`` int64,
    ``lengths[r, f]`` ids of feature ``f`` in row ``r``. ``values``: the ids,
    ``(lengths.sum(),)`` int64, row 0's ids of feature 0, then of feature 1, ...,
    then row 1's.
    """

    dense: np.ndarray
    lengths: np.ndarray
    values: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.dense.shape[0]


@dataclass(frozen=True)
class FieldNames:
    """How a wire format names the three inputs, for error messages."""

    dense: str
    lengths: str
    values: str


# JSON arrays and objects a request may hold per row allowed: a reference-format row is one object and
# three arrays, every other form fewer; the slack covers a body's fixed part (OIP tensors, context, outputs).
JSON_CONTAINERS_PER_ROW = 4
JSON_CONTAINER_SLACK = 256


class RowValidator:
    """The checks shared by every format, vectorised over all rows of a request."""

    def __init__(self, config: DLRMConfig, max_rows: int) -> None:
        self.config = config
        self.max_rows = max_rows
        self.table_sizes = np.asarray(config.num_embeddings_per_feature, dtype=np.int64)

    def check_row_count(self, rows: int, field: str) -> None:
        if rows == 0:
            raise InvalidRequest(
                ErrorKind.EMPTY_INSTANCES,
                f"{field!r} has no rows: send between 1 and {self.max_rows}",
                field=field,
                expected=f"1..{self.max_rows} rows",
                got=0,
            )
        if rows > self.max_rows:
            raise InvalidRequest(
                ErrorKind.TOO_MANY_ROWS,
                f"{field!r} has {rows} rows, more than the limit of {self.max_rows}: split the request",
                field=field,
                expected=f"at most {self.max_rows} rows",
                got=rows,
            )

    def check_json_size(self, text: bytes | bytearray | memoryview | str) -> None:
        """Refuse JSON text with more arrays and objects than any request of ``max_rows`` rows holds.

        Counted on the text at C speed (milliseconds for 4 MiB) before it is parsed: parsing
        ``[[], [], ...]`` makes ~25 bytes of Python objects per byte of text and takes a
        third of a second per 4 MiB, so a request that can only be refused is refused
        before it costs that. Brackets inside strings count too: no valid request has
        many of them.
        """
        data = text.encode() if isinstance(text, str) else bytes(text) if isinstance(text, memoryview) else text
        containers = data.count(b"[") + data.count(b"{")
        limit = JSON_CONTAINERS_PER_ROW * self.max_rows + JSON_CONTAINER_SLACK
        if containers > limit:
            raise InvalidRequest(
                ErrorKind.TOO_MANY_ROWS,
                f"the JSON body holds {containers} arrays and objects, more than a request of at most "
                f"{self.max_rows} rows has: split the request",
                expected=f"at most {limit} JSON arrays and objects",
                got=containers,
            )

    def check(
        self, rows: FeatureRows, names: FieldNames, location: Location = ROWS, sent_dense: list | None = None
    ) -> FeatureRows:
        """``rows`` if every shared rule holds; else the first problem as :class:`InvalidRequest`.

        ``sent_dense``: the dense values as the client sent them (JSON numbers), to echo in an error.
        """
        self.check_dense(rows.dense, names.dense, location, sent_dense)
        self.check_lengths(rows.lengths, rows.values.size, names, location)
        self.check_ids(rows.lengths, rows.values, names.values, location)
        return rows

    def ranking_rows(
        self,
        context: FeatureRows,
        dense: np.ndarray | None,
        lengths: np.ndarray | Sequence[Sequence[int]],
        ids: np.ndarray,
        names: FieldNames,
        context_lengths: str,
        sent_dense: list | None = None,
    ) -> FeatureRows:
        """A ranking request's candidates as model rows, beside its ``context`` row (checked by :meth:`check`).

        The context's sparse features are those it has ids for; the others are the candidates' own.
        ``lengths``: each candidate's over every feature (0 for the context's), or compact, over its own
        features only (:func:`all_features`). ``dense``: the candidates' dense values, or None for the
        context's in every row. The shared rules hold for the candidates, and no candidate has ids of a
        feature whose ids the context has (``context_lengths``: how the request names the context's).
        """
        own = context.lengths[0] == 0
        full = all_features(lengths, own)
        rows = FeatureRows(np.repeat(context.dense, len(full), axis=0) if dense is None else dense, full, ids)
        self.check_dense(rows.dense, names.dense, ROWS, sent_dense)
        self.check_lengths(rows.lengths, rows.values.size, names)
        self.check_one_side(rows.lengths, ~own, names.lengths, context_lengths)
        self.check_ids(rows.lengths, rows.values, names.values)
        return rows

    @staticmethod
    def check_dense(dense: np.ndarray, field: str, location: Location = ROWS, sent: list | None = None) -> None:
        finite = np.isfinite(dense)
        if not finite.all():  # the culprit is looked for only when there is one
            row, position = (int(i) for i in np.argwhere(~finite)[0])
            value = dense[row, position] if sent is None else sent[row][position]
            raise location.error(
                ErrorKind.NON_FINITE,
                row,
                f"{field}[{position}] = {value} is not a finite float32 value",
                field=field,
                expected="finite number within float32 range (|x| < 3.4e38)",
                got=str(value),
            )

    @staticmethod
    def check_lengths(lengths: np.ndarray, num_ids: int, names: FieldNames, location: Location = ROWS) -> None:
        if lengths.size and lengths.min() < 0:
            row, position = (int(i) for i in np.argwhere(lengths < 0)[0])
            raise location.error(
                ErrorKind.NEGATIVE_LENGTH,
                row,
                f"{names.lengths}[{position}] is negative",
                field=names.lengths,
                expected="integer >= 0",
                got=int(lengths[row, position]),
            )
        # One length beyond the ids given already fails, and bounding each keeps the sum clear of int64 overflow.
        total = int(lengths.sum()) if not lengths.size or int(lengths.max()) <= num_ids else num_ids + 1
        if total != num_ids:
            raise InvalidRequest(
                ErrorKind.LENGTH_MISMATCH,
                f"{names.values!r} has {num_ids} ids but {names.lengths!r} adds up to {total}",
                field=names.values,
                expected=total,
                got=num_ids,
            )

    def check_one_side(self, lengths: np.ndarray, shared: np.ndarray, field: str, context_field: str) -> None:
        """No candidate of a ranking request has ids of a feature whose ids the context has (``shared``)."""
        if lengths[:, shared].any():
            row, feature = (int(i) for i in np.argwhere((lengths > 0) & shared)[0])
            name = self.config.sparse_feature_names[feature]
            raise InvalidRequest(
                ErrorKind.DUPLICATE_FIELD,
                f"row {row}: {name} has ids both in {context_field!r} and in {field!r}: "
                "give each feature's ids in one of them",
                field=field,
                row=row,
            )

    def check_ids(self, lengths: np.ndarray, ids: np.ndarray, field: str, location: Location = ROWS) -> None:
        """Every id is in ``[0, rows)`` of its feature's table; the first one that is not is named.

        ``ids`` holds ``lengths.sum()`` ids (checked before)."""
        if not ids.size:
            return
        # As unsigned, a negative id is beyond every table: one comparison checks both ends.
        unsigned, sizes = ids.astype(np.int64, copy=False).view(np.uint64), self.table_sizes.view(np.uint64)
        first_row = lengths[0]
        if ((first_row == 0) | (first_row == 1)).all() and (lengths == first_row).all():
            # Every row has one id of the same features (all of them, or a ranking's candidates' own).
            bad = (unsigned.reshape(len(lengths), -1) >= sizes[first_row == 1]).ravel()
        else:
            feature_of_id = np.repeat(np.tile(np.arange(lengths.shape[1]), lengths.shape[0]), lengths.ravel())
            bad = unsigned >= sizes[feature_of_id]
        if not bad.any():
            return
        first = int(np.flatnonzero(bad)[0])
        row_ends = np.cumsum(lengths.sum(axis=1))
        row = int(np.searchsorted(row_ends, first, side="right"))
        position = first - (int(row_ends[row - 1]) if row else 0)
        segment_ends = np.cumsum(lengths[row])
        feature = int(np.searchsorted(segment_ends, position, side="right"))
        raise self.out_of_range(row, position, int(ids[first]), feature, field, location)

    def out_of_range(
        self, row: int, position: int, value: int, feature: int | None, field: str, location: Location = ROWS
    ) -> InvalidRequest:
        if feature is None:
            where, expected = "", "integer in [0, table size) that fits int64"
        else:
            size = int(self.table_sizes[feature])
            name = self.config.sparse_feature_names[feature]
            where, expected = f" for feature {name} (table of {size} rows)", f"integer in [0, {size})"
        return location.error(
            ErrorKind.ID_OUT_OF_RANGE,
            row,
            f"{field}[{position}] = {value} is out of range{where}",
            field=field,
            expected=expected,
            got=value,
        )


def all_features(lengths: np.ndarray | Sequence[Sequence[int]], own: np.ndarray) -> np.ndarray:
    """A ranking request's candidate lengths over every feature, ``[N, own.size]`` int64: each row as sent when
    it covers every feature, else expanded from the compact form, the lengths of only the features the context
    has no ids for (``own``), the others 0. In a list of rows, both forms may mix."""
    full = np.zeros((len(lengths), own.size), dtype=np.int64)
    if isinstance(lengths, np.ndarray):
        if lengths.shape[1] == own.size:
            return lengths.astype(np.int64, copy=False)
        full[:, own] = lengths
        return full
    whole = np.array([len(row) == own.size for row in lengths], dtype=bool)
    if whole.any():
        full[whole] = [row for row, is_whole in zip(lengths, whole, strict=True) if is_whole]
    if not whole.all():
        compact = [row for row, is_whole in zip(lengths, whole, strict=True) if not is_whole]
        full[np.ix_(~whole, own)] = np.array(compact, dtype=np.int64).reshape(len(compact), int(own.sum()))
    return full


def concatenate(parts: Sequence[FeatureRows]) -> FeatureRows:
    """The rows of several requests, in order, as one batch for one forward pass."""
    if len(parts) == 1:
        return parts[0]
    return FeatureRows(
        dense=np.concatenate([part.dense for part in parts]),
        lengths=np.concatenate([part.lengths for part in parts]),
        values=np.concatenate([part.values for part in parts]),
    )


def split(rows: FeatureRows, row_counts: Sequence[int]) -> list[FeatureRows]:
    """Consecutive pieces of ``row_counts`` rows each: views of ``rows``' arrays, no copies."""
    row_bounds = np.cumsum([0, *row_counts])
    id_bounds = np.concatenate(([0], np.cumsum(rows.lengths.sum(axis=1))))[row_bounds].tolist()
    return [
        FeatureRows(rows.dense[start:end], rows.lengths[start:end], rows.values[first:last])
        for (start, end), (first, last) in zip(pairwise(row_bounds.tolist()), pairwise(id_bounds), strict=True)
    ]


def preprocessed(
    preprocessing: Preprocessing, table_sizes: np.ndarray, raw_ints: np.ndarray, categories: np.ndarray
) -> FeatureRows:
    """Raw Criteo rows → model inputs through the archive's preprocessing, exactly as in training.

    ``raw_ints``: ``(N, num_dense)`` float64 with NaN for missing; ``categories``:
    ``(N, num_sparse)`` parsed hex values (``MISSING_CATEGORY`` for missing). Every
    row gets one id per feature.
    """
    rows = preprocessing.category_rows(categories, table_sizes)
    return FeatureRows(dense=preprocessing.dense(raw_ints), lengths=np.ones_like(rows), values=rows.ravel())


def preprocessed_ranking(
    preprocessing: Preprocessing,
    table_sizes: np.ndarray,
    context: tuple[np.ndarray, np.ndarray],
    candidates: tuple[np.ndarray, np.ndarray],
    shared_dense: np.ndarray,
    shared_sparse: np.ndarray,
) -> tuple[FeatureRows, FeatureRows]:
    """A raw ranking request's candidate rows and context row, each side preprocessed alone: the context once.

    ``context``: one row's raw integers and categories of the features it holds (``shared_dense``,
    ``shared_sparse``), as :func:`preprocessed` takes them; ``candidates``: ``N`` rows' of the others.
    The context's dense values are copied into every row (the dense MLP takes all of them together);
    its sparse ids are the context row's, whose lookups the forward shares.
    """
    (context_ints, context_categories), (ints, categories) = context, candidates
    num_rows = len(ints)
    dense = np.empty((num_rows, shared_dense.size), dtype=np.float32)
    dense[:, ~shared_dense] = preprocessing.dense(ints)
    dense[:, shared_dense] = preprocessing.dense(context_ints)
    rows = FeatureRows(
        dense=dense,
        lengths=np.repeat((~shared_sparse)[None].astype(np.int64), num_rows, axis=0),
        values=preprocessing.category_rows(categories, table_sizes[~shared_sparse]).ravel(),
    )
    context_row = FeatureRows(
        dense=np.zeros((1, shared_dense.size), dtype=np.float32),  # already in every row
        lengths=shared_sparse[None].astype(np.int64),
        values=preprocessing.category_rows(context_categories, table_sizes[shared_sparse]).ravel(),
    )
    return rows, context_row
