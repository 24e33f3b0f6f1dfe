"""Quantized embedding tables (fp16, int8, int4) and int8 MLPs for serving.

Tables are quantized row-wise by TorchRec (``quantize_embeddings``) into FBGEMM's
inference TBE format: each int8/int4 row carries its own fp16 scale and bias.
They are stored outside ``weights.pt`` in ``tables.bin``: every table's rows,
unpadded, one table after the other, in the order of the artifact's table list.
The format does not depend on the device, so one archive serves on CPU (rows
aligned to 4 bytes) and on GPU (16 bytes).

Reading a table file streams it in chunks straight into the tables FBGEMM
allocated, so loading needs no second copy of the tables in memory; writing one
from a random initialisation (:func:`fill_random`) works row block by row block
in the quantized format, so the 45 GB fp32 Criteo-1TB tables are never
materialised.

``torch.load`` is not used for table files: they hold raw bytes whose layout the
artifact describes and whose size is checked, no pickle at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
    unpadded_row_size_in_bytes,
)
from torch import nn
from torchrec.inference.modules import quantize_embeddings
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, data_type_to_sparse_type
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from model_factory.config import ConfigError, DLRMConfig
from model_factory.factory import build_dlrm, embedding_bag_configs, init_weights, table_name


class TableDtype(StrEnum):
    """How the embedding tables are stored: ``none`` keeps fp32."""

    NONE = "none"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


class MlpDtype(StrEnum):
    """How the MLPs' ``Linear`` layers run: ``int8`` is dynamic quantization (CPU only)."""

    NONE = "none"
    INT8 = "int8"


_Enum = TypeVar("_Enum", TableDtype, MlpDtype)
_DATA_TYPES = {TableDtype.FP16: DataType.FP16, TableDtype.INT8: DataType.INT8, TableDtype.INT4: DataType.INT4}
_TORCH_DTYPES = {TableDtype.FP16: torch.float16, TableDtype.INT8: torch.qint8, TableDtype.INT4: torch.quint4x2}
# FBGEMM keeps an fp16 scale and bias in front of every int8/int4 row.
SCALE_BIAS_BYTES = 4
# Row alignment of the tables in memory: 4 bytes on CPU (int8 dim 64: 68 instead of
# TorchRec's default 80 bytes per row), 16 on GPU, as FBGEMM's device kernels expect.
CPU_ROW_ALIGNMENT = 4
GPU_ROW_ALIGNMENT = 16
_CHUNK_BYTES = 64 * 2**20


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
            raise ConfigError("quantize every table or none: an fp32 table cannot share a quantized collection")


def _member(enum: type[_Enum], value: str, what: str) -> _Enum:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise ConfigError(f"quantization of {what} must be one of {choices}, got {value!r}") from None


@dataclass(frozen=True)
class TableLayout:
    """Where one table's rows sit in ``tables.bin``."""

    name: str
    rows: int
    dim: int
    dtype: TableDtype
    row_bytes: int
    offset: int


def table_layouts(config: DLRMConfig, spec: QuantizationSpec) -> list[TableLayout]:
    layouts, offset = [], 0
    for feature, rows in zip(config.sparse_feature_names, config.num_embeddings_per_feature, strict=True):
        dtype = spec.table_dtype(feature)
        row_bytes = unpadded_row_size_in_bytes(
            config.embedding_dim, data_type_to_sparse_type(_DATA_TYPES[dtype]), SCALE_BIAS_BYTES
        )
        layouts.append(TableLayout(table_name(feature), rows, config.embedding_dim, dtype, row_bytes, offset))
        offset += rows * row_bytes
    return layouts


def row_alignment(device: torch.device) -> int:
    return GPU_ROW_ALIGNMENT if device.type == "cuda" else CPU_ROW_ALIGNMENT


def quantize_model_tables(model: DLRM, config: DLRMConfig, spec: QuantizationSpec) -> DLRM:
    """Replace the model's fp32 tables by TorchRec's row-wise quantized ones (in place)."""
    quant_prep_customize_row_alignment(model, [EmbeddingBagCollection], CPU_ROW_ALIGNMENT)
    return quantize_embeddings(
        model,
        dtype=_TORCH_DTYPES[spec.table_dtype(config.sparse_feature_names[0])],  # the default; per table below
        inplace=True,
        per_table_weight_dtype={
            table_name(feature): _TORCH_DTYPES[spec.table_dtype(feature)] for feature in config.sparse_feature_names
        },
    )


def empty_quantized_collection(
    config: DLRMConfig, spec: QuantizationSpec, device: torch.device
) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized collection for ``config`` on ``device``; FBGEMM allocates the tables zero-filled."""
    tables = embedding_bag_configs(config)
    for table, feature in zip(tables, config.sparse_feature_names, strict=True):
        table.data_type = _DATA_TYPES[spec.table_dtype(feature)]
    return QuantEmbeddingBagCollection(
        tables=tables, is_weighted=False, device=device, row_alignment=row_alignment(device)
    )


def table_views(collection: QuantEmbeddingBagCollection) -> dict[str, torch.Tensor]:
    """Each table's rows as FBGEMM stores them, padding cut off: ``(rows, row_bytes)`` uint8 views."""
    views = {}
    for module in collection._emb_modules:
        assert isinstance(module, IntNBitTableBatchedEmbeddingBagsCodegen)
        for (name, _, dim, sparse_type, _), (rows, _, _) in zip(
            module.embedding_specs, module.split_embedding_weights_with_scale_bias(0), strict=True
        ):
            views[name] = rows[:, : unpadded_row_size_in_bytes(dim, sparse_type, SCALE_BIAS_BYTES)]
    return views


def _row_blocks(rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` ranges of rows of about ``_CHUNK_BYTES`` each."""
    block = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, rows, block):
        yield start, min(rows, start + block)


def write_tables(collection: QuantEmbeddingBagCollection, layouts: Sequence[TableLayout], path: Path) -> None:
    views = table_views(collection)
    with open(path, "wb") as output:
        for layout in layouts:
            view = views[layout.name]
            assert view.shape == (layout.rows, layout.row_bytes), (layout, view.shape)
            for start, end in _row_blocks(layout.rows, layout.row_bytes):
                output.write(view[start:end].contiguous().cpu().numpy().tobytes())


def read_tables(collection: QuantEmbeddingBagCollection, layouts: Sequence[TableLayout], path: Path) -> None:
    """Stream ``tables.bin`` into the collection's tables, block by block (no second copy in memory)."""
    expected = sum(layout.rows * layout.row_bytes for layout in layouts)
    actual = path.stat().st_size
    if actual != expected:
        raise ConfigError(f"{path} holds {actual} bytes, the archive's table layout needs {expected}")
    views = table_views(collection)
    with open(path, "rb") as source:
        for layout in layouts:
            view = views[layout.name]
            for start, end in _row_blocks(layout.rows, layout.row_bytes):
                block = torch.empty((end - start) * layout.row_bytes, dtype=torch.uint8)
                if source.readinto(block.numpy().data) != block.numel():
                    raise ConfigError(f"{path} ended inside table {layout.name}")
                view[start:end].copy_(block.view(end - start, layout.row_bytes))


def fill_random(collection: QuantEmbeddingBagCollection, seed: int) -> None:
    """Seeded random tables written directly in the quantized format, row block by row block.

    Values are uniform in ±sqrt(1/rows), TorchRec's default initialisation: for
    int8/int4 rows random codes with the scale and bias that map the code range
    onto that interval; for fp16 rows the values themselves.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in collection._emb_modules:
        for (_, rows, _, sparse_type, _), (data, scale, bias) in zip(
            module.embedding_specs, module.split_embedding_weights_with_scale_bias(2), strict=True
        ):
            bound = (1.0 / rows) ** 0.5
            for start, end in _row_blocks(rows, data.shape[1]):
                if scale is None:  # fp16: the row is the values
                    values = torch.empty((end - start, data.shape[1] // 2), dtype=torch.float16)
                    data[start:end].view(torch.float16).copy_(values.uniform_(-bound, bound, generator=generator))
                    continue
                codes = 2 ** sparse_type.bit_rate() - 1
                random_bytes = torch.randint(
                    0, 256, (end - start, data.shape[1]), dtype=torch.uint8, generator=generator
                )
                data[start:end].copy_(random_bytes)
                scale[start:end].fill_(2 * bound / codes)
                assert bias is not None
                bias[start:end].fill_(-bound)


def quantize_mlps(model: nn.Module) -> nn.Module:
    """Dynamic int8 ``Linear`` layers (CPU): weights int8, activations quantized per batch."""
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def random_quantized_model(config: DLRMConfig, spec: QuantizationSpec, seed: int) -> DLRM:
    """A seeded random model whose tables are created quantized: no fp32 table ever exists."""
    model = build_dlrm(config)
    tables = empty_quantized_collection(config, spec, torch.device("cpu"))
    fill_random(tables, seed)
    model.sparse_arch.embedding_bag_collection = tables
    return init_weights(model, seed)
