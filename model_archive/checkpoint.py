"""Weights from a ``torch.distributed.checkpoint`` (DCP) directory, one table at a time, into a model artifact.

The checkpoint may be one the trainer wrote (``runs/NAME/checkpoints/step-N``)
or one written by any TorchRec ``DistributedModelParallel`` training of a DLRM
of the same shape: its keys are found by their ending (``sparse_arch.
embedding_bag_collection.embedding_bags.t_cat_0.weight`` under whatever prefix
the training wrapped the model in) and every key and shape is checked against
the model config before anything is read. DCP reads shards written by any
number of ranks into whole tensors, and it reads only the tensors asked for:
the MLPs once, then each table when its turn comes. Quantized tables are
quantized as they are read and streamed into ``tables.bin``, so no process holds
more than one fp32 table; an fp32 archive holds its tables together, as every
worker serving it will.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata

from model_factory.artifact import TABLES_FILE, WEIGHTS_FILE, ModelArtifact, save_state_dict, write_description
from model_factory.config import ConfigError, DLRMConfig
from model_factory.factory import build_dlrm
from model_factory.table_file import StoredTable, write_table_file
from model_factory.tbe import quantize_table

_TABLE_PREFIX = "sparse_arch.embedding_bag_collection.embedding_bags."


@dataclass(frozen=True)
class CheckpointWeights:
    """The DCP checkpoint at ``path`` matched against a model config: model key → key in the checkpoint, and
    the checkpoint's description of each stored tensor."""

    path: Path
    keys: dict[str, str]
    stored: dict[str, TensorStorageMetadata]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named model tensors, whole, read from every shard that holds part of them."""
        stored = [self.stored[self.keys[name]] for name in names]
        state = {
            self.keys[name]: torch.empty(tensor.size, dtype=tensor.properties.dtype)
            for name, tensor in zip(names, stored, strict=True)
        }
        with warnings.catch_warnings():
            # DCP warns that it runs without a process group, which is what no_dist asks for.
            warnings.filterwarnings("ignore", message=".*no_dist.*|.*process group.*", category=UserWarning)
            dcp.load(state, checkpoint_id=self.path, no_dist=True)
        return {name: state[self.keys[name]] for name in names}

    def table(self, name: str) -> torch.Tensor:
        (weight,) = self.read([f"{_TABLE_PREFIX}{name}.weight"]).values()
        return weight


def _tensors(path: Path) -> dict[str, TensorStorageMetadata]:
    try:
        metadata = FileSystemReader(path).read_metadata()
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(f"{path} is not a readable torch.distributed.checkpoint directory: {error}") from error
    return {
        key: value for key, value in metadata.state_dict_metadata.items() if isinstance(value, TensorStorageMetadata)
    }


def match_checkpoint(path: Path, config: DLRMConfig) -> CheckpointWeights:
    """Find every tensor of ``config``'s DLRM in the checkpoint; a :class:`ConfigError` naming what does not match."""
    stored = _tensors(path)
    expected = {key: tuple(value.shape) for key, value in build_dlrm(config).state_dict().items()}
    anchor = next(key for key in expected if key.startswith(_TABLE_PREFIX))
    prefixes = {key[: -len(anchor)] for key in stored if key == anchor or key.endswith("." + anchor)}
    if len(prefixes) != 1:
        found = "several models" if prefixes else "no DLRM weights"
        raise ConfigError(f"{path}: {found} in the checkpoint (looked for a tensor named ...{anchor})")
    (prefix,) = prefixes
    missing = [key for key in expected if prefix + key not in stored]
    if missing:
        raise ConfigError(
            f"{path} does not hold this model config's weights: {len(missing)} tensor(s) missing, e.g. "
            f"{', '.join(missing[:3])}"
        )
    wrong = [
        f"{key} is {tuple(stored[prefix + key].size)} in the checkpoint, {shape} in the config"
        for key, shape in expected.items()
        if tuple(stored[prefix + key].size) != shape
    ]
    if wrong:
        raise ConfigError(f"{path} does not match the model config: {'; '.join(wrong[:3])}")
    return CheckpointWeights(path, {key: prefix + key for key in expected}, stored)


def write_artifact_from_checkpoint(
    directory: Path,
    artifact: ModelArtifact,
    checkpoint: Path,
    order_of: Callable[[StoredTable], torch.Tensor] | None = None,
) -> None:
    """Write ``artifact`` into ``directory`` with the weights of the DCP ``checkpoint``, table by table.

    A frequency-ordered artifact needs ``order_of``, each table's ids in row order.
    """
    weights = match_checkpoint(checkpoint, artifact.model)
    dense = [key for key in weights.keys if not key.startswith(_TABLE_PREFIX)]
    state = weights.read(dense)
    directory.mkdir(parents=True, exist_ok=True)
    if artifact.quantized_tables:

        def quantized(table: StoredTable) -> torch.Tensor:
            return quantize_table(table, weights.table(table.name))

        write_table_file(artifact.table_file(), directory / TABLES_FILE, quantized, order_of)
    else:
        state |= weights.read([key for key in weights.keys if key.startswith(_TABLE_PREFIX)])
    save_state_dict(directory / WEIGHTS_FILE, state)
    write_description(directory, artifact)
