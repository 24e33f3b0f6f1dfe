"""The quality gate in front of a model switch: does the new version score its golden set well enough?

Three checks, on the golden rows stored in the new version's archive
(model_archive/golden.py), scored through the running server:

- **integrity**: the served scores equal the scores recorded at build time
  (``max_served_drift``): the archive serves what was built (weights, tables,
  preprocessing) on this server's stack;
- **AUC**: the new version's AUC on the rows' labels is at most ``max_auc_drop``
  below the current version's, scored on the same rows now;
- **drift**: the mean absolute change of the scores from the current version's
  is at most ``max_mean_drift``: a retrained model moves scores a little, a
  broken one (wrong tables, a calibration bug) a lot, even at an equal AUC;
- **AUC floor** (``min_auc``, off by default): an absolute minimum, for checks
  with no current version to compare with (a Kubernetes pod's startup check).

Without a current version (the first publish, a rollback, a pod) the comparisons are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_archive.golden import GoldenSet, auc


@dataclass(frozen=True)
class GateLimits:
    max_auc_drop: float = 0.005
    max_mean_drift: float = 0.05
    max_served_drift: float = 1e-4
    min_auc: float | None = None


DEFAULT_LIMITS = GateLimits()


@dataclass(frozen=True)
class Verdict:
    passed: bool
    findings: list[str]

    def __str__(self) -> str:
        return ("passed: " if self.passed else "refused: ") + "; ".join(self.findings)


def evaluate(
    golden: GoldenSet, new_scores: np.ndarray, current_scores: np.ndarray | None, limits: GateLimits
) -> Verdict:
    """The verdict on ``new_scores`` (the new version's, served) given the current version's (or None)."""
    findings: list[str] = []
    passed = True
    served_drift = float(np.abs(new_scores - golden.scores).max())
    ok = served_drift <= limits.max_served_drift
    passed &= ok
    findings.append(
        f"served vs built scores: max |diff| {served_drift:.2e} ({'<=' if ok else '>'} {limits.max_served_drift:g})"
    )
    new_auc = auc(golden.labels, new_scores)
    if limits.min_auc is not None:
        ok = bool(new_auc >= limits.min_auc)  # False for an undefined (NaN) AUC
        passed &= ok
        findings.append(f"AUC {new_auc:.4f} ({'>=' if ok else 'below'} the floor {limits.min_auc:g})")
    if current_scores is None:
        return Verdict(passed, findings)
    current_auc = auc(golden.labels, current_scores)
    if np.isnan(new_auc):
        findings.append(f"AUC undefined: the {len(golden.labels)} golden labels are all one class")
    else:
        ok = new_auc >= current_auc - limits.max_auc_drop
        passed &= ok
        findings.append(
            f"AUC {new_auc:.4f} vs current {current_auc:.4f} (drop {current_auc - new_auc:+.4f}, "
            f"{'within' if ok else 'beyond'} {limits.max_auc_drop:g})"
        )
    mean_drift = float(np.abs(new_scores - current_scores).mean())
    ok = mean_drift <= limits.max_mean_drift
    passed &= ok
    findings.append(f"mean |score change| {mean_drift:.4f} ({'within' if ok else 'beyond'} {limits.max_mean_drift:g})")
    return Verdict(passed, findings)
