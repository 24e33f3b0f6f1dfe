"""TorchServe entry point for the DLRM: a thin adapter over :class:`DLRMPredictor`.

TorchServe loads this file as the archive's handler; it finds the ``handler``
and ``model_factory`` packages next to it in the extracted archive, so nothing
outside the archive is imported.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import orjson
import torch

from handler.codec import INTERNAL_ERROR
from handler.metrics import HandlerMetrics
from handler.predictor import DLRMPredictor
from handler.settings import ServingSettings
from handler.torchserve import check_version, request_of
from model_factory.factory import format_summary, summarize

logger = logging.getLogger(__name__)

JSON = "application/json"


class DLRMHandler:
    """decode → model → encode for every batch TorchServe hands over."""

    def __init__(self) -> None:
        self.predictor: DLRMPredictor | None = None
        self.metrics: HandlerMetrics | None = None

    def initialize(self, context: Any) -> None:
        check_version()
        properties = context.system_properties
        settings = ServingSettings.from_model_yaml(context.model_yaml_config)
        device = select_device(properties.get("gpu_id"), settings.shard_tables_gpus)
        if device.type == "cpu":
            torch.set_num_threads(settings.threads_per_worker())
        self.predictor = DLRMPredictor.from_artifact(
            Path(properties["model_dir"]),
            device,
            max_rows=settings.max_rows,
            shard_tables_gpus=settings.shard_tables_gpus,
            name=context.model_name,
            version=str(context.manifest.get("model", {}).get("modelVersion", "")),
        )
        self.metrics = HandlerMetrics(context.metrics, context.model_name, flush_seconds=settings.metrics_flush_seconds)
        provenance = self.predictor.artifact.provenance
        log = logger.warning if not provenance.trained else logger.info
        log("DLRM loaded on %s with %d threads: %s", device, torch.get_num_threads(), provenance.describe())
        logger.info("model summary:\n%s", format_summary(summarize(self.predictor.model)))
        # Everything alive now (torch, TorchRec, TorchServe, the model) lives as long as the worker: keep it
        # out of the cyclic garbage collector, whose full passes over those hundreds of thousands of objects
        # landed on whichever request happened to trigger them (the p99).
        gc.freeze()

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        """Exactly one response per request of the batch, whatever happens: TorchServe fails the whole batch
        with 503 when a handler raises or answers with the wrong number of responses."""
        try:
            return self._handle(data, context)
        except Exception:  # a bug outside the predictor's per-request guards: each request gets its 500
            logger.exception("the batch of %d requests failed", len(data))
            for index in range(len(data)):
                context.set_response_content_type(index, JSON)
                context.set_response_status(500, "internal_error", index)
            return [INTERNAL_ERROR] * len(data)

    def _handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        assert self.predictor is not None and self.metrics is not None, "initialize() runs before handle()"
        requests = [request_of(context, index, request) for index, request in enumerate(data)]
        if len(requests) == 1 and requests[0].is_describe:  # TorchServe sends a describe request alone
            context.set_response_content_type(0, JSON)
            return [orjson.dumps(self.describe())]
        result = self.predictor.predict(requests)
        invalid = []
        for index, response in enumerate(result.responses):
            context.set_response_content_type(index, response.content_type)
            for name, value in response.headers.items():
                context.set_response_header(index, name, value)
            if response.status != 200:
                context.set_response_status(response.status, response.error_kind or "internal_error", index)
            if response.error_kind is not None:
                invalid.append(response.error_kind)
        self.metrics.record_batch(len(data), result.rows, result.decode_ms, result.forward_ms, invalid)
        return [response.body for response in result.responses]

    def describe(self) -> dict[str, Any]:
        """Customized metadata for ``GET /models/dlrm?customized=true``."""
        assert self.predictor is not None
        artifact = self.predictor.artifact
        return {
            **artifact.to_dict(),
            "weights": artifact.provenance.describe(),
            "device": str(self.predictor.device),
            "max_rows_per_request": self.predictor.decoder.max_rows,
        }


def select_device(gpu_id: int | str | None, shard_tables_gpus: int = 0) -> torch.device:
    """The GPU TorchServe assigned to this worker when there is one and CUDA works, else the CPU.

    A worker sharding its tables over N GPUs uses ``cuda:0`` .. ``cuda:N-1``, its
    inputs on ``cuda:0``, whatever TorchServe assigned; loading then fails where
    fewer GPUs are present rather than fall back to the CPU.
    """
    if shard_tables_gpus > 1:
        return torch.device("cuda", 0)
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device("cuda", int(gpu_id))
    return torch.device("cpu")
