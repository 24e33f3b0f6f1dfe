"""Shared fixtures: a small seeded model artifact, an archive built by build_mar.py, a real TorchServe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from torchrec.models.dlrm import DLRM

from model_archive.contents import extracted
from model_factory.artifact import ModelArtifact, Provenance, load_model, write_artifact
from model_factory.config import DLRMConfig, preset
from model_factory.factory import build_dlrm, init_weights
from servers.torchserve import TorchServeProcess
from tests.archives import TEST_BATCH_SIZE, TEST_MAX_BATCH_DELAY_MS, TEST_MAX_ROWS, build_archive


@pytest.fixture(scope="session")
def small_config() -> DLRMConfig:
    return preset("small")


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory, small_config: DLRMConfig) -> Path:
    directory = tmp_path_factory.mktemp("artifact")
    model = init_weights(build_dlrm(small_config), seed=7)
    write_artifact(directory, ModelArtifact(small_config, Provenance(trained=False, seed=7)), model)
    return directory


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    result = build_archive(
        store / "dlrm.mar",
        "--seed", "3",
        "--max-rows", str(TEST_MAX_ROWS),
        "--batch-size", str(TEST_BATCH_SIZE),
        "--max-batch-delay", str(TEST_MAX_BATCH_DELAY_MS),
        "--metrics-flush-seconds", "0",  # counters current after every batch, for the batching tests
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return store


@pytest.fixture(scope="session")
def served_model(model_store: Path) -> tuple[DLRM, ModelArtifact]:
    """The model exactly as archived, loaded in-process from the extracted archive."""
    with extracted(model_store / "dlrm.mar") as directory:
        return load_model(directory)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[TorchServeProcess]:
    with TorchServeProcess(model_store, "dlrm=dlrm.mar", tmp_path_factory.mktemp("torchserve")) as instance:
        instance.wait_ready()
        yield instance


@pytest.fixture()
def predict(server: TorchServeProcess):
    session = requests.Session()

    def post(body: bytes, content_type: str = "application/json") -> requests.Response:
        return session.post(
            f"{server.endpoints.inference}/predictions/dlrm",
            data=body,
            headers={"Content-Type": content_type},
            timeout=30,
        )

    yield post
    session.close()
