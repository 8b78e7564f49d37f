"""The membership-inference audit's statistics: AUC and TPR at a low FPR against direct
computations, their bootstrap intervals, and the retrieval-embedding score."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from benchmarks.membership import audit_attack, max_cosine_similarity, roc_auc, tpr_at_fpr


def brute_force_auc(members, non_members) -> float:
    pairs = list(itertools.product(members, non_members))
    return sum(1.0 if m > n else 0.5 if m == n else 0.0 for m, n in pairs) / len(pairs)


def brute_force_tpr(members, non_members, fpr) -> float:
    """Try every threshold: the best TPR among those whose FPR is within the budget."""
    best = 0.0
    for threshold in [-np.inf, *members, *non_members]:
        flagged_non = sum(n > threshold for n in non_members) / len(non_members)
        if flagged_non <= fpr + 1e-12:
            best = max(best, sum(m > threshold for m in members) / len(members))
    return best


def test_auc_is_half_for_identical_scores_one_for_separated_and_counts_ties_half():
    assert roc_auc([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.5
    assert roc_auc([5.0, 6.0], [1.0, 2.0, 3.0]) == 1.0
    assert roc_auc([1.0, 2.0], [5.0, 6.0]) == 0.0
    # 2 > 1 (1), 2 = 2 (0.5), 2 < 3 (0); 4 beats all three: (1.5 + 3) / 6
    assert roc_auc([2.0, 4.0], [1.0, 2.0, 3.0]) == pytest.approx(4.5 / 6)


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_tpr_equal_the_direct_computation_on_random_scores_with_ties(seed):
    rng = np.random.default_rng(seed)
    members = rng.integers(0, 12, size=int(rng.integers(1, 40))).astype(float)
    non_members = rng.integers(0, 10, size=int(rng.integers(1, 250))).astype(float)

    assert roc_auc(members, non_members) == pytest.approx(brute_force_auc(members, non_members))
    for fpr in (0.0, 0.01, 0.1, 0.5):
        assert tpr_at_fpr(members, non_members, fpr) == pytest.approx(
            brute_force_tpr(members, non_members, fpr)
        ), fpr


def test_tpr_at_a_one_percent_fpr_allows_one_false_positive_per_hundred_non_members():
    non_members = list(range(100))  # 0 .. 99
    members = [99.5, 98.5, 50.0]
    # One false positive allowed: the threshold is the second-highest non-member (98).
    assert tpr_at_fpr(members, non_members, 0.01) == pytest.approx(2 / 3)
    # Under 100 non-members, 1% allows none: only what beats every non-member counts.
    assert tpr_at_fpr(members, non_members[:99], 0.01) == pytest.approx(2 / 3)
    assert tpr_at_fpr([98.5], non_members[:99], 0.01) == pytest.approx(1.0)
    assert tpr_at_fpr([97.5], non_members[:99], 0.01) == 0.0


def test_the_audit_gives_intervals_around_its_numbers_deterministically():
    rng = np.random.default_rng(0)
    members = rng.normal(1.0, 1.0, 200)
    non_members = rng.normal(0.0, 1.0, 300)

    audit = audit_attack(members, non_members, resamples=500, seed=3)

    assert audit.auc == pytest.approx(roc_auc(members, non_members))
    assert audit.auc_low < audit.auc < audit.auc_high
    assert 0.6 < audit.auc < 0.9  # two unit normals a standard deviation apart: 0.76
    assert audit.tpr_low <= audit.tpr <= audit.tpr_high
    assert (audit.members, audit.non_members, audit.fpr) == (200, 300, 0.01)
    assert audit == audit_attack(members, non_members, resamples=500, seed=3)


@pytest.mark.parametrize(
    ("members", "non_members", "message"),
    [
        ([], [1.0], "at least one member and one non-member"),
        ([1.0], [], "at least one member and one non-member"),
        ([float("nan")], [1.0], "must be finite"),
    ],
)
def test_scores_that_cannot_be_audited_are_refused(members, non_members, message):
    with pytest.raises(ValueError, match=message):
        roc_auc(members, non_members)
    with pytest.raises(ValueError, match=message):
        audit_attack(members, non_members, resamples=1)


def test_a_shipped_input_is_found_by_its_embedding_and_others_are_not():
    rng = np.random.default_rng(1)
    shipped = rng.normal(size=(50, 16))
    members = shipped[:10] * 3.0  # the same inputs, another norm
    others = rng.normal(size=(10, 16))

    assert np.allclose(max_cosine_similarity(shipped, members), 1.0)
    assert (max_cosine_similarity(shipped, others) < 0.99).all()
    with pytest.raises(ValueError, match="same width"):
        max_cosine_similarity(shipped, others[:, :8])
