"""Model files are replaced whole, never rewritten in place (model_factory/files.py).

A worker maps ``tables.bin`` (and ``weights.pt``): a file truncated under it kills it with
``SIGBUS``, one rewritten under it changes its scores. These tests hold the old file the way a
worker does (a process that mapped the tables, or an open descriptor) while it is rewritten, by a
write that fails half-way and by one that succeeds, and check that the holder still reads the old
bytes, that the path has the new ones, and that nothing is left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from model_archive.build import ArchiveFormat, BuildOptions, build_archive
from model_factory.artifact import (
    TABLES_FILE,
    WEIGHTS_FILE,
    ModelArtifact,
    Provenance,
    load_model,
    save_state_dict,
    write_artifact,
)
from model_factory.config import DLRMConfig
from model_factory.files import write_file
from model_factory.quantization import QuantizationSpec, TableDtype
from model_factory.random_tables import random_quantized_model
from model_factory.table_file import StoredTable, write_table_file
from servers.torchserve import REPO_ROOT

SPEC = QuantizationSpec(TableDtype.INT8)
# Two tables of 2^14 rows: a table file of many pages, a second table to fail on.
CONFIG = DLRMConfig(
    num_embeddings_per_feature=(2**14, 2**14),
    embedding_dim=16,
    dense_arch_layer_sizes=(16,),
    over_arch_layer_sizes=(4, 1),
    dense_feature_names=("int_0",),
    sparse_feature_names=("cat_0", "cat_1"),
)

# A worker's view: the artifact loaded (its tables mapped), then, for each line read, what the mapped
# tables hold (all of their bytes, read again) and the scores of fixed rows.
READER = """
import hashlib, sys
from pathlib import Path
import numpy as np, torch
from model_factory.artifact import load_model
from model_factory.features import rows_to_kjt
from training.synthetic import random_inputs
model, artifact = load_model(Path(sys.argv[1]))
dense, lengths, values = random_inputs(artifact.model, 32, np.random.default_rng(0), num_indices_per_lookup=2)
features = rows_to_kjt(artifact.model.sparse_feature_names, lengths, values)
for _ in sys.stdin:
    tables = b"".join(m.weights_host.numpy().tobytes() for m in model.sparse_arch.embedding_bag_collection._emb_modules)
    with torch.inference_mode():
        scores = model(torch.from_numpy(dense), features).squeeze(1).tolist()
    print(hashlib.sha256(tables).hexdigest(), scores, flush=True)
"""


def write_quantized(directory: Path, seed: int) -> None:
    artifact = ModelArtifact(CONFIG, Provenance(trained=False, seed=seed), quantization=SPEC)
    write_artifact(directory, artifact, random_quantized_model(CONFIG, SPEC, seed))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def ask(reader: subprocess.Popen[str]) -> str:
    assert reader.stdin is not None and reader.stdout is not None
    reader.stdin.write("\n")
    reader.stdin.flush()
    return reader.stdout.readline()


def test_a_process_that_maps_the_tables_reads_the_old_ones_through_a_failed_and_a_done_rewrite(
    tmp_path: Path,
) -> None:
    write_quantized(tmp_path, seed=1)
    before = snapshot(tmp_path)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(tmp_path)],
        cwd=REPO_ROOT, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        mapped = ask(reader)
        assert mapped, "the reader did not start"
        # A rewrite that fails after the first table: the file, and what the mapping holds, stay as they were.
        layout = ModelArtifact(CONFIG, Provenance(False, 2), quantization=SPEC).table_file()

        def rows_of(table: StoredTable) -> torch.Tensor:  # the first table's rows, then a failure
            if table.name != layout.tbes[0].tables[0].name:
                raise RuntimeError("failed half-way")
            return torch.ones((table.rows, table.row_bytes), dtype=torch.uint8)

        with pytest.raises(RuntimeError, match="failed half-way"):
            write_table_file(layout, tmp_path / TABLES_FILE, rows_of)
        assert ask(reader) == mapped, f"the reader ended with {reader.wait(10)}"  # -7: SIGBUS, the file truncated
        assert snapshot(tmp_path) == before
        # A rewrite that succeeds: new files at the paths, the old tables in the mapping.
        write_quantized(tmp_path, seed=2)
        after = snapshot(tmp_path)
        assert after.keys() == before.keys() and after[TABLES_FILE] != before[TABLES_FILE]
        assert ask(reader) == mapped
    finally:
        assert reader.stdin is not None
        reader.stdin.close()
        reader.wait(timeout=30)
    assert reader.returncode == 0
    model, _ = load_model(tmp_path)  # a worker started now loads the new tables
    fresh = b"".join(m.weights_host.numpy().tobytes() for m in model.sparse_arch.embedding_bag_collection._emb_modules)
    assert fresh == after[TABLES_FILE]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    weights = tmp_path / WEIGHTS_FILE
    save_state_dict(weights, {"w": torch.arange(4.0)})
    old = weights.read_bytes()
    with pytest.raises(Exception, match="pickle"):
        save_state_dict(weights, {"w": torch.zeros(4), "not a tensor": lambda: 0})  # type: ignore[dict-item]
    assert weights.read_bytes() == old
    assert [path.name for path in tmp_path.iterdir()] == [WEIGHTS_FILE]
    # A replaced file gets the mode a plain open() gives a new file, not a temporary file's 0600.
    write_file(tmp_path / "model_config.json", "{}\n")
    with open(tmp_path / "plain", "w"):
        pass
    assert (tmp_path / "model_config.json").stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.parametrize("archive_format", list(ArchiveFormat))
def test_rebuilding_an_archive_replaces_it_rather_than_writing_into_it(
    archive_format: ArchiveFormat, tmp_path: Path
) -> None:
    """torch-model-archiver truncates an existing .mar and copies over an unzipped archive's files: the build
    renames a complete new archive over the old one instead, so open (mapped) old files keep their bytes."""
    options = BuildOptions(output=tmp_path / "store" / "dlrm.mar", archive_format=archive_format, seed=1)
    archive, _ = build_archive(options)
    held = [archive] if archive.is_file() else [archive / WEIGHTS_FILE, archive / TABLES_FILE]
    with ExitStack() as stack:
        files = [stack.enter_context(open(path, "rb")) for path in held]
        old = [path.read_bytes() for path in held]
        build_archive(BuildOptions(output=options.output, archive_format=archive_format, seed=2))
        assert [file.read() for file in files] == old
        assert all(path.read_bytes() != content for path, content in zip(held, old, strict=True))
    assert [path.name for path in archive.parent.iterdir()] == [archive.name]  # no staging left behind
