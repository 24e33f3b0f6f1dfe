"""The calls a rollout makes to one running TorchServe: its management API, and scoring through its inference API.

Only TorchServe's own versioning is used (register a version, ``set-default``,
unregister). With token authorization on, as it must be whenever the
model-management API is (docs/deploy.md, "Model updates without downtime"), every call carries the key
TorchServe wrote into its ``key_file.json``. Those keys expire
(``token_expiration_min``, 60 minutes by default) and TorchServe does not renew
them by itself: a call refused for its key reads the key file again (another
client may have renewed the key) or else renews the key through TorchServe's
token API, then goes once more.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import requests

from servers.torchserve import Keys, bearer

# What TorchServe answers (400) when a key is missing, wrong or expired.
KEY_REFUSED = "Token Authorization failed"

Api = Literal["management", "inference"]


class RolloutError(RuntimeError):
    """A rollout step failed; the message says which and what the server answered."""


class NoAnswer(RolloutError):
    """A call got no answer (timed out, connection lost): TorchServe may still carry it out."""


@dataclass(frozen=True)
class VersionState:
    version: str
    default: bool
    ready_workers: int
    pending_requests: int


def read_key_file(path: Path) -> Keys:
    """The keys in TorchServe's key file, which it rewrites in place: a read that catches it half written retries."""
    attempts = 0
    while True:
        try:
            return Keys.from_key_file(path)
        except OSError as error:
            raise RolloutError(f"cannot read TorchServe's keys from {path}: {error}") from error
        except (ValueError, KeyError, TypeError) as error:
            attempts += 1
            if attempts == 20:
                raise RolloutError(f"cannot read TorchServe's keys from {path}: {error!r}") from error
            time.sleep(0.05)


class TorchServe:
    """One TorchServe, through its management and inference APIs.

    ``key_file``: TorchServe's ``key_file.json``, read now and again whenever a key is refused; ``keys`` without
    it are used as given. ``register_timeout``: how long a registration may take (its workers included).
    """

    def __init__(
        self,
        management: str,
        inference: str,
        keys: Keys | None = None,
        timeout: float = 600.0,
        key_file: Path | None = None,
        register_timeout: float = 600.0,
    ) -> None:
        self.management = management.rstrip("/")
        self.inference = inference.rstrip("/")
        self.key_file = key_file
        self.keys = read_key_file(key_file) if key_file is not None else keys or Keys()
        self.timeout = timeout
        self.register_timeout = register_timeout
        self.session = requests.Session()

    def _call(self, what: str, method: str, url: str, api: Api, **kwargs: Any) -> requests.Response:
        """One call with ``api``'s key; refused for its key, again with the key file's key, then with a renewed one
        (the key file's may have expired too)."""
        response = self._send(what, method, url, api, **kwargs)
        for _ in range(2):
            if self.key_file is None or not _key_refused(response):
                break
            self._refresh(what, api, getattr(self.keys, api))
            response = self._send(what, method, url, api, **kwargs)
        return response

    def _send(self, what: str, method: str, url: str, api: Api, **kwargs: Any) -> requests.Response:
        headers = {**kwargs.pop("headers", {}), **bearer(getattr(self.keys, api))}
        kwargs.setdefault("timeout", self.timeout)
        try:
            return self.session.request(method, url, headers=headers, **kwargs)
        except requests.RequestException as error:
            raise NoAnswer(f"{what}: {error}") from error

    def _refresh(self, what: str, api: Api, refused_key: str | None) -> None:
        """After TorchServe refused ``refused_key``: the key file's key if another client renewed it, else a new
        one from TorchServe's token API (its key does not expire), which rewrites the key file."""
        assert self.key_file is not None
        keys = read_key_file(self.key_file)
        if getattr(keys, api) == refused_key:
            try:
                renewal = self.session.get(
                    f"{self.management}/token", params={"type": api}, headers=bearer(keys.api), timeout=self.timeout
                )
            except requests.RequestException as error:
                raise NoAnswer(f"{what}: renewing the expired {api} key: {error}") from error
            if renewal.status_code != 200:
                raise RolloutError(
                    f"{what}: TorchServe refused the {api} key of {self.key_file}, and renewing it with the file's "
                    f"token-API key failed: {renewal.status_code} {renewal.text.strip()}"
                )
            keys = read_key_file(self.key_file)
            if getattr(keys, api) == refused_key:
                raise RolloutError(
                    f"{what}: {self.key_file} is not the key file of this TorchServe: renewing the {api} key "
                    "did not change it (TorchServe writes key_file.json in the directory it started in)"
                )
        self.keys = keys

    def _manage(self, method: str, path: str, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        what = f"{method} {path}"
        response = self._call(what, method, self.management + path, "management", params=params, **kwargs)
        if response.status_code >= 400:
            raise RolloutError(f"{what}: {response.status_code} {response.text.strip()}")
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
        params = {"url": archive, "model_name": model, "synchronous": "true"}
        self._manage("POST", "/models", params, timeout=self.register_timeout)

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
        what = f"scoring the golden set on {model} {version}"
        url = f"{self.inference}/predictions/{model}/{version}"
        headers = {"Content-Type": "application/json"}
        for start in range(0, len(rows), rows_per_request):
            body = orjson.dumps({"instances": list(rows[start : start + rows_per_request])})
            response = self._call(what, "POST", url, "inference", data=body, headers=headers)
            if response.status_code != 200:
                raise RolloutError(f"{what}: {response.status_code} {response.text}")
            scores.extend(prediction["score"] for prediction in orjson.loads(response.content)["predictions"])
        return np.asarray(scores, dtype=np.float64)

    def close(self) -> None:
        self.session.close()


def _key_refused(response: requests.Response) -> bool:
    return response.status_code == 400 and KEY_REFUSED in response.text
