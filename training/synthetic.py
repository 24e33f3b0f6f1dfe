"""Synthetic Criteo-format data from a planted, known click model; random inputs for benchmarks.

:class:`PlantedClickModel` draws rows that look like Criteo's click logs —
heavy-tailed (Zipf) category frequencies, log-normal counts, missing values,
occasional negative integers — and labels from a known logistic model with
per-category effects, dense effects and pairwise category interactions (the
structure a DLRM's dot interaction can represent). Because the true click
probability of every row is known, the best AUC any model can reach on a file
is known too; :func:`write_tsv` records it next to the data.

:func:`random_inputs` is the DLRM reference's random-input generator: uniform or
gaussian ids, a fixed or random number of ids per lookup.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torchmetrics.classification import BinaryAUROC

from model_factory.config import CRITEO_1TB_NUM_EMBEDDINGS, DLRMConfig
from training.criteo import NUM_CAT, NUM_INT, RawRows, metadata_path

MAX_VOCABULARY = 2_000
ZIPF_EXPONENT = 1.1
TARGET_CTR = 0.25
INTERACTION_DIM = 4
DEFAULT_INTERACTION_SCALE = 0.2


@dataclass(frozen=True)
class _CategoricalFeature:
    tokens: np.ndarray  # unsigned 32-bit value (as int64) of each vocabulary entry, by frequency rank
    cdf: np.ndarray  # cumulative Zipf probabilities over ranks
    effects: np.ndarray  # additive logit effect of each rank
    missing_rate: float


class PlantedClickModel:
    """A seeded generator of Criteo-format rows whose click probabilities are known exactly.

    ``interaction_scale`` is the standard deviation of the pairwise interaction
    vectors. The default plants weak interactions; at 0.5 they add as much to the
    logit's variance as half the categorical effects, and the DLRM trained by
    ``make train`` does not pick them up within two epochs of 1M rows (docs/performance/2026-11-23-training.md).
    """

    def __init__(self, seed: int = 0, interaction_scale: float = DEFAULT_INTERACTION_SCALE) -> None:
        self.seed = seed
        self.interaction_scale = interaction_scale
        rng = np.random.default_rng(seed)
        self.int_log_mean = rng.uniform(0.0, 4.0, NUM_INT)
        self.int_log_std = rng.uniform(0.5, 1.5, NUM_INT)
        self.int_missing_rate = rng.choice([0.0, 0.05, 0.2, 0.4], NUM_INT)
        self.int_effects = rng.normal(0.0, 0.3, NUM_INT)
        self.features = [self._categorical(rng, size) for size in CRITEO_1TB_NUM_EMBEDDINGS]
        self.pairs = [(2, 3), (4, 14), (9, 10), (0, 22)]
        self.pair_vectors = {
            feature: rng.normal(0.0, interaction_scale, (len(self.features[feature].tokens), INTERACTION_DIM))
            for pair in self.pairs
            for feature in pair
        }
        self.bias = 0.0
        _, logits = self._draw(np.random.default_rng(seed + 1), 50_000)
        self.bias = _bias_for_click_rate(logits, TARGET_CTR)

    @staticmethod
    def _categorical(rng: np.random.Generator, table_size: int) -> _CategoricalFeature:
        """Zipf-distributed vocabulary; tokens keep distinct rows modulo the feature's Criteo table size."""
        vocabulary = min(table_size, MAX_VOCABULARY)
        weights = 1.0 / np.arange(1, vocabulary + 1) ** ZIPF_EXPONENT
        ranks = np.arange(vocabulary)
        tokens = ranks + table_size * rng.integers(0, (2**32 - vocabulary) // table_size, vocabulary)
        strength = rng.choice([0.0, 0.2, 0.45], p=[0.25, 0.35, 0.4])
        return _CategoricalFeature(
            tokens=tokens.astype(np.int64),
            cdf=np.cumsum(weights) / weights.sum(),
            effects=rng.normal(0.0, strength, vocabulary),
            missing_rate=float(rng.choice([0.0, 0.0, 0.1, 0.3])),
        )

    def _draw(self, rng: np.random.Generator, rows: int) -> tuple[RawRows, np.ndarray]:
        """Rows (labels not yet drawn) and their true logits."""
        counts = np.floor(rng.lognormal(self.int_log_mean, self.int_log_std, (rows, NUM_INT)))
        counts[:, 1] -= rng.random(rows) < 0.05  # Criteo's int_1 has occasional negatives
        ints = np.where(rng.random((rows, NUM_INT)) < self.int_missing_rate, np.nan, counts)
        dense_signal = np.log1p(np.clip(np.nan_to_num(ints), 0.0, None)) - self.int_log_mean
        logits = self.bias + np.tanh(dense_signal / self.int_log_std) @ self.int_effects

        ranks = np.empty((rows, NUM_CAT), dtype=np.int64)
        categories = np.empty((rows, NUM_CAT), dtype=np.int64)
        for index, feature in enumerate(self.features):
            drawn = np.searchsorted(feature.cdf, rng.random(rows), side="right")
            ranks[:, index] = drawn.clip(max=len(feature.cdf) - 1)
            missing = rng.random(rows) < feature.missing_rate
            categories[:, index] = np.where(missing, -1, feature.tokens[ranks[:, index]])
            logits += np.where(missing, 0.0, feature.effects[ranks[:, index]])
            ranks[missing, index] = -1
        for first, second in self.pairs:
            present = (ranks[:, first] >= 0) & (ranks[:, second] >= 0)
            dots = np.einsum(
                "ij,ij->i",
                self.pair_vectors[first][ranks[:, first]],
                self.pair_vectors[second][ranks[:, second]],
            )
            logits += np.where(present, dots, 0.0)
        return RawRows(labels=np.zeros(rows, dtype=np.float32), ints=ints, categories=categories), logits

    def sample(self, rows: int, rng: np.random.Generator) -> tuple[RawRows, np.ndarray]:
        """``rows`` labelled rows and their true click probabilities."""
        features, logits = self._draw(rng, rows)
        probabilities = 1.0 / (1.0 + np.exp(-logits))
        labels = (rng.random(rows) < probabilities).astype(np.float32)
        return RawRows(labels=labels, ints=features.ints, categories=features.categories), probabilities

    def describe(self) -> dict[str, Any]:
        return {
            "generator": "PlantedClickModel",
            "seed": self.seed,
            "max_vocabulary": MAX_VOCABULARY,
            "zipf_exponent": ZIPF_EXPONENT,
            "interaction_pairs": [[f"cat_{a}", f"cat_{b}"] for a, b in self.pairs],
            "interaction_scale": self.interaction_scale,
        }


def _bias_for_click_rate(logits: np.ndarray, click_rate: float) -> float:
    """The shift of ``logits`` whose mean click probability is ``click_rate`` (bisection)."""
    low, high = -20.0, 20.0
    for _ in range(60):
        middle = (low + high) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logits + middle)))) < click_rate:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def format_tsv(rows: RawRows) -> str:
    """Criteo TSV lines: label, integers, 8-hex-digit categories; empty fields for missing values."""
    columns = [rows.labels.astype(np.int64).astype(str)]
    for index in range(NUM_INT):
        values = rows.ints[:, index]
        columns.append(np.where(np.isnan(values), "", np.nan_to_num(values).astype(np.int64).astype(str)))
    for index in range(NUM_CAT):
        values = rows.categories[:, index]
        columns.append(np.where(values < 0, "", np.char.mod("%08x", values.clip(min=0))))
    return "".join("\t".join(line) + "\n" for line in zip(*(c.tolist() for c in columns), strict=True))


def write_tsv(path: Path, rows: int, model: PlantedClickModel, seed: int, chunk_rows: int = 100_000) -> dict:
    """Write ``rows`` planted rows to ``path`` (gzip if it ends in .gz) and a metadata file beside it.

    The metadata holds the planted model's AUC on exactly these rows: the AUC of
    the true probabilities, the best any model can be expected to reach.
    """
    rng = np.random.default_rng(seed)
    auc = BinaryAUROC(thresholds=None)
    positives = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as output:
        for start in range(0, rows, chunk_rows):
            sample, probabilities = model.sample(min(chunk_rows, rows - start), rng)
            output.write(format_tsv(sample))
            auc.update(torch.from_numpy(probabilities), torch.from_numpy(sample.labels).long())
            positives += int(sample.labels.sum())
    metadata = {
        **model.describe(),
        "rows": rows,
        "sample_seed": seed,
        "click_rate": positives / rows,
        "planted_auc": float(auc.compute()),
    }
    metadata_path(path).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def random_inputs(
    config: DLRMConfig,
    rows: int,
    rng: np.random.Generator,
    distribution: Literal["uniform", "gaussian"] = "uniform",
    num_indices_per_lookup: int = 1,
    fixed_lookups: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The DLRM reference's random inputs: ``(dense, lengths, values)`` in the row-major request layout.

    Dense features are uniform in [0, 1). Each lookup has ``num_indices_per_lookup``
    ids, or a random number in ``[1, num_indices_per_lookup]`` when not
    ``fixed_lookups``; ids are uniform over the table, or gaussian around its
    middle (sigma = a sixth of the table) and clipped to it.
    """
    sizes = np.asarray(config.num_embeddings_per_feature, dtype=np.int64)
    shape = (rows, config.num_sparse_features)
    lengths = (
        np.full(shape, num_indices_per_lookup, dtype=np.int64)
        if fixed_lookups
        else rng.integers(1, num_indices_per_lookup + 1, shape)
    )
    table_of_id = np.repeat(np.tile(np.arange(config.num_sparse_features), rows), lengths.ravel())
    table_sizes = sizes[table_of_id]
    if distribution == "uniform":
        values = (rng.random(len(table_of_id)) * table_sizes).astype(np.int64)
    elif distribution == "gaussian":
        values = np.rint(rng.normal(table_sizes / 2, table_sizes / 6)).astype(np.int64).clip(0, table_sizes - 1)
    else:
        raise ValueError(f"unknown distribution {distribution!r}: use 'uniform' or 'gaussian'")
    dense = rng.random((rows, config.num_dense_features), dtype=np.float32)
    return dense, lengths, values


def request_rows(dense: np.ndarray, lengths: np.ndarray, values: np.ndarray) -> Iterator[dict[str, list]]:
    """Rows in the reference request format, from arrays in the row-major request layout."""
    ends = np.cumsum(lengths.sum(axis=1))
    starts = ends - lengths.sum(axis=1)
    for row, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        yield {
            "float_features": dense[row].tolist(),
            "id_list_features.lengths": lengths[row].tolist(),
            "id_list_features.values": values[start:end].tolist(),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write planted synthetic Criteo-format train/validation TSV files and their metadata."
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="where train.tsv and validation.tsv go")
    parser.add_argument("--train-rows", type=int, default=1_000_000, help="training rows (default: 1,000,000)")
    parser.add_argument("--validation-rows", type=int, default=100_000, help="held-out rows (default: 100,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted model (default: 0)")
    parser.add_argument(
        "--interaction-scale",
        type=float,
        default=DEFAULT_INTERACTION_SCALE,
        help=f"std of the pairwise interaction vectors (default: {DEFAULT_INTERACTION_SCALE})",
    )
    parser.add_argument("--gzip", action="store_true", help="write .tsv.gz files")
    args = parser.parse_args(argv)
    model = PlantedClickModel(seed=args.seed, interaction_scale=args.interaction_scale)
    suffix = ".tsv.gz" if args.gzip else ".tsv"
    for offset, (name, rows) in enumerate((("train", args.train_rows), ("validation", args.validation_rows)), start=1):
        metadata = write_tsv(args.output_dir / f"{name}{suffix}", rows, model, seed=args.seed * 1000 + offset)
        rate, auc = metadata["click_rate"], metadata["planted_auc"]
        print(f"{name}: {rows:,} rows, click rate {rate:.3f}, planted AUC {auc:.4f}")


if __name__ == "__main__":
    main()
