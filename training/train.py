"""Train a DLRM on Criteo-format TSV files and write a model artifact that build_mar.py archives.

    python -m training.train --preset small \\
        --train data/synthetic/train.tsv --validation data/synthetic/validation.tsv --output runs/small
    torchrun --nproc-per-node 2 -m training.train --preset small ...   # the same, on 2 ranks

Embedding tables train with TorchRec's fused, row-wise optimizers: the table
update runs inside the backward pass on the rows a batch touched (FBGEMM's
kernels, via ``DistributedModelParallel``), so a step costs the same whatever
the table sizes. Under ``torchrun`` the tables are sharded between the ranks as
TorchRec's planner decides and the MLPs are data parallel
(:mod:`training.distributed`); ``--batch-size`` is per rank, and each rank
reads its own part of every global batch. The MLPs use the matching dense
optimizer. The learning rate follows the DLRM reference's policy: linear
warm-up, constant, then polynomial (power 2) decay to zero.

The output directory is a model artifact (``model_config.json`` with the
preprocessing and the validation metrics) with ``metrics.json``,
``sharding.json`` (the plan, each rank's table bytes), ``frequencies.pt`` (how
often the first epoch looked up each row of each table, for ``build_mar.py
--frequencies``: :mod:`training.frequencies`) and DCP checkpoints
(:mod:`training.checkpoint`), the newest holding the final weights; a
one-process run also writes them as ``weights.pt``. ``--resume`` continues from
the newest checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# Imported with this module, before any process group exists: ZeroRedundancyOptimizer, which this import brings,
# takes ``dist.group.WORLD`` as a default argument, and imported after init_process_group that default would keep
# the gloo group (and its threads) alive past destroy_process_group, into interpreter teardown. TorchRec's own
# apply_optimizer_in_backward imports it lazily, inside the call, and is deprecated in favour of this one.
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchmetrics.functional.classification import binary_accuracy, binary_auroc
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from model_factory.artifact import WEIGHTS_FILE, ModelArtifact, Provenance, write_artifact, write_description
from model_factory.config import DEFAULT_PRESET, PRESETS, ConfigError, DLRMConfig, preset
from model_factory.factory import build_dlrm, load_weights
from model_factory.features import Preprocessing, rows_to_kjt
from model_factory.files import write_file
from training import checkpoint
from training.checkpoint import Progress
from training.criteo import metadata_path, read_batches
from training.distributed import (
    Ranks,
    Sharding,
    ShardingChoices,
    all_ranks,
    any_rank,
    describe_plan,
    gather,
    init_process_group,
    init_sharded_weights,
    local_table_bytes,
    shard,
    sharding_plan,
)
from training.frequencies import IdCounter, counting
from training.loader import prefetched_batches

SHARDING_FILE = "sharding.json"


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
    sharding: ShardingChoices = field(default_factory=ShardingChoices)
    checkpoint_every: int = 0  # steps between checkpoints; 0: at the end of every epoch only
    loader_workers: int = 1  # processes reading ahead per rank; 0: read in the training process
    resume: bool = False


def build_sharded_model(config: TrainingConfig, ranks: Ranks) -> tuple[DistributedModelParallel, ShardingPlan]:
    """The DLRM with its table optimizer fused into the backward pass, sharded over the ranks by TorchRec's planner."""
    model = build_dlrm(config.model)
    if config.optimizer == Optimizer.ADAGRAD:
        apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": config.learning_rate})
    else:
        apply_optimizer_in_backward(torch.optim.SGD, model.sparse_arch.parameters(), {"lr": config.learning_rate})
    plan = sharding_plan(model, config.model, ranks, config.sharding)
    sharded = shard(model, plan, ranks)
    init_sharded_weights(sharded, config.seed)
    return sharded, plan


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
    """A one-process model's weights as an ordinary ``DLRM`` state dict (its table shards are whole tables)."""
    plain = {}
    with warnings.catch_warnings():
        # TorchRec 1.8's sharded tables are ShardedTensors, which PyTorch deprecates in favour of DTensor.
        warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
        for key, value in model.state_dict().items():
            if hasattr(value, "local_shards"):  # a ShardedTensor: the one process holds every shard
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


def filler_batch(config: DLRMConfig) -> Batch:
    """One all-zero row: what a rank without data left feeds to the sharded model while the others finish."""
    features = config.num_sparse_features
    return Batch(
        dense_features=torch.zeros((1, config.num_dense_features)),
        sparse_features=rows_to_kjt(
            config.sparse_feature_names, np.ones((1, features), dtype=np.int64), np.zeros(features, dtype=np.int64)
        ),
        labels=torch.zeros(1),
    )


def evaluate(model: nn.Module, batches: Iterable[Batch], ranks: Ranks, config: DLRMConfig) -> Evaluation:
    """AUC, log loss and accuracy (threshold 0.5) over every rank's ``batches`` together.

    The sharded model's forward is collective: a rank whose data ran out feeds
    :func:`filler_batch` (scored, not counted) until every rank's has.
    """
    scores, labels = [], []
    filler = filler_batch(config)
    iterator = iter(batches)
    model.eval()
    # no_grad, not inference_mode: FBGEMM's CPU training lookup is registered under the autograd key only.
    with torch.no_grad():
        while any_rank((batch := next(iterator, None)) is not None, ranks):
            logits = model((batch or filler).dense_features, (batch or filler).sparse_features).squeeze(1)
            if batch is not None:
                scores.append(logits.float().cpu())
                labels.append(batch.labels)
    model.train()
    mine = (torch.cat(scores) if scores else torch.empty(0), torch.cat(labels) if labels else torch.empty(0))
    parts = gather(mine, ranks)
    logits = torch.cat([part[0] for part in parts])
    targets = torch.cat([part[1] for part in parts])
    if not len(targets):
        raise ConfigError("the validation files hold no rows")
    probabilities = torch.sigmoid(logits)
    return Evaluation(
        auc=float(binary_auroc(probabilities, targets.long())),
        logloss=float(nn.functional.binary_cross_entropy_with_logits(logits, targets)),
        accuracy=float(binary_accuracy(probabilities, targets.long())),
        rows=len(targets),
    )


def planted_auc(paths: Sequence[Path]) -> float | None:
    """The planted model's AUC on a synthetic validation file (from its metadata), if there is one file with it."""
    if len(paths) != 1 or not metadata_path(paths[0]).exists():
        return None
    return json.loads(metadata_path(paths[0]).read_text())["planted_auc"]


@dataclass
class RunStats:
    """What this rank did: rows trained on, seconds in the loop and, of those, seconds waiting for a batch."""

    rows: int = 0
    seconds: float = 0.0
    waiting: float = 0.0


def training_batches(config: TrainingConfig, ranks: Ranks, preprocessing: Preprocessing) -> Iterator[Batch]:
    """This rank's batches of one epoch: read ahead by ``loader_workers`` background processes, or here."""
    part = {"rank": ranks.rank, "world_size": ranks.world_size}
    if config.loader_workers == 0:
        return read_batches(config.train_paths, config.batch_size, config.model, preprocessing, **part)
    return prefetched_batches(
        config.train_paths, config.batch_size, config.model, preprocessing, workers=config.loader_workers, **part
    )


def torch_threads(ranks: Ranks, loader_workers: int) -> int:
    """This rank's share of the usable cores, less its loader's: OpenMP threads that spin on the cores the
    loader needs starve it, for no faster step."""
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // ranks.local_world_size - loader_workers)


def train_epochs(
    config: TrainingConfig,
    ranks: Ranks,
    model: DistributedModelParallel,
    optimizer: CombinedOptimizer,
    start: Progress,
) -> RunStats:
    """Train from ``start`` to the end of the last epoch, checkpointing as configured; returns this rank's stats."""
    preprocessing = Preprocessing()
    base_rates = [group["lr"] for group in optimizer.param_groups]
    criterion = loss_function(config.loss, config.positive_weight)
    stats, step = RunStats(), start.step
    global_batch = config.batch_size * ranks.world_size
    # The first epoch is one pass over the training files: its ids are the frequencies (frequencies.pt).
    counter = IdCounter(config.model) if start.epoch == 0 else None
    started = time.perf_counter()
    show = config.progress and ranks.is_first
    # disable=None: a progress bar on a terminal only, not a line per update in logs.
    with tqdm(unit="rows", unit_scale=True, disable=None if show else True, desc="training") as bar:
        for epoch in range(start.epoch, config.epochs):
            done = start.batches if epoch == start.epoch else 0
            batches = training_batches(config, ranks, preprocessing)
            if epoch == 0 and counter is not None:  # batches skipped on a resume are counted too
                batches = counting(batches, counter)
            iterator = islice(batches, done, None)
            while True:
                waited = time.perf_counter()
                batch = next(iterator, None)
                stats.waiting += time.perf_counter() - waited
                # Every rank steps together (the all-to-alls are collective): the epoch ends when one runs out.
                if not all_ranks(batch is not None, ranks):
                    break
                assert batch is not None
                multiplier = config.schedule.multiplier(step)
                for group, base in zip(optimizer.param_groups, base_rates, strict=True):
                    group["lr"] = base * multiplier
                loss = train_step(model, optimizer, criterion, batch)
                step, done = step + 1, done + 1
                stats.rows += batch.labels.numel()
                bar.update(batch.labels.numel() * ranks.world_size)
                if step % 20 == 0:
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}", lr=f"{base_rates[0] * multiplier:.3g}")
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    checkpoint.save(config.output, model, optimizer, Progress(epoch, done, step, global_batch))
            if epoch == 0 and counter is not None:
                save_frequencies(counter, ranks, config.output)
            checkpoint.save(config.output, model, optimizer, Progress(epoch + 1, 0, step, global_batch))
    stats.seconds = time.perf_counter() - started
    return stats


def save_frequencies(counter: IdCounter, ranks: Ranks, output: Path) -> None:
    """Every rank's counts summed, written by rank 0 (collective), before the checkpoint that ends the epoch: a run
    resumed after it keeps the file, one resumed before counts its first epoch again."""
    if ranks.world_size > 1:
        counter.all_reduce(ranks.device)
    if ranks.is_first:
        counter.save(output)


def train(config: TrainingConfig) -> dict[str, float]:
    """Train (resuming if asked), evaluate, write the artifact, ``metrics.json`` and ``sharding.json``.

    Collective: every rank calls it; rank 0 writes the files. Returns the metrics.
    """
    ranks = init_process_group()
    torch.set_num_threads(torch_threads(ranks, config.loader_workers))
    model, plan = build_sharded_model(config, ranks)
    optimizer = make_optimizer(model, config)
    start = Progress()
    latest = checkpoint.latest_checkpoint(config.output) if config.resume else None
    if latest is not None:
        start = checkpoint.restore(latest, model, optimizer)
        if ranks.is_first:
            print(f"resuming from {latest}: epoch {start.epoch + 1}, step {start.step}", flush=True)
        if start.global_batch != config.batch_size * ranks.world_size:
            raise ConfigError(
                f"--resume: {latest} was written with {start.global_batch} rows per step over all ranks, this run "
                f"takes {config.batch_size} × {ranks.world_size} ranks: use --batch-size {start.global_batch} "
                "divided by the number of ranks"
            )
    stats = train_epochs(config, ranks, model, optimizer, start)
    evaluation = evaluate(
        model,
        read_batches(
            config.validation_paths,
            max(config.batch_size, 4096),
            config.model,
            Preprocessing(),
            rank=ranks.rank,
            world_size=ranks.world_size,
        ),
        ranks,
        config.model,
    )
    all_stats = gather(stats, ranks)
    table_bytes = gather(local_table_bytes(model), ranks)
    rows_seen = sum(rank_stats.rows for rank_stats in all_stats)
    seconds = max(rank_stats.seconds for rank_stats in all_stats)
    metrics: dict[str, float] = {
        "auc": evaluation.auc,
        "logloss": evaluation.logloss,
        "accuracy": evaluation.accuracy,
        "validation_rows": evaluation.rows,
        "rows_seen": rows_seen,
        "ranks": ranks.world_size,
        "train_seconds": round(seconds, 1),
        "train_rows_per_second": round(rows_seen / seconds, 1) if seconds else 0.0,
        "data_wait_share": round(max(s.waiting / s.seconds if s.seconds else 0.0 for s in all_stats), 4),
    }
    reference = planted_auc(config.validation_paths)
    if reference is not None:
        metrics["planted_auc"] = reference
        metrics["auc_vs_planted"] = evaluation.auc / reference
    plain = plain_state_dict(model) if ranks.world_size == 1 else None
    if ranks.is_first:
        write_outputs(config, metrics, plan, table_bytes, plain)
    return metrics


def write_outputs(
    config: TrainingConfig,
    metrics: dict[str, float],
    plan: ShardingPlan,
    table_bytes: Sequence[int],
    plain: dict[str, torch.Tensor] | None,
) -> None:
    """The artifact's description, metrics and sharding; ``weights.pt`` too when one process holds every table."""
    artifact = ModelArtifact(
        model=config.model,
        provenance=Provenance(trained=True, seed=config.seed, checkpoint=config.output.name, metrics=metrics),
        preprocessing=Preprocessing(),
    )
    if plain is not None:
        write_artifact(config.output, artifact, load_weights(build_dlrm(config.model), plain))
    else:
        (config.output / WEIGHTS_FILE).unlink(missing_ok=True)  # a one-process run's, now out of date
        write_description(config.output, artifact)
    sharding = {"world_size": len(table_bytes), "rank_table_bytes": list(table_bytes), "tables": describe_plan(plan)}
    write_file(config.output / SHARDING_FILE, json.dumps(sharding, indent=2) + "\n")
    write_file(config.output / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> TrainingConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--preset", choices=sorted(PRESETS), help=f"model shape (default: {DEFAULT_PRESET})")
    shape.add_argument("--config", type=Path, help="model config JSON file instead of a preset")
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="Criteo TSV file(s), .gz allowed")
    parser.add_argument("--validation", type=Path, nargs="+", required=True, help="held-out Criteo TSV file(s)")
    parser.add_argument("--output", type=Path, required=True, help="directory for the model artifact and metrics")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training files (default: 1)")
    parser.add_argument(
        "--batch-size", type=int, default=1024, help="rows per step and rank: torchrun's N ranks step on N × this"
    )
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
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=1,
        help="background processes per rank that read and preprocess ahead; 0 = in the training loop (default: 1)",
    )
    parallel = parser.add_argument_group("ranks and checkpoints (torchrun --nproc-per-node N -m training.train ...)")
    parallel.add_argument(
        "--sharding",
        type=Sharding,
        nargs="+",
        choices=list(Sharding),
        default=list(ShardingChoices().allowed),
        help="how TorchRec's planner may split each table between ranks (default: any of these)",
    )
    parallel.add_argument(
        "--table-sharding",
        action="append",
        default=[],
        type=feature_sharding,
        metavar="FEATURE=TYPE",
        help="the one sharding type allowed for a feature's table, e.g. cat_0=column_wise (repeatable)",
    )
    parallel.add_argument(
        "--checkpoint-every", type=int, default=0, help="steps between checkpoints (default: 0 = end of each epoch)"
    )
    parallel.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --output if there is one, with any number of ranks "
        "(a restarted job picks up where it stopped)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.learning_rate <= 0 or not math.isfinite(args.learning_rate):
        parser.error("--epochs and --batch-size must be at least 1 and --learning-rate positive")
    if args.checkpoint_every < 0 or args.loader_workers < 0:
        parser.error("--checkpoint-every and --loader-workers must not be negative")
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
        sharding=ShardingChoices(tuple(args.sharding), {feature: (kind,) for feature, kind in args.table_sharding}),
        checkpoint_every=args.checkpoint_every,
        loader_workers=args.loader_workers,
        resume=args.resume,
    )


def feature_sharding(text: str) -> tuple[str, Sharding]:
    feature, separator, kind = text.partition("=")
    if not separator or kind not in set(Sharding):
        raise argparse.ArgumentTypeError(f"expected FEATURE=TYPE with TYPE one of {', '.join(Sharding)}, got {text!r}")
    return feature, Sharding(kind)


def main(argv: list[str] | None = None) -> None:
    # PyTorch logs a notice about its own is_fx_tracing() the first time TorchRec's modules call it.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    config = parse_args(argv)
    metrics = train(config)
    first = dist.get_rank() == 0
    # The sharded model's reference cycles hold the process group: collected here, the group's last reference goes
    # with destroy_process_group and gloo's threads are joined now, not left running into interpreter teardown.
    gc.collect()
    dist.destroy_process_group()
    if not first:
        return
    planted = f" (planted {metrics['planted_auc']:.4f})" if "planted_auc" in metrics else ""
    print(
        f"validation AUC {metrics['auc']:.4f}{planted}, log loss {metrics['logloss']:.4f}, "
        f"accuracy {metrics['accuracy']:.4f} on {metrics['validation_rows']:,.0f} rows; "
        f"trained on {metrics['rows_seen']:,.0f} rows in {metrics['train_seconds']:.0f} s\n"
        f"wrote {config.output}/ (metrics.json has every figure)"
    )


if __name__ == "__main__":
    main()
