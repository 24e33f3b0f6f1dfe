"""Quantized embedding tables (fp16, int8, int4) and int8 MLPs for serving.

Tables are quantized row-wise by TorchRec (``quantize_embeddings``) into FBGEMM's
inference TBE format: each int8/int4 row carries its own fp16 scale and bias.
They are stored outside ``weights.pt`` in ``tables.bin``, laid out exactly as
FBGEMM's inference TBEs hold them in memory on CPU: the ``weights_host`` buffer
of each TBE TorchRec builds, one after the other, rows padded to the CPU row
alignment (4 bytes) and every table starting on a 128-byte cache line. The
artifact records that layout (:class:`TableFile`) and loading checks it.

On CPU, loading maps the file read-only and shared (``MAP_SHARED``,
``PROT_READ``) and hands the mapping to each TBE as its ``weights_host``:
nothing is allocated or copied, and every process serving the archive (each
TorchServe worker) reads the page cache's one copy. The mapping is never
written: a write through it would fault rather than change the file. On GPU the
file is streamed row block by row block into the tables FBGEMM allocated on the
device (16-byte rows), as are archives of format 1 (unpadded rows, one table
after the other: :func:`legacy_table_file`), which can still be read.

Writing a table file from a random initialisation (:func:`fill_random`) works
row block by row block in the quantized format, so the 45 GB fp32 Criteo-1TB
tables are never materialised.

``torch.load`` is not used for table files: they hold raw bytes whose layout the
artifact describes and whose size is checked, no pickle at all.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
    nbit_construct_split_state,
    rounded_row_size_in_bytes,
    unpadded_row_size_in_bytes,
)
from torch import nn
from torchrec.inference.modules import quantize_embeddings
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, data_type_to_sparse_type
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment
from torchrec.tensor_types import UInt4Tensor

from model_factory.config import ConfigError, DLRMConfig
from model_factory.factory import META, build_dlrm, embedding_bag_configs, init_weights, table_name
from model_factory.files import replacing

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
    """How the MLPs' ``Linear`` layers run: ``int8`` is dynamic quantization (CPU only)."""

    NONE = "none"
    INT8 = "int8"


_Enum = TypeVar("_Enum", TableDtype, MlpDtype)
_DATA_TYPES = {
    TableDtype.FP32: DataType.FP32,
    TableDtype.FP16: DataType.FP16,
    TableDtype.INT8: DataType.INT8,
    TableDtype.INT4: DataType.INT4,
}
_TORCH_DTYPES = {
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
_CHUNK_BYTES = 64 * 2**20
# FBGEMM starts every table of a TBE on a 128-byte cache line; the table file starts every TBE's part on one.
_CACHE_LINE = 128


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


@dataclass(frozen=True)
class TableLayout:
    """One table's rows unpadded (data, then scale and bias), and where they sat in a format-1 ``tables.bin``."""

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


@dataclass(frozen=True)
class StoredTable:
    """Where one table's rows sit in its TBE's part of the table file."""

    name: str
    dtype: TableDtype
    rows: int
    dim: int
    row_bytes: int  # unpadded: the row's data, scale and bias
    stride: int  # from one row to the next: ``row_bytes`` rounded up to the row alignment
    offset: int  # of the first row, from the start of the TBE's part


@dataclass(frozen=True)
class TbePart:
    """One TBE's ``weights_host``: ``size`` bytes at ``offset`` in the table file, holding ``tables``."""

    offset: int
    size: int
    tables: tuple[StoredTable, ...]


@dataclass(frozen=True)
class TableFile:
    """The layout of ``tables.bin``, recorded in ``model_config.json`` and checked at load."""

    row_alignment: int
    tbes: tuple[TbePart, ...]

    @property
    def size(self) -> int:
        return max((part.offset + part.size for part in self.tbes), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "row_alignment": self.row_alignment,
            "size": self.size,
            "tbes": [
                {"offset": part.offset, "size": part.size, "tables": [asdict(table) for table in part.tables]}
                for part in self.tbes
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableFile:
        """The layout :meth:`to_dict` wrote; ``KeyError``, ``TypeError`` or ``ValueError`` for anything else."""
        layout = cls(
            row_alignment=int(data["row_alignment"]),
            tbes=tuple(
                TbePart(
                    offset=int(part["offset"]),
                    size=int(part["size"]),
                    tables=tuple(
                        StoredTable(**{**table, "dtype": TableDtype(table["dtype"])}) for table in part["tables"]
                    ),
                )
                for part in data["tbes"]
            ),
        )
        if data["size"] != layout.size:
            raise ValueError(f"the table file's size {data['size']} is not its TBEs' {layout.size} bytes")
        return layout


def _host_specs(module: IntNBitTableBatchedEmbeddingBagsCodegen) -> list[tuple[str, int, int, SparseType, Any]]:
    """The TBE's table specs placed on the host, as TorchRec builds them for a CPU collection."""
    return [
        (name, rows, dim, sparse_type, EmbeddingLocation.HOST)
        for name, rows, dim, sparse_type, _ in module.embedding_specs
    ]


def _tbe_modules(collection: QuantEmbeddingBagCollection) -> list[IntNBitTableBatchedEmbeddingBagsCodegen]:
    modules = list(collection._emb_modules)
    for module in modules:
        assert isinstance(module, IntNBitTableBatchedEmbeddingBagsCodegen), type(module)
    return modules


def table_file_layout(config: DLRMConfig, spec: QuantizationSpec) -> TableFile:
    """The table file as FBGEMM's CPU TBEs hold the tables: each TBE's ``weights_host``, in TorchRec's TBE order.

    TorchRec decides which tables share a TBE, FBGEMM where each table starts in
    it (``nbit_construct_split_state``: rows padded to the row alignment, tables
    to 128-byte cache lines); both are asked on a ``meta`` collection, so nothing
    is allocated. A TBE's part starts on a cache line too (its size already is a
    multiple of one: the parts follow each other without a gap).
    """
    collection = empty_quantized_collection(config, spec, META)
    dtypes = {table_name(feature): spec.table_dtype(feature) for feature in config.sparse_feature_names}
    parts, offset = [], 0
    for module in _tbe_modules(collection):
        specs = _host_specs(module)
        split = nbit_construct_split_state(
            specs, cacheable=True, row_alignment=CPU_ROW_ALIGNMENT, scale_bias_size_in_bytes=SCALE_BIAS_BYTES
        )
        tables = tuple(
            StoredTable(
                name=name,
                dtype=dtypes[name],
                rows=rows,
                dim=dim,
                row_bytes=unpadded_row_size_in_bytes(dim, sparse_type, SCALE_BIAS_BYTES),
                stride=rounded_row_size_in_bytes(dim, sparse_type, CPU_ROW_ALIGNMENT, SCALE_BIAS_BYTES),
                offset=table_offset,
            )
            for (name, rows, dim, sparse_type, _), table_offset in zip(specs, split.offsets, strict=True)
        )
        offset = -(-offset // _CACHE_LINE) * _CACHE_LINE
        parts.append(TbePart(offset=offset, size=split.host_size, tables=tables))
        offset += split.host_size
    return TableFile(row_alignment=CPU_ROW_ALIGNMENT, tbes=tuple(parts))


def legacy_table_file(config: DLRMConfig, spec: QuantizationSpec) -> TableFile:
    """The table file of format-1 archives: every table's rows unpadded, one table after the other."""
    tables = tuple(
        StoredTable(
            layout.name, layout.dtype, layout.rows, layout.dim, layout.row_bytes, layout.row_bytes, layout.offset
        )
        for layout in table_layouts(config, spec)
    )
    size = sum(table.rows * table.row_bytes for table in tables)
    return TableFile(row_alignment=1, tbes=(TbePart(offset=0, size=size, tables=tables),))


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
    """TorchRec's quantized collection for ``config`` on ``device``; FBGEMM allocates the tables zero-filled.

    On ``meta`` nothing is allocated: :func:`map_tables` and :func:`table_file_layout`
    build one to learn TorchRec's grouping of the tables into TBEs.
    """
    tables = embedding_bag_configs(config)
    for table, feature in zip(tables, config.sparse_feature_names, strict=True):
        table.data_type = _DATA_TYPES[spec.table_dtype(feature)]
    return QuantEmbeddingBagCollection(
        tables=tables, is_weighted=False, device=device, row_alignment=row_alignment(device)
    )


def table_views(collection: QuantEmbeddingBagCollection) -> dict[str, torch.Tensor]:
    """Each table's rows as FBGEMM stores them, padding cut off: ``(rows, row_bytes)`` uint8 views."""
    views = {}
    for module in _tbe_modules(collection):
        for (name, _, dim, sparse_type, _), (rows, _, _) in zip(
            module.embedding_specs, module.split_embedding_weights_with_scale_bias(0), strict=True
        ):
            views[name] = rows[:, : unpadded_row_size_in_bytes(dim, sparse_type, SCALE_BIAS_BYTES)]
    return views


def row_blocks(rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` ranges of rows of about ``_CHUNK_BYTES`` each."""
    block = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, rows, block):
        yield start, min(rows, start + block)


def write_tables(collection: QuantEmbeddingBagCollection, layout: TableFile, path: Path) -> None:
    """Write the collection's tables (any device, any row alignment) as ``layout`` lays them out; padding is zero."""
    views = table_views(collection)
    write_table_file(layout, path, lambda table: views[table.name])


def write_table_file(layout: TableFile, path: Path, rows_of: Callable[[StoredTable], torch.Tensor]) -> None:
    """Write ``path`` as ``layout`` lays it out, asking ``rows_of`` for each table's ``(rows, row_bytes)`` rows in turn.

    Tables are asked for one at a time, in file order, and nothing of one is kept
    once it is written: a caller that makes each table when asked (quantizing it
    from a checkpoint) never holds more than one. An existing file is replaced, not
    rewritten: processes that map it keep their tables (:mod:`model_factory.files`).
    """
    with replacing(path) as output:
        for part in layout.tbes:
            for table in part.tables:
                output.write(bytes(part.offset + table.offset - output.tell()))
                view = rows_of(table)
                assert view.shape == (table.rows, table.row_bytes), (table, view.shape)
                for start, end in row_blocks(table.rows, table.stride):
                    block = torch.zeros((end - start, table.stride), dtype=torch.uint8)
                    block[:, : table.row_bytes] = view[start:end]
                    output.write(block.numpy().data)
                del view
        output.write(bytes(layout.size - output.tell()))


def quantize_table(table: StoredTable, weight: torch.Tensor) -> torch.Tensor:
    """One fp32 table quantized exactly as :func:`quantize_model_tables` quantizes a model's: ``(rows, row_bytes)``.

    Rows are quantized independently of each other and of other tables, so a
    table quantized alone is byte for byte the table quantized with the rest.
    """
    config = EmbeddingBagConfig(
        name=table.name, embedding_dim=table.dim, num_embeddings=table.rows, feature_names=[table.name]
    )
    collection = EmbeddingBagCollection(tables=[config], device=META)
    collection.embedding_bags[table.name].weight = nn.Parameter(weight, requires_grad=False)
    holder = nn.ModuleDict({"tables": collection})  # quantize_embeddings swaps a module's children
    quant_prep_customize_row_alignment(holder, [EmbeddingBagCollection], CPU_ROW_ALIGNMENT)
    quantize_embeddings(holder, dtype=_TORCH_DTYPES[table.dtype], inplace=True)
    quantized = holder["tables"]
    assert isinstance(quantized, QuantEmbeddingBagCollection)
    return table_views(quantized)[table.name]


def check_size(path: Path, layout: TableFile) -> None:
    """A :class:`ConfigError` naming ``path`` and the size ``layout`` needs unless the file has exactly that size."""
    try:
        actual = path.stat().st_size
    except OSError as error:
        raise ConfigError(f"cannot read the table file {path} ({layout.size} bytes expected): {error}") from error
    if actual != layout.size:
        raise ConfigError(f"{path} holds {actual} bytes, the archive's table layout needs {layout.size}")


def read_tables(collection: QuantEmbeddingBagCollection, layout: TableFile, path: Path) -> None:
    """Stream the table file into the collection's own tables, row block by row block (no second copy in memory).

    Works for any device and row alignment: each row's unpadded bytes are copied
    from where ``layout`` puts them into where FBGEMM keeps them.
    """
    check_size(path, layout)
    views = table_views(collection)
    with open(path, "rb") as source:
        for part in layout.tbes:
            for table in part.tables:
                view = views[table.name]
                if view.shape != (table.rows, table.row_bytes):
                    raise ConfigError(
                        f"{path}: table {table.name} is {table.rows} rows of {table.row_bytes} bytes, "
                        f"the model's is {tuple(view.shape)}"
                    )
                source.seek(part.offset + table.offset)
                for start, end in row_blocks(table.rows, table.stride):
                    block = torch.empty((end - start) * table.stride, dtype=torch.uint8)
                    if source.readinto(block.numpy().data) != block.numel():
                        raise ConfigError(f"{path} ended inside table {table.name}")
                    view[start:end].copy_(block.view(end - start, table.stride)[:, : table.row_bytes])


def map_read_only(path: Path, layout: TableFile) -> torch.Tensor:
    """``path``'s bytes as a uint8 tensor over a ``MAP_SHARED``, ``PROT_READ`` mapping of the file.

    Shared and read-only: every process mapping the file reads the page cache's
    one copy of each page, the file is opened read-only and nothing can be
    written through the mapping (a write faults instead of changing the file, or
    of silently copying the page as a private mapping would). Such a mapping is
    not charged against the commit limit either. The tensor keeps the mapping
    alive; it survives the file being unlinked (an extracted archive's
    temporary directory), not the file being truncated or rewritten in place,
    which nothing here does: builds replace files by renaming.
    """
    try:
        with open(path, "rb") as file:
            actual = os.fstat(file.fileno()).st_size
            if actual != layout.size:
                raise ConfigError(f"{path} holds {actual} bytes, the archive's table layout needs {layout.size}")
            mapping = mmap.mmap(file.fileno(), layout.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except OSError as error:
        raise ConfigError(f"cannot map the table file {path} ({layout.size} bytes expected): {error}") from error
    with warnings.catch_warnings():
        # PyTorch warns that it cannot mark tensors read-only; the mapping is (PROT_READ) and nothing writes to it.
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(mapping, dtype=torch.uint8)


# Linux 5.14+: fault every page of a range in, reading from the file what the page cache lacks.
MADV_POPULATE_READ = 22


def populate_in_background(mapping: torch.Tensor, path: Path) -> None:
    """Map every page of a table file's ``mapping`` into this process, on a background thread.

    A process pays a page fault the first time it touches each page of a mapping, so until it has
    touched them all, requests pay faults for the rows they look up (README, "The full-size Criteo-1TB
    model", measures what that costs). ``MADV_POPULATE_READ`` maps them in one call (the pages
    stay the page cache's, shared with every other process); from a cold page cache it reads the file
    while the worker already answers. The thread runs at ``SCHED_IDLE`` priority, so that it does not
    slow the requests it is there to speed up, and ctypes releases the GIL for the call. Skipped when
    the file is larger than the memory available, where it would only evict other pages.
    """
    available = _available_memory()
    if available is not None and mapping.numel() > available:
        logger.info("%s is larger than the memory available: its pages are mapped as requests touch them", path)
        return

    def populate() -> None:
        with suppress(OSError):  # this thread only runs on CPU time nothing else wants
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.madvise(mapping.data_ptr(), mapping.numel(), MADV_POPULATE_READ) != 0:
            error = ctypes.get_errno()
            logger.info("%s: pages are mapped as requests touch them (madvise: %s)", path, os.strerror(error))

    threading.Thread(target=populate, name=f"populate {path.name}", daemon=True).start()


def _available_memory() -> int | None:
    """The kernel's estimate of memory available without swapping (``MemAvailable``), in bytes."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _host_tbe(module: IntNBitTableBatchedEmbeddingBagsCodegen) -> IntNBitTableBatchedEmbeddingBagsCodegen:
    """A CPU TBE built as TorchRec builds ``module``'s for a CPU collection, its weights not yet allocated."""
    return IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=_host_specs(module),
        feature_table_map=module.feature_table_map,
        pooling_mode=module.pooling_mode,
        device=torch.device("cpu"),
        output_dtype=SparseType.from_int(module.output_dtype),
        row_alignment=CPU_ROW_ALIGNMENT,
    )


def _adopt_host_weights(
    module: IntNBitTableBatchedEmbeddingBagsCodegen, weights: torch.Tensor, part: TbePart, path: Path
) -> None:
    """FBGEMM's ``initialize_weights`` for a host-only TBE, with ``weights`` instead of a zero-filled allocation."""
    offsets = [table.offset for table in part.tables]
    if (module.host_size, module.dev_size, module.uvm_size) != (part.size, 0, 0) or (
        module.weights_physical_offsets != offsets
    ):
        raise ConfigError(
            f"{path}: FBGEMM lays out a TBE of {module.host_size} bytes with tables at "
            f"{module.weights_physical_offsets}, the table file {part.size} bytes at {offsets}: "
            "rebuild the archive"
        )
    assert not module.weight_initialized
    module.weights_host = weights
    module.initialize_logical_weights_placements_and_offsets()
    module.weight_initialized = True


def _register_weight_views(collection: QuantEmbeddingBagCollection) -> None:
    """Point the collection's per-table ``weight`` buffers (its ``state_dict`` view) at its TBEs' weights.

    As TorchRec's constructor does (``quant_state_dict_split_scale_bias`` off):
    whole padded rows, int4 tables wrapped as ``UInt4Tensor``.
    """
    assert not getattr(collection, "register_tbes", False)
    for tables, module in zip(collection._key_to_tables.values(), _tbe_modules(collection), strict=True):
        for table, (weight, _, _) in zip(tables, module.split_embedding_weights_with_scale_bias(0), strict=True):
            buffer = UInt4Tensor(weight) if table.data_type == DataType.INT4 else weight
            collection.embedding_bags[table.name].register_buffer("weight", buffer)


def map_tables(
    config: DLRMConfig, spec: QuantizationSpec, layout: TableFile, path: Path
) -> QuantEmbeddingBagCollection:
    """The CPU collection whose TBEs' ``weights_host`` are ``path`` mapped read-only: nothing allocated or copied.

    TorchRec's collection is built on ``meta`` (its grouping into TBEs, its
    forward); each of its TBEs is replaced by a CPU TBE built with the same
    arguments, whose ``weights_host`` is the TBE's part of the mapping. FBGEMM's
    CPU lookup reads ``weights_host`` directly (``dev_weights`` when
    ``host_size > 0``), and nothing else refers to it but the collection's
    per-table ``weight`` views, which are re-pointed.
    """
    if layout != table_file_layout(config, spec):
        raise ConfigError(f"{path} is not laid out as FBGEMM holds these tables on CPU: rebuild the archive")
    mapping = map_read_only(path, layout)
    populate_in_background(mapping, path)
    collection = empty_quantized_collection(config, spec, META)
    modules = _tbe_modules(collection)
    for index, (module, part) in enumerate(zip(modules, layout.tbes, strict=True)):
        host = _host_tbe(module)
        _adopt_host_weights(host, mapping[part.offset : part.offset + part.size], part, path)
        collection._emb_modules[index] = host
    collection._device = torch.device("cpu")
    _register_weight_views(collection)
    return collection


def load_tables(
    config: DLRMConfig,
    spec: QuantizationSpec,
    layout: TableFile,
    path: Path,
    device: torch.device,
    *,
    copy: bool = False,
) -> QuantEmbeddingBagCollection:
    """The collection on ``device`` holding the tables of ``path``, laid out as ``layout``.

    On CPU a file in FBGEMM's CPU layout is mapped (:func:`map_tables`) unless
    ``copy``; otherwise (GPU, a format-1 file, ``copy``) FBGEMM allocates the
    tables and the file is streamed into them (:func:`read_tables`).
    """
    if device.type == "cpu" and not copy:
        if layout == table_file_layout(config, spec):
            return map_tables(config, spec, layout, path)
        logger.warning(
            "%s is not in FBGEMM's CPU layout (a format-1 archive): its tables are copied into this process; "
            "rebuild the archive to map them, shared by every worker",
            path,
        )
    collection = empty_quantized_collection(config, spec, device)
    read_tables(collection, layout, path)
    return collection


def fill_random(collection: QuantEmbeddingBagCollection, seed: int) -> None:
    """Seeded random tables written directly in the quantized format, row block by row block.

    Values are uniform in ±sqrt(1/rows), TorchRec's default initialisation: for
    int8/int4 rows random codes with the scale and bias that map the code range
    onto that interval; for fp32/fp16 rows the values themselves.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in collection._emb_modules:
        for (_, rows, _, sparse_type, _), (data, scale, bias) in zip(
            module.embedding_specs, module.split_embedding_weights_with_scale_bias(2), strict=True
        ):
            bound = (1.0 / rows) ** 0.5
            for start, end in row_blocks(rows, data.shape[1]):
                if scale is None:  # a float row (fp32, fp16) is the values
                    dtype = sparse_type.as_dtype()
                    values = torch.empty((end - start, data.shape[1] // dtype.itemsize), dtype=dtype)
                    data[start:end].view(dtype).copy_(values.uniform_(-bound, bound, generator=generator))
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
