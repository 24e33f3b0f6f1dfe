"""Handler metrics, published through TorchServe's own metrics API.

The worker reports them to the frontend, which serves them in Prometheus format
on the metrics API (``/metrics``, loopback only by default) next to
TorchServe's built-in request and latency metrics. They are counters, so rates
and averages come from the scraper: for example
``rate(DLRMRows[1m]) / rate(DLRMBatches[1m])`` is the mean rows per forward pass.

Every metric update is a log line the frontend parses, a visible share of a
worker's time under load (docs/decisions.md). Increments are
therefore summed in the worker and reported at most once per
``flush_seconds``: on the first batch after an idle period at once, under load
once per interval, and what is left when the traffic stops by a timer at the end
of that interval, so that a scrape never misses counts for longer than it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ts.metrics.metric_type_enum import MetricTypes

from handler.settings import DEFAULT_FLUSH_SECONDS

MODEL_DIMENSION = "ModelName"
KIND_DIMENSION = "Kind"
_COUNTERS = {
    "DLRMBatches": "count",
    "DLRMRequests": "count",
    "DLRMRows": "count",
    "DLRMDecodeMilliseconds": "ms",
    "DLRMForwardMilliseconds": "ms",
}
_INVALID = "DLRMInvalidRequests"


class Timer(Protocol):
    def start(self) -> None: ...


def daemon_timer(seconds: float, callback: Callable[[], None]) -> Timer:
    """A thread that runs ``callback`` after ``seconds`` and never keeps the worker from exiting."""
    timer = threading.Timer(seconds, callback)
    timer.daemon = True
    return timer


class HandlerMetrics:
    """The handler's counters, summed per batch and reported at most once per ``flush_seconds``.

    ``clock`` and ``timer`` are the monotonic clock and the delayed call it uses: the real ones when serving,
    ones a test drives when testing the intervals.
    """

    def __init__(
        self,
        cache: Any,
        model_name: str,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        timer: Callable[[float, Callable[[], None]], Timer] = daemon_timer,
    ) -> None:
        self.model_name = model_name
        self.flush_seconds = flush_seconds
        self.clock = clock
        self.timer = timer
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
        self._lock = threading.Lock()  # the worker thread records, a timer thread may flush
        self._timer: Timer | None = None

    def record_batch(
        self, requests: int, rows: int, decode_ms: float, forward_ms: float, invalid: Sequence[str]
    ) -> None:
        with self._lock:
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
            wait = self.last_flush + self.flush_seconds - self.clock()
            if wait <= 0:
                self._flush()
            elif self._timer is None:
                self._timer = self.timer(wait, self._flush_when_due)
                self._timer.start()

    def _flush_when_due(self) -> None:
        with self._lock:
            self._timer = None
            self._flush()

    def _flush(self) -> None:
        self.last_flush = self.clock()
        dimensions = [self.model_name]
        for name, value in self.pending.items():
            self.metrics[name].add_or_update(value, dimensions)
        for kind, count in self.pending_invalid.items():
            self.invalid.add_or_update(count, [self.model_name, kind])
        self.pending.clear()
        self.pending_invalid.clear()
