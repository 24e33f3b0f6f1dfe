"""The archive's serving settings: one typed object for its ``model-config.yaml``.

TorchServe reads the top-level keys (workers, batching, timeouts) and hands the
whole file to the handler, which reads its ``handler`` section. ``build_mar.py``
writes the file, the handler, the benchmarks and the container entry point read
or rewrite it, all through :class:`ServingSettings`, so each key is spelt once.

No torch or TorchRec here: the container entry point imports this module before
any model code exists in the process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_MAX_ROWS = 4096
DEFAULT_FLUSH_SECONDS = 1.0
HANDLER_SECTION = "handler"


class SettingsError(ValueError):
    """A serving setting is out of range; the message names it."""


@dataclass(frozen=True)
class ServingSettings:
    """What ``model-config.yaml`` says about serving the model.

    ``workers``: worker processes, each with its own copy of the model (minWorkers = maxWorkers).
    ``batch_size``/``max_batch_delay_ms``: TorchServe's dynamic batching; a lone request waits the
    whole delay, and a delay of 0 breaks TorchServe 0.12's batching, so keep it at least 1.
    ``threads``: torch threads per worker, 0 for the usable cores split between the workers.
    ``max_rows``: rows allowed in one request. ``metrics_flush_seconds``: the handler reports its
    counters at most this often.
    ``shard_tables_gpus``: N above 1 shards the quantized tables table-wise over ``cuda:0`` ..
    ``cuda:N-1`` (TorchRec's inference sharding: for tables larger than one GPU), the inputs and
    the dense MLPs on ``cuda:0``; 0 or 1 is off. Such a worker uses all N GPUs, whatever GPU
    TorchServe assigned it, so the model runs one worker per host (``workers`` must be 1); it
    fails to load where fewer than N GPUs are present.
    """

    workers: int = 2
    batch_size: int = 32
    max_batch_delay_ms: int = 1
    response_timeout_s: int = 120
    startup_timeout_s: int = 300
    threads: int = 0
    max_rows: int = DEFAULT_MAX_ROWS
    metrics_flush_seconds: float = DEFAULT_FLUSH_SECONDS
    shard_tables_gpus: int = 0

    def __post_init__(self) -> None:
        for setting in fields(self):
            value = getattr(self, setting.name)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not numeric or (setting.type == "int" and not isinstance(value, int)):
                raise SettingsError(f"{setting.name} must be a number, got {value!r}")
        at_least_one = ("workers", "batch_size", "response_timeout_s", "startup_timeout_s", "max_rows")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_batch_delay_ms", "threads", "metrics_flush_seconds", "shard_tables_gpus"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.shard_tables_gpus > 1 and self.workers != 1:
            raise SettingsError(
                f"workers must be 1 when shard_tables_gpus is {self.shard_tables_gpus}: a worker sharding its "
                f"tables uses all {self.shard_tables_gpus} GPUs, got {self.workers} workers"
            )

    @classmethod
    def from_model_yaml(cls, model_yaml: Mapping[str, Any] | None) -> ServingSettings:
        """The settings of a parsed ``model-config.yaml``; keys it lacks take the defaults above."""
        model_yaml = model_yaml or {}
        handler = model_yaml.get(HANDLER_SECTION) or {}
        defaults = cls()
        return cls(
            workers=model_yaml.get("minWorkers", defaults.workers),
            batch_size=model_yaml.get("batchSize", defaults.batch_size),
            max_batch_delay_ms=model_yaml.get("maxBatchDelay", defaults.max_batch_delay_ms),
            response_timeout_s=model_yaml.get("responseTimeout", defaults.response_timeout_s),
            startup_timeout_s=model_yaml.get("startupTimeout", defaults.startup_timeout_s),
            threads=handler.get("num_threads", defaults.threads),
            max_rows=handler.get("max_rows_per_request", defaults.max_rows),
            metrics_flush_seconds=handler.get("metrics_flush_seconds", defaults.metrics_flush_seconds),
            shard_tables_gpus=handler.get("shard_tables_gpus", defaults.shard_tables_gpus),
        )

    def to_model_yaml(self) -> dict[str, Any]:
        """TorchServe's per-model keys and the ``handler`` section, ready for ``yaml.safe_dump``."""
        handler: dict[str, Any] = {
            "max_rows_per_request": self.max_rows,
            "metrics_flush_seconds": self.metrics_flush_seconds,
        }
        if self.threads:
            handler["num_threads"] = self.threads
        if self.shard_tables_gpus:
            handler["shard_tables_gpus"] = self.shard_tables_gpus
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "startupTimeout": self.startup_timeout_s,
            HANDLER_SECTION: handler,
        }

    def threads_per_worker(self) -> int:
        """Intra-op threads of one worker: ``threads``, else the usable cores split between the workers.

        Several workers that each use every core oversubscribe the CPU and
        collapse throughput.
        """
        if self.threads:
            return self.threads
        return max(1, len(os.sched_getaffinity(0)) // self.workers)
