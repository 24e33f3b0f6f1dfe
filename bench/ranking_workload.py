"""The ranking benchmark's queries: one user and N candidates, in every format, and the bound they are held to.

MLPerf Inference's DLRM-v2 server scenario judges a system by the highest rate of queries
at which the 99th percentile of latency stays within 60 ms; here a query is one user with
N candidate items, N uniform in ``CANDIDATES``, from planted Criteo data, each sent in
two forms per wire format (see :mod:`bench.ranking`): expanded (every candidate a full
row) and ranking (the user's first ``CONTEXT_FEATURES`` sparse features once as context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from bench import machine_limit
from dlrm_client.client import encode_request, model_input_tensors, ranking_tensors
from handler.json_rows import RequestDecoder
from model_factory.config import DLRMConfig
from model_factory.quantization import MlpDtype
from training.criteo import request_row
from training.synthetic import PlantedClickModel, format_tsv

P99_BOUND_MS = 60.0
CANDIDATES = (100, 700)
CONTEXT_FEATURES = 13  # of the 26 sparse features: the user's
# Each format's expanded and ranking forms of the same query.
PAIRS = {
    "json": ("expanded", "ranking"),
    "columns": ("columns_expanded", "columns_ranking"),
    "oip": ("oip_expanded", "oip_ranking"),
}
FORMATS = tuple(name for pair in PAIRS.values() for name in pair)
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Message:
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Query:
    candidates: int
    messages: dict[str, Message]  # format -> request


def make_query(config: DLRMConfig, decoder: RequestDecoder, candidates: int, rng: np.random.Generator) -> Query:
    """A user row and ``candidates`` candidate rows of planted Criteo data, in every format.

    The OIP bodies (binary tensors) carry the rows as the server's preprocessing turns them into
    model inputs (``decoder``), so every format scores the same rows.
    """
    sample, _ = PlantedClickModel(seed=0).sample(candidates + 1, rng)
    user, *rows = [request_row(line, config) for line in format_tsv(sample).splitlines()]
    context = {name: user[name] for name in config.sparse_feature_names[:CONTEXT_FEATURES]}
    own = [{name: value for name, value in row.items() if name not in context} for row in rows]
    expanded_rows = [row | context for row in own]
    expanded_body = orjson.dumps({"instances": expanded_rows})
    ranking_body = orjson.dumps({"context": context, "instances": own})
    expanded, ranking = decoder.decode(expanded_body).rows, decoder.decode(ranking_body)
    assert ranking.context is not None
    oip_expanded = encode_request(model_input_tensors(expanded.dense, expanded.lengths, expanded.values), True)
    oip_ranking = encode_request(
        ranking_tensors(
            ranking.rows.lengths,
            ranking.rows.values,
            ranking.context.lengths,
            ranking.context.values,
            dense=ranking.rows.dense,
        ),
        True,
    )
    return Query(
        candidates,
        {
            "expanded": Message("/predictions/dlrm", expanded_body, JSON_HEADERS),
            "ranking": Message("/predictions/dlrm", ranking_body, JSON_HEADERS),
            "columns_expanded": Message(
                "/predictions/dlrm", orjson.dumps({"inputs": columns(expanded_rows)}), JSON_HEADERS
            ),
            "columns_ranking": Message(
                "/predictions/dlrm", orjson.dumps({"context": context, "inputs": columns(own)}), JSON_HEADERS
            ),
            "oip_expanded": Message("/v2/models/dlrm/infer", *oip_expanded),
            "oip_ranking": Message("/v2/models/dlrm/infer", *oip_ranking),
        },
    )


def columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows (all with the same keys) as columns: each key with the rows' values, in order."""
    return {key: [row[key] for row in rows] for key in rows[0]}


def make_queries(config: DLRMConfig, decoder: RequestDecoder, count: int, seed: int) -> list[Query]:
    """``count`` queries of N candidates each, N uniform in ``CANDIDATES``."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(CANDIDATES[0], CANDIDATES[1] + 1, count)
    return [make_query(config, decoder, int(size), rng) for size in sizes]


def multiply_adds_per_candidate(config: DLRMConfig, mlp: MlpDtype) -> dict[str, int]:
    """Each format's forward multiply-adds per candidate.

    A ranking format's split forward leaves out the context's own products; with bf16 or int8 MLPs
    the predictor runs the expanded rows' forward instead (``handler.ranking``).
    """
    expanded = machine_limit.multiply_adds_per_row(config)
    ranked = machine_limit.ranking_multiply_adds_per_candidate(config, CONTEXT_FEATURES)
    ranked_formats = {ranked_format for _, ranked_format in PAIRS.values()}
    return {fmt: ranked if fmt in ranked_formats and mlp == MlpDtype.NONE else expanded for fmt in FORMATS}
