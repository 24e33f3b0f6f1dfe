"""Hostile traffic beside innocent clients, against a real TorchServe and through nginx.

Well-behaved clients send valid requests of every wire format without pause while hostile
clients send a seeded corpus drawn from every wire format: the fuzzers' malformed JSON rows,
columns, raw rows and rankings and OIP JSON, binary and BYTES requests (REST and gRPC), bodies
sized to cost the most memory or CPU, header abuse (TorchServe's own ``describe``,
``explain`` and ``url_path`` markers, a binary header length on a JSON body) and formats
sent to the other format's route. A request may only ever hurt itself: no well-behaved
request fails, every hostile one gets the status the contract gives it, no worker dies and
the workers' memory stays bounded.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from model_factory.config import preset
from servers.memory import PeakRss
from servers.nginx import NginxProcess, nginx_path
from servers.torchserve import REPO_ROOT, TorchServeProcess
from tests.test_batch_isolation import reference_ranking_with_empty_compact_lengths
from tests.test_oip import binary_request, one_row, payload, raw_inputs
from tests.test_oip_served import grpc_error, grpc_request, oip_grpc  # noqa: F401 - oip_grpc is a fixture
from tests.test_reliability import log_lines, malformed_bodies, malformed_oip_requests

SAMPLES = REPO_ROOT / "sample_data"
PREDICTIONS = "/predictions/dlrm"
OIP_INFER = "/v2/models/dlrm/infer"
JSON_HEADERS = {"Content-Type": "application/json"}
BINARY_HEADERS = {"Content-Type": "application/octet-stream"}
FOUR_MIB = 4 * 2**20
# A worker may grow by this much under hostile traffic (the bound for 16 concurrent refused 4 MiB
# bodies); the bodies themselves, held by TorchServe's worker protocol, are 64 MiB of it.
MEMORY_BOUND = 256 * 2**20


@dataclass(frozen=True)
class Call:
    """One HTTP request, and the status the contract gives it."""

    path: str
    body: bytes
    headers: dict[str, str]
    status: int
    what: str

    def send(self, session: requests.Session, base: str) -> requests.Response:
        return session.post(base + self.path, data=self.body, headers=self.headers, timeout=60)


@dataclass
class Innocent:
    """Valid requests of every format sent in a loop; each answer must equal the one the request got alone."""

    base: str
    calls: list[Call]
    expected: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    sent: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def learn(self) -> None:
        with requests.Session() as session:
            for call in self.calls:
                response = call.send(session, self.base)
                assert response.status_code == 200, (call.what, response.text[:300])
                self.expected[call.what] = scores(response)

    def run(self, clients: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]
        for thread in threads:
            thread.start()
        return threads

    def _client(self, offset: int) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                call = self.calls[(self.sent + offset) % len(self.calls)]
                self.sent += 1
                try:
                    response = call.send(session, self.base)
                except requests.RequestException as error:
                    self.failures.append(f"{call.what}: {error!r}")
                    continue
                if response.status_code != 200:
                    self.failures.append(f"{call.what}: {response.status_code} {response.text[:200]}")
                elif not np.allclose(scores(response), self.expected[call.what], atol=1e-5):
                    self.failures.append(f"{call.what}: other scores than alone")


def scores(response: requests.Response) -> Any:
    """The scores of a JSON rows or OIP answer, whatever its form."""
    if response.headers.get("Content-Type", "").startswith("application/octet-stream"):
        return np.frombuffer(response.content[-4:], dtype="<f4").tolist()  # one FP32 row, last output
    body = response.json()
    if "outputs" in body and isinstance(body["outputs"], list):
        return [value for output in body["outputs"] for value in output["data"]]
    if "outputs" in body:
        return body["outputs"]["score"]
    if "predictions" in body:
        return [prediction["score"] for prediction in body["predictions"]]
    return [body["score"]]


def innocent_calls() -> list[Call]:
    """A valid request of every wire format: JSON rows (reference, raw, instances, columns, rankings in each
    form) and OIP (JSON, binary with binary output, BYTES raw rows, ranking)."""
    calls = [
        Call(PREDICTIONS, (SAMPLES / name).read_bytes(), JSON_HEADERS, 200, name)
        for name in (
            "sample_data.json",
            "sample_raw.json",
            "sample_instances.json",
            "sample_ranking.json",
            "sample_ranking_columnar.json",
            "sample_reference_ranking.json",
        )
    ]
    calls.append(Call(OIP_INFER, (SAMPLES / "sample_oip.json").read_bytes(), JSON_HEADERS, 200, "oip json"))
    calls.append(Call(OIP_INFER, (SAMPLES / "sample_oip_ranking.json").read_bytes(), JSON_HEADERS, 200, "oip rank"))
    body, headers = binary_request(one_row(), parameters={"binary_data_output": True})
    calls.append(Call(OIP_INFER, body, {**BINARY_HEADERS, **oip_headers(headers)}, 200, "oip binary"))
    calls.append(Call(OIP_INFER, payload(raw_inputs([{"int_0": 3, "cat_0": "05db9164"}])), JSON_HEADERS, 200, "bytes"))
    return calls


def oip_headers(headers: dict[str, str]) -> dict[str, str]:
    """The HTTP headers of a binary request built for the in-process predictor (which gets TorchServe's)."""
    return {"Inference-Header-Content-Length": headers["inference-header-content-length"]}


def costly_calls() -> list[Call]:
    """Requests built to cost the most memory or CPU per byte, each refused cheaply."""
    brackets = b'{"instances": [' + b"[]," * (FOUR_MIB // 3 - 100) + b"[]]}"
    count = FOUR_MIB // 4 - 256
    bytes_inputs = [
        {"name": "int_features", "datatype": "BYTES", "shape": [1, count], "data": [""] * count},
        {"name": "cat_features", "datatype": "BYTES", "shape": [1, 26], "data": [""] * 26},
    ]
    bytes_body, bytes_headers = binary_request(bytes_inputs, names=("int_features",))
    digits = raw_inputs([{"int_0": 1}])
    digits[0]["data"][0] = "9" * 5000
    return [
        Call(PREDICTIONS, brackets, JSON_HEADERS, 413, "4 MiB of empty rows"),
        Call(OIP_INFER, brackets.replace(b"instances", b"inputs", 1), JSON_HEADERS, 413, "4 MiB of empty tensors"),
        Call(OIP_INFER, bytes_body, {**BINARY_HEADERS, **oip_headers(bytes_headers)}, 400, "4 MiB of BYTES"),
        Call(OIP_INFER, payload(digits), JSON_HEADERS, 400, "5000-digit integer"),
        Call(PREDICTIONS, b"[" * 5000 + b"]" * 5000, JSON_HEADERS, 413, "deep nesting"),
        Call(PREDICTIONS, b'{"instances": [' + b" " * (5 * 2**20) + b"]}", JSON_HEADERS, 413, "over 4 MiB"),
    ]


def header_calls() -> list[Call]:
    """TorchServe's own markers and the binary header sent by clients: a valid request stays valid, an invalid
    one gets its 4xx."""
    sample = (SAMPLES / "sample_data.json").read_bytes()
    oip = (SAMPLES / "sample_oip.json").read_bytes()
    marks = {"describe": "True", "explain": "True", "url_path": "/x"}
    return [
        Call(PREDICTIONS, sample, {**JSON_HEADERS, "describe": "True"}, 200, "describe header"),
        Call(PREDICTIONS, sample, {**JSON_HEADERS, **marks}, 200, "every marker"),
        Call(OIP_INFER, oip, {**JSON_HEADERS, **marks}, 200, "markers on OIP"),
        Call(PREDICTIONS, b"nope", {**JSON_HEADERS, "describe": "True"}, 400, "describe, bad body"),
        Call(PREDICTIONS, sample, {**JSON_HEADERS, "Inference-Header-Content-Length": "9"}, 400, "header length"),
        Call(PREDICTIONS, sample, {"Content-Type": "application/x-www-form-urlencoded"}, 415, "form body"),
        Call(PREDICTIONS, oip, JSON_HEADERS, 200, "OIP body on /predictions"),
        Call(OIP_INFER, sample, JSON_HEADERS, 400, "JSON rows on the OIP route"),
        Call(
            PREDICTIONS,
            json.dumps(reference_ranking_with_empty_compact_lengths(preset("small"))).encode(),
            JSON_HEADERS,
            400,
            "empty compact lengths",
        ),  # fmt: skip
    ]


def hostile_corpus(seed: int, fuzzed: int) -> list[Call]:
    """The hostile requests, shuffled: ``fuzzed`` of the fuzzers' malformed requests, and every crafted one."""
    rng = random.Random(seed)
    rows = [Call(PREDICTIONS, body, JSON_HEADERS, status, "fuzzed rows") for body, status in malformed_bodies()]
    oip = [Call(OIP_INFER, body, headers, status, "fuzzed OIP") for body, headers, status in malformed_oip_requests()]
    corpus = [*rng.sample(rows, fuzzed), *rng.sample(oip, min(len(oip), fuzzed // 2))]
    corpus += [*costly_calls(), *header_calls()] * 2
    rng.shuffle(corpus)
    return corpus


def storm(base: str, corpus: list[Call], innocent: Innocent, clients: int = 8) -> list[tuple[Call, int]]:
    """The corpus sent by ``clients`` hostile threads while the innocent clients run; each call's status."""

    def send(calls: list[Call]) -> list[tuple[Call, int]]:
        with requests.Session() as session:
            return [(call, call.send(session, base).status_code) for call in calls]

    innocent.learn()
    threads = innocent.run(clients=3)
    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            shares = list(pool.map(send, [corpus[n::clients] for n in range(clients)]))
    finally:
        innocent.stop.set()
        for thread in threads:
            thread.join(70)
    return [outcome for share in shares for outcome in share]


def assert_only_hostile_requests_failed(outcomes: list[tuple[Call, int]], innocent: Innocent) -> None:
    assert innocent.sent > 20, f"only {innocent.sent} innocent requests were sent during the storm"
    assert not innocent.failures, f"{len(innocent.failures)} innocent requests failed: {innocent.failures[:5]}"
    wrong = [(call.what, call.body[:120], call.status, got) for call, got in outcomes if got != call.status]
    assert not wrong, f"{len(wrong)} of {len(outcomes)} hostile requests got another status: {wrong[:5]}"


def test_hostile_traffic_hurts_no_other_request(server: TorchServeProcess) -> None:
    pids = server.worker_pids()
    disconnects = log_lines(server, "Worker disconnected")
    innocent = Innocent(server.endpoints.inference, innocent_calls())
    corpus = hostile_corpus(seed=25, fuzzed=300)
    with PeakRss(pids, interval=0.05) as memory:
        outcomes = storm(server.endpoints.inference, corpus, innocent)
    assert_only_hostile_requests_failed(outcomes, innocent)
    assert server.worker_pids() == pids, "a worker was restarted"
    assert log_lines(server, "Worker disconnected") == disconnects
    assert memory.growth < MEMORY_BOUND, f"the workers grew by {memory.growth / 2**20:.0f} MiB"
    print(f"\n{len(outcomes)} hostile requests, {innocent.sent} innocent ones: growth {memory.growth / 2**20:.0f} MiB")


def test_sixteen_concurrent_refused_4_mib_bodies_grow_a_worker_by_less_than_256_mib(server: TorchServeProcess) -> None:
    pids = server.worker_pids()
    bodies = [call for call in costly_calls() if call.what in ("4 MiB of empty rows", "4 MiB of BYTES")]
    calls = [bodies[n % 2] for n in range(16)]
    base = server.endpoints.inference
    with PeakRss(pids, interval=0.05) as memory, ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(lambda call: call.send(requests.Session(), base).status_code, calls))
    assert statuses == [call.status for call in calls]
    assert memory.growth < MEMORY_BOUND, f"the workers grew by {memory.growth / 2**20:.0f} MiB"


def test_a_describe_header_in_a_batch_is_predicted_like_its_neighbours(server: TorchServeProcess) -> None:
    """A client's ``describe: True`` header made the handler answer with the model's description alone, and
    once for N requests inside a TorchServe batch of several, which TorchServe failed whole with 503."""
    sample = (SAMPLES / "sample_data.json").read_bytes()
    url = f"{server.endpoints.inference}{PREDICTIONS}"
    headers = {**JSON_HEADERS, "describe": "True"}
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda _: requests.post(url, data=sample, headers=headers, timeout=60), range(16)))
    assert [r.status_code for r in responses] == [200] * 16, [r.text[:200] for r in responses]
    assert len({r.json()["score"] for r in responses}) == 1
    description = requests.get(f"{server.endpoints.management}/models/dlrm?customized=true", timeout=30).json()[0]
    assert "customizedMetadata" in description  # the management API's describe still describes


def test_hostile_grpc_requests_get_their_errors_beside_valid_ones(server: TorchServeProcess, oip_grpc) -> None:  # noqa: F811
    """Malformed ModelInfer requests over TorchServe's gRPC service, concurrent with valid ones."""
    import grpc

    messages = oip_grpc.messages
    valid = grpc_request(
        messages,
        "valid",
        dense_features=("FP32", [1, 13], "fp32_contents", [0.5] * 13),
        sparse_lengths=("INT64", [1, 26], "int64_contents", [1] * 26),
        sparse_ids=("INT64", [26], "int64_contents", [0] * 26),
    )
    hostile = [
        grpc_request(messages, "shape", dense_features=("FP32", [1, 12], "fp32_contents", [0.5] * 12)),
        grpc_request(
            messages,
            "digits",
            int_features=("BYTES", [1, 13], "bytes_contents", [b"9" * 5000] * 13),
            cat_features=("BYTES", [1, 26], "bytes_contents", [b""] * 26),
        ),
        grpc_request(messages, "type", sparse_ids=("FP32", [1], "fp32_contents", [1.0])),
        grpc_request(messages, "empty"),
    ]
    channel = grpc.insecure_channel(f"{server.endpoints.host}:{server.endpoints.ports.grpc_inference}")
    stub = oip_grpc.services.GRPCInferenceServiceStub(channel)
    calls = [valid if n % 2 else hostile[n // 2 % len(hostile)] for n in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda request: stub.ModelInfer(request, timeout=60), calls))
    channel.close()
    for request, response in zip(calls, responses, strict=True):
        if request is valid:
            assert [output.name for output in response.outputs] == ["score", "logit"], response
        else:
            assert 400 <= grpc_error(response)["code"] < 500, (request.id, grpc_error(response))


@pytest.fixture(scope="module")
def balancer(server: TorchServeProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxProcess]:
    if nginx_path() is None:
        pytest.skip("nginx is not installed (.ci/run installs it)")
    upstream = f"{server.endpoints.host}:{server.endpoints.ports.inference}"
    with NginxProcess([upstream], tmp_path_factory.mktemp("nginx")) as nginx:
        yield nginx


def test_hostile_traffic_through_nginx_hurts_no_other_request(server: TorchServeProcess, balancer) -> None:
    """Behind the shipped nginx, a replica that answers hostile requests must stay in rotation: one request's
    error is never counted against the replica, so innocent clients never get a 502."""
    pids = server.worker_pids()
    innocent = Innocent(balancer.url, innocent_calls())
    outcomes = storm(balancer.url, hostile_corpus(seed=26, fuzzed=100), innocent)
    assert_only_hostile_requests_failed(outcomes, innocent)
    assert server.worker_pids() == pids, "a worker was restarted"
    assert " 502 " not in Path(balancer.access_log).read_text()
