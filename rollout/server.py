"""The calls a rollout makes to one running TorchServe: its management API, and scoring through its inference API.

Only TorchServe's own versioning is used (register a version, ``set-default``,
unregister). With token authorization on, as it must be whenever the
model-management API is (README, "Model updates"), every call carries the key
TorchServe wrote into its ``key_file.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import requests

from servers.torchserve import Keys, bearer


class RolloutError(RuntimeError):
    """A rollout step failed; the message says which and what the server answered."""


@dataclass(frozen=True)
class VersionState:
    version: str
    default: bool
    ready_workers: int
    pending_requests: int


class TorchServe:
    """One TorchServe, through its management and inference APIs."""

    def __init__(self, management: str, inference: str, keys: Keys | None = None, timeout: float = 600.0) -> None:
        self.management = management.rstrip("/")
        self.inference = inference.rstrip("/")
        self.keys = keys or Keys()
        self.timeout = timeout
        self.session = requests.Session()

    def _manage(self, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        try:
            response = self.session.request(
                method,
                self.management + path,
                params=params,
                headers=bearer(self.keys.management),
                timeout=self.timeout,
            )
        except requests.RequestException as error:
            raise RolloutError(f"{method} {path}: {error}") from error
        if response.status_code >= 400:
            raise RolloutError(f"{method} {path}: {response.status_code} {response.text.strip()}")
        return orjson.loads(response.content) if response.content else None

    def versions(self, model: str) -> list[VersionState]:
        """Every registered version of ``model`` (empty when it is not registered)."""
        try:
            described = self._manage("GET", f"/models/{model}/all")
            # Describing the model without a version describes its default version (the only way 0.12 tells).
            default = self._manage("GET", f"/models/{model}")[0]["modelVersion"]
        except RolloutError as error:
            if " 404 " in str(error):
                return []
            raise
        return [
            VersionState(
                version=entry["modelVersion"],
                default=entry["modelVersion"] == default,
                ready_workers=sum(worker.get("status") == "READY" for worker in entry.get("workers", [])),
                pending_requests=int(entry.get("jobQueueStatus", {}).get("pendingRequests", 0)),
            )
            for entry in described
        ]

    def default_version(self, model: str) -> str | None:
        return next((state.version for state in self.versions(model) if state.default), None)

    def register(self, archive: str, model: str) -> None:
        """Load the archive (a name in the model store) as a version of ``model``; returns once its workers are up."""
        self._manage("POST", "/models", {"url": archive, "model_name": model, "synchronous": "true"})

    def set_default(self, model: str, version: str) -> None:
        self._manage("PUT", f"/models/{model}/{version}/set-default")

    def unregister(self, model: str, version: str) -> None:
        self._manage("DELETE", f"/models/{model}/{version}")

    def drain(self, model: str, version: str, grace_s: float, timeout: float = 60.0) -> None:
        """Wait until ``version`` has no queued request, then ``grace_s`` more for the batch its workers run."""
        deadline = time.monotonic() + timeout
        while any(s.version == version and s.pending_requests for s in self.versions(model)):
            if time.monotonic() > deadline:
                raise RolloutError(f"{model} {version} still has queued requests after {timeout:.0f} s")
            time.sleep(0.1)
        time.sleep(grace_s)

    def score(self, model: str, version: str, rows: Sequence[dict[str, Any]], rows_per_request: int) -> np.ndarray:
        """The scores ``version`` gives raw JSON rows, through ``/predictions/{model}/{version}``."""
        scores: list[float] = []
        url = f"{self.inference}/predictions/{model}/{version}"
        headers = {"Content-Type": "application/json", **bearer(self.keys.inference)}
        for start in range(0, len(rows), rows_per_request):
            body = orjson.dumps({"instances": list(rows[start : start + rows_per_request])})
            try:
                response = self.session.post(url, data=body, headers=headers, timeout=self.timeout)
            except requests.RequestException as error:
                raise RolloutError(f"scoring the golden set on {model} {version}: {error}") from error
            if response.status_code != 200:
                raise RolloutError(
                    f"scoring the golden set on {model} {version}: {response.status_code} {response.text}"
                )
            scores.extend(prediction["score"] for prediction in orjson.loads(response.content)["predictions"])
        return np.asarray(scores, dtype=np.float64)

    def close(self) -> None:
        self.session.close()
