"""The process group and the sharded model: one process, or one of the ranks ``torchrun`` started.

``torchrun`` describes each rank in environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and the rendezvous address),
which ``torch.distributed.init_process_group`` reads; a plain ``python -m
training.train`` runs as the one rank of a process group that opens no port.
Tables are placed by TorchRec's planner (table-wise, row-wise or column-wise, as
its cost model decides among the sharding types allowed) and exchanged between
ranks with all-to-alls inside ``DistributedModelParallel``; the MLPs are
replicated and their gradients averaged (data parallel, DDP). Gloo on CPU,
NCCL on GPUs, one GPU per rank.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.models.dlrm import DLRM

from model_factory.config import ConfigError, DLRMConfig
from model_factory.factory import table_name

# Share of each device's memory the planner keeps free for everything but the tables.
STORAGE_RESERVATION = 0.15
_TABLES = "sparse_arch.embedding_bag_collection"
T = TypeVar("T")


class Sharding(StrEnum):
    """The ways TorchRec's planner may split a table between ranks.

    TorchRec 1.8 offers the row-wise ones on GPUs only; on CPU the planner picks among the others.
    """

    TABLE_WISE = ShardingType.TABLE_WISE.value
    COLUMN_WISE = ShardingType.COLUMN_WISE.value
    TABLE_COLUMN_WISE = ShardingType.TABLE_COLUMN_WISE.value
    ROW_WISE = ShardingType.ROW_WISE.value
    TABLE_ROW_WISE = ShardingType.TABLE_ROW_WISE.value


@dataclass(frozen=True)
class ShardingChoices:
    """What the planner may choose: ``allowed`` for every table, ``per_feature`` overrides for some.

    Data-parallel tables are never offered: they would train densely (and through
    an FBGEMM op without a CPU autograd kernel) instead of with the fused
    row-wise optimizer.
    """

    allowed: tuple[Sharding, ...] = tuple(Sharding)
    per_feature: Mapping[str, tuple[Sharding, ...]] = field(default_factory=dict)

    def constraints(self, config: DLRMConfig) -> dict[str, ParameterConstraints]:
        unknown = sorted(set(self.per_feature) - set(config.sparse_feature_names))
        if unknown:
            raise ConfigError(f"sharding given for unknown sparse features {unknown}")
        return {
            table_name(feature): ParameterConstraints(
                sharding_types=[sharding.value for sharding in self.per_feature.get(feature, self.allowed)],
                compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            )
            for feature in config.sparse_feature_names
        }


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def init_process_group() -> Ranks:
    """Join the process group ``torchrun`` describes, or make a one-process group when run directly.

    A one-process group still exists because TorchRec's sharded modules need one;
    it uses an in-memory store, so no port is opened.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Ranks(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device=device,
    )


def sharding_plan(model: DLRM, config: DLRMConfig, ranks: Ranks, choices: ShardingChoices) -> ShardingPlan:
    """TorchRec's plan for ``model``'s tables over the ranks, agreed by all of them (``collective_plan``)."""
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=ranks.world_size, local_world_size=ranks.local_world_size),
        kernel_config=KernelConfig(ranks.device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=choices.constraints(config),
        # A fixed share: TorchRec's default heuristic warns that it misjudges models built on meta, as ours is.
        storage_reservation=FixedPercentageStorageReservation(STORAGE_RESERVATION),
    )
    return planner.collective_plan(model, None, dist.GroupMember.WORLD)


def shard(model: DLRM, plan: ShardingPlan, ranks: Ranks) -> DistributedModelParallel:
    """``model`` (built on meta) with its tables placed as ``plan`` says and its MLPs replicated on every rank."""
    with warnings.catch_warnings():
        # TorchRec 1.8 passes DDP's deprecated `broadcast_buffers` itself; nothing a caller can change.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedModelParallel(module=model, device=ranks.device, plan=plan)


def describe_plan(plan: ShardingPlan) -> dict[str, dict[str, object]]:
    """Per table: the sharding type and each shard's rank, row/column offsets and sizes (for ``sharding.json``)."""
    tables = plan.plan[_TABLES]
    described = {}
    for name, parameter in tables.items():
        assert parameter.sharding_spec is not None
        described[name] = {
            "sharding_type": parameter.sharding_type,
            "shards": [
                {"rank": shard.placement.rank(), "offsets": shard.shard_offsets, "sizes": shard.shard_sizes}
                for shard in parameter.sharding_spec.shards
            ],
        }
    return described


def local_table_bytes(model: DistributedModelParallel) -> int:
    """Bytes of table rows this rank holds: its own shards only."""
    total = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        for key, value in model.state_dict().items():
            if key.startswith(_TABLES) and hasattr(value, "local_shards"):
                total += sum(shard.tensor.numel() * shard.tensor.element_size() for shard in value.local_shards())
    return total


def all_ranks(flag: bool, ranks: Ranks) -> bool:
    """Whether ``flag`` holds on every rank (one tiny all-reduce; no communication with one rank)."""
    if ranks.world_size == 1:
        return flag
    value = torch.tensor([int(flag)], device=ranks.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """Whether ``flag`` holds on some rank."""
    return not all_ranks(not flag, ranks)


def gather(value: T, ranks: Ranks) -> list[T]:
    """``value`` of every rank, in rank order, on every rank (pickled: small values only)."""
    values: list[T | None] = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return [value for value in values if value is not None]


# Rows drawn from one generator when initialising a table: a shard draws the blocks it overlaps.
_INIT_BLOCK_ROWS = 65_536


def init_sharded_weights(model: DistributedModelParallel, seed: int) -> None:
    """Initialise every rank's shards and the MLPs from ``seed`` alone: the same model whatever the sharding.

    Tables are uniform in ±sqrt(1/rows) (TorchRec's default), drawn in blocks of
    rows, each from a generator seeded by (seed, table, block), so a shard draws
    only the blocks it overlaps and any split of the table into row- or
    column-wise shards holds the values one process would; linear layers get
    PyTorch's default initialisation, identical on every rank.
    """
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        tables = [(key, value) for key, value in model.state_dict().items() if key.startswith(_TABLES)]
        for index, (_, table) in enumerate(sorted(tables)):
            rows = table.size(0)
            bound = (1.0 / rows) ** 0.5
            for local in table.local_shards():
                (first_row, first_column), (shard_rows, shard_columns) = (
                    local.metadata.shard_offsets,
                    local.metadata.shard_sizes,
                )
                for block in range(first_row // _INIT_BLOCK_ROWS, -(-(first_row + shard_rows) // _INIT_BLOCK_ROWS)):
                    start = block * _INIT_BLOCK_ROWS
                    generator = torch.Generator().manual_seed(seed * 2**40 + index * 2**24 + block)
                    values = torch.empty((min(_INIT_BLOCK_ROWS, rows - start), table.size(1)))
                    values.uniform_(-bound, bound, generator=generator)
                    low, high = max(first_row, start), min(first_row + shard_rows, start + len(values))
                    local.tensor[low - first_row : high - first_row].copy_(
                        values[low - start : high - start, first_column : first_column + shard_columns]
                    )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.reset_parameters()
