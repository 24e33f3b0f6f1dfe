"""A model's golden set: held-out labelled rows, stored in its archive with the scores the model gave them.

``build_mar.py --golden-set FILE.tsv`` takes the first rows of a Criteo TSV file
(never rows the model was trained on: pass the validation file), scores them
in-process through the handler's own predictor, and writes ``golden-set.json``
into the archive. The rollout gate (``rollout/``) scores the same rows through a
running server before traffic moves to a new version; the rows travel as the
raw Criteo JSON rows of ``/predictions``, so the archive's preprocessing is
checked too, not only its weights. NumPy and orjson only: the check runs as a
Kubernetes probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

GOLDEN_FILE = "golden-set.json"
DEFAULT_GOLDEN_ROWS = 1000


@dataclass(frozen=True)
class GoldenSet:
    """``rows``: raw Criteo JSON rows; ``labels`` [N] 0/1; ``scores`` [N]: the archived model's, at build time."""

    rows: list[dict[str, Any]]
    labels: np.ndarray
    scores: np.ndarray

    @property
    def auc(self) -> float:
        return auc(self.labels, self.scores)

    def to_json(self) -> bytes:
        body = {"labels": self.labels, "scores": self.scores, "auc": self.auc, "rows": self.rows}
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_json(cls, text: bytes | str) -> GoldenSet:
        body = orjson.loads(text)
        labels = np.asarray(body["labels"], dtype=np.int64)
        scores = np.asarray(body["scores"], dtype=np.float64)
        if not (len(body["rows"]) == len(labels) == len(scores)):
            raise ValueError(f"{GOLDEN_FILE}: rows, labels and scores differ in length")
        return cls(rows=body["rows"], labels=labels, scores=scores)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (the Mann-Whitney statistic, tied scores counted half); NaN when the labels are all one class."""
    positives = labels == 1
    num_positive, num_negative = int(positives.sum()), int((~positives).sum())
    if num_positive == 0 or num_negative == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_ranks = np.cumsum(counts) - (counts - 1) / 2  # 1-based ranks, ties sharing their mean rank
    positive_rank_sum = float(mean_ranks[inverse][positives].sum())
    return (positive_rank_sum - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative)
