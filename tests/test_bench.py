"""The benchmarks' in-process measurements run against the current predictor (no timings asserted).

`make bench` is not part of the suite (it takes half an hour and a quiet box), so
nothing else notices when a change to the predictor breaks it: ``bench.inprocess``
broke unnoticed when the predictor began analysing its model for ranking requests
at construction (89686e0), which the codec timings' stand-in model could not satisfy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import torch

from bench import inprocess, ranking
from bench.workload import criteo_like_inputs, request_bodies
from handler.json_rows import RequestDecoder
from handler.predictor import DLRMPredictor

BATCHES = [1, 8]


def predictor_of(artifact_dir: Path) -> DLRMPredictor:
    return DLRMPredictor.from_artifact(artifact_dir, torch.device("cpu"), max_rows=64)


def test_inprocess_bench_times_every_mode_through_the_predictor(artifact_dir: Path) -> None:
    predictor = predictor_of(artifact_dir)
    inputs = criteo_like_inputs(predictor.artifact.model, max(BATCHES))
    timings = inprocess.measure(predictor, inputs, BATCHES, seconds=0.0)
    assert [(timing.mode, timing.batch) for timing in timings] == [
        (mode, batch) for batch in BATCHES for mode in inprocess.MODES
    ]
    assert all(timing.calls >= 5 and timing.rows_per_s > 0 for timing in timings)


def test_codec_only_predictor_decodes_and_encodes_without_the_model(artifact_dir: Path) -> None:
    """The codec timings' stand-in: the served decoding and encoding around a forward of zeros."""
    predictor = predictor_of(artifact_dir)
    inputs = criteo_like_inputs(predictor.artifact.model, 4)
    body = request_bodies(inputs, 4)[0]
    codec_only = inprocess.codec_only(predictor)
    (response,) = codec_only.predict([inprocess.as_request(body)]).responses
    (served,) = predictor.predict([inprocess.as_request(body)]).responses
    assert response.status == served.status == 200
    assert [row["logit"] for row in orjson.loads(response.body)["predictions"]] == [0.0] * 4
    assert [row["logit"] for row in orjson.loads(served.body)["predictions"]] != [0.0] * 4  # still the DLRM


def test_ranking_bench_compares_every_format_in_process(artifact_dir: Path) -> None:
    predictor = predictor_of(artifact_dir)
    config = predictor.artifact.model
    decoder = RequestDecoder(config, predictor.artifact.preprocessing, max_rows=64)
    query = ranking.make_query(config, decoder, 20, np.random.default_rng(0))
    result = ranking.inprocess(predictor, query, repeats=1)
    assert set(result["speedup"]) == set(result["bytes_ratio"]) == set(ranking.PAIRS)
    assert all(0 < ratio < 1 for ratio in result["bytes_ratio"].values())
