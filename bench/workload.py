"""The requests the benchmark sends: Criteo-like rows as JSON bodies in the served formats.

Rows are one-hot (one id per feature, as in the Criteo data sets) with ids drawn
uniformly from each table (``training.synthetic.random_inputs``, the DLRM
reference's generator), so lookups spread over the tables instead of hitting
one cached row. A fixed seed makes every run send the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

from model_factory.config import DLRMConfig
from training.synthetic import random_inputs, request_rows

SEED = 0
# Distinct rows per workload: enough that requests vary, few enough to build quickly.
DISTINCT_ROWS = 4096


def criteo_like_rows(config: DLRMConfig, count: int, seed: int = SEED) -> list[dict[str, Any]]:
    """One-hot rows with uniform ids: the DLRM reference's random inputs, in the request format."""
    return list(request_rows(*random_inputs(config, count, np.random.default_rng(seed))))


def request_bodies(rows: list[dict[str, Any]], rows_per_request: int) -> list[bytes]:
    """JSON bodies of ``rows_per_request`` rows each: the single-row format for 1, ``instances`` beyond.

    ``rows`` is cycled so that every body is full, with at least one body.
    """
    if rows_per_request == 1:
        return [orjson.dumps(row) for row in rows]
    count = max(1, len(rows) // rows_per_request)
    return [
        orjson.dumps({"instances": [rows[(start + i) % len(rows)] for i in range(rows_per_request)]})
        for start in range(0, count * rows_per_request, rows_per_request)
    ]


def write_bodies(bodies: list[bytes], path: Path) -> Path:
    """One body per line, as ``wrk_post.lua`` reads them (compact JSON has no newlines)."""
    path.write_bytes(b"".join(body + b"\n" for body in bodies))
    return path
