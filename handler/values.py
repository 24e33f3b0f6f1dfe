"""Decoded request values → arrays: the conversions and checks every wire format's decoder shares.

A request's JSON text is parsed here, its JSON numbers become float32 and integer arrays, and its
texts become integers (decimal) or categories (hexadecimal). These helpers check what the values
alone can get wrong (JSON types, numbers beyond float32 or an integer type, malformed texts);
:class:`~handler.rows.RowValidator` then checks the arrays as model rows. Errors name the value
as the caller's wire format spells it: the caller passes the names, or turns a helper's
exception into its own :class:`~handler.errors.InvalidRequest`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

import numpy as np
import orjson
from numpy.typing import DTypeLike

from handler.errors import ErrorKind, InvalidRequest, fits_int64, json_type
from handler.rows import RowValidator
from model_factory.features import CategoryFormatError, parse_categories

# The JSON types a decoded value of each kind may have: NumPy would silently convert booleans, strings and
# nulls, and floats where integers are required (``3.0`` is never id 3).
NUMBER_TYPES: frozenset[type] = frozenset({int, float})
INT_TYPES: frozenset[type] = frozenset({int})
STRING_TYPES: frozenset[type] = frozenset({str})
_DECIMAL = re.compile(r"-?[0-9]+")
# No int64 has more significant decimal digits.
_INT64_DIGITS = 19


def parse_json(text: bytes | bytearray | memoryview | str, validator: RowValidator, empty: str, invalid: str) -> Any:
    """The JSON value of a request's text; ``empty`` and ``invalid`` are the messages of the two ways it can fail.

    Text with more arrays and objects than ``validator``'s row limit allows is refused unparsed.
    """
    if not len(text):
        raise InvalidRequest(ErrorKind.EMPTY_BODY, empty, expected="application/json body")
    validator.check_json_size(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(ErrorKind.INVALID_JSON, f"{invalid}: {error}") from None


def check_types(
    values: list, allowed: frozenset[type], what: str, subject: str, field: str, row: int | None = None
) -> None:
    """Every element of ``values`` is a JSON ``what`` (its type among ``allowed``); else the first that is not is
    refused as ``subject[position]`` in ``field``.

    ``set(map(type, ...))`` runs at C speed: the culprit is looked for only when there is one.
    """
    if set(map(type, values)) <= allowed:
        return
    position, bad = next((i, v) for i, v in enumerate(values) if type(v) not in allowed)
    raise InvalidRequest(
        ErrorKind.NON_NUMERIC if what == "number" else ErrorKind.NON_INTEGER,
        f"{subject}[{position}] must be a JSON {what}, got {json_type(bad)} {bad!r}",
        field=field,
        row=row,
        expected=what,
        got=bad,
    )


def float32(values: list) -> np.ndarray:
    """JSON numbers (flat or nested lists) as float32; a number beyond float32 becomes infinite here, for
    :meth:`~handler.rows.RowValidator.check_dense` to refuse as not finite."""
    try:
        wide = np.array(values, dtype=np.float64)
    except OverflowError:  # a JSON integer beyond float64
        wide = np.array(_beyond_float64_infinite(values), dtype=np.float64)
    with np.errstate(over="ignore"):
        return wide.astype(np.float32)


def _beyond_float64_infinite(values: Any) -> Any:
    if isinstance(values, list):
        return [_beyond_float64_infinite(value) for value in values]
    return values if abs(values) <= 1e308 else math.inf


class BeyondRange(ValueError):
    """A JSON integer the array's type cannot hold: ``values`` part ``part``, element ``position``."""

    def __init__(self, part: int, position: int, value: int) -> None:
        super().__init__(f"part {part}, element {position}: {value}")
        self.part = part
        self.position = position
        self.value = value


def integers(parts: Sequence[list], dtype: DTypeLike, count: int) -> np.ndarray:
    """JSON integers (already type-checked), part after part (a request's rows, or one tensor's data), as one
    array of ``count`` elements of ``dtype``; the first one it cannot hold raises :class:`BeyondRange`."""
    try:
        return np.fromiter(chain.from_iterable(parts), dtype=dtype, count=count)
    except OverflowError:
        limits = np.iinfo(dtype)
        for part, values in enumerate(parts):
            for position, value in enumerate(values):
                if not limits.min <= value <= limits.max:
                    raise BeyondRange(part, position, value) from None
        raise


def decimal_int64(text: str) -> int | None:
    """The value of a decimal integer text within int64, or None.

    Its significant digits are counted first: ``int()`` refuses texts of over 4,300
    digits with an error of its own, and no int64 has more than 19.
    """
    if not _DECIMAL.fullmatch(text) or len(text.lstrip("-").lstrip("0")) > _INT64_DIGITS:
        return None
    value = int(text)
    return value if fits_int64(value) else None


def categories(
    texts: Sequence[str], shape: tuple[int, int], invalid: Callable[[int, int, Any], InvalidRequest]
) -> np.ndarray:
    """Hexadecimal category texts, row after row, as ``shape`` (rows, features) parsed values (``""``: missing);
    the first malformed one raises ``invalid(row, position, text)``."""
    try:
        parsed = parse_categories(texts)
    except CategoryFormatError as error:
        raise invalid(*divmod(error.index, shape[1]), error.value) from None
    return parsed.reshape(shape)
