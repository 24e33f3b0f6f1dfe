"""An OIP request's bytes → its JSON header and its input tensors.

Tensors travel as JSON ``data`` (flat, or nested as their shape) or, with the binary data
extension, as raw little-endian bytes after a JSON header whose length the
``Inference-Header-Content-Length`` header gives (``binary_data_size`` per input; BYTES elements
each a 4-byte length, then UTF-8 text). TorchServe's gRPC service hands BYTES elements over
base64-encoded. What a tensor's name, datatype, shape and data can get wrong is checked here;
what its values mean is :mod:`handler.oip.tensors`'.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from handler import values
from handler.errors import ErrorKind, InvalidRequest, json_type, wrong_json_type
from handler.oip.schema import (
    ALLOWED_DATATYPES,
    CONTEXT_INPUTS,
    IDS_INPUT,
    JSON_TYPES,
    MODEL_INPUTS,
    NUMPY_TYPES,
    RAW_CATEGORIES_INPUT,
    RAW_INPUTS,
    RAW_INTS_INPUT,
    TENSOR_KEYS,
)
from handler.rows import RowValidator
from handler.values import BeyondRange
from model_factory.config import DLRMConfig

_BYTES_PREFIX = struct.Struct("<I")
_HEADER_LENGTH = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class Tensor:
    """One input as received: its data as a flat NumPy array (numbers) or list of strings (BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[str]


def split_body(
    body: bytes | bytearray | dict | None, header_length: str | None, validator: RowValidator
) -> tuple[Any, memoryview | None]:
    """The JSON part of a body, parsed (unless it is larger than any valid request's: ``validator``), and the
    binary part (None without the binary data extension)."""
    if isinstance(body, dict):
        return body, None
    if body is None:  # TorchServe parsed a form-encoded body itself: no JSON reached the handler
        raise InvalidRequest(
            ErrorKind.EMPTY_BODY,
            "the request has no JSON body: send it with 'Content-Type: application/json' "
            "(or application/octet-stream with the binary data extension)",
            expected="application/json body",
        )
    if header_length is None or not len(body):
        return _parse_json(body, validator), None
    length = header_length.strip()
    if not _HEADER_LENGTH.fullmatch(length) or not 0 < int(length) <= len(body):
        raise InvalidRequest(
            ErrorKind.INVALID_BINARY,
            f"Inference-Header-Content-Length must be the byte length of the JSON header, at most the body's "
            f"{len(body)} bytes, got {header_length!r}",
            field="Inference-Header-Content-Length",
            expected=f"integer in [1, {len(body)}]",
            got=header_length,
        )
    view = memoryview(body)
    return _parse_json(view[: int(length)], validator), view[int(length) :]


def _parse_json(text: bytes | bytearray | memoryview, validator: RowValidator) -> Any:
    return values.parse_json(
        text, validator, "the request has no body: send an inference request as JSON", "the request's JSON is not valid"
    )


class TensorReader:
    """A request's ``inputs`` as :class:`Tensor` s, each checked for its name, datatype, shape and data."""

    def __init__(self, config: DLRMConfig, validator: RowValidator) -> None:
        self.validator = validator
        self.raw_widths = {RAW_INTS_INPUT: config.num_dense_features, RAW_CATEGORIES_INPUT: config.num_sparse_features}

    def tensors(self, inputs: Any, binary: memoryview | None, grpc: bool) -> dict[str, Tensor]:
        """The inputs by name, with their data from JSON or, in order, from ``binary``."""
        if inputs is None:
            raise InvalidRequest(ErrorKind.MISSING_FIELD, "the request has no 'inputs'", field="inputs")
        if not isinstance(inputs, list) or not inputs:
            raise wrong_json_type(
                "'inputs' must be a non-empty array of tensors", inputs, "non-empty array", field="inputs"
            )
        tensors: dict[str, Tensor] = {}
        offset = 0
        for described in inputs:
            tensor, offset = self._tensor(described, binary, offset, grpc)
            if tensor.name in tensors:
                raise InvalidRequest(
                    ErrorKind.UNKNOWN_FIELD, f"input {tensor.name!r} is given twice", field=tensor.name
                )
            tensors[tensor.name] = tensor
        if binary is not None and offset != len(binary):
            raise InvalidRequest(
                ErrorKind.INVALID_BINARY,
                f"the body has {len(binary)} bytes after the JSON header but the inputs' binary_data_size "
                f"add up to {offset}",
                field="binary_data_size",
                expected=offset,
                got=len(binary),
            )
        return tensors

    def _tensor(self, described: Any, binary: memoryview | None, offset: int, grpc: bool) -> tuple[Tensor, int]:
        """One input tensor, with its data from JSON or from ``binary`` at ``offset``; and the next offset."""
        name, datatype, shape, parameters = self._description(described)
        binary_size = parameters.get("binary_data_size")
        if binary_size is not None:
            return self._binary_tensor(name, datatype, shape, "data" in described, binary_size, binary, offset)
        if "data" not in described:
            raise InvalidRequest(
                ErrorKind.MISSING_FIELD, f"input {name!r} has neither 'data' nor a binary_data_size", field=name
            )
        data = _json_data(name, datatype, described["data"], math.prod(shape))
        if grpc and isinstance(data, list):
            data = _from_base64(name, data)
        return Tensor(name, datatype, shape, data), offset

    def _description(self, described: Any) -> tuple[str, str, tuple[int, ...], dict]:
        """An input's name, datatype, shape and parameters, checked; a rows tensor's row count too, before its
        data is read."""
        if not isinstance(described, dict):
            raise wrong_type("inputs", "object", described)
        name = described.get("name")
        if not isinstance(name, str) or name not in ALLOWED_DATATYPES:
            known = ", ".join(MODEL_INPUTS + RAW_INPUTS + CONTEXT_INPUTS)
            field = name if isinstance(name, str) else "name"
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD, f"unknown input {name!r}: the inputs are {known}", field=field, got=name
            )
        unknown = sorted(described.keys() - TENSOR_KEYS)
        if unknown:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD, f"input {name!r} has an unknown key {unknown[0]!r}", field=name
            )
        datatype = described.get("datatype")
        if datatype not in ALLOWED_DATATYPES[name]:
            allowed = " or ".join(ALLOWED_DATATYPES[name])
            raise InvalidRequest(
                ErrorKind.WRONG_DATATYPE,
                f"input {name!r} must have datatype {allowed}, got {datatype!r}",
                field=name,
                expected=allowed,
                got=datatype,
            )
        shape = _shape(name, described.get("shape"))
        if len(shape) == 2:  # a rows tensor: refuse too many rows before reading its data
            self.validator.check_row_count(shape[0], name)
        parameters = described.get("parameters", {})
        if not isinstance(parameters, dict):
            raise wrong_type(f"{name}.parameters", "object", parameters)
        return name, datatype, shape, parameters

    def _binary_tensor(
        self,
        name: str,
        datatype: str,
        shape: tuple[int, ...],
        has_data: bool,
        binary_size: Any,
        binary: memoryview | None,
        offset: int,
    ) -> tuple[Tensor, int]:
        """An input sent as ``binary_size`` bytes of the binary part from ``offset``, and the next offset."""
        if has_data:
            raise InvalidRequest(
                ErrorKind.INVALID_BINARY, f"input {name!r} has both 'data' and a binary_data_size: send one", field=name
            )
        if binary is None:
            raise InvalidRequest(
                ErrorKind.INVALID_BINARY,
                f"input {name!r} has a binary_data_size but the request has no Inference-Header-Content-Length header",
                field=name,
            )
        if type(binary_size) is not int or binary_size < 0:
            raise wrong_type(f"{name}.parameters.binary_data_size", "integer >= 0", binary_size)
        end = offset + binary_size
        if end > len(binary):
            raise InvalidRequest(
                ErrorKind.INVALID_BINARY,
                f"input {name!r} needs {binary_size} bytes from offset {offset} of the binary data, "
                f"but only {len(binary) - offset} are left: the body is truncated",
                field=name,
                expected=binary_size,
                got=len(binary) - offset,
            )
        if name in self.raw_widths:  # binary BYTES are read element by element: check the shape before that
            rows = shape[0] if shape else 0
            self.validator.check_row_count(rows, name)
            check_shape(name, shape, (rows, self.raw_widths[name]))
        return Tensor(name, datatype, shape, _binary_data(name, datatype, binary[offset:end], math.prod(shape))), end


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise InvalidRequest(
            ErrorKind.WRONG_SHAPE,
            f"input {name!r} needs a shape, an array of integers >= 0, got {shape!r}",
            field=name,
            expected="array of integers >= 0",
            got=json_type(shape) if not isinstance(shape, list) else str(shape),
        )
    return tuple(shape)


def check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if shape != expected:
        raise shape_error(name, shape, str(list(expected)))


def shape_error(name: str, shape: tuple[int, ...], expected: str) -> InvalidRequest:
    return InvalidRequest(
        ErrorKind.WRONG_SHAPE,
        f"input {name!r} must have shape {expected}, got {list(shape)}",
        field=name,
        expected=expected,
        got=str(list(shape)),
    )


def _json_data(name: str, datatype: str, data: Any, size: int) -> np.ndarray | list[str]:
    """A tensor's JSON ``data`` (flat, or nested as its shape), type-checked and flattened."""
    if not isinstance(data, list):
        raise wrong_type(f"{name}.data", "array", data)
    if data and type(data[0]) is list:  # nested rows: flatten one level at a time
        while data and type(data[0]) is list:
            if not all(type(item) is list for item in data):
                raise wrong_type(f"{name}.data", "array nested as the shape", data)
            data = list(chain.from_iterable(data))
    if len(data) != size:
        raise InvalidRequest(
            ErrorKind.WRONG_COUNT,
            f"input {name!r} has {len(data)} values but its shape holds {size}",
            field=name,
            expected=size,
            got=len(data),
        )
    allowed, what = JSON_TYPES[datatype]
    values.check_types(data, allowed, what, f"{name}.data", name)
    if datatype == "BYTES":
        return data
    if datatype == "FP32":
        return values.float32(data)
    try:
        return values.integers([data], NUMPY_TYPES[datatype], len(data))
    except BeyondRange as beyond:
        raise InvalidRequest(
            ErrorKind.ID_OUT_OF_RANGE if name == IDS_INPUT else ErrorKind.NON_INTEGER,
            f"{name}.data[{beyond.position}] = {beyond.value} does not fit {datatype}",
            field=name,
            expected=f"integer that fits {datatype}",
            got=str(beyond.value),
        ) from None


def _from_base64(name: str, elements: list[str]) -> list[str]:
    """BYTES elements as TorchServe's gRPC service passes them (base64), as text."""
    try:
        return [base64.b64decode(element, validate=True).decode("utf-8") for element in elements]
    except ValueError:  # binascii.Error and UnicodeDecodeError among them
        raise InvalidRequest(
            ErrorKind.INVALID_BINARY, f"input {name!r} has a BYTES element that is not UTF-8 text", field=name
        ) from None


def _binary_data(name: str, datatype: str, raw: memoryview, size: int) -> np.ndarray | list[str]:
    """A tensor's raw little-endian bytes as a (read-only, zero-copy) array, or BYTES elements as strings."""
    if datatype == "BYTES":
        return _bytes_elements(name, raw, size)
    itemsize = NUMPY_TYPES[datatype].itemsize
    if len(raw) != size * itemsize:
        raise InvalidRequest(
            ErrorKind.INVALID_BINARY,
            f"input {name!r} of shape holding {size} {datatype} values needs {size * itemsize} bytes, "
            f"its binary_data_size is {len(raw)}",
            field=name,
            expected=size * itemsize,
            got=len(raw),
        )
    return np.frombuffer(raw, dtype=NUMPY_TYPES[datatype])


def _bytes_elements(name: str, raw: memoryview, size: int) -> list[str]:
    """BYTES elements: each a 4-byte little-endian length, then that many bytes (UTF-8 text here)."""
    elements, offset = [], 0
    for _ in range(size):
        if offset + 4 > len(raw):
            break
        (length,) = _BYTES_PREFIX.unpack_from(raw, offset)
        start, offset = offset + 4, offset + 4 + length
        if offset > len(raw):
            break
        try:
            elements.append(bytes(raw[start:offset]).decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidRequest(
                ErrorKind.INVALID_BINARY, f"input {name!r} element {len(elements)} is not UTF-8 text", field=name
            ) from None
    if len(elements) != size or offset != len(raw):
        raise InvalidRequest(
            ErrorKind.INVALID_BINARY,
            f"input {name!r} must hold {size} length-prefixed BYTES elements in exactly its binary_data_size "
            f"({len(raw)} bytes)",
            field=name,
            expected=size,
            got=len(elements),
        )
    return elements


def wrong_type(field: str, expected: str, value: Any) -> InvalidRequest:
    return wrong_json_type(f"{field!r} must be {expected}", value, expected, field=field)
