"""How an archive's model is quantized (:class:`QuantizationSpec`), and quantizing an fp32 model as it says.

Tables are quantized row-wise by TorchRec (``quantize_embeddings``) into FBGEMM's
inference TBE format: each int8/int4 row carries its own fp16 scale and bias.
MLPs run in bfloat16 (:class:`Bf16Linear`) or, through PyTorch's dynamic
quantization, int8 (see ``docs/quantization.md`` for what each costs and buys
on the reference shape). The quantized tables are stored in
``tables.bin``, whose format :mod:`model_factory.table_file` describes;
:mod:`model_factory.tbe` builds, maps and reads TorchRec's quantized collection
(the only module touching FBGEMM's and TorchRec's private state), and
:mod:`model_factory.random_tables` makes seeded random tables created quantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional
from torchrec.inference.modules import quantize_embeddings
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from model_factory.config import REFERENCE_DENSE_ARCH, REFERENCE_OVER_ARCH, ConfigError, DLRMConfig
from model_factory.factory import table_name

logger = logging.getLogger(__name__)


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
    """How the MLPs' ``Linear`` layers run.

    ``none``: fp32. ``bf16``: weights and activations in bfloat16 (fp32 accumulation), fast on CPUs with
    AMX or AVX512-BF16 (and GPUs), many times slower than fp32 on other CPUs. ``int8``: PyTorch's dynamic
    quantization (``torch.ao.quantization``, deprecated upstream; CPU only), one activation scale per
    forward, so a row's score depends on the rows batched with it.
    """

    NONE = "none"
    BF16 = "bf16"
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


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16); without, oneDNN's bf16 GEMM is
    emulated and many times slower than fp32."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def default_mlp_dtype(config: DLRMConfig) -> MlpDtype:
    """The MLPs' precision an archive of ``config`` gets unless told: bf16 for the reference MLPs on a CPU
    with native bf16, fp32 (``none``) otherwise.

    Measured with one thread on the trained ``criteo-kaggle`` model (``python -m bench.precision``; the figures
    are in docs/quantization.md): bf16 MLPs gave the fastest forward of the candidates that need no compilation
    (1.65× fp32's rows/s at 256 rows, 2.08× at 1,024) and the smallest accuracy cost (AUC +0.00001); int8
    dynamic quantization was slower and cost 0.002 of AUC. The ``small`` preset's MLPs gain nothing: bf16
    only adds the cost of its calls.
    """
    reference = (
        config.dense_arch_layer_sizes == REFERENCE_DENSE_ARCH and config.over_arch_layer_sizes == REFERENCE_OVER_ARCH
    )
    return MlpDtype.BF16 if reference and native_bf16() else MlpDtype.NONE


class Bf16Linear(nn.Module):
    """A ``Linear`` in bfloat16: its input cast to bfloat16 (a no-op after another such layer), its output
    left in bfloat16 for the next layer, or cast to fp32 (``float_output``) where it leaves the MLP."""

    def __init__(self, linear: nn.Linear, *, float_output: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        )
        self.float_output = float_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = functional.linear(x.to(torch.bfloat16), self.weight, self.bias)
        return y.float() if self.float_output else y

    def extra_repr(self) -> str:
        outputs, inputs = self.weight.shape
        return f"in_features={inputs}, out_features={outputs}, float_output={self.float_output}"


def _bf16_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().to(torch.bfloat16), requires_grad=False)


def quantize_mlps(model: nn.Module, dtype: MlpDtype = MlpDtype.INT8) -> nn.Module:
    """The model's MLPs in ``dtype``, in place: ``int8`` any ``Linear`` of ``model``, ``bf16`` those of a
    DLRM's dense and over arch; ``none`` leaves the model as it is."""
    if dtype == MlpDtype.INT8:
        if any(parameter.device.type != "cpu" for parameter in model.parameters()):
            raise ConfigError("int8 MLPs (dynamic quantization) run on CPU only: serve this archive on CPU")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    if dtype == MlpDtype.BF16:
        archs = [model.get_submodule("dense_arch"), model.get_submodule("over_arch")]
        if next(archs[0].parameters()).device.type == "cpu" and not native_bf16():
            logger.warning(
                "bf16 MLPs on a CPU with neither AMX nor AVX512-BF16 run many times slower than fp32: "
                "rebuild the archive with --quantize-mlp none for this machine"
            )
        for arch in archs:
            _bf16_layers(arch)
    return model


def _bf16_layers(arch: nn.Module) -> None:
    """Every ``Linear`` of ``arch`` in bfloat16, the last returning fp32, but a final logit layer (one output:
    a few hundred multiply-adds a row, and the score itself), which stays fp32."""
    linears = [(name, module) for name, module in arch.named_modules() if isinstance(module, nn.Linear)]
    if linears[-1][1].out_features == 1:
        linears.pop()
    for index, (name, linear) in enumerate(linears):
        parent, _, attribute = name.rpartition(".")
        setattr(arch.get_submodule(parent), attribute, Bf16Linear(linear, float_output=index == len(linears) - 1))
