"""What every JSON rows request shares: its field names, its decoded form, and the checks of its ``instances``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from handler.errors import ErrorKind, InvalidRequest, Location, wrong_json_type
from handler.rows import FeatureRows, FieldNames, RowValidator

DENSE_FIELD = "float_features"
LENGTHS_FIELD = "id_list_features.lengths"
VALUES_FIELD = "id_list_features.values"
INSTANCES_FIELD = "instances"
COLUMNS_FIELD = "inputs"
CONTEXT_FIELD = "context"
ROW_FIELDS = (DENSE_FIELD, LENGTHS_FIELD, VALUES_FIELD)
ROW_FIELD_SET = frozenset(ROW_FIELDS)
FIELD_NAMES = FieldNames(dense=DENSE_FIELD, lengths=LENGTHS_FIELD, values=VALUES_FIELD)
# A ranking request's context is named in errors in place of a row.
CONTEXT = Location(CONTEXT_FIELD)


@dataclass(frozen=True)
class RowsRequest:
    """The rows of one JSON request, whether it was one row rather than ``instances``, and whether
    it came (and is answered) columnar.

    ``context``, for a ranking request: one row with only the context's sparse ids, whose
    pooled embeddings the forward adds to every row's (``rows`` then hold the candidates,
    without the context's sparse ids and with its dense values copied in).
    """

    rows: FeatureRows
    single_row: bool
    context: FeatureRows | None = None
    columnar: bool = False

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows


def instance_list(rows: Any, validator: RowValidator) -> list:
    """The value of ``instances``: a list of at most ``validator.max_rows`` rows."""
    if not isinstance(rows, list):
        raise wrong_json_type(f"{INSTANCES_FIELD!r} must be a list of rows", rows, "array", field=INSTANCES_FIELD)
    validator.check_row_count(len(rows), INSTANCES_FIELD)
    return rows


def check_keys(payload: dict, allowed: set[str], message: str) -> None:
    """``payload`` has no key beyond ``allowed``; else the first other one is refused (``message``, then it)."""
    extra = sorted(payload.keys() - allowed)
    if extra:
        raise InvalidRequest(ErrorKind.UNKNOWN_FIELD, f"{message}, got {extra[0]!r}", field=extra[0])


def invalid_row(index: int, row: Any, keys: str) -> InvalidRequest:
    """Row ``index`` is not a JSON object (with ``keys``)."""
    return wrong_json_type(
        f"row {index} must be a JSON object {keys}", row, "object", kind=ErrorKind.INVALID_ROW, row=index
    )


def given_twice(name: str, row: int) -> InvalidRequest:
    """A ranking request's feature given both in the context and in a candidate."""
    return InvalidRequest(
        ErrorKind.DUPLICATE_FIELD,
        f"row {row}: {name!r} is given both in {CONTEXT_FIELD!r} and in the row: give it once",
        field=name,
        row=row,
    )
