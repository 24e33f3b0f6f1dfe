"""Workers forked from the fork server (torchserve_shims/worker_fork.py), with real processes and sockets.

A stand-in "frontend" (a Python process, as TorchServe's JVM is) starts a stand-in worker script
named like TorchServe's, with the archive's layout (``sitecustomize.py`` and the ``torchserve_shims``
package) on its ``PYTHONPATH``. The script reports what it finds about itself on stdout. TorchServe
with forked workers is covered by every served test; tests/test_reliability.py kills one.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

from model_archive.build import STARTUP_HOOK
from servers.torchserve import REPO_ROOT
from torchserve_shims import worker_fork

WORKER = """
import json, os, sys, time
def target(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # listdir's own directory, closed by now
        return None
fds = {fd: target(fd) for fd in os.listdir("/proc/self/fd")}
report = {
    "pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv, "cwd": os.getcwd(),
    "setting": os.environ.get("WORKER_SETTING"), "path": sys.path[:3], "torch_preloaded": "torch" in sys.modules,
    "fds": {fd: path for fd, path in fds.items() if path is not None},
}
print(json.dumps(report), flush=True)
if sys.argv[1] == "sleep":
    time.sleep(600)
sys.exit(int(sys.argv[2]))
"""
# The frontend runs the worker, as a child it waits for, and reports how that child (the launcher) ended.
FRONTEND = "import subprocess, sys; print(subprocess.run(sys.argv[1:]).returncode, flush=True)"
# A frontend with two workers at once, one fork server for both: how each launcher ended, on one line.
FRONTEND_OF_TWO = (
    "import subprocess, sys; launchers = [subprocess.Popen(sys.argv[1:]) for _ in (1, 2)]; "
    "print(*[launcher.wait() for launcher in launchers], flush=True)"
)


@pytest.fixture()
def archive() -> Iterator[Path]:
    """A model directory as TorchServe extracts it: the start-up hook and the runtime shims' package.

    Its parent is the workers' TMPDIR, short enough for the fork servers' socket paths."""
    with tempfile.TemporaryDirectory(prefix="worker-fork-", dir="/tmp") as tmp:
        yield make_archive(Path(tmp))
        # Whatever a failed test left running: every process of it names this directory on its command line.
        leftovers = [p for p in psutil.process_iter(["cmdline"]) if tmp in " ".join(p.info["cmdline"] or ())]
        for process in leftovers:
            with suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(leftovers, timeout=10)


def make_archive(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shims = Path(worker_fork.__file__).parent
    (model / shims.name).mkdir(parents=True)
    shutil.copyfile(STARTUP_HOOK, model / "sitecustomize.py")
    for name in ("__init__.py", "worker_fork.py"):
        shutil.copyfile(shims / name, model / shims.name / name)
    script = tmp_path / "ts" / worker_fork.WORKER_SCRIPT
    script.parent.mkdir()
    script.write_text(WORKER)
    return model


def start(archive: Path, *args: str, fork: bool = True, frontend: str = FRONTEND) -> subprocess.Popen[str]:
    environment = {
        **os.environ,
        "PYTHONPATH": f"{archive}{os.pathsep}{archive.parent}",
        "WORKER_SETTING": "from the frontend",
        "TMPDIR": str(archive.parent),
        worker_fork.SWITCH: "1" if fork else "0",
    }
    script = archive.parent / "ts" / worker_fork.WORKER_SCRIPT
    command = [sys.executable, "-c", frontend, sys.executable, str(script), *args]
    return subprocess.Popen(command, cwd=archive, env=environment, stdout=subprocess.PIPE, text=True)


def is_fork_server(process: psutil.Process | None) -> bool:
    return process is not None and "worker_fork.py" in " ".join(process.cmdline()) and "serve" in process.cmdline()


def report(frontend: subprocess.Popen[str]) -> dict:
    assert frontend.stdout is not None
    return json.loads(frontend.stdout.readline())


def launcher_exit(frontend: subprocess.Popen[str]) -> int:
    """How the process the frontend started ended: its exit code, or minus the signal that killed it."""
    assert frontend.stdout is not None
    code = int(frontend.stdout.readline())
    assert frontend.wait(timeout=10) == 0
    return code


def test_a_worker_runs_forked_with_its_own_arguments_directory_environment_and_streams(archive: Path) -> None:
    frontend = start(archive, "exit", "3")
    worker = report(frontend)
    assert launcher_exit(frontend) == 3  # the launcher exits as its worker did
    assert worker["torch_preloaded"]
    assert worker["argv"] == [str(archive.parent / "ts" / worker_fork.WORKER_SCRIPT), "exit", "3"]
    assert worker["cwd"] == str(archive)
    assert worker["setting"] == "from the frontend"
    assert worker["path"] == [str(archive.parent / "ts"), str(archive), str(archive.parent)]
    assert worker["ppid"] != frontend.pid  # the fork server's child, not the launcher's


def test_a_killed_launcher_takes_its_worker_down_and_a_killed_worker_its_launcher(archive: Path) -> None:
    frontend = start(archive, "sleep", "0")
    worker = psutil.Process(report(frontend)["pid"])
    assert is_fork_server(worker.parent())
    (launcher,) = psutil.Process(frontend.pid).children()
    launcher.kill()  # as TorchServe's Process.destroyForcibly() does when it stops a worker
    worker.wait(timeout=10)
    assert launcher_exit(frontend) == -signal.SIGKILL
    frontend = start(archive, "sleep", "0")
    worker = psutil.Process(report(frontend)["pid"])
    worker.send_signal(signal.SIGTERM)
    assert launcher_exit(frontend) == -signal.SIGTERM


def test_the_fork_server_exits_with_its_frontend(archive: Path) -> None:
    frontend = start(archive, "exit", "0")
    server = psutil.Process(report(frontend)["ppid"])
    assert is_fork_server(server)
    assert launcher_exit(frontend) == 0
    server.wait(timeout=10)
    assert not list((archive.parent / f"dlrm-worker-fork-{os.getuid()}").glob("*.sock"))


def test_forking_off_or_impossible_starts_the_worker_in_place(archive: Path) -> None:
    frontend = start(archive, "exit", "0", fork=False)
    worker = report(frontend)
    assert launcher_exit(frontend) == 0
    assert worker["ppid"] == frontend.pid and not worker["torch_preloaded"]
    # A fork server directory another user could enter is refused: the worker starts in place.
    shared = archive.parent / f"dlrm-worker-fork-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    frontend = start(archive, "exit", "0")
    worker = report(frontend)
    assert launcher_exit(frontend) == 0
    assert worker["ppid"] == frontend.pid and not worker["torch_preloaded"]


def test_only_the_worker_script_forks(archive: Path) -> None:
    """Any other Python process with the archive on its path (a tool, a test) runs as usual."""
    environment = {**os.environ, "PYTHONPATH": str(archive), "TMPDIR": str(archive.parent)}
    output = subprocess.run(
        [sys.executable, "-c", "import os, sys; print(os.getpid(), 'torch' in sys.modules)"],
        env=environment, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert output.stdout.split()[1] == "False"
    assert not (archive.parent / f"dlrm-worker-fork-{os.getuid()}").exists()  # no fork server was asked


def test_a_process_that_opened_a_gpu_does_not_fork() -> None:
    """Forked children cannot use a CUDA the parent initialised: such a server refuses, its workers start in place."""
    assert worker_fork.fork_hazard(["/dev/null", "pipe:[123]", "socket:[9]", "/tmp/x.log"]) is None
    assert "/dev/nvidiactl" in (worker_fork.fork_hazard(["/dev/null", "/dev/nvidiactl", "/dev/nvidia0"]) or "")


def test_a_launcher_gone_before_the_reply_leaves_the_server_serving(archive: Path) -> None:
    """TorchServe may kill a starting worker's launcher at any moment (a timeout, a stop): the worker forked
    for it is killed and the server goes on forking for the others."""
    frontend = start(archive, "sleep", "0")
    first = psutil.Process(report(frontend)["pid"])
    server = first.parent()
    assert is_fork_server(server)
    (path,) = (archive.parent / f"dlrm-worker-fork-{os.getuid()}").glob("*.sock")
    script = archive.parent / "ts" / worker_fork.WORKER_SCRIPT
    request = {"argv": [str(script), "sleep", "0"], "cwd": str(archive), "env": {"PYTHONPATH": str(archive)}}
    read_end, write_end = os.pipe()
    alive = os.pidfd_open(os.getpid())  # a launcher's pidfd that stays open: only the server can kill this worker
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as launcher:
        launcher.connect(str(path))
        socket.send_fds(launcher, [json.dumps(request).encode()], [write_end] * 3 + [alive])
    os.close(write_end)
    os.close(alive)
    # The pipe ends once nothing holds its write end: the server has dropped it and killed what it forked.
    with os.fdopen(read_end, "rb") as pipe:
        assert select.select([pipe], [], [], 30)[0]
        pipe.read()
    deadline = time.monotonic() + 10
    while server.children() != [first] and time.monotonic() < deadline:  # until the server has reaped it
        time.sleep(0.05)
    assert server.children() == [first] and server.is_running()
    first.kill()
    assert launcher_exit(frontend) == -signal.SIGKILL
    server.wait(timeout=10)  # gone with its frontend


def gone(process: psutil.Process, timeout: float) -> bool:
    """Whether ``process`` has exited within ``timeout`` seconds (an orphan's zombie counts: it runs no more)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_worker_holds_no_descriptor_of_the_fork_server(archive: Path) -> None:
    """Only its standard streams and its launcher's pidfd: no launcher's connection (its own or another's), no
    listener, no pidfd of another process, so nothing the server holds stays open because a worker lives."""
    frontend = start(archive, "sleep", "0", frontend=FRONTEND_OF_TWO)
    workers = [report(frontend), report(frontend)]
    assert workers[0]["ppid"] == workers[1]["ppid"]  # one server forked both, one while the other's was open
    for worker in workers:
        extra = {fd: path for fd, path in worker["fds"].items() if int(fd) > 2}
        assert list(extra.values()) == ["anon_inode:[pidfd]"], worker["fds"]
        psutil.Process(worker["pid"]).kill()
    assert frontend.stdout is not None
    assert frontend.stdout.readline().split() == [str(-signal.SIGKILL)] * 2


def test_a_worker_dies_with_its_launcher_after_its_fork_server_was_killed(archive: Path) -> None:
    """A fork server killed (by the OOM killer, say) leaves its workers serving; each still dies with its launcher,
    which TorchServe kills to stop it."""
    frontend = start(archive, "sleep", "0")
    worker = psutil.Process(report(frontend)["pid"])
    server = worker.parent()
    assert is_fork_server(server)
    (launcher,) = psutil.Process(frontend.pid).children()
    server.kill()
    assert gone(server, 10)
    assert not gone(worker, 1)  # the worker goes on without the server
    launcher.kill()
    assert launcher_exit(frontend) == -signal.SIGKILL
    assert gone(worker, 5), "the worker outlived its launcher"


def test_the_shims_import_only_the_standard_library() -> None:
    """They run while every worker's interpreter starts, before it has imported anything else, and in any
    Python process with the archive on its path: from a Python without site-packages (``-S``), importing them
    imports nothing beyond the standard library."""
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import torchserve_shims.sitecustomize; "
        "print(*sorted({name.split('.')[0] for name in sys.modules} - {*sys.stdlib_module_names, '__main__'}))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe, str(REPO_ROOT)], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["torchserve_shims"]
