"""Archives for the tests: built by the real ``build_mar.py``, with the settings the tests rely on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from model_factory.artifact import load_model
from model_factory.quantization import MlpDtype, QuantizationSpec, TableDtype
from servers.torchserve import REPO_ROOT

# The session archive's settings: a long batch delay so that concurrent requests are batched.
TEST_MAX_ROWS = 64
TEST_BATCH_SIZE = 16
TEST_MAX_BATCH_DELAY_MS = 100
# Every quantization option the tests compare; "mixed" names only the first features, which every
# test config has.
QUANTIZATION_SPECS = {
    "fp32": QuantizationSpec(TableDtype.FP32),
    "fp16": QuantizationSpec(TableDtype.FP16),
    "int8": QuantizationSpec(TableDtype.INT8),
    "int4": QuantizationSpec(TableDtype.INT4),
    "mixed": QuantizationSpec(TableDtype.INT8, per_table={"cat_0": TableDtype.INT4, "cat_1": TableDtype.FP16}),
    "int8+mlp": QuantizationSpec(TableDtype.INT8, mlp=MlpDtype.INT8),
}


def served_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights a worker serves from an unpacked archive of fp32 tables, as the trainer's ``state_dict``.

    FBGEMM's table-batched collection gives each table's rows as bytes (``uint8``
    ``[rows, 4 * dim]``): these are viewed as the float32 ``[rows, dim]`` they hold.
    """
    model, artifact = load_model(directory)
    assert {artifact.quantization.table_dtype(name) for name in artifact.model.sparse_feature_names} == {
        TableDtype.FP32
    }
    return {
        key: value.view(torch.float32) if value.dtype == torch.uint8 else value
        for key, value in model.state_dict().items()
    }


def build_archive(output: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``build_mar.py --output OUTPUT ARGS...`` from the repository root."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "build_mar.py"), "--output", str(output), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
