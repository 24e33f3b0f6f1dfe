"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): each rank writes its own shards.

A checkpoint is a DCP directory ``checkpoints/step-NNNNNNNNN`` of the output
directory holding ``model`` (the ``DistributedModelParallel`` state dict: table
shards and the MLPs), ``optimizer`` (the fused table optimizer's per-row state
and the dense optimizer's) and ``progress`` (where in the data the run was).
DCP writes its ``.metadata`` file last, so a directory without one is an
interrupted save and is ignored. Resuming may use another number of ranks: DCP
reshards on load.

``model_archive.checkpoint`` turns the ``model`` part of such a checkpoint (or
one written by any TorchRec ``DistributedModelParallel`` training of the same
model) into an archive, one table at a time.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import optim
from torchrec.distributed import DistributedModelParallel

CHECKPOINTS_DIR = "checkpoints"
MODEL_KEY = "model"
_METADATA = ".metadata"
_PREFIX = "step-"
# Checkpoints kept in a run: the newest, and the one before in case the newest cannot be read.
KEEP = 2


@dataclass(frozen=True)
class Progress:
    """Where a run is: ``epoch`` (0-based), global batches done in it, ``step``s done in all.

    ``global_batch``: rows per step over all ranks; a run resumes only with the
    same, since it skips that many rows per batch done (any number of ranks
    that multiplies out to it will do).
    """

    epoch: int = 0
    batches: int = 0
    step: int = 0
    global_batch: int = 0


def checkpoint_dirs(output: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = output / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(path for path in root.glob(f"{_PREFIX}*") if is_checkpoint(path))


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a complete DCP checkpoint directory."""
    return (path / _METADATA).is_file()


def latest_checkpoint(output: Path) -> Path | None:
    checkpoints = checkpoint_dirs(output)
    return checkpoints[-1] if checkpoints else None


def _state(model: DistributedModelParallel, optimizer: optim.Optimizer, progress: Progress) -> dict[str, Any]:
    return {MODEL_KEY: model.state_dict(), "optimizer": optimizer.state_dict(), "progress": asdict(progress)}


def save(output: Path, model: DistributedModelParallel, optimizer: optim.Optimizer, progress: Progress) -> Path:
    """Write a checkpoint of every rank's shards (collective) and drop all but the newest ``KEEP``."""
    path = output / CHECKPOINTS_DIR / f"{_PREFIX}{progress.step:09d}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        dcp.save(_state(model, optimizer, progress), checkpoint_id=path)
    if dist.get_rank() == 0:
        for old in checkpoint_dirs(output)[:-KEEP]:
            shutil.rmtree(old)
    dist.barrier()
    return path


def restore(path: Path, model: DistributedModelParallel, optimizer: optim.Optimizer) -> Progress:
    """Load the checkpoint at ``path`` into the model and optimizer in place (collective); returns its progress."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        state = _state(model, optimizer, Progress())
        dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state[MODEL_KEY])
    optimizer.load_state_dict(state["optimizer"])
    return Progress(**state["progress"])
