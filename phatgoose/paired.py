"""Paired statistics: how much better is method a than method b on the same examples?

Two methods scored on the same examples are compared example by example. Every example falls
into one of four cells: both right, only a right (`a_only`), only b right (`b_only`), both
wrong. The difference of accuracies is `(a_only - b_only) / n`; only the discordant examples
carry information about it, which is why a paired comparison detects differences that
independent standard errors cannot.

- Interval: a percentile bootstrap. A replicate resamples a task's n examples with
  replacement; the four cells' counts in a resample are then Multinomial(n, cell counts / n),
  so drawing those counts is the same distribution as drawing n example indices, at a cost
  that does not grow with n. For a mean over tasks the tasks are strata: every task is
  resampled on its own (an example never moves to another task) and a replicate's statistic
  is the unweighted mean over tasks of the per-task differences, like the reported mean.
- p-value: the exact two-sided McNemar test, a binomial test on the discordant examples.

Everything is deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "PairedDifference",
    "mcnemar_exact",
    "paired_difference",
    "paired_mean_difference",
]


@dataclass(frozen=True)
class PairedDifference:
    """accuracy(a) - accuracy(b) on the same examples, with its paired uncertainty."""

    delta: float  # accuracy(a) - accuracy(b); for a mean, the mean over tasks of the deltas
    low: float  # percentile bootstrap interval of delta (95% unless asked otherwise)
    high: float
    p_value: float  # exact two-sided McNemar p-value
    n: int  # examples (summed over tasks for a mean)
    a_only: int  # examples a got right and b wrong
    b_only: int  # examples b got right and a wrong

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "significant": self.significant}


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value for `a_only` vs `b_only` discordant examples.

    Under the null hypothesis a discordant example is equally likely to favour either
    method, so b_only ~ Binomial(a_only + b_only, 1/2); the p-value is
    min(1, 2 P(X <= min(a_only, b_only))), and 1 when there are no discordant examples.
    Computed in exact integers (Python's int division rounds the ratio correctly).
    """
    for name, value in (("a_only", a_only), ("b_only", b_only)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    discordant = int(a_only) + int(b_only)
    if discordant == 0:
        return 1.0
    smaller = min(int(a_only), int(b_only))
    tail = sum(math.comb(discordant, i) for i in range(smaller + 1))
    return min(1.0, 2 * tail / (1 << discordant))  # 2**d (int ** int is typed Any)


def paired_difference(
    a: Sequence[bool],
    b: Sequence[bool],
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """accuracy(a) - accuracy(b) on one task: `a[i]`, `b[i]` say whether each method got
    example i right. The interval is a percentile bootstrap over the task's examples."""
    _check_settings(resamples, confidence)
    cells = _cells("", a, b)
    replicates = _replicate_deltas(cells, resamples, np.random.default_rng(seed))
    low, high = _percentile_interval(replicates, confidence)
    return PairedDifference(
        delta=cells.delta,
        low=low,
        high=high,
        p_value=mcnemar_exact(cells.a_only, cells.b_only),
        n=cells.n,
        a_only=cells.a_only,
        b_only=cells.b_only,
    )


def paired_mean_difference(
    tasks: Mapping[str, tuple[Sequence[bool], Sequence[bool]]],
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Unweighted mean over tasks of accuracy(a) - accuracy(b), each task's outcomes given as
    `tasks[name] = (a, b)`.

    The interval resamples every task's examples on its own (tasks are strata, each counts
    once in the mean whatever its size). Tasks draw in the order of their names, so the
    result does not depend on the mapping's order.

    The p-value is the exact McNemar test on the discordant examples pooled over all tasks
    (`a_only`, `b_only` are the sums). It tests the null hypothesis that in every task a
    discordant example is equally likely to favour either method: then each task's b_only is
    Binomial(its discordant count, 1/2), so their sum is Binomial(pooled discordant, 1/2).
    Pooling weights tasks by their discordant examples, unlike the unweighted mean, so with
    tasks of very different sizes the p-value and the interval can disagree; the interval
    is the statement about the reported mean.
    """
    _check_settings(resamples, confidence)
    if not tasks:
        raise ValueError("paired_mean_difference needs at least one task")
    rng = np.random.default_rng(seed)
    all_cells = [_cells(name, *tasks[name]) for name in sorted(tasks)]
    replicates = np.zeros(resamples)
    for cells in all_cells:
        replicates += _replicate_deltas(cells, resamples, rng)
    replicates /= len(all_cells)
    low, high = _percentile_interval(replicates, confidence)
    a_only = sum(c.a_only for c in all_cells)
    b_only = sum(c.b_only for c in all_cells)
    return PairedDifference(
        delta=sum(c.delta for c in all_cells) / len(all_cells),
        low=low,
        high=high,
        p_value=mcnemar_exact(a_only, b_only),
        n=sum(c.n for c in all_cells),
        a_only=a_only,
        b_only=b_only,
    )


@dataclass(frozen=True)
class _Cells:
    """One task's paired outcomes, reduced to what the statistics need."""

    n: int
    a_only: int
    b_only: int

    @property
    def delta(self) -> float:
        return (self.a_only - self.b_only) / self.n


def _cells(task: str, a: Sequence[bool], b: Sequence[bool]) -> _Cells:
    where = f"task {task!r}: " if task else ""
    a_right = _outcomes(where, "a", a)
    b_right = _outcomes(where, "b", b)
    if len(a_right) != len(b_right):
        raise ValueError(
            f"{where}a has {len(a_right)} outcomes and b {len(b_right)}; "
            "a paired comparison needs both methods on the same examples"
        )
    if len(a_right) == 0:
        raise ValueError(f"{where}no examples to compare")
    return _Cells(
        n=len(a_right),
        a_only=int(np.count_nonzero(a_right & ~b_right)),
        b_only=int(np.count_nonzero(b_right & ~a_right)),
    )


def _outcomes(where: str, name: str, values: Sequence[bool]) -> NDArray[np.bool_]:
    """`values` as a boolean vector; only booleans (or 0/1) are outcomes."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{where}{name} must be a flat sequence of outcomes, got {array.ndim}-D")
    if array.dtype != np.bool_:
        if array.size and not (
            np.issubdtype(array.dtype, np.number) and np.isin(array, (0, 1)).all()
        ):
            raise ValueError(
                f"{where}{name} must hold booleans (correct or not), got dtype {array.dtype} "
                "with values other than 0 and 1"
            )
        array = array.astype(np.bool_)
    return array


def _check_settings(resamples: int, confidence: float) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def _replicate_deltas(
    cells: _Cells, resamples: int, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Bootstrap replicates of one task's delta: the (a_only, b_only, concordant) counts of n
    examples drawn with replacement are Multinomial(n, counts / n)."""
    counts = np.array([cells.a_only, cells.b_only, cells.n - cells.a_only - cells.b_only])
    drawn = rng.multinomial(cells.n, counts / cells.n, size=resamples)
    return (drawn[:, 0] - drawn[:, 1]) / cells.n


def _percentile_interval(replicates: NDArray[np.float64], confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return float(low), float(high)
