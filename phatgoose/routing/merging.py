"""TIES and DARE: merging the experts' full updates `dW_z = s_z B_z A_z` into one per module.

- TIES (Yadav et al., NeurIPS 2023): trim each update to its top-`density` entries by
  magnitude, elect each entry's sign as the sign of the trimmed updates' sum (total mass),
  average the non-zero entries that agree with it (the disjoint mean), times `scale`.
- DARE (Yu et al., ICML 2024): drop each entry with probability p, rescale the kept ones by
  1/(1-p), then average them (`merge="average"`) or combine them by TIES's sign election and
  disjoint mean without a trim (`merge="ties"`), times `scale`.

The math is pure functions on dense float64 updates `[d, n]`; `ties_update` and
`dare_update` apply it to the experts at one module and return float32 factors `(A, B)`
with `B A` the merged update, as `rows.merged_update` does. An expert that does not adapt a
module contributes a zero update there. Updates are produced afresh on each pass (TIES
reads them twice), so memory stays a few `[d, n]` matrices whatever the number of experts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from phatgoose.expert import Expert

T = TypeVar("T")
DareMerge = Literal["average", "ties"]
DARE_MERGES: tuple[DareMerge, ...] = ("average", "ties")


class Reiterable(Generic[T]):
    """An iterable that calls `make` for a fresh iterator on every pass (nothing is kept)."""

    def __init__(self, make: Callable[[], Iterator[T]]) -> None:
        self._make = make

    def __iter__(self) -> Iterator[T]:
        return self._make()


# ------------------------------------------------------------------ dense updates (pure)
def dense_update(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """`scale * B @ A` as a float64 `[d, n]` (float64 so that merges are exact to float32)."""
    return scale * (lora_B.double() @ lora_A.double())


def kept_count(density: float, entries: int) -> int:
    """How many of `entries` a trim to `density` keeps: density x entries rounded half up,
    at least one."""
    return max(1, min(entries, math.floor(density * entries + 0.5)))


def trim(update: Tensor, density: float) -> Tensor:
    """TIES's trim: `update` with all but its `kept_count(density, numel)` largest-magnitude
    entries set to 0. Ties at the threshold go to the lowest row-major (flat) index, so the
    result never depends on the sort's order."""
    _check_density(density)
    flat = update.reshape(-1)
    keep_count = kept_count(density, flat.numel())
    if keep_count == flat.numel():
        return update.clone()
    magnitude = flat.abs()
    # The keep_count-th largest magnitude is the (numel - keep_count + 1)-th smallest.
    threshold = magnitude.kthvalue(flat.numel() - keep_count + 1).values
    keep = magnitude > threshold
    missing = keep_count - int(keep.sum())
    keep[torch.nonzero(magnitude == threshold).reshape(-1)[:missing]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(update.shape)


def elect_signs(updates: Iterable[Tensor]) -> Tensor:
    """TIES's sign election: per entry, `sign(sum_z update_z)` (the side with more total
    mass; 0 where the sum is exactly 0, which no non-zero entry then agrees with)."""
    total: Tensor | None = None
    for update in updates:
        if total is None:
            total = update.clone()
        else:
            _check_same_shape(total, update)
            total += update
    if total is None:
        raise ValueError("a merge needs at least one update, got none")
    return torch.sign(total)


def disjoint_mean(updates: Iterable[Tensor], signs: Tensor) -> Tensor:
    """TIES's disjoint mean: per entry, the mean of the non-zero entries whose sign is the
    elected one; 0 where no update has such an entry."""
    total = torch.zeros_like(signs)
    count = torch.zeros_like(signs)
    for update in updates:
        _check_same_shape(signs, update)
        agree = (torch.sign(update) == signs) & (update != 0)
        total += torch.where(agree, update, 0.0)
        count += agree
    return total / count.clamp(min=1)


def ties_merge(updates: Iterable[Tensor], density: float, scale: float) -> Tensor:
    """`scale * disjoint_mean(trimmed, elect_signs(trimmed))`, each update trimmed to
    `density`. `updates` is read twice: a list, or a `Reiterable`, not an iterator."""
    _check_density(density)
    _check_scale(scale)
    _check_reiterable(updates)
    trimmed = Reiterable(lambda: (trim(update, density) for update in updates))
    return scale * disjoint_mean(trimmed, elect_signs(trimmed))


def dare_drop(update: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """DARE's drop and rescale: each entry kept where `torch.rand` (float64, drawn from
    `generator` in the update's shape) is `>= drop_rate`, so with probability 1 - p, and
    divided by 1 - p; the others set to 0. `drop_rate=0` keeps `update` exactly."""
    _check_drop_rate(drop_rate)
    draw = torch.rand(
        update.shape, generator=generator, dtype=torch.float64, device=generator.device
    )
    keep = (draw >= drop_rate).to(update.device)
    return torch.where(keep, update / (1.0 - drop_rate), torch.zeros_like(update))


def dare_seed(seed: int, path: str, position: int) -> int:
    """The seed of DARE's draw for the expert at `position` (in the release's expert list)
    at module `path`: the first 8 bytes of SHA-256 over `"{seed}/{path}/{position}"`,
    little-endian. Stable across processes and machines (Python's `hash()` is not)."""
    digest = hashlib.sha256(f"{seed}/{path}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def dare_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (a `dare_seed` value): DARE draws on the CPU
    whatever the model's device, so a release gives the same masks everywhere."""
    return torch.Generator(device="cpu").manual_seed(seed)


def dare_merge(
    updates: Iterable[Tensor],
    seeds: Sequence[int],
    *,
    drop_rate: float,
    merge: str,
    scale: float,
    count: int | None = None,
) -> Tensor:
    """DARE over `updates`, the z-th dropped with `dare_generator(seeds[z])`, then merged:
    `"average"`: `scale * sum_z dropped_z / count` (`count` defaults to the number of
    updates; pass the number of experts when some have no update here: they count as zero
    updates); `"ties"`: `scale * disjoint_mean(dropped, elect_signs(dropped))`, no trim.
    `updates` is read twice for `"ties"` (each pass redraws the same masks)."""
    _check_drop_rate(drop_rate)
    _check_scale(scale)
    if merge not in DARE_MERGES:
        raise ValueError(f"DARE merge must be one of {DARE_MERGES}, got {merge!r}")
    _check_reiterable(updates)

    def dropped_updates() -> Iterator[Tensor]:
        # strict: one seed per update, or the draws would silently shift between experts.
        for update, seed in zip(updates, seeds, strict=True):
            yield dare_drop(update, drop_rate, dare_generator(seed))

    dropped = Reiterable(dropped_updates)
    if merge == "ties":
        return scale * disjoint_mean(dropped, elect_signs(dropped))
    total: Tensor | None = None
    number = 0
    for update in dropped:
        total = update if total is None else total + _check_same_shape(total, update)
        number += 1
    if total is None:
        raise ValueError("a merge needs at least one update, got none")
    count = number if count is None else count
    if count < number:
        raise ValueError(f"DARE's average over {count} experts got {number} updates")
    return scale * total / count


def dense_factors(delta: Tensor) -> tuple[Tensor, Tensor]:
    """Float32 factors `(A, B)` with `B A = delta [d, n]`: the dense update on the narrower
    side and an identity on the other (TIES and DARE updates are full rank in general)."""
    d, n = delta.shape
    delta = delta.float()
    return (torch.eye(n), delta) if n <= d else (delta, torch.eye(d))


# ------------------------------------------------------------------ per module, over experts
def ties_update(
    experts: Sequence[Expert], path: str, *, density: float, scale: float
) -> tuple[Tensor, Tensor]:
    """Factors `(A, B)` with `B A` the TIES merge of the experts' updates at `path`.

    `experts` is the release's list; those that do not adapt `path` contribute a zero update,
    which TIES's disjoint mean ignores.
    """
    members = _members(experts, path)
    updates = Reiterable(lambda: (dense_update(*experts[z].lora_update(path)) for z in members))
    return dense_factors(ties_merge(updates, density, scale))


def dare_update(
    experts: Sequence[Expert],
    path: str,
    *,
    drop_rate: float,
    merge: str,
    scale: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Factors `(A, B)` with `B A` the DARE merge of the experts' updates at `path`.

    `experts` is the release's list, in its order: the expert at position z draws its mask
    from `dare_seed(seed, path, z)`. Those that do not adapt `path` contribute a zero update:
    nothing to TIES's disjoint mean, a zero term (still counted) in the average.
    """
    members = _members(experts, path)
    updates = Reiterable(lambda: (dense_update(*experts[z].lora_update(path)) for z in members))
    seeds = [dare_seed(seed, path, z) for z in members]
    merged = dare_merge(
        updates, seeds, drop_rate=drop_rate, merge=merge, scale=scale, count=len(experts)
    )
    return dense_factors(merged)


# ------------------------------------------------------------------ checks
def _members(experts: Sequence[Expert], path: str) -> list[int]:
    members = [z for z, e in enumerate(experts) if path in e.module_paths()]
    if not members:
        raise ValueError(f"no expert adapts {path}; nothing to merge there")
    return members


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"TIES density must be in (0, 1] (the fraction kept), got {density!r}")


def _check_drop_rate(drop_rate: float) -> None:
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(
            f"DARE drop_rate must be in [0, 1) (rescaling divides by 1 - p), got {drop_rate!r}"
        )


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the merge's scale must be a finite number > 0, got {scale!r}")


def _check_reiterable(updates: Iterable[Tensor]) -> None:
    if iter(updates) is updates:
        raise TypeError(
            "the merge reads the updates twice: pass a list or a Reiterable, not an iterator"
        )


def _check_same_shape(reference: Tensor, update: Tensor) -> Tensor:
    if update.shape != reference.shape:
        raise ValueError(
            f"merged updates must share one shape, got {list(update.shape)} after "
            f"{list(reference.shape)}"
        )
    return update
