import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from handler.settings import ServingSettings
from model_archive.contents import (
    MANIFEST,
    MODEL_YAML,
    extracted,
    file_names,
    model_artifact,
    read_file,
    serving_settings,
)
from model_factory.config import DLRMConfig
from model_factory.factory import build_dlrm, init_weights
from servers.torchserve import REPO_ROOT
from tests.archives import build_archive, served_weights

# Exactly what a worker needs: the model artifact, TorchServe's files, the two packages the handler
# imports and the runtime shims with their start-up hook (serving code only: no trainer, data reader or
# benchmark).
ARTIFACT_FILES = {
    "MAR-INF/MANIFEST.json",
    "dlrm_handler.py",
    "model-config.yaml",
    "model_config.json",
    "oip-metadata.json",
    "tables.bin",
    "weights.pt",
}
SERVED_PACKAGES = ("handler", "model_factory", "torchserve_shims")
STARTUP_HOOK = "sitecustomize.py"  # at the archive's top level only, where Python finds it


def test_archive_holds_only_serving_code(model_store: Path) -> None:
    names = file_names(model_store / "dlrm.mar")
    code = {name for name in names if name.endswith(".py")} - {"dlrm_handler.py"}
    checkout = {
        path.relative_to(REPO_ROOT).as_posix()
        for package in SERVED_PACKAGES
        for path in (REPO_ROOT / package).rglob("*.py")
        if path.name != STARTUP_HOOK
    }
    assert names == ARTIFACT_FILES | checkout | {STARTUP_HOOK}
    assert code == checkout | {STARTUP_HOOK}
    assert not any(name.startswith(("training/", "bench/", "servers/", "tests/")) for name in names)


def test_archive_contents_and_settings(model_store: Path) -> None:
    archive = model_store / "dlrm.mar"
    manifest = json.loads(read_file(archive, MANIFEST))
    settings = yaml.safe_load(read_file(archive, MODEL_YAML))
    artifact = json.loads(read_file(archive, "model_config.json"))
    assert serving_settings(archive) == ServingSettings(
        batch_size=16, max_batch_delay_ms=100, max_rows=64, metrics_flush_seconds=0.0
    )
    assert manifest["model"]["handler"] == "dlrm_handler.py"
    assert manifest["model"]["serializedFile"] == "weights.pt"
    assert settings["batchSize"] == 16 and settings["maxBatchDelay"] == 100
    assert settings["minWorkers"] == settings["maxWorkers"] == 2
    assert settings["handler"] == {"max_rows_per_request": 64, "metrics_flush_seconds": 0.0}
    assert artifact["provenance"] == {"trained": False, "seed": 3, "checkpoint": None, "metrics": None}
    assert artifact["model"]["embedding_dim"] == 16


def test_archive_is_self_contained(model_store: Path, tmp_path: Path) -> None:
    """The handler imports only what the archive carries, not this checkout."""
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import dlrm_handler, handler.json_rows, model_factory.factory;"
        "paths = [m.__file__ for m in sys.modules.values() if m.__name__.split('.')[0] in "
        "('dlrm_handler', 'handler', 'model_factory', 'training', 'servers', 'model_archive', 'bench')];"
        "assert all(p.startswith(sys.argv[1]) for p in paths), paths"
    )
    with extracted(model_store / "dlrm.mar") as directory:
        result = subprocess.run(
            [sys.executable, "-I", "-c", probe, str(directory)], cwd=tmp_path, capture_output=True, text=True
        )
    assert result.returncode == 0, result.stderr


def test_checkpoint_file_is_archived_as_trained(tmp_path: Path, small_config: DLRMConfig) -> None:
    checkpoint = tmp_path / "trained.pt"
    state = init_weights(build_dlrm(small_config), seed=11).state_dict()
    torch.save(state, checkpoint)
    result = build_archive(tmp_path / "out" / "dlrm.mar", "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stderr
    archive = tmp_path / "out" / "dlrm.mar"
    artifact = model_artifact(archive)
    assert artifact.provenance.trained is True
    assert artifact.provenance.checkpoint == "trained.pt"
    with extracted(archive) as directory:
        archived = served_weights(directory)
    assert archived.keys() == state.keys()
    assert all(torch.equal(archived[key], value) for key, value in state.items())


def test_mismatched_checkpoint_fails_before_archiving(tmp_path: Path) -> None:
    checkpoint = tmp_path / "kaggle_shaped.pt"
    torch.save({"not": torch.zeros(1)}, checkpoint)
    result = build_archive(tmp_path / "dlrm.mar", "--checkpoint", str(checkpoint))
    assert result.returncode != 0
    assert "Missing key" in result.stderr or "Unexpected key" in result.stderr
    assert not (tmp_path / "dlrm.mar").exists()


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "payload": Path("/")}, checkpoint)  # a non-tensor object
    result = build_archive(tmp_path / "dlrm.mar", "--checkpoint", str(checkpoint))
    assert result.returncode != 0
    assert "weights_only" in result.stderr.lower() or "unsupported global" in result.stderr.lower()


@pytest.mark.parametrize(
    ("content", "message"),
    [("1\t2\n", "bad.tsv:1: expected 40 tab-separated fields"), ("", "bad.tsv has no rows for a golden set")],
)
def test_malformed_golden_set_is_refused_with_its_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.tsv").write_text(content)
    result = build_archive(tmp_path / "dlrm.mar", "--golden-set", str(tmp_path / "bad.tsv"))
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "dlrm.mar").exists()


@pytest.mark.parametrize(
    "args", [["--output", "dlrm.zip"], ["--batch-size", "0"], ["--preset", "nope"], ["--golden-rows", "0"]]
)
def test_invalid_arguments_are_refused(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "build_mar.py", *args], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "error" in result.stderr


def test_help_documents_every_flag() -> None:
    result = subprocess.run(
        [sys.executable, "build_mar.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    flags = (
        "--preset", "--config", "--checkpoint", "--seed", "--output", "--version", "--archive-format",
        "--quantize", "--quantize-table", "--quantize-mlp", "--batch-size", "--max-batch-delay", "--workers",
        "--threads", "--max-rows", "--response-timeout", "--startup-timeout", "--metrics-flush-seconds",
        "--golden-set", "--golden-rows", "--shard-tables-gpus",
    )  # fmt: skip
    for flag in flags:
        assert flag in result.stdout


def test_a_build_leaves_other_builds_files_in_the_temporary_directory_alone(tmp_path: Path) -> None:
    """torch-model-archiver gathers an archive's files in ``$TMPDIR/<model name>`` after deleting what is
    there: two builds of one model name at once (tests, a rollout's build beside another) deleted each
    other's files. Each build gives the archiver a private temporary directory."""
    shared_tmp = tmp_path / "tmp"
    other_build = shared_tmp / "dlrm"
    other_build.mkdir(parents=True)
    (other_build / "weights.pt").write_bytes(b"another build's file")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "build_mar.py"), "--output", str(tmp_path / "dlrm.mar"), "--seed", "1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(shared_tmp)},
    )
    assert result.returncode == 0, result.stderr
    assert (other_build / "weights.pt").read_bytes() == b"another build's file"
