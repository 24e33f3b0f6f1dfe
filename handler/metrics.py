"""Handler metrics, published through TorchServe's own metrics API.

The worker reports them to the frontend, which serves them in Prometheus format
on the metrics API (``/metrics``, loopback only by default) next to
TorchServe's built-in request and latency metrics. They are counters, so rates
and averages come from the scraper: for example
``rate(DLRMRows[1m]) / rate(DLRMBatches[1m])`` is the mean rows per forward pass.

Every metric update is a log line the frontend parses, which cost 7% of the
worker's time at 160 batches/s (py-spy, `make bench --profile`). Increments are
therefore summed in the worker and reported at most once per
``flush_seconds``: on the first batch after an idle period at once, under load
once per interval.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ts.metrics.metric_type_enum import MetricTypes

MODEL_DIMENSION = "ModelName"
KIND_DIMENSION = "Kind"
DEFAULT_FLUSH_SECONDS = 1.0
_COUNTERS = {
    "DLRMBatches": "count",
    "DLRMRequests": "count",
    "DLRMRows": "count",
    "DLRMDecodeMilliseconds": "ms",
    "DLRMForwardMilliseconds": "ms",
}
_INVALID = "DLRMInvalidRequests"


class HandlerMetrics:
    def __init__(self, cache: Any, model_name: str, flush_seconds: float = DEFAULT_FLUSH_SECONDS) -> None:
        self.model_name = model_name
        self.flush_seconds = flush_seconds
        self.metrics = {
            name: cache.add_metric_to_cache(name, unit, [MODEL_DIMENSION], MetricTypes.COUNTER)
            for name, unit in _COUNTERS.items()
        }
        self.invalid = cache.add_metric_to_cache(
            _INVALID, "count", [MODEL_DIMENSION, KIND_DIMENSION], MetricTypes.COUNTER
        )
        self.pending: Counter[str] = Counter()
        self.pending_invalid: Counter[str] = Counter()
        self.last_flush = float("-inf")

    def record_batch(self, requests: int, rows: int, decode_ms: float, forward_ms: float, invalid: list[str]) -> None:
        self.pending.update(
            {
                "DLRMBatches": 1,
                "DLRMRequests": requests,
                "DLRMRows": rows,
                "DLRMDecodeMilliseconds": decode_ms,
                "DLRMForwardMilliseconds": forward_ms,
            }
        )
        self.pending_invalid.update(invalid)
        now = time.monotonic()
        if now - self.last_flush >= self.flush_seconds:
            self.flush()
            self.last_flush = now

    def flush(self) -> None:
        dimensions = [self.model_name]
        for name, value in self.pending.items():
            self.metrics[name].add_or_update(value, dimensions)
        for kind, count in self.pending_invalid.items():
            self.invalid.add_or_update(count, [self.model_name, kind])
        self.pending.clear()
        self.pending_invalid.clear()
