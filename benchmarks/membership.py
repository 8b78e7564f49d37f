"""How well an attacker tells a contributor's training examples from others: the statistics of
a membership-inference audit (issue 22, section 2), apart from how the scores are made.

An attack gives every candidate example a score, higher meaning "more likely a member" (for
the loss-threshold attack: minus the example's loss under the expert; calibrated: the base
model's loss minus the expert's; for shipped retrieval embeddings: the candidate's largest
cosine similarity to them). The candidates are members (training examples) and non-members
(held-out examples of the same task). Two numbers summarise an attack:

- AUC: the probability that a random member scores above a random non-member (ties count
  half): the area under the ROC curve, 0.5 for an attack that learns nothing.
- TPR at a low FPR (1% by convention): the share of members flagged by the best threshold
  that flags at most that share of non-members, which is what matters for an attacker who
  must be confident about the examples they name. With n non-members, a 1% budget allows
  floor(n / 100) false positives: under 100 non-members, none.

Intervals are percentile bootstraps that resample members and non-members separately (the
two groups are drawn independently); everything is deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["AttackAudit", "audit_attack", "max_cosine_similarity", "roc_auc", "tpr_at_fpr"]

LOW_FPR = 0.01


@dataclass(frozen=True)
class AttackAudit:
    """An attack's success on `members` and `non_members` scored candidates, with 95%
    bootstrap intervals."""

    auc: float
    auc_low: float
    auc_high: float
    fpr: float
    tpr: float  # at `fpr`
    tpr_low: float
    tpr_high: float
    members: int
    non_members: int


def roc_auc(members: ArrayLike, non_members: ArrayLike) -> float:
    """P(a member's score > a non-member's score), ties counted half: the Mann-Whitney U
    statistic over (members x non-members), from ranks in O(n log n)."""
    m, n = _checked(members, non_members)
    ranks = _average_ranks(np.concatenate([m, n]))
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2
    return float(u / (len(m) * len(n)))


def tpr_at_fpr(members: ArrayLike, non_members: ArrayLike, fpr: float) -> float:
    """The largest share of members scoring above a threshold that at most `fpr` of the
    non-members score above (scores above the threshold are flagged as members)."""
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    m, n = _checked(members, non_members)
    allowed = math.floor(fpr * len(n) + 1e-9)  # false positives the budget allows
    ordered = np.sort(n)[::-1]
    # Flag what scores above the (allowed + 1)-th highest non-member: `allowed` of them at
    # most are above it, and any lower threshold would flag one more.
    threshold = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float(np.mean(m > threshold))


def audit_attack(
    members: ArrayLike,
    non_members: ArrayLike,
    *,
    fpr: float = LOW_FPR,
    resamples: int = 2000,
    seed: int = 0,
) -> AttackAudit:
    """AUC and TPR at `fpr` of the scores, each with its 95% percentile bootstrap interval."""
    m, n = _checked(members, non_members)
    rng = np.random.default_rng(seed)
    aucs, tprs = np.empty(resamples), np.empty(resamples)
    for i in range(resamples):
        mine = m[rng.integers(0, len(m), len(m))]
        theirs = n[rng.integers(0, len(n), len(n))]
        aucs[i] = roc_auc(mine, theirs)
        tprs[i] = tpr_at_fpr(mine, theirs, fpr)
    return AttackAudit(
        auc=roc_auc(m, n),
        auc_low=float(np.quantile(aucs, 0.025)),
        auc_high=float(np.quantile(aucs, 0.975)),
        fpr=fpr,
        tpr=tpr_at_fpr(m, n, fpr),
        tpr_low=float(np.quantile(tprs, 0.025)),
        tpr_high=float(np.quantile(tprs, 0.975)),
        members=len(m),
        non_members=len(n),
    )


def max_cosine_similarity(shipped: NDArray[np.floating], queries: NDArray[np.floating]) -> NDArray:
    """Each query row's largest cosine similarity to a row of `shipped`: the score of an
    attacker who embeds a candidate input and looks for it among an expert's shipped
    retrieval embeddings (1.0: the very input was shipped)."""
    if shipped.ndim != 2 or queries.ndim != 2 or shipped.shape[1] != queries.shape[1]:
        raise ValueError(
            f"expected two matrices of the same width, got {shipped.shape} and {queries.shape}"
        )
    if len(shipped) == 0:
        raise ValueError("no shipped embeddings to compare with")
    a = shipped / np.linalg.norm(shipped, axis=1, keepdims=True)
    b = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.asarray((b @ a.T).max(axis=1))


def _checked(
    members: ArrayLike, non_members: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    m, n = np.asarray(members, dtype=float), np.asarray(non_members, dtype=float)
    if m.ndim != 1 or n.ndim != 1 or len(m) == 0 or len(n) == 0:
        raise ValueError(
            f"expected scores of at least one member and one non-member, got {m.shape} and "
            f"{n.shape}"
        )
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("attack scores must be finite")
    return m, n


def _average_ranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks, tied values sharing their average rank."""
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the rank of each group's last value
    return ((last - counts + 1 + last) / 2)[group]
