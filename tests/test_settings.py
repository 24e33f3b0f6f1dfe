"""The archive's serving settings: one typed object from build_mar.py to the handler and the container."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.container.entrypoint import overrides_from, rewrite_archive
from handler.settings import ServingSettings, SettingsError
from model_archive.contents import file_names, read_file, serving_settings


def test_model_yaml_round_trip() -> None:
    settings = ServingSettings(workers=3, batch_size=8, max_batch_delay_ms=5, threads=2, max_rows=10)
    assert ServingSettings.from_model_yaml(settings.to_model_yaml()) == settings
    assert ServingSettings.from_model_yaml(None) == ServingSettings()


def test_threads_are_written_only_when_chosen() -> None:
    assert "num_threads" not in ServingSettings().to_model_yaml()["handler"]
    assert ServingSettings(threads=3).to_model_yaml()["handler"]["num_threads"] == 3
    assert ServingSettings(threads=3).threads_per_worker() == 3
    assert ServingSettings(workers=64).threads_per_worker() >= 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workers": 0}, "workers must be at least 1"),
        ({"max_rows": -1}, "max_rows must be at least 1"),
        ({"max_batch_delay_ms": -1}, "max_batch_delay_ms must not be negative"),
        ({"batch_size": "32"}, "batch_size must be a number"),
        ({"batch_size": 2.5}, "batch_size must be a number"),
        ({"threads": True}, "threads must be a number"),
    ],
)
def test_out_of_range_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        ServingSettings(**values)


def test_container_entry_point_rewrites_a_copy_of_the_archive(model_store: Path, tmp_path: Path) -> None:
    archive = model_store / "dlrm.mar"
    overrides = overrides_from({"DLRM_WORKERS": "3", "DLRM_THREADS": "1", "DLRM_MAX_BATCH_DELAY": " 7 "})
    before = read_file(archive, "weights.pt")
    rewrite_archive(archive, tmp_path / "dlrm.mar", overrides)
    rewritten = serving_settings(tmp_path / "dlrm.mar")
    assert rewritten == ServingSettings(
        workers=3, threads=1, batch_size=16, max_batch_delay_ms=7, max_rows=64, metrics_flush_seconds=0.0
    )
    assert yaml.safe_load(read_file(tmp_path / "dlrm.mar", "model-config.yaml"))["maxWorkers"] == 3
    assert file_names(tmp_path / "dlrm.mar") == file_names(archive)
    assert read_file(tmp_path / "dlrm.mar", "weights.pt") == before
    assert serving_settings(archive).workers == 2  # the original is never modified


@pytest.mark.parametrize(("environ", "message"), [({"DLRM_WORKERS": "two"}, "DLRM_WORKERS must be an integer")])
def test_container_entry_point_refuses_bad_variables(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        overrides_from(environ)


def test_container_entry_point_names_an_out_of_range_variable(model_store: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="DLRM_WORKERS: workers must be at least 1"):
        rewrite_archive(model_store / "dlrm.mar", tmp_path / "dlrm.mar", overrides_from({"DLRM_WORKERS": "0"}))
