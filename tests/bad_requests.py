"""Invalid request bodies and the error each must produce, shared by the codec unit tests and the server tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SAMPLE_DENSE = [0.5] * 13
ONE_HOT = [1] * 26


@dataclass(frozen=True)
class BadRequest:
    name: str
    body: bytes
    status: int
    kind: str
    field: str | None = None
    row: int | None = None
    headers: dict[str, str] | None = None  # the format's usual headers unless given


def row(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "float_features": list(SAMPLE_DENSE),
        "id_list_features.lengths": list(ONE_HOT),
        "id_list_features.values": [0] * 26,
    }
    base.update(changes)
    return base


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def bad_requests(max_rows: int) -> list[BadRequest]:
    without_values = row()
    del without_values["id_list_features.values"]
    dense_12 = SAMPLE_DENSE[:12]
    values_with = lambda position, value: [*[0] * position, value, *[0] * (25 - position)]  # noqa: E731
    return [
        BadRequest("not json", b"{this is not json", 400, "invalid_json"),
        BadRequest("json array", _json([row()]), 400, "invalid_body"),
        BadRequest("missing field", _json(without_values), 400, "missing_field", "id_list_features.values", 0),
        BadRequest("unknown field", _json(row(extra=1)), 400, "unknown_field", "extra", 0),
        BadRequest("dense count", _json(row(float_features=dense_12)), 400, "wrong_count", "float_features", 0),
        BadRequest(
            "dense string", _json(row(float_features=["a", *dense_12])), 400, "non_numeric", "float_features", 0
        ),
        BadRequest("dense null", _json(row(float_features=[None, *dense_12])), 400, "non_numeric", "float_features", 0),
        BadRequest("dense bool", _json(row(float_features=[True, *dense_12])), 400, "non_numeric", "float_features", 0),
        BadRequest(
            "dense beyond float32", _json(row(float_features=[1e39, *dense_12])), 400, "non_finite", "float_features", 0
        ),
        BadRequest("dense not a list", _json(row(float_features=1.0)), 400, "wrong_type", "float_features", 0),
        BadRequest(
            "lengths count", _json(row(**{"id_list_features.lengths": [1] * 25})), 400, "wrong_count",
            "id_list_features.lengths", 0,
        ),
        BadRequest(
            "negative length",
            _json(row(**{"id_list_features.lengths": [2, -1, *[1] * 24]})),
            400, "negative_length", "id_list_features.lengths", 0,
        ),
        BadRequest(
            "float length", _json(row(**{"id_list_features.lengths": [1.0, *[1] * 25]})), 400, "non_integer",
            "id_list_features.lengths", 0,
        ),
        BadRequest(
            "lengths beyond 64 bits", _json(row(**{"id_list_features.lengths": [2**64 - 1] * 26})), 400,
            "length_mismatch", "id_list_features.values", 0,
        ),
        BadRequest(
            "lengths/values mismatch", _json(row(**{"id_list_features.values": [0] * 25})), 400,
            "length_mismatch", "id_list_features.values", 0,
        ),
        BadRequest(
            "id out of range", _json(row(**{"id_list_features.values": values_with(25, 35)})), 400,
            "id_out_of_range", "id_list_features.values", 0,
        ),
        BadRequest(
            "negative id", _json(row(**{"id_list_features.values": values_with(3, -1)})), 400, "id_out_of_range",
            "id_list_features.values", 0,
        ),
        BadRequest(
            "id beyond int64", _json(row(**{"id_list_features.values": values_with(0, 2**63)})), 400,
            "id_out_of_range", "id_list_features.values", 0,
        ),
        BadRequest(
            "float id", _json(row(**{"id_list_features.values": values_with(2, 2.0)})), 400, "non_integer",
            "id_list_features.values", 0,
        ),
        BadRequest(
            "string id", _json(row(**{"id_list_features.values": values_with(2, "2")})), 400, "non_integer",
            "id_list_features.values", 0,
        ),
        BadRequest(
            "boolean id", _json(row(**{"id_list_features.values": values_with(1, True)})), 400, "non_integer",
            "id_list_features.values", 0,
        ),
        BadRequest("empty instances", _json({"instances": []}), 400, "empty_instances", "instances"),
        BadRequest(
            "too many instances", _json({"instances": [row()] * (max_rows + 1)}), 413, "too_many_rows", "instances"
        ),
        BadRequest("instances not a list", _json({"instances": row()}), 400, "wrong_type", "instances"),
        BadRequest("instance not an object", _json({"instances": [row(), 7]}), 400, "invalid_row", row=1),
        BadRequest("instances with extra key", _json({"instances": [row()], "x": 1}), 400, "unknown_field", "x"),
        BadRequest(
            "bad second instance",
            _json({"instances": [row(), row(**{"id_list_features.values": values_with(5, 10**6)})]}),
            400, "id_out_of_range", "id_list_features.values", 1,
        ),
    ]  # fmt: skip


def raw_row(**changes: Any) -> dict[str, Any]:
    """A valid raw Criteo row (all 39 features present) with ``changes`` applied."""
    base: dict[str, Any] = {f"int_{i}": i for i in range(13)}
    base.update({f"cat_{i}": f"{0x05DB9164 + i:08x}" for i in range(26)})
    base.update(changes)
    return base


def bad_raw_requests() -> list[BadRequest]:
    return [
        BadRequest("raw unknown key", _json(raw_row(int_13=1)), 400, "unknown_field", "int_13", 0),
        BadRequest("raw float integer", _json(raw_row(int_3=1.5)), 400, "non_integer", "int_3", 0),
        BadRequest("raw string integer", _json(raw_row(int_3="7")), 400, "non_integer", "int_3", 0),
        BadRequest("raw boolean integer", _json(raw_row(int_0=True)), 400, "non_integer", "int_0", 0),
        BadRequest("raw non-hex category", _json(raw_row(cat_7="05db916g")), 400, "invalid_category", "cat_7", 0),
        BadRequest("raw short category", _json(raw_row(cat_7="5db9164")), 400, "invalid_category", "cat_7", 0),
        BadRequest("raw numeric category", _json(raw_row(cat_2=98275684)), 400, "invalid_category", "cat_2", 0),
        BadRequest("raw integer beyond int64", _json(raw_row(int_4=2**63)), 400, "non_finite", "int_4", 0),
        BadRequest(
            "raw reference row mixed in",
            _json({"instances": [raw_row(), row()]}),
            400, "unknown_field", "float_features", 1,
        ),
    ]  # fmt: skip


def bad_columnar_requests(max_rows: int) -> list[BadRequest]:
    """The columnar form (``inputs``): its own shape errors, and the row format's, naming the row."""
    columns = lambda **changes: {"inputs": {name: [value] for name, value in raw_row(**changes).items()}}  # noqa: E731
    reference = {key: [value] for key, value in row(**{"id_list_features.values": [0] * 25 + [35]}).items()}
    return [
        BadRequest("columns not an object", _json({"inputs": "x"}), 400, "wrong_type", "inputs"),
        BadRequest("column not an array", _json({"inputs": {"int_0": 3}}), 400, "wrong_type", "int_0"),
        BadRequest(
            "columns of different lengths", _json({"inputs": {"int_0": [1, 2], "cat_0": ["05db9164"]}}), 400,
            "wrong_count", "cat_0",
        ),
        BadRequest("no columns", _json({"inputs": {}}), 400, "empty_instances", "inputs"),
        BadRequest("empty columns", _json({"inputs": {"int_0": []}}), 400, "empty_instances", "inputs"),
        BadRequest(
            "too many rows in columns", _json({"inputs": {"int_0": [1] * (max_rows + 1)}}), 413, "too_many_rows",
            "inputs",
        ),
        BadRequest(
            "columns with instances", _json({"inputs": {"int_0": [1]}, "instances": []}), 400, "unknown_field",
            "instances",
        ),
        BadRequest("columnar unknown feature", _json(columns(int_13=1)), 400, "unknown_field", "int_13", 0),
        BadRequest(
            "columnar bad value names its row", _json({"inputs": {"int_0": [1, 1.5]}}), 400, "non_integer", "int_0", 1
        ),
        BadRequest("columnar bad category", _json(columns(cat_7="05db916g")), 400, "invalid_category", "cat_7", 0),
        BadRequest(
            "columnar reference id out of range", _json({"inputs": reference}), 400, "id_out_of_range",
            "id_list_features.values", 0,
        ),
        BadRequest(
            "columnar null context", _json({"context": None, "inputs": {"int_0": [1]}}), 400, "wrong_type", "context"
        ),
        BadRequest(
            "columnar candidate repeats the context",
            _json({"context": {"cat_0": "05db9164"}, "inputs": columns()["inputs"]}),
            400, "duplicate_field", "cat_0", 0,
        ),
    ]  # fmt: skip
