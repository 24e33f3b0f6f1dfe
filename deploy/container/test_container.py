"""Build the container image with Podman, run it, and check it from the host (`make test-container`).

Slow (minutes: the image holds PyTorch and a Java runtime), so it is not part of `make test`.

1. Podman (with buildah, runc, debootstrap) is installed with apt-get when missing, and its
   containers.conf goes to .cache/containers/ (runc, cgroupfs, file events: no systemd needed).
2. The base image (debian:bookworm-slim) is used when present. Where no registry is reachable
   it is made once with debootstrap from the host's Debian mirror and kept under that name.
3. build_mar.py writes .cache/containers/dlrm.mar from the current code, with a golden set of
   planted rows: the image never serves a stale model_store/dlrm.mar.
4. `podman build` gets the host's CA bundle for pip (TLS-inspecting proxies) and, when
   --torch-wheels names a directory (default: $TORCH_WHEELS, else $PIP_FIND_LINKS), the
   torch wheel from there instead of the PyTorch CPU index.
5. The container runs with its inference, management and metrics ports published on free
   loopback ports of the host, with every DLRM_* setting and the Kubernetes Deployment's
   memory limit, until a prediction of sample_data/sample_data.json succeeds.
6. Checks: the answer is a score in [0, 1]; the OIP model metadata route (the frontend agent)
   answers; the Kubernetes startup probe (the golden check) passes inside the container;
   management and metrics are refused from the host while they answer inside the container;
   the DLRM_* settings reached TorchServe and the handler; the JVM's heap limit is the image's
   share of the memory limit; TorchServe runs as a non-root user; the HEALTHCHECK passes; a
   restart serves again from the one copy of the archive with the settings (no copy per start);
   `podman stop` stops TorchServe on SIGTERM, well before its timeout; a container given a bad
   DLRM_* value exits at once with a message that names it.
7. Containers are removed whatever happens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests
import yaml

from servers.torchserve import REPO_ROOT, free_port
from training.synthetic import PlantedClickModel, write_tsv

CACHE = REPO_ROOT / ".cache" / "containers"
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
BASE_IMAGE = "debian:bookworm-slim"
BASE_IMAGE_FULL_NAME = "docker.io/library/debian:bookworm-slim"
HOST_APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What debian:bookworm-slim leaves out, so that sizes measured on the debootstrap base hold.
SLIM_DPKG_CONFIG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""
ARCHIVE = CACHE / "dlrm.mar"
SAMPLE = REPO_ROOT / "sample_data" / "sample_data.json"
DEPLOYMENT = REPO_ROOT / "deploy" / "k8s" / "deployment.yaml"
# The Deployment's container: its startup probe, as the pod runs it, and its memory limit (Gi).
POD_CONTAINER = next(doc for doc in yaml.safe_load_all(DEPLOYMENT.read_text()) if doc["kind"] == "Deployment")["spec"][
    "template"
]["spec"]["containers"][0]
STARTUP_PROBE = POD_CONTAINER["startupProbe"]["exec"]["command"][-1]
MEMORY_GIB = int(POD_CONTAINER["resources"]["limits"]["memory"].removesuffix("Gi"))
# Where the entry point writes the archive with the DLRM_* settings (deploy/container/entrypoint.py).
SETTINGS_STORE = "/tmp/dlrm-model-store"
SETTINGS = {"DLRM_WORKERS": 2, "DLRM_THREADS": 1, "DLRM_BATCH_SIZE": 8, "DLRM_MAX_BATCH_DELAY": 10}
CONTAINER_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082}
STOP_TIMEOUT = 30


class CheckFailed(Exception):
    """The image or the container does not behave as the README says."""


class Clock:
    """Prints each step with the seconds since the start."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", flush=True)


def podman(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    """Podman with this test's containers.conf; output captured unless ``kwargs`` say otherwise."""
    kwargs.setdefault("capture_output", True)
    env = {**os.environ, "CONTAINERS_CONF": str(CACHE / "containers.conf")}
    result = subprocess.run(["podman", *args], env=env, text=True, **kwargs)
    if check and result.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def ensure_podman() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "containers.conf").write_text(CONTAINERS_CONF)
    missing = [tool for tool in ("podman", "buildah", "runc", "debootstrap") if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"missing {', '.join(missing)}: install them (Debian: apt-get install {' '.join(missing)})")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=environment)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=environment)


def host_mirror() -> str:
    """The first Debian mirror of the host's apt sources, which this machine can reach."""
    if HOST_APT_SOURCES.exists():
        for line in HOST_APT_SOURCES.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    return DEFAULT_MIRROR


def ensure_base_image(clock: Clock) -> None:
    """debian:bookworm-slim: the local one, else a debootstrap equivalent (made once, then cached)."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        clock.log(f"base image {BASE_IMAGE}: present")
        return
    clock.log(f"base image {BASE_IMAGE}: absent, making it with debootstrap from {host_mirror()}")
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as directory:
        rootfs = Path(directory)
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), host_mirror()],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        slim_down(rootfs)
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            podman("import", "-", BASE_IMAGE_FULL_NAME, stdin=tar.stdout)
    clock.log(f"base image {BASE_IMAGE}: made")


def slim_down(rootfs: Path) -> None:
    """Make a debootstrap tree like debian:bookworm-slim: no docs, man pages, locales or apt caches."""
    (rootfs / "etc/dpkg/dpkg.cfg.d/slim").write_text(SLIM_DPKG_CONFIG)
    for pattern in ("usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*"):
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for path in [*rootfs.glob("var/cache/apt/*.bin"), *rootfs.glob("var/cache/apt/archives/*.deb")]:
        path.unlink()
    shutil.rmtree(rootfs / "var/lib/apt/lists")
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
    if HOST_APT_SOURCES.exists():  # the host's mirror and suites (updates, security), as in the real image
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        shutil.copy(HOST_APT_SOURCES, rootfs / "etc/apt/sources.list.d/debian.sources")


def build_archive() -> None:
    """The default (untrained) archive, with a golden set of planted rows for the startup probe's check."""
    golden = CACHE / "golden.tsv"
    write_tsv(golden, 200, PlantedClickModel(seed=0), seed=1)
    command = [sys.executable, "build_mar.py", "--output", str(ARCHIVE), "--golden-set", str(golden)]
    built = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if built.returncode != 0:
        raise CheckFailed(f"build_mar.py failed ({built.returncode}):\n{built.stderr[-4000:]}")


def host_ca_bundle() -> Path | None:
    """The CA bundle the host trusts (pip's own, when set), for pip inside the build."""
    configured = os.environ.get("PIP_CERT") or ssl.get_default_verify_paths().openssl_cafile
    path = Path(configured).resolve()
    return path if path.is_file() else None


def default_torch_wheels() -> str | None:
    candidate = os.environ.get("TORCH_WHEELS") or os.environ.get("PIP_FIND_LINKS")
    return candidate if candidate and Path(candidate).is_dir() else None


def build_image(tag: str, torch_wheels: str | None, log: Path) -> None:
    """`podman build` of the Dockerfile; its output goes to ``log``."""
    args = ["build", "--format=docker", f"--tag={tag}", f"--build-arg=MODEL_ARCHIVE={ARCHIVE.relative_to(REPO_ROOT)}"]
    ca_bundle = host_ca_bundle()
    if ca_bundle is not None:
        args += [f"--volume={ca_bundle}:/tmp/host-ca-bundle.pem:ro", "--build-arg=PIP_CERT=/tmp/host-ca-bundle.pem"]
    if torch_wheels is not None:
        args += [f"--volume={Path(torch_wheels).resolve()}:/wheels:ro", "--build-arg=TORCH_WHEELS=/wheels"]
    with log.open("w") as output:
        result = podman(*args, str(REPO_ROOT), check=False, capture_output=False, stdout=output, stderr=output)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise CheckFailed(f"podman build failed ({result.returncode}); last lines of {log}:\n{tail}")


def run_container(name: str, tag: str, ports: dict[str, int]) -> None:
    published = [f"--publish=127.0.0.1:{ports[api]}:{port}" for api, port in CONTAINER_PORTS.items()]
    settings = [f"--env={key}={value}" for key, value in SETTINGS.items()]
    podman("run", "--detach", "--name", name, f"--memory={MEMORY_GIB}g", *published, *settings, tag)


def wait_for_prediction(name: str, url: str, body: bytes, timeout: float = 300.0) -> requests.Response:
    """The first answer to ``body`` that is not a connection error, timeout or 503 (TorchServe still starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        if state != "true":
            raise CheckFailed(f"the container stopped:\n{podman('logs', name, check=False).stdout[-4000:]}")
        try:
            response = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
        except (requests.ConnectionError, requests.Timeout):
            response = None
        if response is not None and response.status_code != 503:
            return response
        time.sleep(1)
    raise CheckFailed(f"no prediction after {timeout:.0f}s:\n{podman('logs', name, check=False).stdout[-4000:]}")


def check_score(response: requests.Response) -> float:
    if response.status_code != 200:
        raise CheckFailed(f"prediction answered {response.status_code}: {response.text}")
    answer = response.json()
    score, logit = answer.get("score"), answer.get("logit")
    if not (isinstance(score, float) and 0.0 <= score <= 1.0 and isinstance(logit, float)):
        raise CheckFailed(f"expected {{'score': p in [0, 1], 'logit': z}}, got {answer}")
    if not math.isclose(score, 1.0 / (1.0 + math.exp(-logit)), rel_tol=1e-5):
        raise CheckFailed(f"score {score} is not sigmoid(logit {logit})")
    return score


def check_refused_from_host(api: str, port: int) -> None:
    try:
        response = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
    except requests.ConnectionError:
        return
    raise CheckFailed(f"the {api} API answered from the host through the container: {response.status_code}")


def inside(name: str, *command: str) -> str:
    """stdout of ``command`` run in the container (as its non-root user)."""
    return podman("exec", name, *command).stdout


def fetch_inside(name: str, url: str) -> str:
    """``url`` fetched inside the container, where the loopback-only APIs listen."""
    script = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    return inside(name, "python", "-c", script)


def check_open_inference_protocol(name: str, inference: str) -> None:
    """The frontend agent's routes answer (model metadata), and the Deployment's startup probe passes."""
    metadata = requests.get(f"{inference}/v2/models/dlrm", timeout=10).json()
    if [tensor.get("name") for tensor in metadata.get("inputs", [])] != [
        "dense_features",
        "sparse_lengths",
        "sparse_ids",
    ]:
        raise CheckFailed(f"GET /v2/models/dlrm: expected the model's OIP metadata, got {metadata}")
    probe = podman("exec", name, "sh", "-c", STARTUP_PROBE, check=False)
    if probe.returncode != 0 or "passed" not in probe.stdout:
        raise CheckFailed(f"the startup probe's golden check failed: {probe.stdout}{probe.stderr}")


def check_settings(name: str) -> None:
    """The DLRM_* settings reached TorchServe (management API) and the handler (its log)."""
    model = json.loads(fetch_inside(name, "http://127.0.0.1:8081/models/dlrm"))[0]
    expected = {
        "minWorkers": SETTINGS["DLRM_WORKERS"],
        "maxWorkers": SETTINGS["DLRM_WORKERS"],
        "batchSize": SETTINGS["DLRM_BATCH_SIZE"],
        "maxBatchDelay": SETTINGS["DLRM_MAX_BATCH_DELAY"],
    }
    got = {key: model.get(key) for key in expected}
    if got != expected or len(model.get("workers", [])) != SETTINGS["DLRM_WORKERS"]:
        raise CheckFailed(f"expected {expected} and {SETTINGS['DLRM_WORKERS']} workers, got {got}, {model['workers']}")
    threads_line = f"with {SETTINGS['DLRM_THREADS']} threads"
    if threads_line not in inside(name, "cat", "logs/model_log.log"):
        raise CheckFailed(f"no worker logged '{threads_line}' in logs/model_log.log")


def check_jvm_heap(name: str) -> str:
    """TorchServe's JVM runs with the image's MaxRAMPercentage, whose heap is that share of the memory limit."""
    java = [row for row in podman("top", name, "args").stdout.splitlines() if "org.pytorch.serve.ModelServer" in row]
    percentages = re.findall(r"-XX:MaxRAMPercentage=(\S+)", "".join(java))
    if len(java) != 1 or len(percentages) != 1:
        raise CheckFailed(f"expected one TorchServe JVM with -XX:MaxRAMPercentage, got {java}")
    # The JRE has no jcmd: a JVM with the same options in the same container reports the bound it computes.
    flags = inside(name, "java", f"-XX:MaxRAMPercentage={percentages[0]}", "-XX:+PrintFlagsFinal", "-version")
    heap = int(re.search(r"\bMaxHeapSize\s*=\s*(\d+)", flags).group(1))  # type: ignore[union-attr]
    expected = MEMORY_GIB * 2**30 * float(percentages[0]) / 100
    if not 0.95 * expected <= heap <= expected:
        raise CheckFailed(f"MaxHeapSize {heap} is not {percentages[0]} % of the {MEMORY_GIB} GiB limit")
    return f"-XX:MaxRAMPercentage={percentages[0]}: {heap / 2**20:.0f} MiB of {MEMORY_GIB} GiB"


def check_restart_keeps_one_copy(name: str, url: str, body: bytes) -> str:
    """A restarted container (its files kept) serves again with one copy of the archive with the DLRM_*
    settings, and one extraction of it by TorchServe (/tmp/models): no copy piles up per start."""
    before = inside(name, "ls", "-A", "/tmp")
    podman("restart", "--time", str(STOP_TIMEOUT), name)
    check_score(wait_for_prediction(name, url, body))
    after = inside(name, "ls", "-A", "/tmp")
    store = inside(name, "ls", "-A", SETTINGS_STORE).split()
    extractions = inside(name, "ls", "-A", "/tmp/models").split()
    if after != before or store != ["dlrm.mar"] or len(extractions) != 1:
        raise CheckFailed(
            f"after a restart: /tmp {after.split()} (before: {before.split()}), {SETTINGS_STORE} {store}, "
            f"/tmp/models {extractions}"
        )
    return f"{SETTINGS_STORE}: {store}, /tmp/models: {len(extractions)} archive"


def check_non_root(name: str) -> list[str]:
    """The users of TorchServe's processes: none may be root."""
    rows = podman("top", name, "user", "comm").stdout.splitlines()[1:]
    processes = [row.split() for row in rows if row.strip()]
    if not processes or any(user in ("root", "0") for user, *_ in processes):
        raise CheckFailed(f"processes must run as a non-root user: {processes}")
    return [f"{user}:{' '.join(command)}" for user, *command in processes]


def check_stop(name: str) -> float:
    """Seconds `podman stop` needs: SIGTERM must end TorchServe, well before the SIGKILL timeout."""
    started = time.monotonic()
    podman("stop", "--time", str(STOP_TIMEOUT), name)
    seconds = time.monotonic() - started
    if seconds > STOP_TIMEOUT / 2:
        raise CheckFailed(f"podman stop took {seconds:.1f}s: SIGTERM did not stop TorchServe")
    return seconds


def check_rejects_bad_setting(name: str, tag: str) -> str:
    """A bad DLRM_* value stops the container before TorchServe starts, with a message naming it."""
    try:
        result = podman("run", "--name", name, "--env=DLRM_WORKERS=0", tag, check=False, timeout=60)
    finally:
        podman("rm", "--force", "--ignore", name, check=False)
    message = (result.stderr.strip().splitlines() or [""])[-1]
    if result.returncode == 0 or "DLRM_WORKERS" not in message:
        raise CheckFailed(f"DLRM_WORKERS=0 should stop the container, got exit {result.returncode}: {message}")
    return message


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="localhost/dlrm-torchserve:latest", help="image name (default: %(default)s)")
    parser.add_argument(
        "--torch-wheels",
        default=default_torch_wheels(),
        help="directory with the torch CPU wheel, instead of the PyTorch CPU index (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    clock = Clock()
    ensure_podman()
    ensure_base_image(clock)
    build_archive()
    clock.log(f"archive {ARCHIVE.relative_to(REPO_ROOT)}: built")
    log = CACHE / "build.log"
    build_started = time.monotonic()
    build_image(args.tag, args.torch_wheels, log)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", args.tag).stdout)
    clock.log(f"image {args.tag}: built in {time.monotonic() - build_started:.0f}s, {size / 1e6:.0f} MB (log: {log})")

    name = f"dlrm-test-{os.getpid()}"
    ports = {api: free_port() for api in CONTAINER_PORTS}
    try:
        run_container(name, args.tag, ports)
        clock.log(f"container {name}: started, host ports {ports}, {SETTINGS}")
        inference = f"http://127.0.0.1:{ports['inference']}"
        response = wait_for_prediction(name, f"{inference}/predictions/dlrm", SAMPLE.read_bytes())
        clock.log(f"prediction: {response.text}")
        score = check_score(response)
        clock.log(f"score {score:.6f} is in [0, 1]")
        check_open_inference_protocol(name, inference)
        clock.log("OIP model metadata (frontend agent) and the startup probe's golden check: answered, passed")
        for api in ("management", "metrics"):
            check_refused_from_host(api, ports[api])
        fetch_inside(name, "http://127.0.0.1:8081/models")
        fetch_inside(name, "http://127.0.0.1:8082/metrics")
        clock.log("management and metrics: refused from the host, answering on the container's loopback")
        check_settings(name)
        clock.log("DLRM_* settings: applied (management API and worker log)")
        clock.log(f"JVM heap: {check_jvm_heap(name)}")
        clock.log(f"processes: {', '.join(check_non_root(name))}")
        health = podman("healthcheck", "run", name, check=False)
        if health.returncode != 0:
            raise CheckFailed(f"healthcheck failed: {health.stdout}{health.stderr}")
        clock.log("healthcheck: healthy")
        files = check_restart_keeps_one_copy(name, f"{inference}/predictions/dlrm", SAMPLE.read_bytes())
        clock.log(f"restart: served again, /tmp unchanged ({files})")
        seconds = check_stop(name)
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        clock.log(f"podman stop: {seconds:.1f}s (exit code {exit_code})")
    finally:
        podman("rm", "--force", "--ignore", name, check=False)
    clock.log(f"DLRM_WORKERS=0: refused ({check_rejects_bad_setting(f'{name}-bad-setting', args.tag)})")
    clock.log("container test passed")


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as failure:
        sys.exit(f"container test FAILED: {failure}")
