"""A small client for the DLRM's Open Inference Protocol endpoint (KServe v2 REST).

The server's contract (handler/oip/) is columnar: one request carries ``N``
rows as three tensors, ``dense_features`` FP32 ``[N, 13]``, ``sparse_lengths``
INT64 ``[N, 26]`` and ``sparse_ids`` INT64 ``[total]`` (row 0's ``cat_0`` ids, its
``cat_1`` ids, ..., then row 1's), or raw Criteo rows as two BYTES tensors; it
answers ``score`` and ``logit``, FP32 ``[N]``. This client turns NumPy arrays
into such a request and the answer back into arrays, so callers never build
tensor JSON by hand.

With ``binary=True`` (the default) tensors travel as raw little-endian bytes
after a JSON header (the binary data extension): no number is printed and
re-parsed, ids stay exact int64 and a large batch costs a copy instead of a
JSON encode. ``binary=False`` sends JSON tensors, handy to read on the wire.

Usage::

    import numpy as np
    from dlrm_client import DLRMClient, DLRMRequestError

    with DLRMClient("http://127.0.0.1:8080") as client:
        dense = np.zeros((2, 13), dtype=np.float32)
        lengths = np.ones((2, 26), dtype=np.int64)        # one id per feature and row
        ids = np.zeros(52, dtype=np.int64)                # 2 rows x 26 features x 1 id
        prediction = client.predict(dense, lengths, ids)
        print(prediction.score, prediction.logit)         # two float32 values each
        raw = client.predict_raw([["8", "", *["0"] * 11]], [["05db9164", *[""] * 25]])
        try:
            client.predict(dense, lengths, ids[:-1])      # one id short
        except DLRMRequestError as error:
            print(error.status, error.kind, error.body["message"])   # 400 length_mismatch ...
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import orjson
import requests

NUM_DENSE = 13
NUM_SPARSE = 26
DENSE_INPUT = "dense_features"
LENGTHS_INPUT = "sparse_lengths"
IDS_INPUT = "sparse_ids"
CONTEXT_DENSE_INPUT = "context_dense_features"
CONTEXT_LENGTHS_INPUT = "context_sparse_lengths"
CONTEXT_IDS_INPUT = "context_sparse_ids"
RAW_INTS_INPUT = "int_features"
RAW_CATEGORIES_INPUT = "cat_features"
OUTPUTS = ("score", "logit")
# The binary data extension: this header gives the byte length of the JSON part of the body.
HEADER_LENGTH = "Inference-Header-Content-Length"

# Wire types of the numeric datatypes: the extension's binary tensors are little-endian, whatever the host.
_WIRE_TYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}
_BYTES_LENGTH = np.dtype("<u4")


@dataclass(frozen=True)
class Prediction:
    """The answer for ``N`` rows, in request order.

    ``score``: float32 ``[N]``, click probabilities in [0, 1].
    ``logit``: float32 ``[N]``, the model's raw output (``score = sigmoid(logit)``).
    """

    score: np.ndarray
    logit: np.ndarray

    def __len__(self) -> int:
        return len(self.score)


class DLRMRequestError(Exception):
    """The server answered with a status other than 200.

    ``status`` is the HTTP status; ``body`` the parsed JSON error body: for the
    handler's own 4xx it has ``error``, ``code``, ``type``, ``message`` and where
    the problem is (``field``, ``row``, ``expected``, ``got``); TorchServe's own
    errors (404 unknown model, 413 body too large, 503 no worker) have ``code``,
    ``type`` and ``message``. A body that is not a JSON object (a proxy's HTML
    page) is kept as ``{"error": <text>}`` so that callers can always index it.
    """

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        kind = body.get("type")
        message = body.get("message") or body.get("error") or ""
        super().__init__(f"HTTP {status} {kind}: {message}" if kind else f"HTTP {status}: {message}")

    @property
    def kind(self) -> str | None:
        """The error ``type`` (``wrong_shape``, ``id_out_of_range``, ...); docs/api.md lists them (Errors)."""
        kind = self.body.get("type")
        return kind if isinstance(kind, str) else None

    @property
    def field(self) -> str | None:
        """The input the error is about, when the server says."""
        field = self.body.get("field")
        return field if isinstance(field, str) else None


@dataclass(frozen=True)
class Tensor:
    """One input tensor: ``data`` is a NumPy array (numeric datatypes) or a flat list of strings (BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[str]


def encode_request(
    tensors: Sequence[Tensor], binary: bool, outputs: Sequence[str] = OUTPUTS
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an inference request.

    ``binary``: the inputs' bytes follow the JSON header in the order of
    ``tensors`` (each input names its ``binary_data_size``), the header's length
    goes in ``Inference-Header-Content-Length``, and the outputs are asked for as
    raw bytes too. Numeric tensors are little-endian; a BYTES element is a 4-byte
    little-endian length followed by its UTF-8 bytes. Otherwise every tensor is
    a flat JSON ``data`` array and the answer comes back as JSON.
    """
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for tensor in tensors:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary:
            raw = _tensor_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif isinstance(tensor.data, np.ndarray):
            entry["data"] = np.ascontiguousarray(tensor.data).ravel()  # orjson writes only contiguous arrays
        else:
            entry["data"] = tensor.data
        described.append(entry)
    request: dict[str, Any] = {"inputs": described, "outputs": [{"name": name} for name in outputs]}
    if binary:
        request["parameters"] = {"binary_data_output": True}
    header = orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *chunks]), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def decode_response(body: bytes, headers: Any) -> dict[str, np.ndarray]:
    """The output tensors of an inference response, by name, as float32 arrays.

    ``headers`` is the response's (case-insensitive) headers: with
    ``Inference-Header-Content-Length`` the body is a JSON header followed by the
    outputs that have a ``binary_data_size``, in the header's order.
    """
    header_length = headers.get(HEADER_LENGTH)
    split = int(header_length) if header_length is not None else len(body)
    response = orjson.loads(body[:split])
    binary = memoryview(body)[split:]
    offset = 0
    tensors: dict[str, np.ndarray] = {}
    for output in response.get("outputs", []):
        datatype = output.get("datatype")
        if datatype not in _WIRE_TYPES:
            raise ValueError(f"output {output.get('name')!r} has datatype {datatype!r}; this client reads numbers")
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            values = np.asarray(output["data"], dtype=_WIRE_TYPES[datatype])
        else:
            if offset + size > len(binary):
                raise ValueError(f"output {output['name']!r} needs {size} bytes at {offset}: the body is truncated")
            values = np.frombuffer(binary[offset : offset + size], dtype=_WIRE_TYPES[datatype])
            offset += size
        tensors[output["name"]] = values.reshape(output["shape"]).astype(np.float32, copy=False)
    return tensors


def model_input_tensors(dense: Any, lengths: Any, ids: Any) -> list[Tensor]:
    """The three model-input tensors; shapes are taken from the arrays, and the server checks them.

    ``dense``: float32 ``[N, 13]``. ``lengths``: integers ``[N, 26]``, sent as INT64.
    ``ids``: integers ``[lengths.sum()]``, sent as INT64. Ids and lengths must
    already be integers: a float id is refused here rather than silently
    truncated (the server refuses ``3.0`` for the same reason).
    """
    dense_array = np.asarray(dense, dtype=np.float32)
    lengths_array = _integers(lengths, LENGTHS_INPUT)
    ids_array = _integers(ids, IDS_INPUT)
    return [
        Tensor(DENSE_INPUT, "FP32", dense_array.shape, dense_array),
        Tensor(LENGTHS_INPUT, "INT64", lengths_array.shape, lengths_array),
        Tensor(IDS_INPUT, "INT64", ids_array.shape, ids_array),
    ]


def ranking_tensors(
    lengths: Any, ids: Any, context_lengths: Any, context_ids: Any, dense: Any = None, context_dense: Any = None
) -> list[Tensor]:
    """A ranking request's tensors: ``N`` candidates and one context row whose sparse ids they share.

    ``lengths`` ``[N, 26]``, ``ids``: the candidates' own ids; ``context_lengths`` ``[1, 26]``,
    ``context_ids``: the context's, each feature's ids on one side only (its lengths 0 on the
    other). The dense features: ``dense`` ``[N, 13]`` per candidate, or ``context_dense``
    ``[1, 13]`` for all of them; exactly one of the two. The candidates' lengths go in the
    compact form, ``[N, m]`` over the ``m`` features the context has no ids for, when their
    other columns are all 0 (else as given, for the server to name the problem).
    """
    if (dense is None) == (context_dense is None):
        raise ValueError("give the dense features once: dense [N, 13] or context_dense [1, 13]")
    lengths_array, ids_array = _integers(lengths, LENGTHS_INPUT), _integers(ids, IDS_INPUT)
    context_lengths_array = _integers(context_lengths, CONTEXT_LENGTHS_INPUT)
    context_ids_array = _integers(context_ids, CONTEXT_IDS_INPUT)
    own = context_lengths_array.reshape(-1) == 0
    if lengths_array.ndim == 2 and lengths_array.shape[1] == own.size and not lengths_array[:, ~own].any():
        lengths_array = lengths_array[:, own]
    name, values = (DENSE_INPUT, dense) if dense is not None else (CONTEXT_DENSE_INPUT, context_dense)
    dense_array = np.asarray(values, dtype=np.float32)
    return [
        Tensor(name, "FP32", dense_array.shape, dense_array),
        Tensor(LENGTHS_INPUT, "INT64", lengths_array.shape, lengths_array),
        Tensor(IDS_INPUT, "INT64", ids_array.shape, ids_array),
        Tensor(CONTEXT_LENGTHS_INPUT, "INT64", context_lengths_array.shape, context_lengths_array),
        Tensor(CONTEXT_IDS_INPUT, "INT64", context_ids_array.shape, context_ids_array),
    ]


def raw_row_tensors(int_features: Any, cat_features: Any) -> list[Tensor]:
    """The two raw-row BYTES tensors from 2-D ``[N, 13]`` and ``[N, 26]`` tables of strings.

    Integer features are decimal strings (Python ints are written as such),
    categorical ones 8 hex digits; ``""`` or ``None`` is a missing value.
    """
    return [
        Tensor(RAW_INTS_INPUT, "BYTES", *_string_table(int_features, RAW_INTS_INPUT)),
        Tensor(RAW_CATEGORIES_INPUT, "BYTES", *_string_table(cat_features, RAW_CATEGORIES_INPUT)),
    ]


class DLRMClient:
    """Scores rows with a DLRM served by TorchServe over the Open Inference Protocol (REST).

    One keep-alive HTTP session per client: reuse a client for many requests,
    and close it (or use it as a context manager) when done. Not thread-safe
    across threads sharing one instance; give each thread its own client.
    """

    def __init__(
        self, url: str = "http://127.0.0.1:8080", model: str = "dlrm", binary: bool = True, timeout: float = 30.0
    ) -> None:
        """``url``: TorchServe's inference API. ``binary``: use the binary data extension (see the module doc)."""
        self.url = url.rstrip("/")
        self.model = model
        self.binary = binary
        self.timeout = timeout
        self.session = requests.Session()

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.model}/infer"

    def predict(self, dense: Any, lengths: Any, ids: Any) -> Prediction:
        """Scores ``N`` rows of model inputs.

        ``dense``: float32 ``[N, 13]``, already transformed as in training.
        ``lengths``: integers ``[N, 26]``, ids per row and feature (0 and more than 1 allowed).
        ``ids``: int64 ``[lengths.sum()]``, row-major: row 0's ``cat_0`` ids, its ``cat_1`` ids, ...
        Raises :class:`DLRMRequestError` when the server refuses the rows.
        """
        return self._infer(model_input_tensors(dense, lengths, ids))

    def predict_raw(self, int_features: Any, cat_features: Any) -> Prediction:
        """Scores ``N`` raw Criteo rows; the server applies the archive's training preprocessing.

        ``int_features``: ``[N, 13]`` decimal strings (or ints); ``cat_features``:
        ``[N, 26]`` strings of 8 hex digits; ``""`` or ``None`` is missing.
        """
        return self._infer(raw_row_tensors(int_features, cat_features))

    def predict_ranking(
        self,
        lengths: Any,
        ids: Any,
        context_lengths: Any,
        context_ids: Any,
        dense: Any = None,
        context_dense: Any = None,
    ) -> Prediction:
        """Scores ``N`` candidates sharing one context row (see :func:`ranking_tensors`): the context's
        sparse ids are looked up once for all of them."""
        return self._infer(ranking_tensors(lengths, ids, context_lengths, context_ids, dense, context_dense))

    def ready(self) -> bool:
        """Whether the model answers ``GET /v2/models/{model}/ready`` with 200: all its workers are up.

        False while it loads, when it is not served, or when the server cannot be reached.
        """
        try:
            response = self.session.get(f"{self.url}/v2/models/{self.model}/ready", timeout=self.timeout)
        except requests.ConnectionError:
            return False
        return response.status_code == 200

    def metadata(self) -> dict[str, Any]:
        """The model's OIP metadata (``GET /v2/models/{model}``): name, versions, input and output tensors."""
        response = self.session.get(f"{self.url}/v2/models/{self.model}", timeout=self.timeout)
        if response.status_code != 200:
            raise DLRMRequestError(response.status_code, _error_body(response))
        metadata: dict[str, Any] = orjson.loads(response.content)
        return metadata

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> DLRMClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _infer(self, tensors: list[Tensor]) -> Prediction:
        body, headers = encode_request(tensors, self.binary)
        response = self.session.post(self.infer_url, data=body, headers=headers, timeout=self.timeout)
        if response.status_code != 200:
            raise DLRMRequestError(response.status_code, _error_body(response))
        outputs = decode_response(response.content, response.headers)
        missing = [name for name in OUTPUTS if name not in outputs]
        if missing:
            raise ValueError(f"the response lacks output {missing[0]!r}: {sorted(outputs)}")
        return Prediction(score=outputs["score"], logit=outputs["logit"])


def _tensor_bytes(tensor: Tensor) -> bytes:
    if isinstance(tensor.data, np.ndarray):
        return np.ascontiguousarray(tensor.data, dtype=_WIRE_TYPES[tensor.datatype]).tobytes()
    parts: list[bytes] = []
    for text in tensor.data:
        encoded = text.encode("utf-8")
        parts += [np.array(len(encoded), dtype=_BYTES_LENGTH).tobytes(), encoded]
    return b"".join(parts)


def _integers(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got {array.dtype}: ids are never rounded from floats")
    return array.astype(np.int64, copy=False)


def _string_table(rows: Any, name: str) -> tuple[tuple[int, int], list[str]]:
    """The shape ``[N, width]`` and the flat row-major strings of a 2-D table."""
    table: Iterable[Any] = rows.tolist() if isinstance(rows, np.ndarray) else rows
    flat: list[str] = []
    widths = set()
    count = 0
    for row in table:
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"{name} must be 2-D: a sequence of rows, got a row of type {type(row).__name__}")
        widths.add(len(row))
        flat.extend(_text(value, name) for value in row)
        count += 1
    if len(widths) > 1:
        raise ValueError(f"{name} rows have different lengths {sorted(widths)}: a tensor needs one width")
    return (count, widths.pop() if widths else 0), flat


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    raise TypeError(f"{name} values must be strings (or ints, or None for missing), got {type(value).__name__}")


def _error_body(response: requests.Response) -> dict[str, Any]:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    return body if isinstance(body, dict) else {"error": response.text}
