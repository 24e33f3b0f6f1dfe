"""Container entry point: apply the DLRM_* settings of the environment to the model archive, then run TorchServe.

TorchServe 0.12 takes workers and batching from the archive's model-config.yaml, and
those win over config.properties and over every TS_* variable (for instance
TS_DEFAULT_WORKERS_PER_MODEL does nothing for an archive that sets minWorkers). So the
settings an operator chooses at `docker run` time are written into a copy of the archive
before TorchServe starts; without any of them the image's archive is served as built.
The copy has one fixed place, SETTINGS_STORE (in the temporary directory, $TMPDIR or
/tmp), which each start replaces; and what TorchServe extracted from the archive at an
earlier start goes before it extracts it again: restarts never pile up copies of a large
archive.

    DLRM_WORKERS          worker processes (minWorkers = maxWorkers)
    DLRM_THREADS          torch threads per worker (default: usable cores / workers)
    DLRM_BATCH_SIZE       requests TorchServe batches into one forward pass
    DLRM_MAX_BATCH_DELAY  milliseconds TorchServe waits to fill a batch

TS_* variables override config.properties as usual (enable_envvars_config=true), e.g.
TS_INFERENCE_ADDRESS, which the image sets to http://0.0.0.0:8080.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from handler.settings import ServingSettings, SettingsError

ARCHIVE = Path("/opt/dlrm/model_store/dlrm.mar")
# The model store of the archive with the DLRM_* settings applied (the image's own is read-only).
SETTINGS_STORE = Path(tempfile.gettempdir()) / "dlrm-model-store"
# Where TorchServe extracts a zipped archive at every start, each time under a new random name, and
# never removes it: Java's temporary directory, which TorchServe's launcher sets to $TEMP (Java's
# default, /tmp, without it; TMPDIR plays no part).
TORCHSERVE_EXTRACTIONS = Path(os.environ.get("TEMP") or "/tmp") / "models"
MANIFEST = "MAR-INF/MANIFEST.json"
# Each variable and the ServingSettings field it sets.
VARIABLES = {
    "DLRM_WORKERS": "workers",
    "DLRM_THREADS": "threads",
    "DLRM_BATCH_SIZE": "batch_size",
    "DLRM_MAX_BATCH_DELAY": "max_batch_delay_ms",
}


def overrides_from(environ: Mapping[str, str]) -> dict[str, int]:
    """The ServingSettings fields that ``environ``'s DLRM_* variables set; exits naming a bad one."""
    overrides = {}
    for name, setting in VARIABLES.items():
        text = environ.get(name, "").strip()
        if not text:
            continue
        try:
            overrides[setting] = int(text)
        except ValueError:
            sys.exit(f"{name} must be an integer, got {text!r}")
    return overrides


def apply(settings: ServingSettings, overrides: Mapping[str, int]) -> ServingSettings:
    """``settings`` with ``overrides``; exits with the setting's own message when one is out of range."""
    try:
        return replace(settings, **overrides)
    except SettingsError as error:
        names = {setting: name for name, setting in VARIABLES.items()}
        variable = next((names[setting] for setting in overrides if str(error).startswith(setting)), "DLRM_*")
        sys.exit(f"{variable}: {error}")


def rewrite_archive(source: Path, destination: Path, overrides: Mapping[str, int]) -> dict[str, Any]:
    """Copy the archive ``source`` to ``destination`` with ``overrides`` applied to its model-config.yaml.

    The other entries are streamed, so a large archive costs disk and time but not memory.
    """
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w") as copy:
        config_name = json.loads(original.read(MANIFEST))["model"].get("configFile", "model-config.yaml")
        original_yaml = yaml.safe_load(original.read(config_name)) or {}
        settings = apply(ServingSettings.from_model_yaml(original_yaml), overrides)
        model_yaml = {**original_yaml, **settings.to_model_yaml()}
        for entry in original.infolist():
            if entry.filename == config_name:
                copy.writestr(copied_info(entry), yaml.safe_dump(model_yaml, sort_keys=False))
                continue
            with original.open(entry) as reader, copy.open(copied_info(entry), "w") as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
    return model_yaml


def copied_info(entry: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A new header for ``entry`` (writing mutates a ZipInfo, and ``entry`` still describes the original)."""
    info = zipfile.ZipInfo(entry.filename, entry.date_time)
    info.compress_type = entry.compress_type
    info.external_attr = entry.external_attr
    info.file_size = entry.file_size  # lets zipfile choose ZIP64 for entries over 2 GiB
    return info


def model_store(environ: Mapping[str, str], archive: Path = ARCHIVE, settings_store: Path = SETTINGS_STORE) -> Path:
    """The model store to serve ``archive`` from: its own directory, or with DLRM_* settings ``settings_store``.

    The settings' copy replaces the previous start's: the old one goes first (TorchServe is not running
    yet, and a full-size archive is GBs, so two must not coexist), the new one is written beside it
    under a temporary name and renamed into place once complete.
    """
    overrides = overrides_from(environ)
    if not overrides:
        return archive.parent
    settings_store.mkdir(mode=0o700, exist_ok=True)
    served = settings_store / archive.name
    served.unlink(missing_ok=True)
    partial = settings_store / f".{archive.name}.partial"
    model_yaml = rewrite_archive(archive, partial, overrides)
    os.replace(partial, served)
    print(f"serving {archive.name} with {json.dumps(model_yaml)}", flush=True)
    return settings_store


def remove_earlier_extractions(directory: Path = TORCHSERVE_EXTRACTIONS) -> None:
    """Remove the archives TorchServe extracted at earlier starts of this container: it is not running yet,
    and it never reads them again (a full-size model's extraction is GBs)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(directory)


def main() -> None:
    remove_earlier_extractions()
    command = [
        "torchserve", "--start", "--foreground", "--ncs",
        "--model-store", str(model_store(os.environ)), "--models", f"dlrm={ARCHIVE.name}",
    ]  # fmt: skip
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
