"""Archives for the tests: built by the real ``build_mar.py``, with the settings the tests rely on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def build_archive(output: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``build_mar.py --output OUTPUT ARGS...`` from the repository root."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "build_mar.py"), "--output", str(output), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
