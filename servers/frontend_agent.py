"""Build the TorchServe frontend agent of ``frontend_agent/`` (a jar) with the JDK's ``javac``.

The agent gives TorchServe 0.12 the Open Inference Protocol's model metadata and model
readiness routes (``GET /v2/models/{m}[/versions/{v}][/ready]``) and its standard gRPC service
(``inference.GRPCInferenceService``, which ``tritonclient.grpc`` and KServe's client call), and
restarts a dead worker at once the first time (not after TorchServe's one-second back-off); the
Java sources say how and why, docs/torchserve-internals.md what of TorchServe they rely on.
``config.properties`` loads it through ``vmargs=-javaagent:...``, so it must exist
before TorchServe starts: ``make install`` builds it, :class:`~servers.torchserve.TorchServeProcess`
rebuilds it when a source changed, the container image builds it in its build stage.

    python -m servers.frontend_agent [--output JAR]

Stdlib only, so that the container's build stage runs it before anything else is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

SOURCES = Path(__file__).resolve().parent.parent / "frontend_agent" / "src"
AGENT_JAR = SOURCES.parent / "build" / "dlrm-frontend-agent.jar"
AGENT_CLASS = "dlrm.agent.FrontendAgent"
# The class the agent replaces: stored in the jar under a resource name, not as a class on the classpath.
REPLACED_CLASS = "org/pytorch/serve/http/api/rest/OpenInferenceProtocolRequestHandler.class"
REPLACEMENT_RESOURCE = "replacement/OpenInferenceProtocolRequestHandler.class.bin"


def torchserve_jar() -> Path:
    """The installed TorchServe frontend the agent is compiled against."""
    spec = importlib.util.find_spec("ts")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("torchserve is not installed in this Python environment")
    jar = Path(spec.origin).parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise FileNotFoundError(f"TorchServe's frontend jar is missing: {jar}")
    return jar


def is_current(jar: Path = AGENT_JAR) -> bool:
    """Whether ``jar`` is newer than every source and than the TorchServe jar it was compiled against."""
    if not jar.is_file():
        return False
    built = jar.stat().st_mtime
    inputs = [*SOURCES.rglob("*.java"), torchserve_jar()]
    return all(path.stat().st_mtime < built for path in inputs)


def build_agent(jar: Path = AGENT_JAR) -> Path:
    """Compile the sources and write the agent jar (atomically: a running TorchServe keeps its open copy)."""
    javac = shutil.which("javac")
    if javac is None:
        raise FileNotFoundError(
            "building the TorchServe frontend agent needs a JDK: apt-get install openjdk-17-jdk-headless"
        )
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".agent-", dir=jar.parent) as tmp:
        classes = Path(tmp) / "classes"
        sources = sorted(str(path) for path in SOURCES.rglob("*.java"))
        command = [javac, "--release", "17", "-Xlint:all", "-Werror", "-cp", str(torchserve_jar()), "-d", str(classes)]
        subprocess.run([*command, *sources], check=True)
        staged = Path(tmp) / jar.name
        manifest = f"Manifest-Version: 1.0\nPremain-Class: {AGENT_CLASS}\nCreated-By: servers/frontend_agent.py\n"
        with zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("META-INF/MANIFEST.MF", manifest)
            for path in sorted(classes.rglob("*.class")):
                name = path.relative_to(classes).as_posix()
                archive.write(path, REPLACEMENT_RESOURCE if name == REPLACED_CLASS else name)
        os.replace(staged, jar)
    return jar


def agent_jar() -> Path:
    """The agent jar, built first if it is missing or older than its sources."""
    return AGENT_JAR if is_current() else build_agent()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=AGENT_JAR, help=f"the jar to write (default: {AGENT_JAR})")
    args = parser.parse_args()
    print(build_agent(args.output))


if __name__ == "__main__":
    main()
