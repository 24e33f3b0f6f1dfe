"""Client errors: every kind of invalid request, its HTTP status, and the JSON body that describes it.

The body is TorchServe's error shape (``code``, ``type``, ``message``) plus where
the problem is (``field``, ``row``) and what was expected and received.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# Longest echo of client input in an error body.
MAX_ECHO = 200


class ErrorKind(StrEnum):
    """The ``type`` of an error body; docs/api.md's error table documents each."""

    EMPTY_BODY = "empty_body"
    INVALID_JSON = "invalid_json"
    INVALID_BODY = "invalid_body"
    INVALID_ROW = "invalid_row"
    MISSING_FIELD = "missing_field"
    DUPLICATE_FIELD = "duplicate_field"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    WRONG_COUNT = "wrong_count"
    NON_NUMERIC = "non_numeric"
    NON_FINITE = "non_finite"
    NON_INTEGER = "non_integer"
    INVALID_CATEGORY = "invalid_category"
    NEGATIVE_LENGTH = "negative_length"
    LENGTH_MISMATCH = "length_mismatch"
    ID_OUT_OF_RANGE = "id_out_of_range"
    EMPTY_INSTANCES = "empty_instances"
    TOO_MANY_ROWS = "too_many_rows"
    WRONG_DATATYPE = "wrong_datatype"
    WRONG_SHAPE = "wrong_shape"
    INVALID_BINARY = "invalid_binary"


# Every kind is a client error; the exceptions to 400 say why.
HTTP_STATUS: dict[ErrorKind, int] = {kind: 400 for kind in ErrorKind} | {
    ErrorKind.EMPTY_BODY: 415,  # no JSON body: usually a client that did not set the content type
    ErrorKind.TOO_MANY_ROWS: 413,  # the request is too large, as TorchServe says for too many bytes
}


class InvalidRequest(Exception):
    """A client error of ``kind``, with its HTTP status and what to tell the client."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        field: str | None = None,
        row: int | None = None,
        expected: Any = None,
        got: Any = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field
        self.row = row
        self.expected = expected
        self.got = got

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.kind]

    def to_body(self, oip: bool = False) -> dict[str, Any]:
        """The JSON error body; ``oip`` adds the Open Inference Protocol's own ``error`` key first.

        ``expected`` and ``got`` echo client input, so anything but a plain JSON
        scalar that orjson can encode (an integer beyond 64 bits, a nested value)
        is sent back as a short string: the error response itself must never fail.
        """
        message = shorten(self.message)
        body: dict[str, Any] = {"error": message} if oip else {}
        body |= {"code": self.status, "type": str(self.kind), "message": message}
        for key in ("field", "row", "expected", "got"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value if _is_encodable_scalar(value) else shorten(repr(value))
        return body


@dataclass(frozen=True)
class Location:
    """Which rows an error is in: a request's rows (``row 3: ...``, ``"row": 3``), or a part of the request
    named in place of a row (a JSON ranking request's ``context: ...``, no ``row``)."""

    part: str | None = None

    def prefix(self, row: int) -> str:
        """The start of a message about ``row``."""
        return f"{self.part}: " if self.part else f"row {row}: "

    def row(self, row: int) -> int | None:
        """The error body's ``row`` for ``row``."""
        return None if self.part else row

    def error(self, kind: ErrorKind, row: int, message: str, **details: Any) -> InvalidRequest:
        """An error in ``row``: ``message`` after the row's name (``details``: ``field``, ``expected``, ``got``)."""
        return InvalidRequest(kind, f"{self.prefix(row)}{message}", row=self.row(row), **details)


ROWS = Location()


def wrong_json_type(
    message: str,
    value: Any,
    expected: str,
    *,
    kind: ErrorKind = ErrorKind.WRONG_TYPE,
    field: str | None = None,
    row: int | None = None,
) -> InvalidRequest:
    """``value`` is not the JSON value ``expected``: ``message`` says what it must be, the error names what it is."""
    return InvalidRequest(
        kind, f"{message}, got {json_type(value)}", field=field, row=row, expected=expected, got=json_type(value)
    )


def shorten(text: str) -> str:
    return text if len(text) <= MAX_ECHO else text[: MAX_ECHO - 3] + "..."


def fits_int64(value: int) -> bool:
    return -(2**63) <= value < 2**63


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_encodable_scalar(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return fits_int64(value)
    return isinstance(value, (str, float, bool)) and len(str(value)) <= MAX_ECHO
