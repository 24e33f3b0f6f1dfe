"""Handler metrics, published through TorchServe's own metrics API.

The worker reports them to the frontend, which serves them in Prometheus format
on the metrics API (``/metrics``, loopback only by default) next to
TorchServe's built-in request and latency metrics. Counters accumulate, so rates
and averages come from the scraper: for example
``rate(DLRMRows[1m]) / rate(DLRMBatches[1m])`` is the mean rows per forward pass.
"""

from __future__ import annotations

from typing import Any

from ts.metrics.metric_type_enum import MetricTypes

MODEL_DIMENSION = "ModelName"
KIND_DIMENSION = "Kind"


class HandlerMetrics:
    def __init__(self, cache: Any, model_name: str) -> None:
        self.model_name = model_name

        def counter(name: str, unit: str, dimensions: list[str]) -> Any:
            return cache.add_metric_to_cache(name, unit, dimensions, MetricTypes.COUNTER)

        self.batches = counter("DLRMBatches", "count", [MODEL_DIMENSION])
        self.requests = counter("DLRMRequests", "count", [MODEL_DIMENSION])
        self.rows = counter("DLRMRows", "count", [MODEL_DIMENSION])
        self.invalid = counter("DLRMInvalidRequests", "count", [MODEL_DIMENSION, KIND_DIMENSION])
        self.decode_ms = counter("DLRMDecodeMilliseconds", "ms", [MODEL_DIMENSION])
        self.forward_ms = counter("DLRMForwardMilliseconds", "ms", [MODEL_DIMENSION])
        self.rows_per_batch = cache.add_metric_to_cache(
            "DLRMRowsPerBatch", "count", [MODEL_DIMENSION], MetricTypes.GAUGE
        )

    def record_batch(self, requests: int, rows: int, decode_ms: float, forward_ms: float) -> None:
        dims = [self.model_name]
        self.batches.add_or_update(1, dims)
        self.requests.add_or_update(requests, dims)
        self.rows.add_or_update(rows, dims)
        self.rows_per_batch.add_or_update(rows, dims)
        self.decode_ms.add_or_update(decode_ms, dims)
        self.forward_ms.add_or_update(forward_ms, dims)

    def record_invalid(self, kind: str) -> None:
        self.invalid.add_or_update(1, [self.model_name, kind])
