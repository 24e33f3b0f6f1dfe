"""The nginx load balancer of deploy/nginx: render its site config and run it as a plain process.

``deploy/nginx/dlrm.conf.template`` is the one source of the load balancer's
settings. The nginx image renders it from the environment (deploy/compose.yaml);
``render_site`` renders it for given replica addresses, for hosts without
containers and for the tests, which run :class:`NginxProcess` (nginx in the
foreground with its own prefix, pid file, logs and temporary files, never the
system's nginx service) in front of real TorchServe instances.

    python -m servers.nginx render --upstream 10.0.0.5:8080 --upstream 10.0.0.6:8080 --listen 8000
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from servers.torchserve import LOOPBACK, free_port

SITE_TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "dlrm.conf.template"
UPSTREAM = "${DLRM_UPSTREAM}"
LISTEN = "${DLRM_LISTEN}"


@dataclass(frozen=True)
class ClientLimits:
    """What one client address may send through nginx; the defaults are deploy/compose.yaml's (the template
    explains them). Beyond them nginx answers 429."""

    rate: int = 5000  # requests per second
    burst: int = 5000  # requests beyond the rate answered at once
    connections: int = 64  # requests in flight

    def placeholders(self) -> dict[str, str]:
        """The template's placeholder for each limit, with its value."""
        return {f"${{DLRM_CLIENT_{name.upper()}}}": str(value) for name, value in asdict(self).items()}


def render_site(upstreams: Sequence[str], listen: str, limits: ClientLimits = ClientLimits()) -> str:
    """The site config for these replica addresses (the template's server line once per address)."""
    if not upstreams:
        raise ValueError("at least one upstream address is needed")
    values = {LISTEN: listen, **limits.placeholders()}
    lines = []
    for line in SITE_TEMPLATE.read_text().splitlines(keepends=True):
        if line.lstrip().startswith("#"):
            lines.append(line)
        elif UPSTREAM in line:
            lines.extend(line.replace(UPSTREAM, address) for address in upstreams)
        else:
            for placeholder, value in values.items():
                line = line.replace(placeholder, value)
            lines.append(line)
            if "${DLRM_" in line:
                raise ValueError(f"{SITE_TEMPLATE} has a placeholder that render_site does not fill: {line.strip()}")
    return "".join(lines)


class NginxProcess:
    """nginx in the foreground of its own process group, serving the rendered site on a loopback port."""

    def __init__(
        self, upstreams: Sequence[str], workdir: Path, port: int | None = None, limits: ClientLimits = ClientLimits()
    ) -> None:
        self.upstreams = list(upstreams)
        self.workdir = workdir.resolve()
        self.port = port or free_port()
        self.limits = limits
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    def write_config(self) -> Path:
        """The site (the shipped template, listening on loopback) inside a main config of this prefix."""
        site = self.workdir / "dlrm.conf"
        site.write_text(render_site(self.upstreams, f"{LOOPBACK}:{self.port}", self.limits))
        temp = {name: self.workdir / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        # As root, nginx's workers would switch to an unprivileged user that cannot use this work directory.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
        config = self.workdir / "nginx.conf"
        config.write_text(
            f"daemon off;\n{user}worker_processes 2;\npid {self.workdir / 'nginx.pid'};\n"
            f"error_log {self.error_log} notice;\n"
            "events { worker_connections 1024; }\n"
            "http {\n    access_log off;\n"
            + "".join(f"    {name}_temp_path {path};\n" for name, path in temp.items())
            + f"    include {site};\n}}\n"
        )
        return config

    def start(self) -> NginxProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        command = [nginx_executable(), "-p", str(self.workdir), "-c", str(config), "-e", str(self.error_log)]
        checked = subprocess.run([*command, "-t", "-q"], capture_output=True, text=True)
        if checked.returncode != 0:
            raise RuntimeError(f"nginx refuses the configuration {config}:\n{checked.stderr}")
        with open(self.access_log, "ab") as access_log:
            self.process = subprocess.Popen(
                command, stdout=access_log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_listening()
        except BaseException:
            self.stop()  # a context manager's __exit__ does not run when __enter__ fails
            raise
        return self

    def _wait_listening(self, timeout: float = 10.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.error_log.read_text()}")
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"nginx is not listening on {self.port} after {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGQUIT lets workers finish their requests), then SIGKILL to the group."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def __enter__(self) -> NginxProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def nginx_path() -> str | None:
    """nginx from PATH, or from /usr/sbin where Debian installs it (often not on a user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def nginx_executable() -> str:
    found = nginx_path()
    if found is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx)")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="print the site config (an nginx http-context file)")
    render.add_argument("--upstream", action="append", required=True, help="host:port of a replica; repeat")
    render.add_argument("--listen", default="8080", help="port or address:port nginx listens on (default: 8080)")
    defaults = ClientLimits()
    for name, value in asdict(defaults).items():
        render.add_argument(f"--client-{name}", type=int, default=value, help=f"ClientLimits.{name} (default: {value})")
    args = parser.parse_args()
    limits = ClientLimits(args.client_rate, args.client_burst, args.client_connections)
    print(render_site(args.upstream, args.listen, limits), end="")


if __name__ == "__main__":
    main()
