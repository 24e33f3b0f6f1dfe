"""Rows in the reference format (pytorch/serve's ``torchrec_dlrm``) → model rows.

``{"float_features": [13 numbers], "id_list_features.lengths": [26 ints >= 0],
"id_list_features.values": [sum(lengths) ints]}``: what only JSON can get wrong (keys, JSON
types, counts, lengths that add up to each row's ids) is checked here, row by row when a row is
malformed; the arrays then go to :class:`~handler.rows.RowValidator`.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np

from handler import values
from handler.errors import ROWS, ErrorKind, Location, wrong_json_type
from handler.json_rows.request import (
    DENSE_FIELD,
    FIELD_NAMES,
    LENGTHS_FIELD,
    ROW_FIELD_SET,
    ROW_FIELDS,
    VALUES_FIELD,
    given_twice,
    invalid_row,
)
from handler.rows import FeatureRows, RowValidator
from handler.values import INT_TYPES, NUMBER_TYPES, BeyondRange


class ReferenceRows:
    """The reference format's checks and conversion, for one model configuration."""

    def __init__(self, validator: RowValidator) -> None:
        self.validator = validator
        self.num_dense = validator.config.num_dense_features
        self.num_sparse = validator.config.num_sparse_features

    def rows(self, rows: list) -> FeatureRows:
        """Reference-format rows as checked model rows."""
        dense_rows, length_rows, value_rows = self.fields(rows)
        lengths = np.array(length_rows, dtype=np.int64)
        features = FeatureRows(values.float32(dense_rows), lengths, self.ids(value_rows, int(lengths.sum())))
        return self.validator.check(features, FIELD_NAMES, sent_dense=dense_rows)

    def fields(
        self,
        rows: list,
        fields: frozenset[str] = ROW_FIELD_SET,
        widths: tuple[int, ...] | None = None,
        context_fields: frozenset[str] = frozenset(),
    ) -> tuple[list, list, list]:
        """The lists of ``fields`` in every row (dense values, lengths, ids; a field not among ``fields``: empty).

        ``widths``: the accepted numbers of lengths (26 unless a ranking's candidates may leave out the
        context's features); ``context_fields``: what a ranking's context already gives.
        """
        return self._well_formed_fields(rows, fields, widths) or self._checked_fields(
            rows, fields, widths, context_fields
        )

    def _well_formed_fields(
        self, rows: list, fields: frozenset[str], widths: tuple[int, ...] | None
    ) -> tuple[list, list, list] | None:
        """:meth:`fields` if every row is well formed, checked for all rows at once; else None.

        The fast path for valid requests: a few C-speed passes over all rows
        instead of one Python round of checks per row, which dominated the decode
        of large requests. Anything it does not accept goes to
        :meth:`_checked_fields`, which finds the first problem and names it. Ranges
        (finite dense values, ids within their tables) are checked afterwards, on
        the arrays, for both paths.
        """
        if widths is None:
            widths = (self.num_sparse,)
        if not all(type(row) is dict and row.keys() == fields for row in rows):
            return None
        dense_rows = [row[DENSE_FIELD] for row in rows] if DENSE_FIELD in fields else []
        length_rows = [row[LENGTHS_FIELD] for row in rows]
        value_rows = [row[VALUES_FIELD] for row in rows]
        well_formed = (
            set(map(type, chain(dense_rows, length_rows, value_rows))) == {list}
            and set(map(len, dense_rows)) <= {self.num_dense}
            and set(map(len, length_rows)) <= set(widths)
            and set(map(type, chain.from_iterable(dense_rows))) <= NUMBER_TYPES
            and set(map(type, chain.from_iterable(length_rows))) <= INT_TYPES
            and set(map(type, chain.from_iterable(value_rows))) <= INT_TYPES
            and min(chain.from_iterable(length_rows), default=0) >= 0
            and list(map(sum, length_rows)) == list(map(len, value_rows))
        )
        return (dense_rows, length_rows, value_rows) if well_formed else None

    def _checked_fields(
        self, rows: list, fields: frozenset[str], widths: tuple[int, ...] | None, context_fields: frozenset[str]
    ) -> tuple[list, list, list]:
        """:meth:`fields`, checked row by row: raises on the first malformed row."""
        dense_rows, length_rows, value_rows = [], [], []
        for index, row in enumerate(rows):
            dense, lengths, ids = self.row_fields(row, index, fields, widths, context_fields)
            dense_rows.extend(dense)
            length_rows.extend(lengths)
            value_rows.extend(ids)
        return dense_rows, length_rows, value_rows

    def row_fields(
        self,
        row: Any,
        index: int,
        fields: frozenset[str] = ROW_FIELD_SET,
        widths: tuple[int, ...] | None = None,
        context_fields: frozenset[str] = frozenset(),
        location: Location = ROWS,
    ) -> tuple[list, list, list]:
        """:meth:`fields` of one row, checked for presence, JSON type and counts, each wrapped in a list;
        ``location``: how errors name the row."""
        names = [name for name in ROW_FIELDS if name in fields]
        if not isinstance(row, dict):
            raise invalid_row(index, row, f"with keys {names}")
        both = next((name for name in context_fields if name in row), None)
        if both is not None:
            raise given_twice(both, index)
        unknown = sorted(row.keys() - fields)
        if unknown:
            raise location.error(
                ErrorKind.UNKNOWN_FIELD,
                index,
                f"unknown field {unknown[0]!r}; a row has exactly the keys {names}",
                field=unknown[0],
            )
        missing = [name for name in names if name not in row]
        if missing:
            raise location.error(ErrorKind.MISSING_FIELD, index, f"missing field {missing[0]!r}", field=missing[0])
        dense = []
        if DENSE_FIELD in fields:
            dense = [_typed_list(row, DENSE_FIELD, index, NUMBER_TYPES, "number", location)]
            _check_count(DENSE_FIELD, dense[0], (self.num_dense,), index, location)
        if LENGTHS_FIELD not in fields:
            return dense, [], []
        lengths = _typed_list(row, LENGTHS_FIELD, index, INT_TYPES, "integer", location)
        ids = _typed_list(row, VALUES_FIELD, index, INT_TYPES, "integer", location)
        _check_count(LENGTHS_FIELD, lengths, widths or (self.num_sparse,), index, location)
        _check_lengths(lengths, len(ids), index, location)
        return dense, [lengths], [ids]

    def ids(self, value_rows: list[list[int]], count: int, location: Location = ROWS) -> np.ndarray:
        """The rows' ids, in order, as int64 (an id beyond int64 is out of every table)."""
        try:
            return values.integers(value_rows, np.int64, count)
        except BeyondRange as beyond:
            raise self.validator.out_of_range(
                beyond.part, beyond.position, beyond.value, None, VALUES_FIELD, location
            ) from None


def _typed_list(row: dict, field: str, index: int, allowed: frozenset[type], what: str, location: Location) -> list:
    """The field's value, which must be a JSON array of the allowed scalar types (:func:`values.check_types`)."""
    value = row[field]
    if not isinstance(value, list):
        raise wrong_json_type(
            f"{location.prefix(index)}{field!r} must be an array of {what}s",
            value,
            f"array of {what}s",
            field=field,
            row=location.row(index),
        )
    values.check_types(value, allowed, what, f"{location.prefix(index)}{field}", field, location.row(index))
    return value


def _check_count(field: str, value: list, accepted: tuple[int, ...], index: int, location: Location) -> None:
    """``len(value)`` is one of ``accepted``: one count, or a ranking candidate's compact and full counts."""
    if len(value) not in accepted:
        expected = " or ".join(map(str, accepted))
        raise location.error(
            ErrorKind.WRONG_COUNT,
            index,
            f"{field!r} must have {expected} entries, got {len(value)}",
            field=field,
            expected=accepted[0] if len(accepted) == 1 else expected,
            got=len(value),
        )


def _check_lengths(lengths: list[int], num_values: int, index: int, location: Location) -> None:
    """Lengths are non-negative and add up to the row's number of ids (on Python ints: no overflow).

    Per row, where :meth:`~handler.rows.RowValidator.check_lengths` checks a request's total: each JSON row
    has its own ids, so a mismatch is named by its row.
    """
    if min(lengths, default=0) < 0:
        position = next(i for i, length in enumerate(lengths) if length < 0)
        raise location.error(
            ErrorKind.NEGATIVE_LENGTH,
            index,
            f"{LENGTHS_FIELD}[{position}] is negative",
            field=LENGTHS_FIELD,
            expected="integer >= 0",
            got=lengths[position],
        )
    total = sum(lengths)
    if total != num_values:
        raise location.error(
            ErrorKind.LENGTH_MISMATCH,
            index,
            f"{VALUES_FIELD!r} has {num_values} ids but {LENGTHS_FIELD!r} adds up to {total}",
            field=VALUES_FIELD,
            expected=total,
            got=num_values,
        )
