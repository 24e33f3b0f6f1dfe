"""Make the venv's ``torchserve`` launcher read the ``config.properties`` that TorchServe's Java frontend reads.

TorchServe 0.12 reads its configuration in two places. The Java frontend reads
``TS_CONFIG_FILE``, else ``--ts-config``, else ``./config.properties``. The Python
launcher (``ts/model_server.py``) reads only the first two, and takes the JVM options
(``vmargs``: here the frontend agent and ``log4j2.xml``) from that file alone. So the
README's start command, ``torchserve --start --ncs --model-store model_store --models
dlrm=dlrm.mar``, run from the repository root without ``.venv/bin/activate`` (which
exports ``TS_CONFIG_FILE``), by a unit file, a script or an image that only sets
``PATH``, served without the agent (no Open Inference Protocol model metadata or
readiness routes), and said nothing.

``make install`` copies this file into the venv's site-packages as
``dlrm_torchserve_launcher.py``, with a ``.pth`` line that calls :func:`configure`
whenever an interpreter of the venv starts: a ``.pth`` is the start-up hook Python
offers, while the ``torchserve`` console script belongs to pip, which rewrites it.
:func:`configure` returns at once unless the process is the ``torchserve`` launcher,
started with neither ``TS_CONFIG_FILE`` nor ``--ts-config`` from a directory that
holds a ``config.properties``. Then it points ``TS_CONFIG_FILE`` at that file, the
one the frontend reads anyway, and sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set,
as the activated venv does (idle OpenMP threads in the workers sleep instead of
spinning on the frontend's cores).

``os`` and ``sys`` only: every interpreter of the venv imports this module.
"""

import os
import sys

CONFIG_FILE = "config.properties"


def configure() -> None:
    """Set ``TS_CONFIG_FILE`` for the torchserve launcher when it would drop ``./config.properties``' vmargs."""
    argv = getattr(sys, "argv", None)  # absent in an embedded interpreter
    if not argv or os.path.basename(argv[0]) != "torchserve" or "TS_CONFIG_FILE" in os.environ:
        return
    if any(names_ts_config(arg) for arg in argv[1:]):
        return
    try:
        config = os.path.join(os.getcwd(), CONFIG_FILE)
    except OSError:  # the working directory is gone
        return
    if os.path.isfile(config):
        os.environ["TS_CONFIG_FILE"] = config
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def names_ts_config(arg: str) -> bool:
    """Whether a launcher argument is ``--ts-config``: argparse takes any unambiguous prefix, down to ``--t``."""
    name = arg.split("=", 1)[0]
    return len(name) >= 3 and "--ts-config".startswith(name)
