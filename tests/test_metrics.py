"""Handler metrics through TorchServe's own metrics cache: summed per interval, and never left behind."""

from __future__ import annotations

import re
import time
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


@pytest.fixture()
def metrics(caplog: pytest.LogCaptureFixture) -> HandlerMetrics:
    caplog.set_level("INFO")
    return HandlerMetrics(MetricsCacheYamlImpl(str(TORCHSERVE_METRICS_YAML)), "dlrm", flush_seconds=0.3)


def test_a_burst_is_reported_at_once_then_summed_and_flushed_when_the_interval_ends(
    metrics: HandlerMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    metrics.record_batch(requests=2, rows=5, decode_ms=1.0, forward_ms=2.0, invalid=["id_out_of_range"])
    first = dict(emitted(caplog))
    assert first["DLRMRows"] == 5 and first["DLRMBatches"] == 1 and first["DLRMInvalidRequests"] == 1
    caplog.clear()

    metrics.record_batch(requests=3, rows=7, decode_ms=1.0, forward_ms=2.0, invalid=[])
    metrics.record_batch(requests=1, rows=4, decode_ms=1.0, forward_ms=2.0, invalid=["wrong_count"])
    assert emitted(caplog) == []  # within the interval: held back
    time.sleep(0.6)  # no more traffic: the timer reports what is left
    trailing = dict(emitted(caplog))
    assert trailing["DLRMRows"] == 11 and trailing["DLRMBatches"] == 2 and trailing["DLRMRequests"] == 4
    assert trailing["DLRMInvalidRequests"] == 1
    caplog.clear()
    time.sleep(0.4)
    assert emitted(caplog) == []  # nothing pending, nothing reported twice


def test_no_interval_reports_every_batch(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    metrics = HandlerMetrics(MetricsCacheYamlImpl(str(TORCHSERVE_METRICS_YAML)), "dlrm", flush_seconds=0)
    for rows in (3, 4):
        metrics.record_batch(requests=1, rows=rows, decode_ms=0.1, forward_ms=0.2, invalid=[])
    assert [value for name, value in emitted(caplog) if name == "DLRMRows"] == [3, 4]
