"""Count how often the training rows look up each row of each table: ``frequencies.pt``, for frequency order.

    python -m training.frequencies --preset small --train data/synthetic/train.tsv --output runs/small
    python build_mar.py --checkpoint runs/small --quantize int8 --frequencies runs/small

The trainer counts the ids of its first epoch as it trains (one pass over the
training files) and writes ``frequencies.pt`` beside its artifact; this pass
counts the same from Criteo TSV files, for a checkpoint trained elsewhere. Both
read the files with the trainer's reader and preprocessing
(:func:`~training.criteo.read_batches`), so they count the same ids.
``build_mar.py --frequencies`` then writes each table's rows hottest first
(:mod:`model_factory.row_order`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from model_factory.config import DEFAULT_PRESET, PRESETS, ConfigError, DLRMConfig, preset
from model_factory.factory import table_name
from model_factory.features import Preprocessing
from model_factory.row_order import FREQUENCIES_FILE, save_frequencies
from training.criteo import CriteoFormatError, read_batches
from training.loader import prefetched_batches

# Counts sent through one all-reduce at most: 128 MiB of int64 on the wire and on a GPU.
_REDUCE_CHUNK = 2**24


class IdCounter:
    """A count per row of every table, kept as one int64 tensor: feature ``f``'s ids at ``base[f]`` onwards."""

    def __init__(self, config: DLRMConfig) -> None:
        self.config = config
        sizes = torch.tensor(config.num_embeddings_per_feature, dtype=torch.int64)
        self.base = torch.cumsum(sizes, 0) - sizes
        self.counts = torch.zeros(int(sizes.sum()), dtype=torch.int64)

    def add(self, features: KeyedJaggedTensor) -> None:
        """Count the ids of a batch's sparse features (one KJT key per table, in the config's order)."""
        if features.keys() != list(self.config.sparse_feature_names):
            raise ValueError(f"expected the features {list(self.config.sparse_feature_names)}, got {features.keys()}")
        per_feature = torch.tensor(features.length_per_key(), dtype=torch.int64)
        ids = features.values().cpu() + torch.repeat_interleave(self.base, per_feature)
        self.counts.index_add_(0, ids, torch.ones_like(ids))

    def all_reduce(self, device: torch.device) -> None:
        """Sum every rank's counts (a collective: every rank calls it), in chunks through ``device``."""
        for chunk in self.counts.split(_REDUCE_CHUNK):
            on_device = chunk.to(device)
            dist.all_reduce(on_device)
            chunk.copy_(on_device)

    def per_table(self) -> dict[str, torch.Tensor]:
        sizes = list(self.config.num_embeddings_per_feature)
        names = [table_name(feature) for feature in self.config.sparse_feature_names]
        return dict(zip(names, self.counts.split(sizes), strict=True))

    def save(self, directory: Path) -> Path:
        """Write ``frequencies.pt`` into ``directory``; returns its path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FREQUENCIES_FILE
        save_frequencies(path, {name: counts.clone() for name, counts in self.per_table().items()})
        return path


def counting(batches: Iterator[Batch], counter: IdCounter) -> Iterator[Batch]:
    """``batches``, each counted as it is read."""
    for batch in batches:
        counter.add(batch.sparse_features)
        yield batch


def count_files(paths: list[Path], config: DLRMConfig, batch_size: int = 65_536, loader_workers: int = 0) -> IdCounter:
    """The ids of every row of the Criteo TSV ``paths``, read as the trainer reads them."""
    counter = IdCounter(config)
    if loader_workers:
        batches = prefetched_batches(paths, batch_size, config, Preprocessing(), workers=loader_workers)
    else:
        batches = read_batches(paths, batch_size, config, Preprocessing())
    for _ in counting(batches, counter):
        pass
    return counter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--preset", choices=sorted(PRESETS), help=f"model shape (default: {DEFAULT_PRESET})")
    shape.add_argument("--config", type=Path, help="model config JSON file instead of a preset")
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="Criteo TSV file(s), .gz allowed")
    parser.add_argument("--output", type=Path, required=True, help=f"directory to write {FREQUENCIES_FILE} into")
    parser.add_argument(
        "--loader-workers", type=int, default=0, help="background processes that read ahead (default: 0)"
    )
    args = parser.parse_args(argv)
    if args.loader_workers < 0:
        parser.error("--loader-workers must not be negative")
    started = time.perf_counter()
    try:
        config = DLRMConfig.from_json(args.config.read_text()) if args.config else preset(args.preset or DEFAULT_PRESET)
        counter = count_files(args.train, config, loader_workers=args.loader_workers)
        path = counter.save(args.output)
    except (ConfigError, CriteoFormatError, OSError) as error:
        sys.exit(f"training.frequencies: {error}")
    lookups = int(counter.counts.sum())
    print(f"counted {lookups:,} lookups in {time.perf_counter() - started:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
