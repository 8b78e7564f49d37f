import itertools
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from phatgoose import paired
from phatgoose.paired import (
    PairedDifference,
    mcnemar_exact,
    paired_difference,
    paired_mean_difference,
)


# ----------------------------------------------------------------------------- McNemar
@pytest.mark.parametrize(
    ("a_only", "b_only", "expected"),
    [
        (0, 5, 0.0625),  # 2 * (1/2)^5
        (5, 0, 0.0625),
        (1, 9, 2 * (1 + 10) / 2**10),
        (2, 8, 2 * (1 + 10 + 45) / 2**10),
        (2, 3, 1.0),  # 2 * P(X <= 2) = 2 * 16/32, capped at 1
        (4, 4, 1.0),
        (0, 0, 1.0),  # no discordant example: no evidence either way
        (0, 1, 1.0),
    ],
)
def test_mcnemar_equals_the_hand_computed_binomial_tail(a_only, b_only, expected):
    assert mcnemar_exact(a_only, b_only) == expected


def test_mcnemar_stays_exact_far_in_the_tail():
    # A float computation of C(1000, i) / 2^1000 underflows term by term; the exact one does not.
    tail = sum(Fraction(math.comb(1000, i), 2**1000) for i in range(101))
    assert mcnemar_exact(900, 100) == pytest.approx(float(2 * tail), rel=1e-12)
    assert 0 < mcnemar_exact(900, 100) < 1e-100


@pytest.mark.parametrize(("a_only", "b_only"), [(-1, 3), (2.5, 3), (True, 3)])
def test_mcnemar_rejects_what_is_not_a_count(a_only, b_only):
    with pytest.raises(ValueError, match="a_only must be a non-negative integer count"):
        mcnemar_exact(a_only, b_only)


# --------------------------------------------------------------------------- bootstrap
def exact_bootstrap_distribution(a: list[bool], b: list[bool]) -> dict[Fraction, Fraction]:
    """The distribution of the resampled delta, by enumerating every one of the n^n ways to
    draw n example indices with replacement (the definition of the bootstrap)."""
    n = len(a)
    counts: Counter[Fraction] = Counter()
    for draw in itertools.product(range(n), repeat=n):
        counts[Fraction(sum(int(a[i]) - int(b[i]) for i in draw), n)] += 1
    return {delta: Fraction(count, n**n) for delta, count in counts.items()}


def convolve_mean(*distributions: dict[Fraction, Fraction]) -> dict[Fraction, Fraction]:
    """The distribution of the mean of independent deltas (tasks resampled separately)."""
    total: dict[Fraction, Fraction] = {Fraction(0): Fraction(1)}
    for distribution in distributions:
        combined: Counter[Fraction] = Counter()
        for s, p in total.items():
            for d, q in distribution.items():
                combined[s + d] += p * q
        total = dict(combined)
    return {s / len(distributions): p for s, p in total.items()}


def exact_quantile(distribution: dict[Fraction, Fraction], level: float) -> float:
    """The level-quantile of a discrete distribution whose CDF does not sit near `level` (so
    the percentile interval of 10 000 replicates equals it with overwhelming probability)."""
    cumulative = Fraction(0)
    for value in sorted(distribution):
        cumulative += distribution[value]
        assert abs(cumulative - Fraction(level)) > 0.01, "a test case too close to call"
        if cumulative > level:
            return float(value)
    raise AssertionError("unreachable: the CDF reaches 1")


A = [True, True, True, False, False]  # a_only = 2, b_only = 1, both right 1, both wrong 1
B = [False, True, False, True, False]


def test_replicates_follow_the_exact_bootstrap_distribution():
    exact = exact_bootstrap_distribution(A, B)
    draws = 200_000
    replicates = paired._replicate_deltas(paired._cells("t", A, B), draws, np.random.default_rng(0))
    seen = Counter(Fraction(round(r * len(A)), len(A)) for r in replicates)
    assert set(seen) <= set(exact)
    for delta, probability in exact.items():
        spread = math.sqrt(float(probability) * (1 - float(probability)) / draws)
        assert seen[delta] / draws == pytest.approx(float(probability), abs=5 * spread + 1e-9)


def test_interval_is_the_percentile_interval_of_the_exact_bootstrap():
    exact = exact_bootstrap_distribution(A, B)
    result = paired_difference(A, B, resamples=10_000, confidence=0.9, seed=3)
    assert result.delta == pytest.approx(1 / 5)
    assert (result.low, result.high) == (exact_quantile(exact, 0.05), exact_quantile(exact, 0.95))
    assert (result.n, result.a_only, result.b_only) == (5, 2, 1)
    assert result.p_value == 1.0  # 2 * P(X <= 1), X ~ Binomial(3, 1/2) = 2 * 4/8


def test_mean_interval_resamples_every_task_on_its_own():
    second = ([True, False], [False, False])
    exact = convolve_mean(exact_bootstrap_distribution(A, B), exact_bootstrap_distribution(*second))
    result = paired_mean_difference(
        {"first": (A, B), "second": second}, resamples=10_000, seed=1, confidence=0.7
    )
    assert result.delta == pytest.approx((1 / 5 + 1 / 2) / 2)
    assert (result.low, result.high) == (exact_quantile(exact, 0.15), exact_quantile(exact, 0.85))


def test_a_task_never_borrows_examples_from_another():
    # Every example of "gain" favours a, every one of "same" is a tie: resampled within each
    # task the deltas are always 1 and 0, so every replicate's mean is exactly 0.5. Pooling
    # the 40 examples would put the mean near 10/40 and spread it.
    tasks = {"gain": ([True] * 10, [False] * 10), "same": ([True] * 30, [True] * 30)}
    result = paired_mean_difference(tasks, resamples=2_000)
    assert (result.delta, result.low, result.high) == (0.5, 0.5, 0.5)
    assert (result.n, result.a_only, result.b_only) == (40, 10, 0)


def test_identical_outcomes_differ_by_nothing():
    outcomes = [True, False, True, True, False, False]
    result = paired_difference(outcomes, outcomes)
    assert (result.delta, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not result.significant


def test_a_large_clear_difference_is_significant():
    rng = np.random.default_rng(7)
    a = rng.random(300) < 0.8
    b = rng.random(300) < 0.5
    result = paired_difference(a, b)
    assert result.delta == pytest.approx(a.mean() - b.mean())
    assert result.significant and result.low > 0.15
    assert result.p_value < 1e-6
    swapped = paired_difference(b, a)
    assert swapped.delta == -result.delta and swapped.high < -0.15 and swapped.significant


def test_a_mean_over_tasks_pools_the_discordant_examples_for_its_p_value():
    tasks = {
        "one": ([True, True, False, True], [False, True, False, False]),  # a_only 2
        "two": ([False, False, True], [True, True, True]),  # b_only 2
        "three": ([True] * 6, [False] * 6),  # a_only 6
    }
    result = paired_mean_difference(tasks, resamples=1_000)
    assert (result.n, result.a_only, result.b_only) == (13, 8, 2)
    assert result.p_value == mcnemar_exact(8, 2)
    assert result.delta == pytest.approx((2 / 4 - 2 / 3 + 6 / 6) / 3)


def test_the_same_seed_reproduces_and_task_order_does_not_matter():
    rng = np.random.default_rng(0)
    tasks = {f"task{i}": (rng.random(50) < 0.6, rng.random(50) < 0.5) for i in range(4)}
    first = paired_mean_difference(tasks, seed=11, resamples=2_000)
    reordered = dict(reversed(list(tasks.items())))
    assert paired_mean_difference(reordered, seed=11, resamples=2_000) == first
    a, b = tasks["task0"]
    assert paired_difference(a, b, seed=5) == paired_difference(a, b, seed=5)
    cells = paired._cells("t", a, b)
    assert not np.array_equal(
        paired._replicate_deltas(cells, 100, np.random.default_rng(1)),
        paired._replicate_deltas(cells, 100, np.random.default_rng(2)),
    )


def test_a_lower_confidence_gives_a_narrower_interval():
    rng = np.random.default_rng(3)
    a, b = rng.random(200) < 0.6, rng.random(200) < 0.5
    wide = paired_difference(a, b, confidence=0.95)
    narrow = paired_difference(a, b, confidence=0.5)
    assert wide.low < narrow.low <= narrow.high < wide.high


def test_to_dict_says_whether_the_interval_excludes_zero():
    result = PairedDifference(0.1, 0.02, 0.18, 0.01, n=100, a_only=15, b_only=5)
    assert result.to_dict() == {
        "delta": 0.1, "low": 0.02, "high": 0.18, "p_value": 0.01,
        "n": 100, "a_only": 15, "b_only": 5, "significant": True,
    }  # fmt: skip
    assert not PairedDifference(0.1, -0.01, 0.2, 0.2, 100, 15, 5).significant
    assert PairedDifference(-0.1, -0.2, -0.01, 0.2, 100, 5, 15).significant


def test_outcomes_may_be_zeros_and_ones():
    assert paired_difference([1, 0, 1], [0, 0, 1]) == paired_difference(
        [True, False, True], [False, False, True]
    )


# ------------------------------------------------------------------------------ errors
def test_outcomes_of_different_lengths_name_the_task():
    with pytest.raises(ValueError, match="task 'navigate': a has 3 outcomes and b 2"):
        paired_mean_difference({"navigate": ([True, False, True], [True, False])})
    with pytest.raises(ValueError, match="a has 1 outcomes and b 2"):
        paired_difference([True], [True, False])


def test_an_empty_task_is_refused():
    with pytest.raises(ValueError, match="task 'empty': no examples to compare"):
        paired_mean_difference({"full": ([True], [False]), "empty": ([], [])})
    with pytest.raises(ValueError, match="needs at least one task"):
        paired_mean_difference({})


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1])
def test_confidence_must_lie_strictly_between_zero_and_one(confidence):
    with pytest.raises(ValueError, match="confidence must lie strictly between 0 and 1"):
        paired_difference([True], [False], confidence=confidence)


@pytest.mark.parametrize("resamples", [0, -5, 2.0])
def test_resamples_must_be_a_positive_integer(resamples):
    with pytest.raises(ValueError, match="resamples must be a positive integer"):
        paired_mean_difference({"t": ([True], [False])}, resamples=resamples)


def test_outcomes_must_be_booleans():
    with pytest.raises(ValueError, match="task 't': b must hold booleans"):
        paired_mean_difference({"t": ([True, False], [0.7, 1.0])})
    with pytest.raises(ValueError, match="a must be a flat sequence of outcomes"):
        paired_difference([[True], [False]], [True, False])
