"""Fork TorchServe's Python workers from a process that has imported torch and TorchRec once.

TorchServe starts every worker as a new interpreter (``python .../ts/model_service_worker.py
--sock-type unix ...``), and each one imports torch, FBGEMM and TorchRec before it can load a
model: seconds of CPU per worker, paid by every worker that starts together on a small box and
again by every restarted one. The archive's ``sitecustomize.py``, which Python imports while it
starts (the archive's directory is on the worker's ``PYTHONPATH``), calls :func:`fork_if_worker`:
the process TorchServe started asks a fork server to fork the worker, hands it its arguments,
working directory, environment and standard streams (``SCM_RIGHTS``), and stays as TorchServe's
handle on it: it exits with the worker's status, and its worker is killed when it is killed. It
keeps no copy of TorchServe's pipes, so they close the moment the worker dies, as without the fork
(TorchServe 0.12 ends a dead worker's log readers, which share its restart latch, only then).

A worker never outlives its launcher, whatever dies first. The worker is the fork server's child,
not the launcher's, so ``PR_SET_PDEATHSIG`` would tie it to the server (and every worker would die
with it) rather than to its launcher. The launcher hands the worker a pidfd of itself instead, and
a thread of the worker kills it once that pidfd says the launcher has exited; the server also
kills the worker when its launcher's connection ends. A killed fork server thus leaves its workers
serving, each still tied to its launcher (which then reports exit code 1: only a parent learns how a
process ended), and the next worker to start starts a new server. A forked worker holds no
descriptor of the server: no launcher's connection, no listener, no pidfd but its launcher's.

There is one fork server per TorchServe frontend (the launcher's parent), Python executable,
environment (but ``PYTHONPATH``, which names the model) and version of this file; the first worker
starts it and it exits with its frontend. It imports third-party packages only (:data:`PRELOADED`),
never an archive's code, so the models and model versions that share it each run their own handler.
The server never initialises CUDA or OpenMP (it only imports), so a forked worker sets up its own
device and threads as a fresh one does. Whatever goes wrong on the way, the worker starts as it
always did, with a warning in the model log. ``DLRM_WORKER_FORK=0`` in TorchServe's environment
turns forking off.

    python -P torchserve_shims/worker_fork.py serve SOCKET FRONTEND_PID   # the fork server (launchers start it)

One module of over 400 lines, launcher and server together: a launcher starts the server as this
very file, and only a server of this file's exact version serves it (its hash is in the server's key).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import select
import selectors
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What every worker imports before it reaches the handler; the worker itself imports the rest.
PRELOADED = ("numpy", "torch", "fbgemm_gpu", "torchrec", "orjson", "yaml", "ts.model_service_worker")
WORKER_SCRIPT = "model_service_worker.py"
SWITCH = "DLRM_WORKER_FORK"
MAX_REQUEST_BYTES = 1 << 20
SERVER_START_TIMEOUT_S = 60.0
# AF_UNIX socket paths are limited to 108 bytes; a deep TMPDIR falls back to /tmp.
MAX_SOCKET_PATH = 100
SOCKET_NAME_CHARS = 40  # "/<frontend pid>-<16 hex digits>.sock", with room to spare


def fork_if_worker() -> None:
    """In a process TorchServe started as a worker: run the worker in a fork, then exit as it exits.

    Returns (and the worker starts in this process, as without this module) anywhere else, when
    forking is off, or when no fork server can be reached.
    """
    if not sys.argv or Path(sys.argv[0]).name != WORKER_SCRIPT or os.environ.get(SWITCH, "1") == "0":
        return
    server = None
    try:
        server = connect_to_server()
        request = {"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}
        launcher_exit_fd = os.pidfd_open(os.getpid())  # the worker's way to learn that this process is gone
        try:
            socket.send_fds(server, [json.dumps(request).encode()], [0, 1, 2, launcher_exit_fd])
        finally:
            os.close(launcher_exit_fd)
        reply = json.loads(server.recv(MAX_REQUEST_BYTES))
        if "pid" not in reply:
            raise RuntimeError(reply.get("refused", "no reply"))
        worker_pid = int(reply["pid"])
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        if server is not None:
            server.close()  # a server that forked a worker all the same kills it when this connection ends
        print(f"WARNING: worker fork server unavailable ({error}); starting the worker in this process",
              file=sys.stderr, flush=True)  # fmt: skip
        return
    # The worker alone holds TorchServe's pipes now, so they close the moment it dies, as they would
    # without the fork: TorchServe ends the dead worker's log readers before it starts the next one.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        exit_like(wait_for_worker(server, worker_pid))
    finally:
        os._exit(1)  # whatever happens, never go on to run a second worker in this process


def wait_for_worker(server: socket.socket, worker_pid: int) -> int:
    """The worker's exit code (negative: killed by that signal), as the fork server reports it."""
    with suppress(OSError, ValueError, KeyError):
        return int(json.loads(server.recv(MAX_REQUEST_BYTES))["exit_code"])
    # The fork server is gone, its worker not necessarily: wait for the worker itself.
    with suppress(ProcessLookupError):
        selector = selectors.DefaultSelector()
        selector.register(os.pidfd_open(worker_pid), selectors.EVENT_READ)
        selector.select()
    return 1


def exit_like(exit_code: int) -> None:
    """End this process as the worker ended: with its exit status, or by the signal that killed it."""
    sys.stdout.flush()
    sys.stderr.flush()
    if exit_code < 0:
        with suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset
            signal.signal(-exit_code, signal.SIG_DFL)
        os.kill(os.getpid(), -exit_code)
    os._exit(exit_code if exit_code >= 0 else 128 - exit_code)


# ---------------------------------------------------------------------------------------------
# Finding (or starting) the fork server: the launcher's side


def server_key(python: str, environment: dict[str, str]) -> str:
    """What a fork server must share with a worker: interpreter, environment (but PYTHONPATH), this code."""
    shared_environment = sorted((name, value) for name, value in environment.items() if name != "PYTHONPATH")
    text = json.dumps([python, shared_environment])
    return hashlib.sha256(text.encode() + Path(__file__).read_bytes()).hexdigest()[:16]


def private_directory() -> Path:
    """A directory only this user can enter, for the fork servers' sockets, locks and logs."""
    for base in (os.environ.get("TMPDIR") or "/tmp", "/tmp"):
        directory = Path(base) / f"dlrm-worker-fork-{os.getuid()}"
        if len(str(directory)) + SOCKET_NAME_CHARS <= MAX_SOCKET_PATH:
            break
    directory.mkdir(mode=0o700, exist_ok=True)
    status = directory.lstat()
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise RuntimeError(f"{directory} is not a private directory of this user")
    return directory


def connect_to_server() -> socket.socket:
    """A connection to this frontend's fork server, started first (once, under a lock) if there is none."""
    frontend_pid = os.getppid()
    if frontend_pid == 1:
        raise RuntimeError("no frontend process to tie a fork server to")
    name = f"{frontend_pid}-{server_key(sys.executable, dict(os.environ))}"
    directory = private_directory()
    path = directory / f"{name}.sock"
    try:
        return open_connection(path)
    except OSError:
        pass
    with open(directory / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers starting now wait here for the same server
        try:
            return open_connection(path)
        except OSError:
            pass
        log = directory / f"{name}.log"
        server = start_server(path, frontend_pid, log)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"the fork server exited with {server.returncode}; see {log}")
            try:
                return open_connection(path)
            except OSError:
                time.sleep(0.02)
        server.kill()
        raise RuntimeError(f"the fork server did not listen within {SERVER_START_TIMEOUT_S:.0f} s; see {log}")


def open_connection(path: Path) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.connect(str(path))
    except OSError:
        connection.close()
        raise
    return connection


def start_server(path: Path, frontend_pid: int, log: Path) -> subprocess.Popen[bytes]:
    """The fork server, in this worker's environment without the model's PYTHONPATH, from ``/``.

    ``-P`` keeps this file's directory (the archive's ``torchserve_shims`` package) off its module path.
    """
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    with open(log, "ab") as output:
        return subprocess.Popen(
            [sys.executable, "-P", __file__, "serve", str(path), str(frontend_pid)],
            cwd="/", env=environment, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The fork server


@dataclass
class Worker:
    pid: int
    exit_fd: int  # a pidfd: readable once the worker has exited
    launcher: socket.socket | None  # None once the launcher has gone


class ForkServer:
    """Accepts launchers on a Unix socket and forks one worker for each; one thread, one selector."""

    def __init__(self, path: Path, frontend_pid: int) -> None:
        self.frontend_exit_fd = os.pidfd_open(frontend_pid)
        self.path = path
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.workers: dict[int, Worker] = {}
        self.running = True
        self.refusal: str | None = None  # why this server must not fork (its launchers then start in place)
        # A fresh worker's module path: its script's directory and PYTHONPATH come first (see run_worker).
        self.base_path = list(sys.path)

    def listen(self) -> None:
        """Accept launchers from now on: called once everything is imported, so a connection means ready."""
        self.path.unlink(missing_ok=True)
        self.listener.bind(str(self.path))
        self.listener.listen(64)
        self.selector.register(self.listener, selectors.EVENT_READ, self.accept)
        self.selector.register(self.frontend_exit_fd, selectors.EVENT_READ, self.frontend_exited)

    def serve(self) -> None:
        while self.running:
            for key, _ in self.selector.select():
                key.data(key.fileobj)
                if not self.running:
                    break

    def accept(self, _: object) -> None:
        try:
            connection, _address = self.listener.accept()
        except OSError:  # the launcher gave up before it was accepted
            return
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if int.from_bytes(credentials[4:8], sys.byteorder) != os.getuid():
            connection.close()
            return
        self.selector.register(connection, selectors.EVENT_READ, self.fork_for)

    def fork_for(self, launcher: socket.socket) -> None:
        """Fork a worker with the launcher's standard streams (``fds[:3]``), tied to its pidfd (``fds[3]``)."""
        try:
            message, fds, _flags, _address = socket.recv_fds(launcher, MAX_REQUEST_BYTES, 4)
            request = json.loads(message) if message else None
        except (OSError, ValueError):
            request, fds = None, []
        if request is None or len(fds) != 4 or self.refusal:
            self.selector.unregister(launcher)
            for fd in fds:
                os.close(fd)
            with suppress(OSError):
                launcher.send(json.dumps({"refused": self.refusal or "malformed request"}).encode())
            launcher.close()
            return
        # Forked while the connection is still registered: the child closes it with the server's other descriptors.
        pid = self.fork(lambda: run_worker(request, fds, self.base_path))
        for fd in fds:
            os.close(fd)
        worker = Worker(pid, os.pidfd_open(pid), launcher)
        self.workers[pid] = worker
        self.selector.register(worker.exit_fd, selectors.EVENT_READ, lambda _: self.reap(worker))
        self.selector.modify(launcher, selectors.EVENT_READ, lambda _: self.launcher_gone(worker))
        try:
            launcher.send(json.dumps({"pid": pid}).encode())
        except OSError:  # the launcher was killed while it waited (TorchServe stopping): so must its worker be
            self.launcher_gone(worker)

    def fork(self, run: Callable[[], int]) -> int:
        """Fork; the child drops every descriptor of this server, runs ``run`` and never returns here."""
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        exit_code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.close()
            exit_code = run()
        finally:
            with suppress(OSError, ValueError):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(exit_code)

    def launcher_gone(self, worker: Worker) -> None:
        """The launcher has exited or been killed (TorchServe stopping the worker): so must its worker."""
        if worker.launcher is None:  # reaped earlier in the same round of events
            return
        self.selector.unregister(worker.launcher)
        worker.launcher.close()
        worker.launcher = None
        with suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)

    def reap(self, worker: Worker) -> None:
        """Collect an exited worker and tell its launcher how it ended."""
        _pid, status = os.waitpid(worker.pid, 0)
        self.selector.unregister(worker.exit_fd)
        os.close(worker.exit_fd)
        del self.workers[worker.pid]
        if worker.launcher is not None:
            self.selector.unregister(worker.launcher)
            with suppress(OSError):
                worker.launcher.send(json.dumps({"exit_code": os.waitstatus_to_exitcode(status)}).encode())
            worker.launcher.close()
            worker.launcher = None

    def frontend_exited(self, _: object) -> None:
        """The frontend is gone: its workers are of no use (they exit on their own when its sockets close)."""
        for worker in list(self.workers.values()):
            with suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            os.waitpid(worker.pid, 0)
        self.close()

    def close(self) -> None:
        """Close every descriptor the server holds: all are registered with its selector once it listens (the
        listener, the frontend's pidfd, each worker's pidfd, each launcher's connection, accepted or served)."""
        self.running = False
        for key in list(self.selector.get_map().values()):
            if isinstance(key.fileobj, socket.socket):
                key.fileobj.close()  # the object too, or it would close the number again when collected
            else:
                os.close(key.fd)
        self.workers = {}
        self.selector.close()


def run_worker(request: dict[str, Any], fds: list[int], base_path: list[str]) -> int:
    """In the forked child: become the process TorchServe started, tied to it, then run its worker script."""
    *streams, launcher_exit_fd = fds
    exit_with(launcher_exit_fd)
    for target, fd in enumerate(streams):
        os.dup2(fd, target)
    for fd in streams:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script = request["argv"][0]
    python_path = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    sys.path[:] = [os.path.dirname(script), *python_path, *base_path]
    sys.argv = list(request["argv"])
    import runpy

    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            return exit.code or 0
        print(exit.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def exit_with(launcher_exit_fd: int) -> None:
    """Kill this process once the launcher this pidfd refers to has exited (at once if it already has).

    A thread, so that no order of deaths leaves the worker running: not the launcher's child, it
    cannot ask the kernel for a signal when its launcher dies.
    """

    def watch() -> None:
        poll = select.poll()
        poll.register(launcher_exit_fd, select.POLLIN)
        poll.poll()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def preload() -> None:
    """Import what workers share, leaving logging as a fresh interpreter has it (the worker configures it)."""
    handlers = list(logging.root.handlers)
    for module in PRELOADED:
        __import__(module)
    for handler in logging.root.handlers[len(handlers) :]:
        logging.root.removeHandler(handler)


def open_files() -> list[str]:
    """What this process's file descriptors refer to."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return targets


def fork_hazard(open_files: list[str]) -> str | None:
    """Why a process with these files open must not fork workers, if it must not.

    A process that has opened the GPU driver (an import that initialised CUDA) cannot hand a
    working CUDA to a forked child; its workers must start on their own.
    """
    devices = sorted({path for path in open_files if path.startswith(("/dev/nvidia", "/dev/dri", "/dev/kfd"))})
    return f"the fork server has GPU devices open ({', '.join(devices)})" if devices else None


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] != "serve":
        sys.exit(f"usage: python -P {Path(__file__).name} serve SOCKET FRONTEND_PID")
    path = Path(argv[1])
    server = ForkServer(path, int(argv[2]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped with its process group
    with suppress(SystemExit):
        preload()
        server.refusal = fork_hazard(open_files())
        server.listen()
        print(f"fork server {os.getpid()} for frontend {argv[2]}: preloaded {', '.join(PRELOADED)}", flush=True)
        server.serve()
    # A clean exit leaves nothing behind; after an error, the log stays with its traceback.
    for suffix in (".sock", ".lock", ".log"):
        path.with_suffix(suffix).unlink(missing_ok=True)


if __name__ == "__main__":
    main(sys.argv[1:])
