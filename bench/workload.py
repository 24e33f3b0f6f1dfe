"""The requests the benchmark sends: Criteo-like rows in every served format.

Rows are one-hot (one id per feature, as in the Criteo data sets) with ids drawn
uniformly from each table (``training.synthetic.random_inputs``, the DLRM
reference's generator), so lookups spread over the tables instead of hitting
one cached row. A fixed seed makes every run send the same bytes.

Formats: ``rows`` (the reference single-row format for one row, ``instances``
beyond), ``oip_json`` (Open Inference Protocol, JSON tensors) and
``oip_binary`` (OIP with the binary data extension, binary outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import orjson

from handler import oip
from model_factory.config import DLRMConfig
from training.synthetic import random_inputs, request_rows

SEED = 0
# Distinct rows per workload: enough that requests vary, few enough to build quickly.
DISTINCT_ROWS = 4096
JSON = "application/json"


class Protocol(StrEnum):
    ROWS = "rows"
    OIP_JSON = "oip_json"
    OIP_BINARY = "oip_binary"

    def path(self, model: str) -> str:
        return f"/predictions/{model}" if self == Protocol.ROWS else f"/v2/models/{model}/infer"


@dataclass(frozen=True)
class Body:
    """One request body and the headers it needs beyond its content type."""

    data: bytes
    content_type: str = JSON
    header_length: int | None = None  # the binary data extension's Inference-Header-Content-Length

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        if self.header_length is not None:
            headers["Inference-Header-Content-Length"] = str(self.header_length)
        return headers


Inputs = tuple[np.ndarray, np.ndarray, np.ndarray]  # dense (N, 13) float32, lengths (N, 26), ids


def criteo_like_inputs(config: DLRMConfig, count: int, seed: int = SEED) -> Inputs:
    """One-hot rows with uniform ids: the DLRM reference's random inputs, as arrays."""
    return random_inputs(config, count, np.random.default_rng(seed))


def request_bodies(inputs: Inputs, rows_per_request: int, protocol: Protocol = Protocol.ROWS) -> list[Body]:
    """Bodies of ``rows_per_request`` rows each in ``protocol``; ``inputs`` is cycled so every body is full."""
    dense, lengths, values = inputs
    total = dense.shape[0]
    ends = np.cumsum(lengths.sum(axis=1))
    starts = ends - lengths.sum(axis=1)
    count = max(1, total // rows_per_request)
    bodies = []
    for first in range(0, count * rows_per_request, rows_per_request):
        rows = [(first + i) % total for i in range(rows_per_request)]
        ids = np.concatenate([values[starts[row] : ends[row]] for row in rows])
        bodies.append(_body((dense[rows], lengths[rows], ids), protocol))
    return bodies


def _body(inputs: Inputs, protocol: Protocol) -> Body:
    dense, lengths, ids = inputs
    if protocol == Protocol.ROWS:
        rows = list(request_rows(dense, lengths, ids))
        return Body(orjson.dumps(rows[0] if len(rows) == 1 else {"instances": rows}))
    tensors = [
        (oip.DENSE_INPUT, "FP32", dense.astype("<f4")),
        (oip.LENGTHS_INPUT, "INT32", lengths.astype("<i4")),
        (oip.IDS_INPUT, "INT64", ids.astype("<i8")),
    ]
    if protocol == Protocol.OIP_JSON:
        inputs_json = [
            {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist()}
            for name, datatype, array in tensors
        ]
        return Body(orjson.dumps({"inputs": inputs_json}))
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": array.nbytes},
                }
                for name, datatype, array in tensors
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    return Body(
        b"".join([header, *(array.tobytes() for _, _, array in tensors)]), "application/octet-stream", len(header)
    )


def write_bodies(bodies: list[Body], path: Path) -> Path:
    """The bodies as ``wrk_post.lua`` reads them: per body a header line, then the body's bytes.

    The line is ``<content type> <header length or -1> <body length>``: bodies may
    hold any bytes (binary tensors), so they are framed by length, not by newlines.
    """
    with open(path, "wb") as output:
        for body in bodies:
            length = -1 if body.header_length is None else body.header_length
            output.write(f"{body.content_type} {length} {len(body.data)}\n".encode())
            output.write(body.data)
    return path
