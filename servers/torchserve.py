"""Start, wait for and stop real TorchServe instances on chosen loopback ports.

Used by the tests, the benchmarks and ``make serve``. Each instance gets its own
working directory (config, logs, pid file) and runs in its own process group, so
that stopping it also stops its Java frontend and Python workers, even when a
test fails halfway.

    python -m servers.torchserve serve        # serve model_store/dlrm.mar on the shipped ports until Ctrl-C
    python -m servers.torchserve wait-ready   # wait for dlrm on the default ports
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path

import requests

from servers.frontend_agent import agent_jar

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO_ROOT / "config.properties"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in range(5)))


@dataclass(frozen=True)
class Endpoints:
    host: str = LOOPBACK
    ports: Ports = field(default_factory=Ports)

    @property
    def inference(self) -> str:
        return f"http://{self.host}:{self.ports.inference}"

    @property
    def management(self) -> str:
        return f"http://{self.host}:{self.ports.management}"

    @property
    def metrics(self) -> str:
        return f"http://{self.host}:{self.ports.metrics}"


def read_properties(path: Path) -> dict[str, str]:
    properties = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            properties[key.strip()] = value.strip()
    return properties


KEY_FILE = "key_file.json"


@dataclass(frozen=True)
class Keys:
    """TorchServe's API keys, from the ``key_file.json`` it writes into its working directory when token
    authorization is on; ``None`` where it is off.

    The management and inference keys expire (``token_expiration_min``, 60 minutes by default); the
    token-API key (``api``) does not, and renews them: ``GET /token?type=management|inference`` on the
    management API, which rewrites the key file.
    """

    management: str | None = None
    inference: str | None = None
    api: str | None = None

    @classmethod
    def from_key_file(cls, path: Path) -> Keys:
        keys = json.loads(path.read_text())
        return cls(management=keys["management"]["key"], inference=keys["inference"]["key"], api=keys["API"]["key"])


def bearer(key: str | None) -> dict[str, str]:
    """The header TorchServe's token authorization expects, or none without a key."""
    return {"Authorization": f"Bearer {key}"} if key else {}


class TorchServeProcess:
    """One TorchServe in the foreground of its own process group, configured from ``config.properties``."""

    def __init__(
        self,
        model_store: Path,
        models: str,  # TorchServe's --models: "name=archive", several separated by spaces
        workdir: Path,
        ports: Ports | None = None,
        overrides: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.model_store = model_store.resolve()
        self.models = models
        self.workdir = workdir.resolve()
        self.log_dir = (log_dir or self.workdir / "logs").resolve()
        self.endpoints = Endpoints(ports=ports or Ports.free())
        self.overrides = overrides or {}
        self.env = env or {}
        self.process: subprocess.Popen | None = None

    def write_config(self) -> Path:
        ports = self.endpoints.ports
        properties = read_properties(BASE_CONFIG)
        properties.update(
            {
                "inference_address": f"http://{LOOPBACK}:{ports.inference}",
                "management_address": f"http://{LOOPBACK}:{ports.management}",
                "metrics_address": f"http://{LOOPBACK}:{ports.metrics}",
                "grpc_inference_port": str(ports.grpc_inference),
                "grpc_management_port": str(ports.grpc_management),
                "model_store": str(self.model_store),
                # config.properties names these relative to the repository root; this runs elsewhere
                "vmargs": f"-Dlog4j.configurationFile={REPO_ROOT / 'log4j2.xml'} -javaagent:{agent_jar()}",
            }
        )
        properties.update(self.overrides)
        path = self.workdir / "config.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
        return path

    def start(self) -> TorchServeProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / KEY_FILE).unlink(missing_ok=True)  # an earlier run's keys, refused by this one
        config = self.write_config()
        env = {
            **os.environ,
            "LOG_LOCATION": str(self.log_dir),
            "METRICS_LOCATION": str(self.log_dir),
            "TEMP": str(self.workdir),  # TorchServe keeps its pid file in the temp dir
            "TMPDIR": str(self.workdir),
            "OMP_WAIT_POLICY": "PASSIVE",  # as `make serve` and the image: idle OpenMP threads yield the CPU
            **self.env,
        }
        env.pop("TS_CONFIG_FILE", None)
        command = [
            executable("torchserve"), "--start", "--foreground", "--ncs",
            "--ts-config", str(config), "--model-store", str(self.model_store), "--models", *self.models.split(),
        ]  # fmt: skip
        with open(self.workdir / "torchserve.out", "ab") as output:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait_ready(self, model: str = "dlrm", timeout: float = 180.0) -> None:
        """Until a worker of ``model`` is READY (``/ping`` turns healthy before workers can answer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.process.returncode}:\n{self.log_tail()}")
            if model_ready(self.endpoints.management, model, self.keys().management):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{model} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def keys(self) -> Keys:
        """The API keys of this instance (none until it has written its key file, or with token authorization off)."""
        try:
            return Keys.from_key_file(self.workdir / KEY_FILE)
        except (FileNotFoundError, ValueError):  # not written yet, or being written
            return Keys()

    def worker_pids(self, model: str = "dlrm") -> list[int]:
        url = f"{self.endpoints.management}/models/{model}"
        description = requests.get(url, headers=bearer(self.keys().management), timeout=10).json()
        return [int(worker["pid"]) for worker in description[0]["workers"] if worker.get("pid")]

    def log_tail(self, lines: int = 60) -> str:
        texts = []
        for path in (self.workdir / "torchserve.out", self.log_dir / "model_log.log", self.log_dir / "ts_log.log"):
            if path.exists():
                texts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(texts)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop TorchServe and its workers: SIGTERM to the process group, SIGKILL for what lingers."""
        if self.process is None:
            return
        group = self.process.pid
        _signal_group(group, signal.SIGTERM)
        if not self._group_gone(timeout):
            _signal_group(group, signal.SIGKILL)
            self._group_gone(10.0)
        self.process.wait()
        self.process = None

    def _group_gone(self, timeout: float) -> bool:
        """Whether every process of the group has exited within ``timeout``."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.process.poll()  # reap the launcher, or its zombie keeps the group alive
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False

    def __enter__(self) -> TorchServeProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _signal_group(group: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(group, sig)


def model_ready(management_url: str, model: str, key: str | None = None) -> bool:
    try:
        response = requests.get(f"{management_url}/models/{model}", headers=bearer(key), timeout=5)
    except requests.RequestException:
        return False
    if response.status_code != 200:
        return False
    return any(worker.get("status") == "READY" for entry in response.json() for worker in entry.get("workers", []))


def executable(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else name


def serve(model_store: Path, model: str, archive: str, log_dir: Path, example: str) -> None:
    """Serve one archive on the shipped ports, TorchServe's output in ``log_dir``, until Ctrl-C."""
    print(f"starting TorchServe: its logs go to {log_dir}/", flush=True)
    try:
        with TorchServeProcess(model_store, f"{model}={archive}", log_dir, ports=Ports(), log_dir=log_dir) as server:
            server.wait_ready(model)
            print(f"\n{model} is ready on {server.endpoints.inference}. Try:\n  {example}\nCtrl-C stops the server.")
            assert server.process is not None
            code = server.process.wait()
            if code != 0:
                sys.exit(f"TorchServe exited with {code}:\n{server.log_tail()}")
            print("\nTorchServe stopped (make stop)")
    except KeyboardInterrupt:
        print("\nstopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="serve an archive on the shipped ports until Ctrl-C")
    run.add_argument("--model-store", type=Path, default=REPO_ROOT / "model_store")
    run.add_argument("--model", default="dlrm", help="model name in the URLs")
    run.add_argument("--archive", default="dlrm.mar", help="archive in the model store")
    run.add_argument("--log-dir", type=Path, default=Path("logs"), help="where TorchServe's logs and output go")
    run.add_argument("--example", default="", help="a command to suggest once the model is ready")
    wait = commands.add_parser("wait-ready", help="wait until a model's worker is READY")
    wait.add_argument("--management", default=Endpoints().management, help="management API base URL")
    wait.add_argument("--model", default="dlrm")
    wait.add_argument("--timeout", type=float, default=180.0)
    wait.add_argument(
        "--key-file",
        type=Path,
        help="TorchServe's key_file.json when token authorization is on (in its working directory; `make serve`: "
        "logs/key_file.json)",
    )
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.model_store, args.model, args.archive, args.log_dir, args.example)
        return
    key = Keys.from_key_file(args.key_file).management if args.key_file else None
    deadline = time.monotonic() + args.timeout
    while not model_ready(args.management, args.model, key):
        if time.monotonic() > deadline:
            sys.exit(f"{args.model} is not ready at {args.management} after {args.timeout:.0f}s")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
