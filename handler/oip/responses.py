"""OIP responses: which outputs a request asks for, and the scores as those outputs, JSON or raw bytes.

Outputs ``score`` (click probability) and ``logit``, FP32 ``[N]``: both unless the request's
``outputs`` names some; as raw bytes when the request asks (``"parameters":
{"binary_data_output": true}``, or ``binary_data`` per output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from handler.codec import Response
from handler.errors import ErrorKind, InvalidRequest, json_type
from handler.oip.schema import BINARY_CONTENT_TYPE, JSON_CONTENT_TYPE, LOGIT_OUTPUT, OUTPUTS, SCORE_OUTPUT
from handler.oip.wire import wrong_type


@dataclass(frozen=True)
class OutputRequest:
    """Which outputs a request wants, and which of them as raw bytes."""

    names: tuple[str, ...] = OUTPUTS
    binary: frozenset[str] = frozenset()


def output_request(parameters: Any, outputs: Any) -> OutputRequest:
    """The outputs a request's ``parameters`` and ``outputs`` ask for."""
    if parameters is not None and not isinstance(parameters, dict):
        raise wrong_type("parameters", "object", parameters)
    all_binary = _flag("parameters.binary_data_output", (parameters or {}).get("binary_data_output", False))
    if outputs is None:
        return OutputRequest(OUTPUTS, frozenset(OUTPUTS) if all_binary else frozenset())
    if not isinstance(outputs, list) or not outputs:
        raise wrong_type("outputs", "non-empty array of {name, parameters}", outputs)
    names, binary = [], set()
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in OUTPUTS:
            raise InvalidRequest(
                ErrorKind.UNKNOWN_FIELD,
                f"unknown output {name!r}: the outputs are {', '.join(OUTPUTS)}",
                field="outputs",
                got=name if isinstance(name, str) else json_type(output),
            )
        output_parameters = output.get("parameters", {})
        if not isinstance(output_parameters, dict):
            raise wrong_type(f"outputs.{name}.parameters", "object", output_parameters)
        names.append(name)
        if _flag(f"outputs.{name}.parameters.binary_data", output_parameters.get("binary_data", all_binary)):
            binary.add(name)
    return OutputRequest(tuple(dict.fromkeys(names)), frozenset(binary))


def _flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise wrong_type(field, "true or false", value)
    return value


def encode(header: dict[str, Any], outputs: OutputRequest, logits: np.ndarray, scores: np.ndarray) -> Response:
    """The response: ``header`` (name, version, id) with the outputs as JSON tensors, or followed by the binary
    ones."""
    values = {SCORE_OUTPUT: scores.astype("<f4", copy=False), LOGIT_OUTPUT: logits.astype("<f4", copy=False)}
    described: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in outputs.names:
        output: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": [len(values[name])]}
        if name in outputs.binary:
            raw = values[name].tobytes()
            output["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            output["data"] = values[name]
        described.append(output)
    encoded = orjson.dumps(header | {"outputs": described}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return Response(200, encoded, JSON_CONTENT_TYPE)
    return Response(
        200, b"".join([encoded, *chunks]), BINARY_CONTENT_TYPE, {"Inference-Header-Content-Length": str(len(encoded))}
    )
