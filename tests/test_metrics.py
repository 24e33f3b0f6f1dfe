"""Handler metrics through TorchServe's own metrics cache: summed per interval, and never left behind."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ts
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from handler.metrics import HandlerMetrics

TORCHSERVE_METRICS_YAML = Path(ts.__file__).parent / "configs" / "metrics.yaml"


def emitted(caplog: pytest.LogCaptureFixture) -> list[tuple[str, float]]:
    """(metric, value) of every metric line the worker would have sent to the frontend so far."""
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("[METRICS]")]
    matches = [re.match(r"\[METRICS\](\w+)\.\w+:([^|]+)", line) for line in lines]
    return [(match[1], float(match[2])) for match in matches if match is not None]


class FakeTime:
    """A clock the test moves, and the timers started on it, which fire when it passes their time."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def clock(self) -> float:
        return self.now

    def timer(self, seconds: float, callback: Callable[[], None]) -> FakeTime:
        self.timers.append((self.now + seconds, callback))
        return self

    def start(self) -> None:
        pass

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [callback for at, callback in self.timers if at <= self.now]
        self.timers = [(at, callback) for at, callback in self.timers if at > self.now]
        for callback in due:
            callback()


@pytest.fixture()
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture()
def metrics(caplog: pytest.LogCaptureFixture, fake_time: FakeTime) -> HandlerMetrics:
    caplog.set_level("INFO")
    cache = MetricsCacheYamlImpl(str(TORCHSERVE_METRICS_YAML))
    return HandlerMetrics(cache, "dlrm", flush_seconds=0.3, clock=fake_time.clock, timer=fake_time.timer)


def test_a_burst_is_reported_at_once_then_summed_and_flushed_when_the_interval_ends(
    metrics: HandlerMetrics, caplog: pytest.LogCaptureFixture, fake_time: FakeTime
) -> None:
    metrics.record_batch(requests=2, rows=5, decode_ms=1.0, forward_ms=2.0, invalid=["id_out_of_range"])
    first = dict(emitted(caplog))
    assert first["DLRMRows"] == 5 and first["DLRMBatches"] == 1 and first["DLRMInvalidRequests"] == 1
    caplog.clear()

    fake_time.advance(0.1)
    metrics.record_batch(requests=3, rows=7, decode_ms=1.0, forward_ms=2.0, invalid=[])
    fake_time.advance(0.1)
    metrics.record_batch(requests=1, rows=4, decode_ms=1.0, forward_ms=2.0, invalid=["wrong_count"])
    assert emitted(caplog) == []  # within the interval: held back
    assert len(fake_time.timers) == 1  # one timer for the interval's end, not one per batch
    fake_time.advance(0.09)
    assert emitted(caplog) == []
    fake_time.advance(0.02)  # the interval ends, no more traffic: the timer reports what is left
    trailing = dict(emitted(caplog))
    assert trailing["DLRMRows"] == 11 and trailing["DLRMBatches"] == 2 and trailing["DLRMRequests"] == 4
    assert trailing["DLRMInvalidRequests"] == 1
    caplog.clear()
    fake_time.advance(10)
    assert emitted(caplog) == [] and fake_time.timers == []  # nothing pending, nothing reported twice
    metrics.record_batch(requests=1, rows=2, decode_ms=1.0, forward_ms=2.0, invalid=[])
    assert dict(emitted(caplog))["DLRMRows"] == 2  # after an idle interval: at once


def test_the_real_timer_flushes_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    """The default timer thread, end to end: counts held back within the interval arrive when it ends."""
    caplog.set_level("INFO")
    metrics = HandlerMetrics(MetricsCacheYamlImpl(str(TORCHSERVE_METRICS_YAML)), "dlrm", flush_seconds=0.2)
    metrics.record_batch(requests=1, rows=3, decode_ms=0.1, forward_ms=0.2, invalid=[])
    metrics.record_batch(requests=1, rows=4, decode_ms=0.1, forward_ms=0.2, invalid=[])
    deadline = time.monotonic() + 10
    while [value for name, value in emitted(caplog) if name == "DLRMRows"] != [3, 4] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [value for name, value in emitted(caplog) if name == "DLRMRows"] == [3, 4]


def test_no_interval_reports_every_batch(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    metrics = HandlerMetrics(MetricsCacheYamlImpl(str(TORCHSERVE_METRICS_YAML)), "dlrm", flush_seconds=0)
    for rows in (3, 4):
        metrics.record_batch(requests=1, rows=rows, decode_ms=0.1, forward_ms=0.2, invalid=[])
    assert [value for name, value in emitted(caplog) if name == "DLRMRows"] == [3, 4]
