"""The shipped load balancer (deploy/nginx) in front of two real TorchServe replicas, and the deploy manifests.

nginx runs as a plain foreground process with its own prefix (servers.nginx),
configured from the same template as the container; only the replica addresses and
the listening port differ. A replica is killed the hard way (SIGKILL to its whole
process group: frontend and worker) while clients keep sending predictions.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

from servers.load import SteadyLoad
from servers.nginx import LISTEN, UPSTREAM, ClientLimits, NginxProcess, nginx_path, render_site
from servers.torchserve import LOOPBACK, REPO_ROOT, TorchServeProcess, free_port
from tests.test_server import prometheus_counter

# Without nginx these tests are skipped on a workstation, and fail in CI (CI=true), where .ci/run installs it.
needs_nginx = pytest.mark.skipif(
    nginx_path() is None and not os.environ.get("CI"), reason="nginx is not installed (apt-get install nginx)"
)

SAMPLE = (REPO_ROOT / "sample_data" / "sample_data.json").read_bytes()
DEPLOY = REPO_ROOT / "deploy"
MODEL = "dlrm=dlrm.mar"


def start_all(instances: list[TorchServeProcess]) -> None:
    """Start together, then wait: the replicas load their models in parallel."""
    for instance in instances:
        instance.start()
    for instance in instances:
        instance.wait_ready()


def stop_all(instances: list[TorchServeProcess]) -> None:
    with ThreadPoolExecutor(len(instances)) as pool:
        list(pool.map(TorchServeProcess.stop, instances))


@pytest.fixture(scope="module")
def replicas(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TorchServeProcess]]:
    """Two replicas for the module. The fail-over test replaces one with its restart: whatever the
    list holds at the end is stopped."""
    workdir = tmp_path_factory.mktemp("replicas")
    instances = [TorchServeProcess(model_store, MODEL, workdir / f"replica{i}") for i in range(2)]
    try:
        start_all(instances)
        yield instances
    finally:
        stop_all(instances)


@pytest.fixture(scope="module")
def balancer(replicas: list[TorchServeProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxProcess]:
    upstreams = [f"{LOOPBACK}:{replica.endpoints.ports.inference}" for replica in replicas]
    with NginxProcess(upstreams, tmp_path_factory.mktemp("nginx")) as nginx:
        yield nginx


def handled(replica: TorchServeProcess) -> int:
    """Predictions this replica's handler has answered (its DLRMRequests counter)."""
    return int(prometheus_counter(replica, "DLRMRequests"))


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``condition`` holds within ``timeout``: the handler's counters reach the metrics API a
    moment after the response (the worker logs them, the frontend parses the log)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def access_log(nginx: NginxProcess) -> list[str]:
    return nginx.access_log.read_text().splitlines()


@needs_nginx
def test_requests_are_spread_over_both_replicas(balancer: NginxProcess, replicas: list[TorchServeProcess]) -> None:
    before = [handled(replica) for replica in replicas]
    with SteadyLoad(f"{balancer.url}/predictions/dlrm", SAMPLE, clients=8) as load:
        load.wait_for(lambda outcomes: len(outcomes) >= 200, timeout=60)
    outcomes = load.outcomes()
    assert all(outcome.ok for outcome in outcomes), [o for o in outcomes if not o.ok][:3]

    def served() -> list[int]:
        return [handled(replica) - start for replica, start in zip(replicas, before, strict=True)]

    assert eventually(lambda: sum(served()) == len(outcomes)), "each prediction reached exactly one replica"
    counts = served()
    assert min(counts) >= 0.25 * sum(counts), f"least_conn should spread the load evenly, got {counts}"


@needs_nginx
def test_body_over_4_mib_is_refused_by_nginx(balancer: NginxProcess) -> None:
    log_start = len(access_log(balancer))
    response = requests.post(
        f"{balancer.url}/predictions/dlrm",
        data=b'{"instances": [' + b" " * (4 * 2**20) + b"]}",
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    # nginx logs the request once it has drained the body it refused, a moment after answering.
    assert eventually(
        lambda: any(" 413 " in line and " upstream=- " in line for line in access_log(balancer)[log_start:])
    ), "nginx itself refused the body, without passing it to a replica"


@needs_nginx
def test_only_the_inference_api_is_proxied(balancer: NginxProcess) -> None:
    assert requests.get(f"{balancer.url}/ping", timeout=10).json()["status"] == "Healthy"
    assert requests.get(f"{balancer.url}/v2/health/ready", timeout=10).json()["ready"] is True
    oip = {
        "inputs": [
            {"name": "dense_features", "datatype": "FP32", "shape": [1, 13], "data": [0.0] * 13},
            {"name": "sparse_lengths", "datatype": "INT32", "shape": [1, 26], "data": [0] * 26},
            {"name": "sparse_ids", "datatype": "INT64", "shape": [0], "data": []},
        ]
    }
    answer = requests.post(f"{balancer.url}/v2/models/dlrm/infer", json=oip, timeout=30)
    assert answer.status_code == 200, answer.text
    assert [output["name"] for output in answer.json()["outputs"]] == ["score", "logit"]
    assert requests.get(f"{balancer.url}/v2/models/dlrm/ready", timeout=10).json() == {"name": "dlrm", "ready": True}
    assert requests.get(f"{balancer.url}/v2/models/dlrm", timeout=10).json()["outputs"][0]["name"] == "score"
    for path in ("/models", "/models/dlrm", "/metrics", "/api-description", "/v2/models/dlrm/infer/x"):
        response = requests.get(f"{balancer.url}{path}", timeout=10)
        assert response.status_code == 404, path
        assert response.json()["type"] == "not_found"


@needs_nginx
def test_replica_killed_under_load_loses_no_request_and_comes_back(
    balancer: NginxProcess, replicas: list[TorchServeProcess], model_store: Path, tmp_path: Path
) -> None:
    """Runs after the tests that need both original replicas; leaves the restarted one in ``replicas``."""
    victim = replicas[1]
    log_start = len(access_log(balancer))
    with SteadyLoad(f"{balancer.url}/predictions/dlrm", SAMPLE, clients=16) as load:
        load.wait_for(lambda outcomes: sum(o.ok for o in outcomes) >= 100, timeout=60)
        assert handled(victim) > 0
        assert victim.process is not None
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.stop()  # reaps the group
        after_kill = len(load.outcomes())
        load.wait_for(lambda outcomes: len(outcomes) >= after_kill + 300, timeout=60)

        # The same ports, as an orchestrator restarting the replica would give it.
        restarted = TorchServeProcess(model_store, MODEL, tmp_path / "replica1-restarted", ports=victim.endpoints.ports)
        replicas[1] = restarted
        start_all([restarted])
        # nginx takes a replica back once fail_timeout (10 s) has passed since its last failure.
        load.wait_for(lambda _: handled(restarted) >= 20, timeout=60)
    outcomes = load.outcomes()
    failed = [outcome for outcome in outcomes if not outcome.ok]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed, e.g. {failed[:3]}"
    retried = [line for line in access_log(balancer)[log_start:] if re.search(r"upstream=\S+, ", line)]
    assert retried, "no request was retried on the other replica: the kill did not hit in-flight traffic"
    slowest = max(outcome.finished - outcome.started for outcome in outcomes)
    print(f"\nfail-over: {len(outcomes)} requests, 0 failed, {len(retried)} retried, slowest {slowest:.2f} s")


class WorkerDiesOnce(BaseHTTPRequestHandler):
    """Answers the first request the way TorchServe does when the worker dies under it, later ones with 200."""

    protocol_version = "HTTP/1.1"
    first_status = 507
    bodies: list[bytes] = []

    def do_POST(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        status = self.first_status if len(self.bodies) == 1 else 200
        reply = b'{"code": %d, "type": "InternalServerException", "message": "Worker died."}' % status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@needs_nginx
@pytest.mark.parametrize("status", [500, 507])
def test_worker_died_response_is_sent_again(status: int, tmp_path: Path) -> None:
    """TorchServe answers a batch whose worker died with 507 or 500 "Worker died." (which of the two depends
    on timing, see test_reliability.py); a stand-in replica gives that answer deterministically."""
    handler: type[WorkerDiesOnce] = type("Handler", (WorkerDiesOnce,), {"first_status": status, "bodies": []})
    replica = ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=replica.serve_forever, daemon=True)
    thread.start()
    try:
        with NginxProcess([f"{LOOPBACK}:{replica.server_port}"], tmp_path / "nginx") as nginx:
            response = requests.post(
                f"{nginx.url}/predictions/dlrm", data=SAMPLE, headers={"Content-Type": "application/json"}, timeout=30
            )
    finally:
        replica.shutdown()
        thread.join()
    assert response.status_code == 200
    assert handler.bodies == [SAMPLE, SAMPLE], "the retry must carry the same body"


class StandInReplica:
    """A stand-in for a TorchServe replica on a loopback port: it answers each POST with ``status`` (which a test
    may change) after ``hold`` is set, and counts what it answers. For the answers TorchServe gives only under
    conditions hard to bring about on demand (its job queue full), or to hold requests in flight."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.hold = threading.Event()
        self.hold.set()
        self.received = 0
        self.answered: list[int] = []
        replica = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                replica.received += 1
                replica.hold.wait(30)
                status = replica.status
                replica.answered.append(status)
                reply = json.dumps({"code": status, "type": "ServiceUnavailableException", "message": "stand-in"})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.server.server_port}"

    def __enter__(self) -> StandInReplica:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def post_from(client: str, nginx: NginxProcess, path: str = "/predictions/dlrm") -> tuple[int, bytes]:
    """POST the sample to ``nginx`` from the loopback address ``client`` (all of 127.0.0.0/8 reaches loopback),
    so that nginx sees distinct clients: the status and the body of the answer."""
    connection = http.client.HTTPConnection(LOOPBACK, nginx.port, timeout=30, source_address=(client, 0))
    try:
        connection.request("POST", path, SAMPLE, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@needs_nginx
def test_overloaded_replicas_are_not_taken_out_of_rotation(tmp_path: Path) -> None:
    """TorchServe answers 503 when its job queue is full (and when a handler raises): the replica is alive.
    Counted as failures, a burst of 503s from every replica would take them all out for fail_timeout, and
    every client would get 502 for 10 s after the overload ended."""
    with (
        StandInReplica(503) as first,
        StandInReplica(503) as second,
        NginxProcess([first.address, second.address], tmp_path / "nginx") as nginx,
    ):
        overloaded = [post_from("127.0.0.1", nginx)[0] for _ in range(12)]
        first.status = second.status = 200
        after = [post_from("127.0.0.1", nginx)[0] for _ in range(6)]
        error_log = nginx.error_log.read_text()
    assert set(overloaded) == {503}, "the overload's 503 reaches the client as it is"
    assert after == [200] * 6, "no replica was taken out of rotation"
    assert "temporarily disabled" not in error_log


@needs_nginx
def test_one_overloaded_replica_is_retried_elsewhere_and_stays_in_rotation(tmp_path: Path) -> None:
    with (
        StandInReplica(503) as overloaded,
        StandInReplica(200) as healthy,
        NginxProcess([overloaded.address, healthy.address], tmp_path / "nginx") as nginx,
    ):
        statuses = [post_from("127.0.0.1", nginx)[0] for _ in range(20)]
        error_log = nginx.error_log.read_text()
    assert statuses == [200] * 20, "an overloaded replica's 503 is retried on the other one"
    assert len(overloaded.answered) >= 10, "the overloaded replica keeps getting its share: it was not taken out"
    assert "temporarily disabled" not in error_log


def assert_too_many_requests(status: int, body: bytes) -> None:
    assert status == 429, body
    answer = json.loads(body)
    assert answer["code"] == 429 and answer["type"] == "too_many_requests", answer


@needs_nginx
def test_a_client_over_the_rate_limit_gets_429_and_another_is_served(tmp_path: Path) -> None:
    limits = ClientLimits(rate=5, burst=5, connections=64)  # the shipped template, with limits a test reaches
    with StandInReplica() as replica, NginxProcess([replica.address], tmp_path / "nginx", limits=limits) as nginx:
        greedy = [post_from("127.0.0.2", nginx) for _ in range(limits.burst + 10)]
        other = [post_from("127.0.0.3", nginx) for _ in range(3)]
    statuses = [status for status, _ in greedy]
    assert statuses[: limits.burst + 1] == [200] * (limits.burst + 1), "the burst is answered at once"
    assert statuses.count(429) >= 5, statuses
    for status, body in greedy:
        if status != 200:
            assert_too_many_requests(status, body)
    assert [status for status, _ in other] == [200] * 3, "another client is not limited by the first one's requests"
    assert len(replica.answered) == statuses.count(200) + 3, "nginx refused the excess without passing it on"


@needs_nginx
def test_a_client_over_the_connection_limit_gets_429_and_another_is_served(tmp_path: Path) -> None:
    limits = ClientLimits(connections=2)
    with StandInReplica() as replica, NginxProcess([replica.address], tmp_path / "nginx", limits=limits) as nginx:
        replica.hold.clear()  # requests stay in flight until released
        with ThreadPoolExecutor(3) as pool:
            in_flight = [pool.submit(post_from, "127.0.0.2", nginx) for _ in range(limits.connections)]
            assert eventually(lambda: replica.received == limits.connections)
            other = pool.submit(post_from, "127.0.0.3", nginx)
            assert eventually(lambda: replica.received == limits.connections + 1), "the other client is let in"
            assert_too_many_requests(*post_from("127.0.0.2", nginx))
            replica.hold.set()
            assert [future.result()[0] for future in in_flight] == [200] * limits.connections
            assert other.result()[0] == 200


# ---------------------------------------------------------------- deploy manifests


def test_template_renders_one_server_line_per_replica() -> None:
    site = render_site(["10.0.0.5:8080", "10.0.0.6:8080"], "8000")
    directives = [line.strip() for line in site.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    servers = [line for line in directives if line.startswith("server ") and line.endswith(";")]
    assert servers == [
        "server 10.0.0.5:8080 max_fails=3 fail_timeout=10s;",
        "server 10.0.0.6:8080 max_fails=3 fail_timeout=10s;",
    ]
    assert "listen 8000;" in directives
    assert not [line for line in directives if "${" in line], "every placeholder is filled"
    assert UPSTREAM in site and LISTEN in site, "the comments explaining the placeholders stay"


def test_compose_file_wires_nginx_to_the_replicas() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    replica, balancer = compose["services"]["dlrm"], compose["services"]["lb"]
    assert replica["build"] == ".." and replica["image"] == "dlrm-torchserve:latest"
    assert replica["deploy"]["replicas"] >= 2
    assert not replica.get("ports"), "replicas are reachable only through nginx"
    mount = next(v for v in balancer["volumes"] if v.endswith(":ro"))
    source, target, _ = mount.split(":")
    assert (DEPLOY / source).resolve() == (DEPLOY / "nginx" / "dlrm.conf.template").resolve()
    assert target.startswith("/etc/nginx/templates/") and target.endswith(".template")
    template = (DEPLOY / source).read_text()
    placeholders = set(re.findall(r"\$\{(DLRM_\w+)\}", template))
    assert placeholders <= set(balancer["environment"]), "every placeholder of the template is set"
    assert balancer["environment"]["DLRM_UPSTREAM"] == "dlrm:8080"
    limits = {placeholder[2:-1]: value for placeholder, value in ClientLimits().placeholders().items()}
    assert limits == {name: balancer["environment"][name] for name in limits}, "compose's limits are the defaults"
    assert balancer["depends_on"]["dlrm"]["condition"] == "service_healthy"


def k8s_documents() -> dict[str, dict]:
    documents = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[document["kind"]] = document
    return documents


def test_kubernetes_manifests_fit_together() -> None:
    docs = k8s_documents()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(docs)
    deployment, service, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "dlrm-torchserve:latest"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"inference": 8080}, "management and metrics stay inside the pod"
    assert service["spec"]["ports"][0]["targetPort"] in ("inference", 8080)
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "2"
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    workers_x_threads = int(env["DLRM_WORKERS"]) * int(env["DLRM_THREADS"])
    assert workers_x_threads == int(resources["limits"]["cpu"]), "workers x torch threads match the CPU limit"
    assert container["livenessProbe"]["httpGet"] == {"path": "/ping", "port": "inference"}
    assert "python -m rollout check" in container["startupProbe"]["exec"]["command"][-1]  # tests/test_rollout.py
    assert container["readinessProbe"]["exec"]["command"][:2] == ["python", "-c"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def readiness_command(inference_port: int) -> list[str]:
    """The Deployment's readiness probe, aimed at a test server instead of the pod's port 8080."""
    command = k8s_documents()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]
    script = command["command"][2]
    assert script.count("127.0.0.1:8080") == 1
    return [sys.executable, "-c", script.replace("127.0.0.1:8080", f"{LOOPBACK}:{inference_port}")]


def test_readiness_probe_is_a_real_prediction(server: TorchServeProcess) -> None:
    before = handled(server)
    ready = subprocess.run(readiness_command(server.endpoints.ports.inference), capture_output=True, timeout=30)
    assert ready.returncode == 0, ready.stderr
    assert eventually(lambda: handled(server) == before + 1), "the probe went through the model"
    closed = subprocess.run(readiness_command(free_port()), capture_output=True)
    assert closed.returncode != 0, "the probe must fail where nothing answers"
