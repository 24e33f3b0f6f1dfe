"""TorchRec's quantized collection and the FBGEMM TBEs in it: the only module touching their private state.

TorchRec's ``EmbeddingBagCollection`` (quantized) groups the tables into FBGEMM
``IntNBitTableBatchedEmbeddingBagsCodegen`` modules (TBEs) and keeps them in
its private ``_emb_modules``; everything here that reaches into either lives in
this module, so a TorchRec or FBGEMM upgrade has one place to check (and
``tests/test_mapped_tables.py`` checks it).

- :func:`table_file_layout`: the table file as FBGEMM's CPU TBEs hold the tables,
  asked of TorchRec and FBGEMM on ``meta``;
- :func:`map_tables`: a CPU collection whose TBEs' ``weights_host`` are the table
  file mapped read-only (:func:`model_factory.table_file.map_read_only`): nothing
  is allocated or copied; FBGEMM's CPU lookup reads ``weights_host`` directly;
- :func:`load_tables`, :func:`write_tables`: the table file into a collection
  (mapped, or streamed on GPU) and out of one;
- :func:`table_remaps`, :func:`set_remaps`: a frequency-ordered file's remaps,
  the row of each id, which each TBE maps ids through before its lookup (FBGEMM's
  index remapping: the same in the CPU and GPU kernels);
- :func:`table_views`, :func:`tbe_modules`, :func:`quantize_table`: each table's
  rows as FBGEMM stores them, for writing, copying and checking them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

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
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment
from torchrec.tensor_types import UInt4Tensor

from model_factory.config import ConfigError, DLRMConfig
from model_factory.factory import META, embedding_bag_configs, table_name
from model_factory.quantization import (
    CPU_ROW_ALIGNMENT,
    DATA_TYPES,
    GPU_ROW_ALIGNMENT,
    SCALE_BIAS_BYTES,
    TORCH_DTYPES,
    QuantizationSpec,
)
from model_factory.residency import decide
from model_factory.row_order import REMAP_DTYPE, FrequencyOrder
from model_factory.table_file import (
    StoredTable,
    TableFile,
    TbePart,
    map_read_only,
    populate_in_background,
    read_remap,
    read_table_file,
    write_table_file,
)

# FBGEMM starts every table of a TBE on a 128-byte cache line; the table file starts every TBE's part on one.
_CACHE_LINE = 128
# A frequency-ordered file starts each TBE's remap on a page of its own: it is kept resident or not as a whole.
_REMAP_ALIGNMENT = 4096


def row_alignment(device: torch.device) -> int:
    return GPU_ROW_ALIGNMENT if device.type == "cuda" else CPU_ROW_ALIGNMENT


def empty_quantized_collection(
    config: DLRMConfig, spec: QuantizationSpec, device: torch.device
) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized collection for ``config`` on ``device``; FBGEMM allocates the tables zero-filled.

    On ``meta`` nothing is allocated: :func:`map_tables` and :func:`table_file_layout`
    build one to learn TorchRec's grouping of the tables into TBEs.
    """
    tables = embedding_bag_configs(config)
    for table, feature in zip(tables, config.sparse_feature_names, strict=True):
        table.data_type = DATA_TYPES[spec.table_dtype(feature)]
    return QuantEmbeddingBagCollection(
        tables=tables, is_weighted=False, device=device, row_alignment=row_alignment(device)
    )


def tbe_modules(collection: QuantEmbeddingBagCollection) -> list[IntNBitTableBatchedEmbeddingBagsCodegen]:
    """The collection's TBEs, in TorchRec's order."""
    modules = list(collection._emb_modules)
    for module in modules:
        assert isinstance(module, IntNBitTableBatchedEmbeddingBagsCodegen), type(module)
    return modules


def table_views(collection: QuantEmbeddingBagCollection) -> dict[str, torch.Tensor]:
    """Each table's rows as FBGEMM stores them, padding cut off: ``(rows, row_bytes)`` uint8 views."""
    views = {}
    for module in tbe_modules(collection):
        for (name, _, dim, sparse_type, _), (rows, _, _) in zip(
            module.embedding_specs, module.split_embedding_weights_with_scale_bias(0), strict=True
        ):
            views[name] = rows[:, : unpadded_row_size_in_bytes(dim, sparse_type, SCALE_BIAS_BYTES)]
    return views


def _host_specs(module: IntNBitTableBatchedEmbeddingBagsCodegen) -> list[tuple[str, int, int, SparseType, Any]]:
    """The TBE's table specs placed on the host, as TorchRec builds them for a CPU collection."""
    return [
        (name, rows, dim, sparse_type, EmbeddingLocation.HOST)
        for name, rows, dim, sparse_type, _ in module.embedding_specs
    ]


def table_file_layout(config: DLRMConfig, spec: QuantizationSpec, frequency_ordered: bool = False) -> TableFile:
    """The table file as FBGEMM's CPU TBEs hold the tables: each TBE's ``weights_host``, in TorchRec's TBE order.

    TorchRec decides which tables share a TBE, FBGEMM where each table starts in
    it (``nbit_construct_split_state``: rows padded to the row alignment, tables
    to 128-byte cache lines); both are asked on a ``meta`` collection, so nothing
    is allocated. A TBE's part starts on a cache line too (its size already is a
    multiple of one: the parts follow each other without a gap).
    ``frequency_ordered``: each TBE's remap follows, each on a page of its own.
    """
    collection = empty_quantized_collection(config, spec, META)
    dtypes = {table_name(feature): spec.table_dtype(feature) for feature in config.sparse_feature_names}
    parts, offset = [], 0
    for module in tbe_modules(collection):
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
    if frequency_ordered:
        for index, part in enumerate(parts):
            offset = -(-offset // _REMAP_ALIGNMENT) * _REMAP_ALIGNMENT
            parts[index] = replace(part, remap_offset=offset)
            offset += parts[index].remap_size
    return TableFile(row_alignment=CPU_ROW_ALIGNMENT, tbes=tuple(parts))


def write_tables(
    collection: QuantEmbeddingBagCollection,
    layout: TableFile,
    path: Path,
    order_of: Callable[[StoredTable], torch.Tensor] | None = None,
) -> None:
    """Write the collection's tables (any device, any row alignment) as ``layout`` lays them out; padding is zero.

    A frequency-ordered layout needs ``order_of``: :func:`~model_factory.table_file.write_table_file`.
    """
    views = table_views(collection)
    write_table_file(layout, path, lambda table: views[table.name], order_of)


def table_remaps(collection: QuantEmbeddingBagCollection) -> dict[str, torch.Tensor]:
    """Each table's remap (the row of each id) in the collection's TBEs: none when its rows are in id order."""
    remaps = {}
    for module in tbe_modules(collection):
        if module.index_remappings_array.numel():
            offsets = module.index_remappings_array_offsets.tolist()
            for (name, *_), start, end in zip(module.embedding_specs, offsets[:-1], offsets[1:], strict=True):
                remaps[name] = module.index_remappings_array[start:end]
    return remaps


def set_remaps(module: IntNBitTableBatchedEmbeddingBagsCodegen, remaps: dict[str, torch.Tensor]) -> None:
    """Have the TBE map each id of its tables through ``remaps`` before its lookup (FBGEMM's index remapping, made
    for pruned tables: here a permutation), copied to the TBE's device."""
    module.set_index_remappings_array([remaps[name] for name, *_ in module.embedding_specs])


def quantize_table(table: StoredTable, weight: torch.Tensor) -> torch.Tensor:
    """One fp32 table quantized exactly as :func:`~model_factory.quantization.quantize_model_tables` quantizes a
    model's: ``(rows, row_bytes)``.

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
    quantize_embeddings(holder, dtype=TORCH_DTYPES[table.dtype], inplace=True)
    quantized = holder["tables"]
    assert isinstance(quantized, QuantEmbeddingBagCollection)
    return table_views(quantized)[table.name]


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


def _adopt_remap(module: IntNBitTableBatchedEmbeddingBagsCodegen, remap: torch.Tensor, part: TbePart) -> None:
    """FBGEMM's ``set_index_remappings_array`` with ``remap``, the TBE's remaps one after the other, adopted as
    they are (mapped, not copied) instead of concatenated into a new tensor."""
    rows = [table.rows for table in part.tables]
    module.index_remappings_array = remap
    module.index_remappings_array_offsets = torch.tensor([0, *itertools.accumulate(rows)], dtype=torch.int64)
    module.original_rows_per_table = torch.tensor([rows[t] for t in module.feature_table_map], dtype=torch.int64)


def _register_weight_views(collection: QuantEmbeddingBagCollection) -> None:
    """Point the collection's per-table ``weight`` buffers (its ``state_dict`` view) at its TBEs' weights.

    As TorchRec's constructor does (``quant_state_dict_split_scale_bias`` off):
    whole padded rows, int4 tables wrapped as ``UInt4Tensor``.
    """
    assert not getattr(collection, "register_tbes", False)
    for tables, module in zip(collection._key_to_tables.values(), tbe_modules(collection), strict=True):
        for table, (weight, _, _) in zip(tables, module.split_embedding_weights_with_scale_bias(0), strict=True):
            buffer = UInt4Tensor(weight) if table.data_type == DataType.INT4 else weight
            collection.embedding_bags[table.name].register_buffer("weight", buffer)


def map_tables(
    config: DLRMConfig,
    spec: QuantizationSpec,
    layout: TableFile,
    path: Path,
    frequency_order: FrequencyOrder | None = None,
) -> QuantEmbeddingBagCollection:
    """The CPU collection whose TBEs' ``weights_host`` are ``path`` mapped read-only: nothing allocated or copied.

    TorchRec's collection is built on ``meta`` (its grouping into TBEs, its
    forward); each of its TBEs is replaced by a CPU TBE built with the same
    arguments, whose ``weights_host`` is the TBE's part of the mapping. FBGEMM's
    CPU lookup reads ``weights_host`` directly (``dev_weights`` when
    ``host_size > 0``), and nothing else refers to it but the collection's
    per-table ``weight`` views, which are re-pointed. What of the file is kept
    resident depends on the memory budget and, for a frequency-ordered file, on
    ``frequency_order`` (:mod:`model_factory.residency`).
    """
    if layout != table_file_layout(config, spec, layout.frequency_ordered):
        raise ConfigError(f"{path} is not laid out as FBGEMM holds these tables on CPU: rebuild the archive")
    mapping = map_read_only(path, layout)
    populate_in_background(mapping, path, decide(layout, frequency_order, path).resident)
    collection = empty_quantized_collection(config, spec, META)
    modules = tbe_modules(collection)
    for index, (module, part) in enumerate(zip(modules, layout.tbes, strict=True)):
        host = _host_tbe(module)
        _adopt_host_weights(host, mapping[part.offset : part.offset + part.size], part, path)
        if part.remap_offset is not None:
            remap = mapping[part.remap_offset : part.remap_offset + part.remap_size].view(REMAP_DTYPE)
            _adopt_remap(host, remap, part)
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
    frequency_order: FrequencyOrder | None = None,
) -> QuantEmbeddingBagCollection:
    """The collection on ``device`` holding the tables of ``path``, laid out as ``layout``.

    On CPU the file is mapped (:func:`map_tables`) unless ``copy``; otherwise (GPU,
    ``copy``) FBGEMM allocates the tables and the file is streamed into them, and a
    frequency-ordered file's remaps are copied to the TBEs' device.
    """
    if device.type == "cpu" and not copy:
        return map_tables(config, spec, layout, path, frequency_order)
    collection = empty_quantized_collection(config, spec, device)
    read_table_file(layout, path, table_views(collection))
    for module, part in zip(tbe_modules(collection), layout.tbes, strict=True):
        if part.remap_offset is not None:
            remap = read_remap(path, part)
            rows = [table.rows for table in part.tables]
            set_remaps(module, dict(zip([table.name for table in part.tables], remap.split(rows), strict=True)))
    return collection
