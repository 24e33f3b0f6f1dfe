"""A TorchServe handler that does no work: the framework's own ceiling for the benchmark.

Served under the same TorchServe settings as the DLRM (same config.properties and
model-config.yaml), it answers every request with one constant JSON body, so its
throughput and latency are what TorchServe itself costs on this machine: HTTP,
batching, the frontend-worker protocol and the Python worker loop.
"""

from __future__ import annotations

from typing import Any

BODY = b'{"score":0.5,"logit":0.0}'
JSON = "application/json"


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[bytes] | None:
    """TorchServe calls this with ``data=None`` once to initialise, then once per batch."""
    if data is None:
        return None
    for index in range(len(data)):
        context.set_response_content_type(index, JSON)
    return [BODY] * len(data)
