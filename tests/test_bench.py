"""The benchmarks run against the current code (no timings asserted): their harness, the machine's limit,
and the in-process measurements.

`make bench` is not part of the suite (it takes half an hour and a quiet box), so
nothing else notices when a change to the predictor breaks it: ``bench.inprocess``
once broke unnoticed when the predictor began analysing its model for ranking
requests at construction, which the codec timings' stand-in model could not satisfy.
The machine's limit is what every figure of the report is divided by, so the work
per row it counts is checked against the model's own forward.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import harness, inprocess, machine_limit, ranking, ranking_workload, report
from bench.workload import criteo_like_inputs, request_bodies
from handler.json_rows import RequestDecoder
from handler.predictor import DLRMPredictor
from handler.ranking import RankingForward, Segment
from model_archive.contents import model_artifact
from model_factory.config import DLRMConfig, preset
from model_factory.factory import build_dlrm, init_weights
from model_factory.features import rows_to_kjt
from model_factory.quantization import MlpDtype

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
    query = ranking_workload.make_query(config, decoder, 20, np.random.default_rng(0))
    result = ranking.inprocess(predictor, query, repeats=1)
    assert set(result["speedup"]) == set(result["bytes_ratio"]) == set(ranking_workload.PAIRS)
    assert all(0 < ratio < 1 for ratio in result["bytes_ratio"].values())


# The forward's multiply-adds per row on the reference shape (docs/performance/2026-12-07-ranking-queries.md,
# "What bounds the gain"): expanded rows, and a ranking request's candidates with the 13 first sparse features
# as context; and on `small`.
REFERENCE_WORK = {"criteo-kaggle": (806_720, 744_320), "small": (39_088, 28_480)}


@pytest.mark.parametrize("name", sorted(REFERENCE_WORK))
def test_the_forward_counted_does_the_layer_arithmetic(name: str) -> None:
    config = preset(name)
    expanded, _ = REFERENCE_WORK[name]
    assert machine_limit.counted_multiply_adds_per_row(config) == expanded
    assert machine_limit.multiply_adds_per_row(config) == expanded


def counted_ranking_work(config: DLRMConfig, candidates: int) -> int:
    """Multiply-adds of ``handler.ranking``'s split forward over one ranking request of ``candidates``.

    The forward accumulates the first layer with the in-place ``addmm_``, which the counter
    does not know: it is counted as its out-of-place twin.
    """
    shape = replace(config, num_embeddings_per_feature=(1,) * config.num_sparse_features)
    forward = RankingForward(init_weights(build_dlrm(shape), seed=0))
    features, rows = config.num_sparse_features, candidates + 1  # the context is the last row
    sparse = rows_to_kjt(
        config.sparse_feature_names, np.ones((rows, features), np.int64), np.zeros(rows * features, np.int64)
    )
    shared = tuple(feature < ranking_workload.CONTEXT_FEATURES for feature in range(features))
    segment = Segment(0, candidates, context_row=candidates, shared=shared)

    def addmm_in_place(bias: Any, left: Any, right: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * left[0] * left[1] * right[1]

    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_in_place})
    with counter, torch.inference_mode():
        forward(torch.rand(candidates, config.num_dense_features), sparse, [segment])
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", sorted(REFERENCE_WORK))
def test_a_ranking_candidate_costs_what_the_split_forward_counts(name: str) -> None:
    """One candidate more adds the per-candidate work; what a request does once cancels out."""
    config = preset(name)
    _, per_candidate = REFERENCE_WORK[name]
    assert counted_ranking_work(config, 3) - counted_ranking_work(config, 2) == per_candidate
    assert machine_limit.ranking_multiply_adds_per_candidate(config, ranking_workload.CONTEXT_FEATURES) == per_candidate


def test_ranking_formats_are_charged_the_forward_the_predictor_runs() -> None:
    """The split forward for fp32 MLPs; the expanded rows' forward where a bf16 or int8 first layer rules it out."""
    config = preset("criteo-kaggle")
    float_work = ranking_workload.multiply_adds_per_candidate(config, MlpDtype.NONE)
    assert float_work == {
        "expanded": 806_720, "ranking": 744_320,
        "columns_expanded": 806_720, "columns_ranking": 744_320,
        "oip_expanded": 806_720, "oip_ranking": 744_320,
    }  # fmt: skip
    for mlp in (MlpDtype.BF16, MlpDtype.INT8):
        assert set(ranking_workload.multiply_adds_per_candidate(config, mlp).values()) == {806_720}


def test_machine_limit_measures_every_precision_with_one_thread_and_all_cores() -> None:
    threads_before = torch.get_num_threads()
    record = machine_limit.measure(preset("small"), machine_limit.Mode(seconds=0.0, batches=(8, 16)))
    counts = [str(count) for count in sorted({1, harness.usable_cores()})]
    assert {precision: sorted(limits) for precision, limits in record["limits"].items()} == {
        "fp32": counts,
        "bf16": counts,
        "int8": counts,
    }
    assert len(record["throughputs"]) == 3 * 2 * len(counts)  # precisions × batches × thread counts
    for precision, limits in record["limits"].items():
        for count, value in limits.items():
            measured = [
                point["multiply_adds_per_s"]
                for point in record["throughputs"]
                if point["precision"] == precision and point["threads"] <= int(count)
            ]
            assert value == max(measured) > 0  # the best batch size, with as many threads or fewer
    assert record["multiply_adds_per_row"] == 39_088
    assert torch.get_num_threads() == threads_before


def test_machine_limit_runs_as_its_own_process(tmp_path: Path) -> None:
    """How bench.run and bench.ranking measure it: ``python -m bench.machine_limit`` in quick mode."""
    record = machine_limit.measure_in_subprocess(preset("small"), "quick", tmp_path / "limit.json")
    assert record["mode"]["batches"] == list(machine_limit.MODES["quick"].batches)
    assert record["shapes"] == [[13, 64], [64, 16], [367, 64], [64, 32], [32, 1]]
    assert all(value > 0 for limits in record["limits"].values() for value in limits.values())


LIMITS = {
    "multiply_adds_per_row": 806_720,
    "limits": {"fp32": {"1": 40e9, "2": 80e9}, "int8": {"1": 160e9, "2": 320e9}},
}


def test_a_figure_is_divided_by_the_limit_of_its_precision_and_threads() -> None:
    assert machine_limit.fraction_of_limit(50_000, 806_720, LIMITS, "fp32", 1) == pytest.approx(50_000 * 806_720 / 40e9)
    assert machine_limit.fraction_of_limit(50_000, 806_720, LIMITS, "int8", 2) == pytest.approx(
        50_000 * 806_720 / 320e9
    )
    assert machine_limit.limit(LIMITS, "fp32", 4) == 80e9  # more threads than cores: the all-core limit


def test_the_report_states_each_dlrm_figure_as_a_share_of_the_limit() -> None:
    document = {"machine_limit": LIMITS, "mlp_precision": "fp32"}
    model = {"mode": "model", "batch": 1024, "rows_per_s": 49_584.0, "p50_ms": 20.65}
    codec = {**model, "mode": "codec_instances"}
    assert report.inprocess_cell(document, model, threads=1) == "49,584 (100.0%, 20.65 ms)"
    assert report.inprocess_cell(document, codec, threads=1) == "49,584 (20.65 ms)"  # no model, no share
    assert report.share_of_limit(document, 49_584.0, threads=2) == "50.0%"
    assert report.share_of_limit({}, 49_584.0, threads=2) == "–"  # a run from before the limit was measured


def test_build_archive_runs_build_mar_and_measures_it(tmp_path: Path) -> None:
    run = harness.build_archive(tmp_path / "store" / "dlrm.mar", "--preset", "small", "--workers", "1")
    assert model_artifact(tmp_path / "store" / "dlrm.mar").model == preset("small")
    assert run.seconds > 0 and run.peak_rss > 0


def test_a_failed_build_stops_the_benchmark_with_build_mar_s_own_message(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stopped:
        harness.build_archive(tmp_path / "dlrm.mar", "--preset", "no-such-preset")
    assert "invalid choice: 'no-such-preset'" in str(stopped.value)


def test_latency_summary_gives_the_median_and_99th_percentile() -> None:
    assert harness.latency_summary([float(ms) for ms in range(1, 101)]) == {"p50_ms": 50.5, "p99_ms": 99.01}
    assert all(math.isnan(value) for value in harness.latency_summary([]).values())


def test_results_go_to_a_new_folder_named_by_time_and_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    directory = harness.results_dir("ranking-quick", datetime(2026, 12, 8, 9, 5, 1, tzinfo=UTC))
    harness.write_results(directory, {"figure": 1}, "# report\n")
    assert directory == tmp_path / "20261208-090501-ranking-quick"
    assert orjson.loads((directory / "results.json").read_bytes()) == {"figure": 1}
    assert (directory / "results.md").read_text() == "# report\n"
