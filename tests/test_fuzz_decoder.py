"""Property-based fuzzing of the request decoder: any body gives a valid request or a 4xx, nothing else.

12,000 generated bodies per run (the ``max_examples`` below), the same ones on
every run (derandomized, no example database): valid bodies in both row formats and
ranking bodies in both (a context and candidates), each also in the columnar form (``inputs``),
near-valid ones (a valid body with one to three structural mutations: keys
dropped or added, counts changed, ids replaced by floats, strings, negative or
huge numbers, NaN-like tokens), byte-level corruptions of valid bodies,
arbitrary JSON and arbitrary bytes.

Every body is judged twice: by the decoder, and by :func:`expected_status`, an
oracle written from the contract in docs/api.md rather than from the codec. They
must agree on accept/reject and on the status; a rejection must be an
:class:`InvalidRequest` whose JSON error body can be encoded (the server sends
it), and an acceptance must satisfy the invariants the model relies on.
"""

from __future__ import annotations

import json
import math
import string
from typing import Any

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler.errors import InvalidRequest
from handler.json_rows import RequestDecoder, RowsRequest, encode_error
from model_factory.config import preset
from model_factory.features import Preprocessing
from tests import fuzzing
from tests.rows import columnar, random_row

CONFIG = preset("small")
MAX_ROWS = 4
DECODER = RequestDecoder(CONFIG, Preprocessing(), max_rows=MAX_ROWS)
TABLE_SIZES = CONFIG.num_embeddings_per_feature
DENSE_NAMES = CONFIG.dense_feature_names
SPARSE_NAMES = CONFIG.sparse_feature_names
NUM_DENSE, NUM_SPARSE = len(DENSE_NAMES), len(SPARSE_NAMES)
# The reference format's keys, spelled out here (not imported) so that the oracle stays independent.
REFERENCE_KEYS = ("float_features", "id_list_features.lengths", "id_list_features.values")
HEX = set(string.hexdigits)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------- the oracle


def expected_status(body: bytes) -> int | None:
    """None when the contract accepts ``body``, else the 4xx status it must get."""
    if not body:
        return 415
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 400
    if not isinstance(payload, dict):
        return 400
    if "inputs" in payload:
        return expected_columnar_status(payload)
    if "context" in payload:
        return expected_ranking_status(payload)
    if "instances" not in payload:
        rows = [payload]
    else:
        rows = payload["instances"]
        if set(payload) != {"instances"} or not isinstance(rows, list) or not rows:
            return 400
        if len(rows) > MAX_ROWS:
            return 413
    valid_row = valid_raw_row if is_raw_row(rows[0]) else valid_reference_row
    return None if all(valid_row(row) for row in rows) else 400


def expected_columnar_status(payload: dict) -> int | None:
    """``inputs``: an object of arrays, all of the same length (1..MAX_ROWS), beside an optional context;
    then the status of the rows they transpose to."""
    columns = payload["inputs"]
    if not set(payload) <= {"inputs", "context"} or not isinstance(columns, dict):
        return 400
    if not all(isinstance(column, list) for column in columns.values()):
        return 400
    counts = {len(column) for column in columns.values()}
    if len(counts) != 1 or counts == {0}:
        return 400
    if counts.pop() > MAX_ROWS:
        return 413
    return expected_status(json.dumps(as_rows(payload)).encode())


def as_rows(payload: dict) -> dict[str, Any]:
    """A columnar payload's ``instances`` form: row ``i`` holds every column's value ``i``."""
    columns = payload["inputs"]
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    return {key: value for key, value in payload.items() if key != "inputs"} | {"instances": rows}


def expected_ranking_status(payload: dict) -> int | None:
    """A context of raw features and candidates holding other features only, each feature in at most one of
    them (absent from both: missing, as in a plain raw row); or both in the reference format."""
    names = {*DENSE_NAMES, *SPARSE_NAMES}
    context, rows = payload["context"], payload.get("instances")
    if set(payload) != {"context", "instances"} or not isinstance(context, dict):
        return 400
    if is_reference_ranking(context, rows):
        return expected_reference_ranking_status(context, rows)
    if not set(context) <= names:
        return 400
    if not isinstance(rows, list) or not rows:
        return 400
    if len(rows) > MAX_ROWS:
        return 413
    own = names - set(context)
    if not all(isinstance(row, dict) and set(row) <= own for row in rows):
        return 400
    return None if valid_raw_row(context) and all(map(valid_raw_row, rows)) else 400


def is_reference_ranking(context: dict, rows: Any) -> bool:
    """The context has a reference-format key, or is empty and the first candidate is not a raw row."""
    if any(key in context for key in REFERENCE_KEYS):
        return True
    return not context and isinstance(rows, list) and bool(rows) and not is_raw_row(rows[0])


def expected_reference_ranking_status(context: dict, rows: Any) -> int | None:
    """The context: float_features, and/or lengths of all 26 features with their ids (a feature whose
    context length is > 0 is the context's); each candidate: float_features unless the context has them,
    and lengths of the other features only or of all 26 (0 for the context's), with their ids."""
    dense_key, lengths_key, values_key = REFERENCE_KEYS
    if not isinstance(rows, list) or not rows:
        return 400
    if len(rows) > MAX_ROWS:
        return 413
    if not set(context) <= set(REFERENCE_KEYS) or (lengths_key in context) != (values_key in context):
        return 400
    if dense_key in context and not valid_dense(context[dense_key]):
        return 400
    context_lengths = context.get(lengths_key, [0] * NUM_SPARSE)
    if lengths_key in context and not valid_ids(context_lengths, context[values_key], list(range(NUM_SPARSE))):
        return 400
    own = [feature for feature, n in enumerate(context_lengths) if n == 0]
    row_keys = {lengths_key, values_key} | (set() if dense_key in context else {dense_key})
    for row in rows:
        if not isinstance(row, dict) or set(row) != row_keys:
            return 400
        if dense_key in row and not valid_dense(row[dense_key]):
            return 400
        lengths = row[lengths_key]
        if isinstance(lengths, list) and len(lengths) == NUM_SPARSE and len(own) != NUM_SPARSE:
            if not all(map(is_int, lengths)) or any(n != 0 for f, n in enumerate(lengths) if f not in own):
                return 400
            lengths = [lengths[feature] for feature in own]
        if not valid_ids(lengths, row[values_key], own):
            return 400
    return None


def valid_dense(dense: Any) -> bool:
    return isinstance(dense, list) and len(dense) == NUM_DENSE and all(map(finite_in_float32, dense))


def valid_ids(lengths: Any, values: Any, features: list[int]) -> bool:
    """``lengths`` of ``features`` (ints >= 0, one each) and as many ``values``, each within its table."""
    if not isinstance(lengths, list) or len(lengths) != len(features):
        return False
    if not all(is_int(n) and n >= 0 for n in lengths):
        return False
    if not isinstance(values, list) or not all(map(is_int, values)) or len(values) != sum(lengths):
        return False
    of_value = [feature for feature, n in zip(features, lengths, strict=True) for _ in range(n)]
    return all(0 <= value < TABLE_SIZES[feature] for value, feature in zip(values, of_value, strict=True))


def is_raw_row(row: Any) -> bool:
    """A raw Criteo row uses feature names as keys and none of the reference format's keys."""
    return (
        isinstance(row, dict)
        and not any(key in row for key in REFERENCE_KEYS)
        and any(key in row for key in (*DENSE_NAMES, *SPARSE_NAMES))
    )


def is_int(value: Any) -> bool:
    return type(value) is int  # JSON integers only: not booleans, not 3.0


def finite_in_float32(value: Any) -> bool:
    if type(value) not in (int, float):
        return False
    try:
        wide = float(value)
    except OverflowError:
        return False
    # float32's largest finite value is (2 - 2**-23) * 2**127; halfway to 2**128 and beyond rounds to infinity.
    return math.isfinite(wide) and abs(wide) < 2.0**128 - 2.0**103


def valid_reference_row(row: Any) -> bool:
    if not isinstance(row, dict) or set(row) != set(REFERENCE_KEYS):
        return False
    dense, lengths, values = (row[key] for key in REFERENCE_KEYS)
    return valid_dense(dense) and valid_ids(lengths, values, list(range(NUM_SPARSE)))


def valid_raw_row(row: Any) -> bool:
    if not isinstance(row, dict) or not set(row) <= {*DENSE_NAMES, *SPARSE_NAMES}:
        return False
    ints_ok = all(
        row.get(name) is None or (is_int(row[name]) and -(2**63) <= row[name] < 2**63) for name in DENSE_NAMES
    )
    categories_ok = all(
        row.get(name) in (None, "") or (type(row[name]) is str and len(row[name]) == 8 and set(row[name]) <= HEX)
        for name in SPARSE_NAMES
    )
    return ints_ok and categories_ok


# ---------------------------------------------------------------- the check


def check(body: bytes) -> None:
    status = expected_status(body)
    try:
        request = DECODER.decode(body)
    except InvalidRequest as error:
        assert status is not None, f"a valid body was refused: {error.to_body()}\n{body[:500]!r}"
        assert error.status == status, f"expected {status}, got {error.to_body()}\n{body[:500]!r}"
        sent = orjson.loads(encode_error(error))
        assert sent["code"] == status and sent["type"] == error.kind and sent["message"]
        return
    assert status is None, f"an invalid body was accepted (expected {status}):\n{body[:500]!r}"
    payload = orjson.loads(body)
    assert request.columnar == ("inputs" in payload)
    check_invariants(request, as_rows(payload) if request.columnar else payload)


def check_invariants(decoded: RowsRequest, payload: dict) -> None:
    request = decoded.rows
    rows = payload.get("instances", [payload])
    n = len(rows)
    if "context" in payload and is_reference_ranking(payload["context"], rows):
        check_reference_ranking(decoded, payload["context"], rows)
        return
    if "context" in payload:
        assert decoded.context is not None and decoded.context.num_rows == 1
        shared = np.array([name in payload["context"] for name in SPARSE_NAMES])
        assert request.lengths.tolist() == [(~shared).astype(int).tolist()] * n
        assert decoded.context.lengths.tolist() == [shared.astype(int).tolist()]
        assert decoded.context.values.size == shared.sum()
    else:
        assert decoded.context is None
    assert decoded.single_row == ("instances" not in payload)
    assert decoded.num_rows == n
    assert request.dense.shape == (n, NUM_DENSE) and request.dense.dtype == np.float32
    assert np.isfinite(request.dense).all()
    assert request.lengths.shape == (n, NUM_SPARSE) and request.lengths.dtype == np.int64
    assert (request.lengths >= 0).all()
    assert request.values.ndim == 1 and request.values.dtype == np.int64
    assert request.values.size == request.lengths.sum()
    feature_of_id = np.repeat(np.tile(np.arange(NUM_SPARSE), n), request.lengths.ravel())
    assert ((request.values >= 0) & (request.values < np.asarray(TABLE_SIZES)[feature_of_id])).all()
    if "context" in payload:
        assert (request.dense >= 0).all()
    elif is_raw_row(rows[0]):  # exact: the documented preprocessing, one id per feature (0 for missing)
        assert (request.lengths == 1).all()
        expected_dense = [
            [math.log1p(max(float(row[name]), 0.0)) if row.get(name) is not None else 0.0 for name in DENSE_NAMES]
            for row in rows
        ]
        assert request.dense.tolist() == np.array(expected_dense, np.float32).tolist()
        expected_ids = [
            int(row[name], 16) % size if row.get(name) else 0
            for row in rows
            for name, size in zip(SPARSE_NAMES, TABLE_SIZES, strict=True)
        ]
        assert request.values.tolist() == expected_ids
    else:  # exact: ids and lengths as sent, dense values as their float32 rounding
        assert request.lengths.tolist() == [row["id_list_features.lengths"] for row in rows]
        assert request.values.tolist() == [v for row in rows for v in row["id_list_features.values"]]
        assert request.dense.tolist() == np.array([row["float_features"] for row in rows], np.float32).tolist()


def check_reference_ranking(decoded: RowsRequest, context: dict, rows: list[dict]) -> None:
    """Exact: the context's ids as sent, each candidate's lengths over all 26 features (0 for the context's),
    its ids as sent, the dense values (the context's in every row, or each row's) as their float32 rounding."""
    dense_key, lengths_key, values_key = REFERENCE_KEYS
    context_lengths = context.get(lengths_key, [0] * NUM_SPARSE)
    assert decoded.context is not None
    assert decoded.context.lengths.tolist() == [context_lengths]
    assert decoded.context.values.tolist() == context.get(values_key, [])
    own = [feature for feature, n in enumerate(context_lengths) if n == 0]
    expected_lengths = []
    for row in rows:
        lengths = row[lengths_key]
        if len(lengths) == len(own):
            lengths = [lengths[own.index(f)] if f in own else 0 for f in range(NUM_SPARSE)]
        expected_lengths.append(lengths)
    request = decoded.rows
    assert request.lengths.tolist() == expected_lengths
    assert request.values.tolist() == [v for row in rows for v in row[values_key]]
    dense = [context[dense_key] if dense_key in context else row[dense_key] for row in rows]
    assert request.dense.tolist() == np.array(dense, np.float32).tolist()


# ---------------------------------------------------------------- generators
# Bodies come from a NumPy generator seeded by Hypothesis (element-wise Hypothesis draws cost 5-10x the
# time); they are functions of a seed so that tests/test_reliability.py sends the same kinds of bodies.

seeds = st.integers(0, 2**32 - 1)


def raw_row(rng: np.random.Generator) -> dict[str, Any]:
    """A valid raw Criteo row: each feature absent, null, or a value (empty strings for categories too)."""
    row: dict[str, Any] = {DENSE_NAMES[0]: int(rng.integers(-(2**63), 2**63 - 1))}  # an empty row is not raw
    for name in DENSE_NAMES[1:]:
        choice = rng.integers(3)
        if choice:
            row[name] = None if choice == 1 else int(rng.integers(-(2**63), 2**63 - 1))
    for name in SPARSE_NAMES:
        choice = rng.integers(4)
        if choice:
            row[name] = [None, "", rng.bytes(4).hex()][choice - 1]
    return row


def ranking_payload(rng: np.random.Generator) -> dict[str, Any]:
    """A context of some raw features and 1..MAX_ROWS candidates with the others: each missing one null or
    absent (from both sides)."""
    names = [*DENSE_NAMES, *SPARSE_NAMES]
    in_context = rng.random(len(names)) < rng.random()

    def complete(chosen: list[str]) -> dict[str, Any]:
        row = raw_row(rng)
        return {name: row.get(name) for name in chosen if name in row or rng.integers(2)}

    context = complete([name for name, shared in zip(names, in_context, strict=True) if shared])
    own = [name for name, shared in zip(names, in_context, strict=True) if not shared]
    return {"context": context, "instances": [complete(own) for _ in range(rng.integers(1, MAX_ROWS + 1))]}


def reference_ranking_payload(rng: np.random.Generator) -> dict[str, Any]:
    """A reference-format context (a user row's float_features, ids of some features, or both) and
    1..MAX_ROWS candidates with the rest, their lengths compact or over all 26 features."""
    dense_key, lengths_key, values_key = REFERENCE_KEYS
    user = random_row(CONFIG, rng)
    shared = (rng.random(NUM_SPARSE) < rng.random()) & (np.array(user[lengths_key]) > 0)
    context: dict[str, Any] = {}
    if rng.integers(3):
        context[lengths_key] = np.where(shared, user[lengths_key], 0).tolist()
        context[values_key] = ids_of(user, shared)
    else:
        shared[:] = False
    if not shared.any() or rng.integers(2):
        context[dense_key] = user[dense_key]
    candidates = []
    for _ in range(rng.integers(1, MAX_ROWS + 1)):
        row = random_row(CONFIG, rng)
        lengths = np.where(shared, 0, row[lengths_key])
        candidate = {lengths_key: (lengths if rng.integers(2) else lengths[~shared]).tolist()}
        candidate[values_key] = ids_of(row, ~shared)
        if dense_key not in context:
            candidate[dense_key] = row[dense_key]
        candidates.append(candidate)
    return {"context": context, "instances": candidates}


def ids_of(row: dict[str, Any], features: np.ndarray) -> list[int]:
    """The ids of a reference-format row's ``features``, in order."""
    _, lengths_key, values_key = REFERENCE_KEYS
    ends = np.cumsum(row[lengths_key]).tolist()
    starts = [0, *ends[:-1]]
    return [v for f in np.flatnonzero(features) for v in row[values_key][starts[f] : ends[f]]]


def valid_payload(rng: np.random.Generator) -> dict[str, Any]:
    """One row or 1..MAX_ROWS ``instances``, all in the reference format or all raw, or a ranking body in
    either format; a third of the multi-row bodies columnar."""
    choice = rng.integers(8)
    if choice < 2:
        payload = ranking_payload(rng) if choice else reference_ranking_payload(rng)
    else:
        make_row = (lambda: random_row(CONFIG, rng)) if rng.integers(2) else (lambda: raw_row(rng))
        if rng.integers(2):
            return make_row()
        payload = {"instances": [make_row() for _ in range(rng.integers(1, MAX_ROWS + 1))]}
    return columnar(payload) if rng.integers(3) == 0 and any(payload["instances"]) else payload


# Edge numbers: around 0 and the small tables' sizes, int64/uint64 limits, float32/float64 limits.
EDGE_NUMBERS: list[int | float] = [
    -1,
    0,
    1,
    34,
    35,
    9999,
    10000,
    2**31,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**63),
    -(2**63) - 1,
]
EDGE_NUMBERS += [3.0, -0.0, 0.5, 3.4028234e38, 3.4028236e38, 1e39, 1e300, -1e300, 5e-324]
NAN_LIKE = ["NaN", "Infinity", "-Infinity", "1", "", "05db9164", "05DB9164", "0x05db91", "05db916g"]
EXTRA_KEYS = ["instances", "inputs", "context", "extra", *REFERENCE_KEYS, DENSE_NAMES[3], SPARSE_NAMES[25]]


def nasty_value(rng: np.random.Generator) -> Any:
    """What a mutation puts in place of a value: mostly edge numbers, else any number, a wrong JSON type,
    a NaN-like or hex string, or a container."""
    kind = rng.integers(8)
    if kind < 3:
        return EDGE_NUMBERS[rng.integers(len(EDGE_NUMBERS))]
    if kind == 3:
        return int.from_bytes(rng.bytes(9), "big", signed=True) >> int(rng.integers(0, 72))
    if kind == 4:
        return float(rng.normal(0, 10.0 ** rng.integers(-300, 300)))
    if kind == 5:
        return [None, True, False, "".join(map(chr, rng.integers(1, 0x3000, rng.integers(0, 8))))][rng.integers(4)]
    if kind == 6:
        return NAN_LIKE[rng.integers(len(NAN_LIKE))]
    return [{}, [[1]], [None], [int(i) for i in rng.integers(-5, 5, rng.integers(0, 30))]][rng.integers(4)]


def mutated(rng: np.random.Generator, value: Any) -> Any:
    return fuzzing.mutated(rng, value, nasty_value, EXTRA_KEYS)


def near_valid_body(seed: int) -> bytes:
    """A valid body after one to three mutations (serialized by the json module: huge integers stay
    exact, NaN becomes the token NaN)."""
    rng = np.random.default_rng(seed)
    payload = valid_payload(rng)
    for _ in range(rng.integers(1, 4)):
        payload = mutated(rng, payload)
    return json.dumps(payload).encode()


def corrupted_body(seed: int) -> bytes:
    """A valid body with one to three runs of bytes deleted, inserted or overwritten."""
    rng = np.random.default_rng(seed)
    body = bytearray(json.dumps(valid_payload(rng)).encode())
    for _ in range(rng.integers(1, 4)):
        position = int(rng.integers(len(body) + 1))
        junks = [b"NaN", b"1e999", b"-", b",", b"]", b"}", b'"', b"\\u0000", rng.bytes(int(rng.integers(1, 5)))]
        junk = junks[rng.integers(len(junks))]
        change = rng.integers(3)
        if change == 0:
            del body[position : position + len(junk)]
        elif change == 1:
            body[position:position] = junk
        else:
            body[position : position + len(junk)] = junk
    return bytes(body)


def random_json(rng: np.random.Generator) -> Any:
    """Any JSON value, with the row formats' keys among its strings."""
    texts = ["", "instances", "inputs", "float_features", "int_0", "cat_0", "05db9164", "NaN", "é"]
    return fuzzing.random_json(rng, texts, ["instances", "inputs", "extra", "int_1", "cat_2", *REFERENCE_KEYS])


def random_json_body(seed: int) -> bytes:
    return json.dumps(random_json(np.random.default_rng(seed))).encode()


# ---------------------------------------------------------------- the properties (12,000 bodies)


@fuzz_settings(2_000)
@given(seeds.map(lambda seed: json.dumps(valid_payload(np.random.default_rng(seed))).encode()))
def test_valid_bodies_decode_exactly(body: bytes) -> None:
    assert expected_status(body) is None
    check(body)


@fuzz_settings(5_000)
@given(seeds.map(near_valid_body))
def test_near_valid_bodies_decode_or_get_the_right_4xx(body: bytes) -> None:
    check(body)


@fuzz_settings(2_000)
@given(seeds.map(corrupted_body))
def test_corrupted_bytes_decode_or_get_the_right_4xx(body: bytes) -> None:
    check(body)


@fuzz_settings(1_500)
@given(seeds.map(random_json_body))
def test_arbitrary_json_gets_a_4xx_or_decodes(body: bytes) -> None:
    check(body)


@fuzz_settings(1_500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_get_a_4xx_or_decode(body: bytes) -> None:
    check(body)
