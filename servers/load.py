"""A steady, closed-loop load of concurrent clients that records every request's outcome.

Used by the fail-over and fault tests: each client thread posts the same body in
a loop over its own keep-alive session, so the load keeps running while a
replica or a worker is killed, and every request's start, end and status can be
checked afterwards (did any fail, how long did the longest take, when did the
first one succeed after the kill). Throughput benchmarks use wrk instead
(bench/soak.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import requests


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic()
    finished: float
    status: int | None  # None: no HTTP response (connection error or client timeout)
    detail: str = ""  # the error body or exception, for failure messages

    @property
    def ok(self) -> bool:
        return self.status == 200


class SteadyLoad:
    """``clients`` threads posting ``body`` to ``url`` until the context exits."""

    def __init__(
        self, url: str, body: bytes, clients: int = 8, timeout: float = 30.0, headers: Mapping[str, str] | None = None
    ) -> None:
        self.url = url
        self.body = body
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.timeout = timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = session.post(self.url, data=self.body, headers=self.headers, timeout=self.timeout)
                    outcome = Outcome(started, time.monotonic(), response.status_code, response.text[:200])
                except requests.RequestException as error:
                    outcome = Outcome(started, time.monotonic(), None, repr(error)[:200])
                with self._lock:
                    self._outcomes.append(outcome)

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def wait_for(self, condition: Callable[[list[Outcome]], bool], timeout: float) -> None:
        """Until ``condition(outcomes so far)`` holds; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not condition(self.outcomes()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"load condition not met after {timeout:.0f}s")
            time.sleep(0.05)

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
