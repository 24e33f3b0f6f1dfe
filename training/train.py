"""Train a DLRM on Criteo-format TSV files and write a model artifact that build_mar.py archives.

    python -m training.train --preset small \\
        --train data/synthetic/train.tsv --validation data/synthetic/validation.tsv --output runs/small

Embedding tables train with TorchRec's fused, row-wise optimizers: the table
update runs inside the backward pass on the rows a batch touched (FBGEMM's
kernels, via ``DistributedModelParallel`` on one CPU process), so a step costs
the same whatever the table sizes. The MLPs use the matching dense optimizer.
The learning rate follows the DLRM reference's policy: linear warm-up, constant,
then polynomial (power 2) decay to zero.

The output directory is a model artifact (``model_config.json`` with the
preprocessing and the validation metrics, ``weights.pt``) plus ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from model_factory.artifact import ModelArtifact, Provenance, write_artifact
from model_factory.config import DEFAULT_PRESET, PRESETS, DLRMConfig, preset
from model_factory.factory import build_dlrm, load_weights, table_name
from model_factory.features import Preprocessing
from training.criteo import metadata_path, read_batches

# Share of each device's memory the planner keeps free for everything but the tables.
STORAGE_RESERVATION = 0.15


class Optimizer(StrEnum):
    """Row-wise Adagrad (fused, per table row) or SGD for the tables; the same algorithm for the MLPs."""

    ADAGRAD = "adagrad"
    SGD = "sgd"


class Loss(StrEnum):
    """``bce`` on logits, ``wbce`` with clicks weighted, ``mse`` on probabilities (the DLRM reference's losses)."""

    BCE = "bce"
    WBCE = "wbce"
    MSE = "mse"


@dataclass(frozen=True)
class LearningRatePolicy:
    """The DLRM reference's schedule as a multiplier of the base learning rate at a given step."""

    warmup_steps: int = 0
    decay_start: int = 0
    decay_steps: int = 0

    def multiplier(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay_steps and step >= self.decay_start:
            remaining = max(0.0, 1.0 - (step - self.decay_start) / self.decay_steps)
            return remaining**2
        return 1.0


@dataclass(frozen=True)
class TrainingConfig:
    model: DLRMConfig
    train_paths: tuple[Path, ...]
    validation_paths: tuple[Path, ...]
    output: Path
    epochs: int = 1
    batch_size: int = 1024
    learning_rate: float = 0.05
    optimizer: Optimizer = Optimizer.ADAGRAD
    schedule: LearningRatePolicy = LearningRatePolicy()
    loss: Loss = Loss.BCE
    positive_weight: float = 3.0
    seed: int = 0
    progress: bool = True


def init_single_process_group() -> None:
    """TorchRec's sharded modules need a process group, even for one CPU process; no port is opened."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def sharded_model(config: TrainingConfig) -> DistributedModelParallel:
    torch.manual_seed(config.seed)
    model = build_dlrm(config.model)
    if config.optimizer == Optimizer.ADAGRAD:
        apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": config.learning_rate})
    else:
        apply_optimizer_in_backward(torch.optim.SGD, model.sparse_arch.parameters(), {"lr": config.learning_rate})
    # Every table table-wise with the fused kernel: left to itself the planner makes small tables
    # data-parallel, which trains them densely (and through an FBGEMM op without an autograd kernel).
    fused = ParameterConstraints(
        sharding_types=[ShardingType.TABLE_WISE.value], compute_kernels=[EmbeddingComputeKernel.FUSED.value]
    )
    constraints = {table_name(feature): fused for feature in config.model.sparse_feature_names}
    topology = TopologyFactory.create_topology(TrainerConfig(world_size=1), kernel_config=KernelConfig("cpu"))
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        # A fixed share: TorchRec's default heuristic warns that it misjudges models built on meta, as ours is.
        storage_reservation=FixedPercentageStorageReservation(STORAGE_RESERVATION),
    )
    plan = planner.collective_plan(model, None, dist.GroupMember.WORLD)
    with warnings.catch_warnings():
        # TorchRec 1.8 passes DDP's deprecated `broadcast_buffers` itself; nothing a caller can change.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan)


def make_optimizer(model: DistributedModelParallel, config: TrainingConfig) -> CombinedOptimizer:
    dense_class = torch.optim.Adagrad if config.optimizer == Optimizer.ADAGRAD else torch.optim.SGD
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: dense_class(params, lr=config.learning_rate),
    )
    return CombinedOptimizer([model.fused_optimizer, dense])


def loss_function(loss: Loss, positive_weight: float) -> nn.Module:
    match loss:
        case Loss.BCE:
            return nn.BCEWithLogitsLoss()
        case Loss.WBCE:
            return nn.BCEWithLogitsLoss(pos_weight=torch.tensor(positive_weight))
        case Loss.MSE:
            return _ProbabilityMSE()


class _ProbabilityMSE(nn.Module):
    """Mean squared error between the click probability and the label (the reference's ``mse``)."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(torch.sigmoid(logits), labels)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, batch: Batch) -> torch.Tensor:
    """One update; the tables' rows are updated inside ``backward`` by the fused optimizer."""
    logits = model(batch.dense_features, batch.sparse_features).squeeze(1)
    loss = criterion(logits, batch.labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def plain_state_dict(model: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """The sharded model's weights as an ordinary ``DLRM`` state dict (tables gathered to full tensors)."""
    plain = {}
    with warnings.catch_warnings():
        # TorchRec 1.8's sharded tables are ShardedTensors, which PyTorch deprecates in favour of DTensor.
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        for key, value in model.state_dict().items():
            if hasattr(value, "local_shards"):  # a ShardedTensor: one process holds every shard
                full = torch.empty(value.size(), dtype=value.dtype)
                value.gather(dst=0, out=full)
                value = full
            plain[key] = value.detach().clone()
    return plain


@dataclass(frozen=True)
class Evaluation:
    auc: float
    logloss: float
    accuracy: float
    rows: int


def evaluate(model: nn.Module, batches: Iterator[Batch]) -> Evaluation:
    """AUC, log loss and accuracy (threshold 0.5) with torchmetrics, streaming over ``batches``."""
    auc, accuracy, logloss = BinaryAUROC(), BinaryAccuracy(), MeanMetric()
    rows = 0
    model.eval()
    with torch.inference_mode():
        for batch in batches:
            logits = model(batch.dense_features, batch.sparse_features).squeeze(1)
            labels = batch.labels
            auc.update(torch.sigmoid(logits), labels.long())
            accuracy.update(torch.sigmoid(logits), labels.long())
            losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            logloss.update(losses)
            rows += labels.numel()
    model.train()
    return Evaluation(float(auc.compute()), float(logloss.compute()), float(accuracy.compute()), rows)


def planted_auc(paths: Sequence[Path]) -> float | None:
    """The planted model's AUC on a synthetic validation file (from its metadata), if there is one file with it."""
    if len(paths) != 1 or not metadata_path(paths[0]).exists():
        return None
    return json.loads(metadata_path(paths[0]).read_text())["planted_auc"]


def train(config: TrainingConfig) -> dict[str, float]:
    """Train, evaluate, write the artifact and ``metrics.json``; returns the metrics."""
    init_single_process_group()
    preprocessing = Preprocessing()
    model = sharded_model(config)
    optimizer = make_optimizer(model, config)
    base_rates = [group["lr"] for group in optimizer.param_groups]
    criterion = loss_function(config.loss, config.positive_weight)
    step, rows_seen, started = 0, 0, time.perf_counter()
    # disable=None: a progress bar on a terminal only, not a line per update in logs.
    with tqdm(unit="rows", unit_scale=True, disable=None if config.progress else True, desc="training") as progress:
        for epoch in range(config.epochs):
            for batch in read_batches(config.train_paths, config.batch_size, config.model, preprocessing):
                multiplier = config.schedule.multiplier(step)
                for group, base in zip(optimizer.param_groups, base_rates, strict=True):
                    group["lr"] = base * multiplier
                loss = train_step(model, optimizer, criterion, batch)
                step += 1
                rows_seen += batch.labels.numel()
                progress.update(batch.labels.numel())
                if step % 20 == 0:
                    progress.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", lr=f"{base_rates[0] * multiplier:.3g}")
    train_seconds = time.perf_counter() - started

    plain = load_weights(build_dlrm(config.model), plain_state_dict(model)).eval()
    evaluation = evaluate(
        plain, read_batches(config.validation_paths, max(config.batch_size, 4096), config.model, preprocessing)
    )
    metrics: dict[str, float] = {
        "auc": evaluation.auc,
        "logloss": evaluation.logloss,
        "accuracy": evaluation.accuracy,
        "validation_rows": evaluation.rows,
        "rows_seen": rows_seen,
        "train_seconds": round(train_seconds, 1),
        "train_rows_per_second": round(rows_seen / train_seconds, 1),
    }
    reference = planted_auc(config.validation_paths)
    if reference is not None:
        metrics["planted_auc"] = reference
        metrics["auc_vs_planted"] = evaluation.auc / reference
    artifact = ModelArtifact(
        model=config.model,
        provenance=Provenance(trained=True, seed=config.seed, checkpoint=config.output.name, metrics=metrics),
        preprocessing=preprocessing,
    )
    write_artifact(config.output, artifact, plain)
    (config.output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def parse_args(argv: list[str] | None = None) -> TrainingConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--preset", choices=sorted(PRESETS), help=f"model shape (default: {DEFAULT_PRESET})")
    shape.add_argument("--config", type=Path, help="model config JSON file instead of a preset")
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="Criteo TSV file(s), .gz allowed")
    parser.add_argument("--validation", type=Path, nargs="+", required=True, help="held-out Criteo TSV file(s)")
    parser.add_argument("--output", type=Path, required=True, help="directory for the model artifact and metrics")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training files (default: 1)")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per step (default: 1024)")
    parser.add_argument("--learning-rate", type=float, default=0.05, help="base learning rate (default: 0.05)")
    parser.add_argument(
        "--optimizer",
        type=Optimizer,
        choices=list(Optimizer),
        default=Optimizer.ADAGRAD,
        help="row-wise Adagrad or SGD for the tables, the same for the MLPs (default: adagrad)",
    )
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    parser.add_argument("--decay-start", type=int, default=0, help="step where polynomial decay starts (default: 0)")
    parser.add_argument("--decay-steps", type=int, default=0, help="steps of decay to zero; 0 = no decay (default: 0)")
    parser.add_argument(
        "--loss", type=Loss, choices=list(Loss), default=Loss.BCE, help="bce, mse (on probabilities) or wbce"
    )
    parser.add_argument("--positive-weight", type=float, default=3.0, help="weight of clicks for wbce (default: 3.0)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.learning_rate <= 0 or not math.isfinite(args.learning_rate):
        parser.error("--epochs and --batch-size must be at least 1 and --learning-rate positive")
    model = DLRMConfig.from_json(args.config.read_text()) if args.config else preset(args.preset or DEFAULT_PRESET)
    return TrainingConfig(
        model=model,
        train_paths=tuple(args.train),
        validation_paths=tuple(args.validation),
        output=args.output,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        schedule=LearningRatePolicy(args.warmup_steps, args.decay_start, args.decay_steps),
        loss=args.loss,
        positive_weight=args.positive_weight,
        seed=args.seed,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> None:
    # PyTorch logs a notice about its own is_fx_tracing() the first time TorchRec's modules call it.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    config = parse_args(argv)
    metrics = train(config)
    planted = f" (planted {metrics['planted_auc']:.4f})" if "planted_auc" in metrics else ""
    print(
        f"validation AUC {metrics['auc']:.4f}{planted}, log loss {metrics['logloss']:.4f}, "
        f"accuracy {metrics['accuracy']:.4f} on {metrics['validation_rows']:,.0f} rows; "
        f"trained on {metrics['rows_seen']:,.0f} rows in {metrics['train_seconds']:.0f} s\n"
        f"wrote {config.output}/ (metrics.json has every figure)"
    )


if __name__ == "__main__":
    main()
