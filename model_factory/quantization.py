"""How an archive's model is quantized (:class:`QuantizationSpec`), and quantizing an fp32 model as it says.

Tables are quantized row-wise by TorchRec (``quantize_embeddings``) into FBGEMM's
inference TBE format: each int8/int4 row carries its own fp16 scale and bias;
MLPs by PyTorch's dynamic quantization. The quantized tables are stored in
``tables.bin``, whose format :mod:`model_factory.table_file` describes;
:mod:`model_factory.tbe` builds, maps and reads TorchRec's quantized collection
(the only module touching FBGEMM's and TorchRec's private state), and
:mod:`model_factory.random_tables` makes seeded random tables created quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

import torch
from torch import nn
from torchrec.inference.modules import quantize_embeddings
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from model_factory.config import ConfigError, DLRMConfig
from model_factory.factory import table_name


class TableDtype(StrEnum):
    """How the embedding tables are stored.

    ``none`` keeps TorchRec's fp32 ``EmbeddingBag`` modules (one lookup call per
    table); the others are FBGEMM's table-batched collection, one lookup call
    for all tables: ``fp32`` rows as they are (the same scores as ``none``), or
    quantized row-wise to ``fp16``, ``int8`` or ``int4``.
    """

    NONE = "none"
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


class MlpDtype(StrEnum):
    """How the MLPs' ``Linear`` layers run: ``int8`` is dynamic quantization (CPU only)."""

    NONE = "none"
    INT8 = "int8"


_Enum = TypeVar("_Enum", TableDtype, MlpDtype)
# TorchRec's data type of a table-batched table, and the dtype its quantization is asked for.
DATA_TYPES = {
    TableDtype.FP32: DataType.FP32,
    TableDtype.FP16: DataType.FP16,
    TableDtype.INT8: DataType.INT8,
    TableDtype.INT4: DataType.INT4,
}
TORCH_DTYPES = {
    TableDtype.FP32: torch.float32,
    TableDtype.FP16: torch.float16,
    TableDtype.INT8: torch.qint8,
    TableDtype.INT4: torch.quint4x2,
}
# FBGEMM keeps an fp16 scale and bias in front of every int8/int4 row.
SCALE_BIAS_BYTES = 4
# Row alignment of the tables in memory: 4 bytes on CPU (int8 dim 64: 68 instead of
# TorchRec's default 80 bytes per row), 16 on GPU, as FBGEMM's device kernels expect.
CPU_ROW_ALIGNMENT = 4
GPU_ROW_ALIGNMENT = 16


@dataclass(frozen=True)
class QuantizationSpec:
    """How an archive's model is quantized; recorded in the archive and applied at load."""

    tables: TableDtype = TableDtype.NONE
    per_table: dict[str, TableDtype] = field(default_factory=dict)
    mlp: MlpDtype = MlpDtype.NONE

    def __post_init__(self) -> None:
        """Strings (from JSON or the command line) become the enums; anything else is refused by name."""
        object.__setattr__(self, "tables", _member(TableDtype, self.tables, "tables"))
        object.__setattr__(
            self, "per_table", {name: _member(TableDtype, dtype, name) for name, dtype in self.per_table.items()}
        )
        object.__setattr__(self, "mlp", _member(MlpDtype, self.mlp, "the MLPs"))

    def table_dtype(self, feature: str) -> TableDtype:
        return self.per_table.get(feature, self.tables)

    def quantizes_tables(self, config: DLRMConfig) -> bool:
        return any(self.table_dtype(feature) != TableDtype.NONE for feature in config.sparse_feature_names)

    def validate_for(self, config: DLRMConfig) -> None:
        unknown = sorted(set(self.per_table) - set(config.sparse_feature_names))
        if unknown:
            raise ConfigError(f"per-table quantization names unknown features {unknown}")
        kinds = {self.table_dtype(feature) for feature in config.sparse_feature_names}
        if TableDtype.NONE in kinds and len(kinds) > 1:
            raise ConfigError(
                "quantize every table or none: a table of TorchRec's own modules (none) cannot share FBGEMM's "
                "table-batched collection"
            )


def _member(enum: type[_Enum], value: str, what: str) -> _Enum:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise ConfigError(f"quantization of {what} must be one of {choices}, got {value!r}") from None


def quantize_model_tables(model: DLRM, config: DLRMConfig, spec: QuantizationSpec) -> DLRM:
    """Replace the model's fp32 tables by TorchRec's row-wise quantized ones (in place)."""
    quant_prep_customize_row_alignment(model, [EmbeddingBagCollection], CPU_ROW_ALIGNMENT)
    return quantize_embeddings(
        model,
        dtype=TORCH_DTYPES[spec.table_dtype(config.sparse_feature_names[0])],  # the default; per table below
        inplace=True,
        per_table_weight_dtype={
            table_name(feature): TORCH_DTYPES[spec.table_dtype(feature)] for feature in config.sparse_feature_names
        },
    )


def quantize_mlps(model: nn.Module) -> nn.Module:
    """Dynamic int8 ``Linear`` layers (CPU): weights int8, activations quantized per batch."""
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
