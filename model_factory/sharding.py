"""Quantized tables sharded table-wise over the GPUs of one process, with TorchRec's inference sharding.

Why: int8/int4 tables larger than one GPU can still be served by one worker on a
multi-GPU host. TorchRec's planner puts each whole table on one device
(table-wise), balancing its estimate of the lookups within each device's memory;
its ``ShardedQuantEmbeddingBagCollection`` sends every device the ids of its own
tables and gathers the pooled embeddings on the device the ids came from, where
the dense MLPs run. The ranks are TorchRec's: ``cuda:0`` .. ``cuda:N-1``, or
every rank on the CPU, where TorchRec's inference sharding runs too (what the
tests without a GPU check).

TorchRec's sharded collection allocates its own tables on each device, empty.
The artifact's tables are therefore loaded on the CPU first (mapped read-only
from ``tables.bin``: nothing copied) and each table's rows are then streamed
into the device that holds it, row block by row block, so no device ever holds
more than its own tables.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torchrec.distributed.fused_params import FUSED_PARAM_QUANT_STATE_DICT_SPLIT_SCALE_BIAS
from torchrec.distributed.global_settings import get_propogate_device, set_propogate_device
from torchrec.distributed.quant_embeddingbag import QuantEmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.inference.modules import DEFAULT_FUSED_PARAMS, shard_quant_model
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from model_factory.artifact import ModelArtifact, load_model
from model_factory.config import ConfigError
from model_factory.quantization import MlpDtype
from model_factory.table_file import row_blocks
from model_factory.tbe import set_remaps, table_remaps, table_views

logger = logging.getLogger(__name__)


def load_sharded_model(directory: Path, world_size: int, device: torch.device) -> tuple[DLRM, ModelArtifact]:
    """The artifact's model in eval mode with its quantized tables sharded over ``world_size`` ranks.

    ``device`` is where the inputs and the dense MLPs go: ``cuda:0`` (the tables
    then go to ``cuda:0`` .. ``cuda:N-1``) or the CPU (every rank on the CPU).
    """
    model, artifact = load_model(directory, "cpu")
    if artifact.quantization.mlp == MlpDtype.INT8 and device.type != "cpu":
        raise ConfigError("int8 MLPs (dynamic quantization) run on CPU only: serve this archive on CPU")
    model, plan = shard_tables(model, world_size, device)
    logger.info("quantized tables sharded over %d ranks:\n%s", world_size, plan)
    return model, artifact


def shard_tables(model: DLRM, world_size: int, device: torch.device) -> tuple[DLRM, ShardingPlan]:
    """``model`` (changed in place, eval mode) with its quantized tables sharded table-wise over ``world_size``
    ranks, and TorchRec's plan (which rank holds which table).

    The tables may be anywhere (mapped on the CPU, or on a GPU); the dense MLPs
    move to ``device``, as :func:`load_sharded_model` says.
    """
    _check_devices(world_size, device)
    tables = model.sparse_arch.embedding_bag_collection
    if not isinstance(tables, QuantEmbeddingBagCollection):
        raise ConfigError(
            "only quantized tables can be sharded (TorchRec's inference sharding): build the archive with --quantize"
        )
    for name in ("dense_arch", "inter_arch", "over_arch"):
        getattr(model, name).to(device)
    with _propagating_device():
        _, plan = shard_quant_model(
            model,
            world_size=world_size,
            compute_device=device.type,
            sharding_device=device.type,
            sharders=_sharders(),
        )
        _build_distributions(model.sparse_arch.embedding_bag_collection, tables.embedding_bag_configs(), device)
    _copy_rows(tables, model.sparse_arch.embedding_bag_collection)
    return model.eval(), plan  # TorchRec builds the sharded collection in training mode


def _check_devices(world_size: int, device: torch.device) -> None:
    """A :class:`ConfigError` unless this process can shard the tables over ``world_size`` ranks from ``device``.

    On GPUs TorchRec puts rank ``r`` on ``cuda:r``: a worker sharding over N GPUs
    uses the first N, whatever GPU TorchServe assigned it, and fails rather than
    fall back to fewer.
    """
    if world_size < 1:
        raise ConfigError(f"tables shard over at least 1 rank, got {world_size}")
    if device.type == "cpu":
        return
    if device != torch.device("cuda", 0):
        raise ConfigError(f"sharded tables take their inputs on cuda:0 (ranks cuda:0..N-1) or the CPU, not {device}")
    available = torch.cuda.device_count()
    if available < world_size:
        raise ConfigError(
            f"the archive shards its tables over {world_size} GPUs (shard_tables_gpus), but this process sees "
            f"{available}: serve it on a host with at least {world_size} GPUs, or rebuild it with another "
            "--shard-tables-gpus"
        )


def _sharders() -> list[ModuleSharder[nn.Module]]:
    """TorchRec's inference sharder for quantized collections, their state kept as whole rows.

    TorchRec's default splits each row's scale and bias out of the state, which
    fails on fp16 tables, which have none (TorchRec 1.8: ``AttributeError:
    'NoneType' object has no attribute 'shape'`` in ``_initialize_torch_state``).
    Whole rows work for every dtype and allow table-wise sharding only, which is
    all this module asks for.
    """
    fused_params = {**DEFAULT_FUSED_PARAMS, FUSED_PARAM_QUANT_STATE_DICT_SPLIT_SCALE_BIAS: False}
    return [cast(ModuleSharder[nn.Module], QuantEmbeddingBagCollectionSharder(fused_params=fused_params))]


@contextmanager
def _propagating_device() -> Iterator[None]:
    """Have TorchRec build the sharded modules for the device type it is given, the CPU included.

    Without it TorchRec assumes CUDA for every rank. The switch is process-wide
    and read only while the modules are built (sharding, then the first call:
    :func:`_build_distributions`), so it is restored after.
    """
    previous = get_propogate_device()
    set_propogate_device(True)
    try:
        yield
    finally:
        set_propogate_device(previous)


def _build_distributions(sharded: nn.Module, tables: list[EmbeddingBagConfig], device: torch.device) -> None:
    """Call the sharded collection once, on an empty batch, to have TorchRec build its input and output
    distributions now, while the device type propagates, rather than at the first request.

    TorchRec builds them at the first call and keeps that call's feature order (the
    tables' features, in order, as the model's inputs always are) and device.
    """
    keys = [feature for table in tables for feature in table.feature_names]
    empty = KeyedJaggedTensor(
        keys=keys,
        values=torch.empty(0, dtype=torch.int64, device=device),
        lengths=torch.zeros(len(keys), dtype=torch.int64, device=device),
    )
    with torch.no_grad():
        sharded(empty)


def _copy_rows(source: QuantEmbeddingBagCollection, sharded: nn.Module) -> None:
    """Copy each table's rows from ``source`` into the TBE TorchRec built for the table on its rank's device,
    and a frequency-ordered table's remap with them: each rank maps the ids of its own tables.

    Only the rows' data, scale and bias are copied, padding cut off: the row
    alignment differs between the CPU and GPUs.
    """
    views = table_views(source)
    remaps = table_remaps(source)
    copied = []
    for module in sharded.modules():
        if not isinstance(module, IntNBitTableBatchedEmbeddingBagsCodegen):
            continue
        if remaps:
            set_remaps(module, remaps)
        for (name, _, _, _, _), (rows, _, _) in zip(
            module.embedding_specs, module.split_embedding_weights_with_scale_bias(0), strict=True
        ):
            view = views[name]
            target = rows[:, : view.shape[1]]
            for start, end in row_blocks(*view.shape):
                target[start:end].copy_(view[start:end])
            copied.append(name)
    assert sorted(copied) == sorted(views), f"table-wise sharding holds every table once, got {copied}"
