"""The README's start command as a unit file or a script runs it: from the repository root, in a clean environment
(``env -i``), the venv not activated, its ``torchserve`` called by path or found on ``PATH``.

TorchServe's launcher takes the JVM options of config.properties (``vmargs``: the frontend agent, log4j2.xml) only
from ``TS_CONFIG_FILE`` or ``--ts-config``, which such a start gives neither; the venv's launcher hook
(servers/launcher_hook.py, installed by ``make install``) points it at the ``./config.properties`` the frontend reads.

The server must not take config.properties' fixed ports (``make serve`` or another test may hold them): the
``TS_*`` variables that its ``enable_envvars_config=true`` admits move them to free ones, and the file is
otherwise read as it is. Its pid file, temporary files and logs go to the test's directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from servers.torchserve import BASE_CONFIG, LOOPBACK, REPO_ROOT, Ports, model_ready, read_properties

VENV_BIN = Path(sys.executable).parent
SYSTEM_PATH = f"{Path(shutil.which('java') or '/usr/bin/java').parent}:/usr/local/bin:/usr/bin:/bin"


def clean_environment(directory: Path, ports: Ports, path: str) -> dict[str, str]:
    return {
        "PATH": path,
        "HOME": str(directory),
        "TMPDIR": str(directory),  # the launcher's pid file
        "TEMP": str(directory),  # the frontend's temporary files and the workers' sockets
        "LOG_LOCATION": str(directory / "logs"),  # not the repository's logs/ (make serve's)
        "METRICS_LOCATION": str(directory / "logs"),
        "TS_INFERENCE_ADDRESS": f"http://{LOOPBACK}:{ports.inference}",
        "TS_MANAGEMENT_ADDRESS": f"http://{LOOPBACK}:{ports.management}",
        "TS_METRICS_ADDRESS": f"http://{LOOPBACK}:{ports.metrics}",
        "TS_GRPC_INFERENCE_PORT": str(ports.grpc_inference),
        "TS_GRPC_MANAGEMENT_PORT": str(ports.grpc_management),
    }


@pytest.fixture(params=["venv torchserve by path", "venv bin on PATH"])
def started(request: pytest.FixtureRequest, model_store: Path, tmp_path: Path) -> Iterator[tuple[Ports, int, Path]]:
    """TorchServe started by the README's command; yields its ports, the frontend's pid and its log directory."""
    ports = Ports.free()
    on_path = request.param == "venv bin on PATH"
    env = clean_environment(tmp_path, ports, f"{VENV_BIN}:{SYSTEM_PATH}" if on_path else SYSTEM_PATH)
    torchserve = "torchserve" if on_path else str(VENV_BIN / "torchserve")
    command = [torchserve, "--start", "--ncs", "--model-store", str(model_store), "--models", "dlrm=dlrm.mar"]
    output = tmp_path / "torchserve.out"
    try:
        with output.open("wb") as sink:  # not a pipe: the frontend inherits it and outlives the launcher
            launcher = subprocess.run(
                command, cwd=REPO_ROOT, env=env, stdout=sink, stderr=sink, timeout=60, start_new_session=True
            )
        assert launcher.returncode == 0, output.read_text()
        frontend = int((tmp_path / ".model_server.pid").read_text())
        deadline = time.monotonic() + 180
        while not model_ready(f"http://{LOOPBACK}:{ports.management}", "dlrm"):
            assert Path(f"/proc/{frontend}").exists(), output.read_text()[-3000:]
            assert time.monotonic() < deadline, "dlrm not ready after 180 s"
            time.sleep(0.5)
        yield ports, frontend, tmp_path / "logs"
    finally:
        group = _group_of_pid_file(tmp_path)
        stop = subprocess.run([torchserve, "--stop"], cwd=tmp_path, env=env, capture_output=True, text=True)
        _end_group(group)
        assert stop.returncode == 0, stop.stdout + stop.stderr


def _group_of_pid_file(directory: Path) -> int | None:
    """The process group of the frontend the launcher left running (the launcher's own, a new session)."""
    try:
        return os.getpgid(int((directory / ".model_server.pid").read_text()))
    except (OSError, ValueError):
        return None


def _end_group(group: int | None, timeout: float = 30.0) -> None:
    """Wait for the frontend and its workers to exit after ``torchserve --stop``; kill what lingers."""
    if group is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)


def test_readme_start_command_serves_with_the_agent_and_logging_config(started: tuple[Ports, int, Path]) -> None:
    ports, frontend, logs = started
    inference = f"http://{LOOPBACK}:{ports.inference}"
    metadata = requests.get(f"{inference}/v2/models/dlrm", timeout=10)
    assert metadata.status_code == 200, (
        f"no frontend agent (the OIP model metadata route answers {metadata.status_code}): is the launcher hook "
        "installed (make install)?"
    )
    assert metadata.json()["name"] == "dlrm"
    assert requests.get(f"{inference}/v2/models/dlrm/ready", timeout=10).status_code == 200
    # The JVM got config.properties' vmargs: the agent and log4j2.xml.
    command_line = Path(f"/proc/{frontend}/cmdline").read_bytes().decode().split("\0")
    vmargs = read_properties(BASE_CONFIG)["vmargs"].split()
    assert vmargs and all(option in command_line for option in vmargs), command_line
    # log4j2.xml's INFO level: TorchServe's built-in configuration writes DEBUG lines to ts_log.log.
    body = (REPO_ROOT / "sample_data" / "sample_data.json").read_bytes()
    prediction = requests.post(
        f"{inference}/predictions/dlrm", data=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert prediction.status_code == 200, prediction.text
    frontend_log = (logs / "ts_log.log").read_text()
    assert f"Inference API bind to: {inference}" in frontend_log and "[DEBUG]" not in frontend_log


PRINT_ENVIRONMENT = "import os; print(os.environ.get('TS_CONFIG_FILE'), os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.parametrize(
    ("script", "args", "preset", "with_config", "adopted"),
    [
        ("torchserve", ["--start"], None, True, True),
        ("torchserve", ["--start", "--ts-config", "other.properties"], None, True, False),
        ("torchserve", ["--start", "--ts-conf=other.properties"], None, True, False),  # argparse's prefix match
        ("torchserve", ["--start"], "/etc/ts.properties", True, False),
        ("torchserve", ["--start"], None, False, False),
        ("torch-model-archiver", [], None, True, False),
    ],
)
def test_launcher_hook_sets_ts_config_file_for_the_launcher_alone(
    tmp_path: Path, script: str, args: list[str], preset: str | None, with_config: bool, adopted: bool
) -> None:
    """The installed hook, through a stand-in console script of the venv that prints what it was given: only the
    torchserve launcher, given no config, adopts the working directory's config.properties."""
    launcher = tmp_path / "bin" / script
    launcher.parent.mkdir()
    launcher.write_text(f"#!{sys.executable}\n{PRINT_ENVIRONMENT}\n")
    launcher.chmod(0o755)
    if with_config:
        (tmp_path / "config.properties").write_text("inference_address=http://127.0.0.1:8080\n")
    env = {"PATH": SYSTEM_PATH, **({"TS_CONFIG_FILE": preset} if preset else {})}
    printed = subprocess.run([launcher, *args], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    expected = f"{tmp_path}/config.properties PASSIVE" if adopted else f"{preset} None"
    assert printed.stdout.strip() == expected
