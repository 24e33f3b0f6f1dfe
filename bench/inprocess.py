"""In-process speed of the serving path, without TorchServe: the ceiling the server is compared with.

Everything goes through :class:`handler.predictor.DLRMPredictor`, loaded from the
extracted archive with the worker's thread count, so the numbers are exactly what
a TorchServe worker runs per batch:

- ``model``: the DLRM forward alone, on a prebuilt dense tensor and KeyedJaggedTensor;
- ``forward``: ``DLRMPredictor.forward`` on decoded rows (building the KJT, forward, sigmoid);
- ``handler_instances``: ``predict`` on one JSON ``instances`` body of ``batch`` rows
  (decode, forward, encode: a request of that many rows);
- ``handler_rows``: ``predict`` on ``batch`` single-row JSON bodies (what TorchServe hands
  the worker for a batch of that many single-row requests);
- ``handler_oip_json``, ``handler_oip_binary``: ``predict`` on one Open Inference Protocol
  request of ``batch`` rows, JSON tensors or binary tensors (binary outputs);
- ``codec_instances``, ``codec_rows``, ``codec_oip_json``, ``codec_oip_binary``: the same four
  handler calls with the model replaced by a stub that returns zeros: what decoding, building the
  KJT and encoding cost, measured directly. (Subtracting the model's time from a handler's would
  leave the noise of two timings, and a model timed on one reused KJT benefits from the KJT's
  cached offsets, which a fresh request's KJT computes.)

It runs as its own process, so that environment variables read when the OpenMP
runtime starts (``OMP_WAIT_POLICY``) can be set as they are for the workers:

    python -m bench.inprocess model_store/dlrm.mar --threads 2 --batches 1 256 --seconds 3
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.harness import time_calls
from bench.workload import Body, Inputs, Protocol, criteo_like_inputs, request_bodies
from handler.predictor import DLRMPredictor, Request
from model_archive.contents import extracted, serving_settings
from model_factory.features import rows_to_kjt

HANDLER_MODES = ("handler_instances", "handler_rows", "handler_oip_json", "handler_oip_binary")
CODEC_MODES = tuple(mode.replace("handler_", "codec_") for mode in HANDLER_MODES)
MODES = ("model", "forward", *HANDLER_MODES, *CODEC_MODES)


@dataclass(frozen=True)
class Timing:
    mode: str
    batch: int
    calls: int
    seconds: float
    p50_ms: float
    rows_per_s: float


def check_valid(predictor: DLRMPredictor, requests: list[Request]) -> None:
    """Timing 4xx answers would measure the wrong path: every benchmark body must be served."""
    for response in predictor.predict(requests).responses:
        if response.status != 200:
            raise RuntimeError(f"benchmark body refused with {response.status}: {response.body[:300]!r}")


class ZeroModel(torch.nn.Module):
    """Stands in for the DLRM when only the codec is timed: a logit of 0 per row, no work."""

    def forward(self, dense: torch.Tensor, sparse: Any) -> torch.Tensor:
        return torch.zeros(dense.shape[0], 1)


def codec_only(predictor: DLRMPredictor) -> DLRMPredictor:
    """``predictor`` with a model that does no work: its decoding, building the KJT and encoding, as served."""
    stand_in = copy.copy(predictor)
    stand_in.model = ZeroModel()
    return stand_in


def as_request(body: Body) -> Request:
    """A body as TorchServe hands it to the worker: header names lower-cased."""
    return Request(body.data, {name.lower(): value for name, value in body.headers.items()})


def measure(
    predictor: DLRMPredictor, inputs: Inputs, batches: list[int], seconds: float, modes: tuple[str, ...] = MODES
) -> list[Timing]:
    timings = []
    stand_in = codec_only(predictor)
    for batch in batches:
        single_rows = [as_request(body) for body in request_bodies(inputs, 1)[:batch]]
        instances, oip_json, oip_binary = ([as_request(request_bodies(inputs, batch, p)[0])] for p in Protocol)
        for requests in (single_rows, instances, oip_json, oip_binary):
            check_valid(predictor, requests)
        decoded = predictor.decoder.decode(instances[0].body).rows
        dense = torch.from_numpy(decoded.dense)
        sparse = rows_to_kjt(predictor.artifact.model.sparse_feature_names, decoded.lengths, decoded.values)

        def model_only(dense: torch.Tensor = dense, sparse: Any = sparse) -> None:
            with torch.inference_mode():
                predictor.model(dense, sparse)

        by_mode = dict(zip(HANDLER_MODES, (instances, single_rows, oip_json, oip_binary), strict=True))
        calls: dict[str, Callable[[], Any]] = {
            "model": model_only,
            "forward": partial(predictor.forward, [decoded]),
            **{mode: partial(predictor.predict, batch_requests) for mode, batch_requests in by_mode.items()},
            **{
                codec: partial(stand_in.predict, batch_requests)
                for codec, batch_requests in zip(CODEC_MODES, by_mode.values(), strict=True)
            },
        }
        for mode in modes:
            count, total, p50 = time_calls(calls[mode], seconds)
            timings.append(Timing(mode, batch, count, total, p50, batch * count / total))
    return timings


def measure_archive(
    archive: Path, threads: int, batches: list[int], seconds: float, modes: tuple[str, ...] = MODES
) -> list[Timing]:
    """Timings of the archived model, loaded as the handler loads it, with ``threads`` torch threads."""
    with extracted(archive) as directory:
        torch.set_num_threads(threads)
        max_rows = serving_settings(archive).max_rows
        predictor = DLRMPredictor.from_artifact(directory, torch.device("cpu"), max_rows=max_rows)
        return measure(predictor, criteo_like_inputs(predictor.artifact.model, max(batches)), batches, seconds, modes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", type=Path, help="a dlrm.mar built by build_mar.py")
    parser.add_argument("--threads", type=int, required=True, help="torch threads, as in a worker")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256, 1024])
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size and mode")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to time (default: all)")
    parser.add_argument("--output", type=Path, help="write the timings here as JSON")
    args = parser.parse_args()
    timings = measure_archive(args.archive, args.threads, args.batches, args.seconds, tuple(args.modes))
    for timing in timings:
        print(
            f"in-process {timing.mode:<18} batch {timing.batch:>5}: {timing.rows_per_s:>9,.0f} rows/s, "
            f"p50 {timing.p50_ms:.2f} ms",
            flush=True,
        )
    if args.output:
        args.output.write_text(json.dumps([asdict(timing) for timing in timings], indent=2))


if __name__ == "__main__":
    main()
