"""The columnar form, TF Serving's ``inputs`` form of ``instances``: ``{"inputs": {field: [its value in row 0,
row 1, ...]}}``, every field of the row format an array of one value per row (all of the same length),
optionally beside a ranking ``context``; answered columnar.

It saves repeating every key in every row. Raw Criteo columns with nothing wrong take a fast path
straight to arrays; anything else (the reference format's fields, or a problem to name) is decoded
as the rows it transposes to, so each rule and error is the row format's (row ``i`` is position
``i`` of the columns).
"""

from __future__ import annotations

from typing import Any

from handler.errors import ErrorKind, InvalidRequest, wrong_json_type
from handler.json_rows.ranking import Rankings
from handler.json_rows.request import COLUMNS_FIELD, CONTEXT_FIELD, INSTANCES_FIELD, RowsRequest, check_keys
from handler.rows import RowValidator


class Columns:
    """The columnar form's checks, and its fast path for raw Criteo columns."""

    def __init__(self, rankings: Rankings) -> None:
        self.rankings = rankings
        self.raw = rankings.raw
        self.validator: RowValidator = rankings.validator

    def decode(self, payload: dict) -> RowsRequest | dict[str, Any]:
        """The request of raw Criteo columns with nothing wrong; else the ``instances`` body the columns
        transpose to, to decode as rows (beside the body's context, if any)."""
        check_keys(
            payload,
            {COLUMNS_FIELD, CONTEXT_FIELD},
            f"a body with {COLUMNS_FIELD!r} has only that and {CONTEXT_FIELD!r}",
        )
        columns = self._columns(payload[COLUMNS_FIELD])
        rest = {key: value for key, value in payload.items() if key != COLUMNS_FIELD}  # the context, if any
        request = self._well_formed_raw(columns, rest)
        if request is not None:
            return request
        rows = [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
        return rest | {INSTANCES_FIELD: rows}

    def _columns(self, columns: Any) -> dict[str, list]:
        """The value of ``inputs``: an object of arrays of one value per row, as many rows in each."""
        if not isinstance(columns, dict):
            raise wrong_json_type(
                f"{COLUMNS_FIELD!r} must be an object of columns (a field's values, one per row)",
                columns,
                "object",
                field=COLUMNS_FIELD,
            )
        for name, column in columns.items():
            if not isinstance(column, list):
                raise wrong_json_type(
                    f"{COLUMNS_FIELD}: {name!r} must be an array of one value per row", column, "array", field=name
                )
        counts = [len(column) for column in columns.values()]
        if len(set(counts)) > 1:
            first = next(iter(columns))
            name, count = next((name, count) for name, count in zip(columns, counts, strict=True) if count != counts[0])
            raise InvalidRequest(
                ErrorKind.WRONG_COUNT,
                f"{COLUMNS_FIELD}: {name!r} has {count} values but {first!r} has {counts[0]}: every column has "
                "one value per row",
                field=name,
                expected=counts[0],
                got=count,
            )
        self.validator.check_row_count(counts[0] if counts else 0, COLUMNS_FIELD)
        return columns

    def _well_formed_raw(self, columns: dict[str, list], rest: dict[str, Any]) -> RowsRequest | None:
        """The request of raw Criteo columns with nothing wrong, beside the body's ``rest`` (a raw context, if
        any); else None."""
        context = rest.get(CONTEXT_FIELD)
        if not rest:
            own_dense, own_sparse = list(self.raw.dense_names), list(self.raw.sparse_names)
        elif isinstance(context, dict) and context.keys() <= self.raw.names:
            own_dense, own_sparse = self.rankings.own_features(context)
        else:
            return None
        parsed = self.raw.well_formed_columns(columns, own_dense, own_sparse)
        if parsed is None:
            return None
        if context is None:
            return RowsRequest(self.raw.preprocessed(*parsed), single_row=False)
        return self.rankings.raw_rows(context, self.rankings.context_values(context), parsed)
