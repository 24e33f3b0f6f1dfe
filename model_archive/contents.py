"""Read a model archive built by ``build_mar.py``, zipped (``dlrm.mar``) or not (a model directory).

Tests, benchmarks and tools go through these helpers instead of opening
archives themselves; nothing here ever writes into an archive.
"""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from handler.settings import ServingSettings
from model_factory.artifact import CONFIG_FILE, ModelArtifact

MANIFEST = "MAR-INF/MANIFEST.json"
MODEL_YAML = "model-config.yaml"


def unzipped_path(archive: Path) -> Path:
    """Where a ``no-archive`` build of ``archive`` lives: ``model_store/dlrm.mar`` → ``model_store/dlrm``."""
    return archive.with_suffix("") if archive.suffix == ".mar" else archive


def _location(archive: Path) -> Path:
    """The archive itself: the ``.mar`` file if there is one, else its unzipped directory."""
    if archive.is_file() or archive.is_dir():
        return archive
    directory = unzipped_path(archive)
    if directory.is_dir():
        return directory
    raise FileNotFoundError(f"no model archive at {archive} (nor an unzipped one at {directory})")


def file_names(archive: Path) -> set[str]:
    """Every file in the archive, as relative POSIX paths."""
    location = _location(archive)
    if location.is_dir():
        return {path.relative_to(location).as_posix() for path in location.rglob("*") if path.is_file()}
    with zipfile.ZipFile(location) as zipped:
        return {name for name in zipped.namelist() if not name.endswith("/")}


def read_file(archive: Path, name: str) -> bytes:
    """One file of the archive, without extracting the others."""
    location = _location(archive)
    if location.is_dir():
        return (location / name).read_bytes()
    with zipfile.ZipFile(location) as zipped:
        return zipped.read(name)


def serving_settings(archive: Path) -> ServingSettings:
    return ServingSettings.from_model_yaml(yaml.safe_load(read_file(archive, MODEL_YAML)))


def model_artifact(archive: Path) -> ModelArtifact:
    """The archive's model description (shape, preprocessing, quantization, provenance)."""
    return ModelArtifact.from_json(read_file(archive, CONFIG_FILE))


@contextmanager
def extracted(archive: Path) -> Iterator[Path]:
    """A directory holding the archive's files, as a TorchServe worker sees them (its ``model_dir``).

    An unzipped archive is used in place; a ``.mar`` is extracted to a temporary
    directory that is removed on exit.
    """
    location = _location(archive)
    if location.is_dir():
        yield location
        return
    with tempfile.TemporaryDirectory(prefix="dlrm-archive-") as directory, zipfile.ZipFile(location) as zipped:
        zipped.extractall(directory)
        yield Path(directory)
