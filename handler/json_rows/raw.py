"""Raw Criteo rows → model rows, through the archive's preprocessing, exactly as in training.

``{"int_0": 5, ..., "int_12": 0, "cat_0": "05db9164", ..., "cat_25": "c0d61a5c"}``: integers or
null, 8-hex-digit strings or null/empty; an absent key means missing. Well-formed rows take a
fast path of a few C-speed passes over all values; anything else is checked row by row, which
names the first problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

from handler import values
from handler.errors import ROWS, ErrorKind, InvalidRequest, Location, fits_int64, json_type
from handler.json_rows.request import ROW_FIELD_SET, invalid_row
from handler.rows import FeatureRows, RowValidator, preprocessed
from model_factory.features import CategoryFormatError, Preprocessing, parse_categories

_RAW_INT_TYPES: frozenset[type] = frozenset({int, type(None)})
_RAW_CATEGORY_TYPES: frozenset[type] = frozenset({str, type(None)})


class RawRows:
    """Raw rows' checks and preprocessing, for one model configuration."""

    def __init__(self, validator: RowValidator, preprocessing: Preprocessing) -> None:
        self.validator = validator
        self.preprocessing = preprocessing
        self.dense_names = validator.config.dense_feature_names
        self.sparse_names = validator.config.sparse_feature_names
        self.names = frozenset(self.dense_names + self.sparse_names)

    def is_raw_row(self, row: Any) -> bool:
        """A raw row names schema features and none of the reference format's fields."""
        return isinstance(row, dict) and not row.keys() & ROW_FIELD_SET and bool(row.keys() & self.names)

    def rows(self, rows: list) -> FeatureRows:
        """Raw rows as model rows: the same arrays as the reference format's, one id per feature."""
        return self.preprocessed(*self.values(rows, self.dense_names, self.sparse_names))

    def preprocessed(self, ints: np.ndarray, categories: np.ndarray) -> FeatureRows:
        """Checked raw values of every feature (:meth:`values`) as model rows."""
        return preprocessed(self.preprocessing, self.validator.table_sizes, ints, categories)

    def values(
        self, rows: list, dense_names: Sequence[str], sparse_names: Sequence[str], location: Location = ROWS
    ) -> tuple[np.ndarray, np.ndarray]:
        """The checked raw values of these features in ``rows`` (an absent key is a missing value).

        Integers: ``[N, len(dense_names)]`` float64, NaN for missing; categories:
        ``[N, len(sparse_names)]`` parsed hex values. ``location``: how errors name the rows.
        """
        return self.well_formed(rows, dense_names, sparse_names) or self._checked(
            rows, dense_names, sparse_names, location
        )

    def well_formed(
        self, rows: list, dense_names: Sequence[str], sparse_names: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`values` of rows with nothing wrong, in a few C-speed passes over all values; else None.

        The fast path, as the reference format's is: a round of Python checks per row
        cost more than the values' conversion. Anything it does not accept (a wrong
        type, an absent or unknown key, a bad category, an integer at or beyond ±2^63
        as a float) goes to the row-by-row check, which names the first problem or
        accepts it.
        """
        width = len(dense_names) + len(sparse_names)
        if set(map(type, rows)) != {dict} or set(map(len, rows)) != {width}:
            return None
        try:  # with as many keys as names, each name found means no other key
            ints, categories = _values(rows, dense_names), _values(rows, sparse_names)
        except KeyError:
            return None
        parsed = _well_formed_values(ints, categories)
        if parsed is None:
            return None
        return parsed[0].reshape(len(rows), len(dense_names)), parsed[1].reshape(len(rows), len(sparse_names))

    def well_formed_columns(
        self, columns: dict[str, list], dense_names: Sequence[str], sparse_names: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`well_formed` of the columnar form: one list of values per feature, exactly these features."""
        if columns.keys() != {*dense_names, *sparse_names}:
            return None
        parsed = _well_formed_values(
            list(chain.from_iterable(columns[name] for name in dense_names)),
            list(chain.from_iterable(columns[name] for name in sparse_names)),
        )
        if parsed is None:
            return None
        num_rows = len(next(iter(columns.values())))
        # The columns, one after the other: transposed to rows.
        return parsed[0].reshape(len(dense_names), num_rows).T, parsed[1].reshape(len(sparse_names), num_rows).T

    def _checked(
        self, rows: list, dense_names: Sequence[str], sparse_names: Sequence[str], location: Location
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`values` row by row: the first problem becomes :class:`InvalidRequest`."""
        raw_ints: list[list[int | None]] = []
        raw_categories: list[str] = []
        for index, row in enumerate(rows):
            self._check_keys(row, index, location)
            ints = [row.get(name) for name in dense_names]
            if not set(map(type, ints)) <= _RAW_INT_TYPES:
                name, value = next(
                    (n, v) for n, v in zip(dense_names, ints, strict=True) if type(v) not in _RAW_INT_TYPES
                )
                raise location.error(
                    ErrorKind.NON_INTEGER,
                    index,
                    f"{name} must be a JSON integer or null, got {json_type(value)} {value!r}",
                    field=name,
                    expected="integer or null",
                    got=value,
                )
            overflowing = next(
                (n for n, v in zip(dense_names, ints, strict=True) if v is not None and not fits_int64(v)), None
            )
            if overflowing is not None:
                raise location.error(
                    ErrorKind.NON_FINITE,
                    index,
                    f"{overflowing} = {row[overflowing]} does not fit a 64-bit integer",
                    field=overflowing,
                    expected="integer within int64",
                    got=str(row[overflowing]),
                )
            categories = [row.get(name) for name in sparse_names]
            if not set(map(type, categories)) <= _RAW_CATEGORY_TYPES:
                position = next(i for i, v in enumerate(categories) if type(v) not in _RAW_CATEGORY_TYPES)
                raise _invalid_category(index, sparse_names[position], categories[position], location)
            raw_ints.append(ints)
            raw_categories.extend("" if value is None else value for value in categories)
        parsed = values.categories(
            raw_categories,
            (len(rows), len(sparse_names)),
            lambda row, position, text: _invalid_category(row, sparse_names[position], text, location),
        )
        dense = np.array([[np.nan if v is None else float(v) for v in ints] for ints in raw_ints], dtype=np.float64)
        return dense.reshape(len(rows), len(dense_names)), parsed

    def _check_keys(self, row: Any, index: int, location: Location) -> None:
        """A raw row is an object whose keys are the schema's feature names."""
        if not isinstance(row, dict):
            raise invalid_row(index, row, "keyed by feature names")
        unknown = sorted(row.keys() - self.names)
        if unknown:
            dense, sparse = self.dense_names, self.sparse_names
            raise location.error(
                ErrorKind.UNKNOWN_FIELD,
                index,
                f"unknown field {unknown[0]!r}; a raw row has the keys "
                f"{dense[0]}..{dense[-1]} and {sparse[0]}..{sparse[-1]}",
                field=unknown[0],
            )


def _invalid_category(row: int, name: str, value: Any, location: Location) -> InvalidRequest:
    return location.error(
        ErrorKind.INVALID_CATEGORY,
        row,
        f"{name} must be 8 hex digits (like '05db9164'), empty or null, got {json_type(value)} {value!r}",
        field=name,
        expected="string of 8 hex digits, empty or null",
        got=value,
    )


def _well_formed_values(ints: list, categories: list) -> tuple[np.ndarray, np.ndarray] | None:
    """Raw integers (float64, NaN for null) and parsed categories, flat, if all are well formed; else None.

    C-speed passes over all values; an integer at or beyond ±2^63, a wrong type or a
    bad category gives None, for the row-by-row check to name.
    """
    if not (set(map(type, ints)) <= _RAW_INT_TYPES and set(map(type, categories)) <= _RAW_CATEGORY_TYPES):
        return None
    try:
        dense = np.array(ints, dtype=np.float64)  # None is NaN
        parsed = parse_categories([value or "" for value in categories])
    except (OverflowError, CategoryFormatError):
        return None
    if (np.abs(dense) >= 2.0**63).any():
        return None
    return dense, parsed


def _values(rows: list[dict], names: Sequence[str]) -> list:
    """The values of ``names`` in each row, row after row, looked up at C speed (``itemgetter``)."""
    if len(names) <= 1:
        return [row[name] for row in rows for name in names]
    return list(chain.from_iterable(map(itemgetter(*names), rows)))
