"""Build the TorchRec DLRM described by a :class:`DLRMConfig`.

Construction happens on the ``meta`` device: no memory is allocated for tables
until weights are either loaded (``load_state_dict(..., assign=True)``, which
adopts the loaded tensors without a copy) or initialised on a real device. That
keeps building a 45 GB configuration, or a model about to receive a checkpoint,
cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from model_factory.config import DLRMConfig

META = torch.device("meta")


def table_name(feature_name: str) -> str:
    return f"t_{feature_name}"


def embedding_bag_configs(config: DLRMConfig) -> list[EmbeddingBagConfig]:
    """One sum-pooled table per sparse feature, in the config's feature order."""
    return [
        EmbeddingBagConfig(
            name=table_name(feature),
            embedding_dim=config.embedding_dim,
            num_embeddings=num_embeddings,
            feature_names=[feature],
        )
        for feature, num_embeddings in zip(config.sparse_feature_names, config.num_embeddings_per_feature, strict=True)
    ]


def build_dlrm(config: DLRMConfig, device: torch.device | str = META) -> DLRM:
    """The TorchRec ``DLRM`` for ``config``; on ``meta`` (the default) nothing is allocated."""
    device = torch.device(device)
    tables = EmbeddingBagCollection(tables=embedding_bag_configs(config), device=device)
    return DLRM(
        embedding_bag_collection=tables,
        dense_in_features=config.num_dense_features,
        dense_arch_layer_sizes=list(config.dense_arch_layer_sizes),
        over_arch_layer_sizes=list(config.over_arch_layer_sizes),
        dense_device=device,
    )


def init_weights(model: DLRM, seed: int, device: torch.device | str = "cpu") -> DLRM:
    """Allocate what is still on meta on ``device`` and initialise it deterministically from ``seed``.

    Tables use TorchRec's own initialiser (uniform in ±sqrt(1/rows)), linear layers
    PyTorch's default; the global RNG state is left untouched.
    """
    materialize(model, torch.device(device))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        collection = model.sparse_arch.embedding_bag_collection
        if isinstance(collection, EmbeddingBagCollection):  # quantized tables come filled (random_tables.fill_random)
            for table in collection.embedding_bag_configs():
                assert table.init_fn is not None  # EmbeddingBagConfig always sets one
                table.init_fn(collection.embedding_bags[table.name].weight)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    return model


def materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) storage on ``device`` for the parameters and buffers still on meta.

    Unlike ``to_empty``, tensors that already live on a device are left alone:
    buffers computed at construction (the interaction's ``triu_indices``) and
    tables that were allocated and filled already (quantized collections).
    """
    for owner in module.modules():
        for name, parameter in owner.named_parameters(recurse=False):
            if parameter.is_meta:
                empty = torch.empty_like(parameter, device=device)
                owner._parameters[name] = nn.Parameter(empty, requires_grad=parameter.requires_grad)
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer.is_meta:
                owner._buffers[name] = torch.empty_like(buffer, device=device)


def load_weights(model: DLRM, state_dict: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> DLRM:
    """Adopt ``state_dict`` into a meta-built model (no copy on CPU) and move it to ``device``.

    Strict: a checkpoint for another shape fails here with PyTorch's list of
    missing/unexpected keys rather than serving a half-initialised model.
    """
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(torch.device(device))


@dataclass(frozen=True)
class ComponentSize:
    name: str
    parameters: int
    bytes: int


def summarize(model: DLRM) -> list[ComponentSize]:
    """Parameter count and storage per top-level component, then the total.

    Sizes include buffers (the interaction's index pairs). Quantized tables are
    measured where FBGEMM keeps them (its TBE weight buffers, row padding
    included), not through their ``state_dict`` views, which misreport int4
    tables. Works on meta-built models.
    """
    rows = []
    for name, child in model.named_children():
        tensors = [*child.parameters(), *child.buffers()]
        parameters = sum(p.numel() for p in child.parameters())
        size = sum(t.numel() * t.element_size() for t in tensors)
        if name == "sparse_arch" and isinstance(child.embedding_bag_collection, QuantEmbeddingBagCollection):
            tables = child.embedding_bag_collection
            parameters = sum(t.num_embeddings * t.embedding_dim for t in tables.embedding_bag_configs())
            size = sum(
                buffer.numel()
                for module in tables._emb_modules
                for buffer in (module.weights_host, module.weights_dev, module.weights_uvm)
            )
        rows.append(ComponentSize(name=name, parameters=parameters, bytes=size))
    rows.append(ComponentSize("total", sum(r.parameters for r in rows), sum(r.bytes for r in rows)))
    return rows


def format_summary(rows: list[ComponentSize]) -> str:
    """A fixed-width table of :func:`summarize` rows, like torchinfo's summary."""
    lines = [f"{'component':<14}{'parameters':>18}{'size':>14}", "-" * 46]
    for row in rows:
        if row.name == "total":
            lines.append("-" * 46)
        lines.append(f"{row.name:<14}{row.parameters:>18,}{human_bytes(row.bytes):>14}")
    return "\n".join(lines)


def human_bytes(size: float) -> str:
    """``size`` bytes in B, KiB, MiB or GiB, as people read memory sizes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")
