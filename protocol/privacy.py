"""A differential-privacy guarantee as an expert's manifest states it, and a release's weakest.

DP-SGD (Abadi et al., 2016): each step samples every training example independently with
probability `sample_rate` (Poisson sampling), clips each example's gradient to L2 norm
`max_grad_norm`, sums them and adds Gaussian noise of standard deviation
`noise_multiplier * max_grad_norm`. An accountant turns (noise multiplier, sample rate,
steps) into the (epsilon, delta) the whole run spends. The guarantee is about one training
example (add or remove one), over everything the package ships that was computed from the
data: the LoRA and the gates. A package with a guarantee carries neither average activations
nor retrieval embeddings, which nothing privatises.

The data model is pure pydantic; `accounted_epsilon` needs the accountant (Opacus, imported
when called).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

PRIVACY_FORMAT_VERSION: Final = 1
ACCOUNTANTS: Final = ("rdp",)
# A claimed epsilon may be below the accountant's own value by this much (relative): the
# accountant's arithmetic may differ in its last digits between versions and machines.
EPSILON_TOLERANCE: Final = 1e-6
# Each example's gradient is clipped to this L2 norm unless the contributor says otherwise.
# Chosen on held-in data (`bench privacy`, social_iqa): a fresh SmolLM2-135M LoRA's
# per-example gradient norms run from 2.6 to 16 (median 5.3), so every example is clipped,
# i.e. normalised. With every example normalised, AdamW's update does not depend on the clip
# (signal and noise scale together, and Adam is scale-free): no clip to tune.
DEFAULT_MAX_GRAD_NORM: Final = 1.0


class PrivacyGuarantee(BaseModel):
    """(epsilon, delta)-DP of the expert's LoRA and gates together, and how it was obtained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = PRIVACY_FORMAT_VERSION
    mechanism: Literal["dp-sgd"] = "dp-sgd"
    epsilon: float = Field(
        gt=0, le=1e6, allow_inf_nan=False, description="spent, by the accountant, at `delta`"
    )
    delta: float = Field(gt=0, lt=1, allow_inf_nan=False)
    max_grad_norm: float = Field(
        gt=0, le=1e6, allow_inf_nan=False, description="each example's gradient clipped to this"
    )
    noise_multiplier: float = Field(
        gt=0, le=1e6, allow_inf_nan=False, description="noise std / max_grad_norm"
    )
    sample_rate: float = Field(
        gt=0, le=1, allow_inf_nan=False, description="Poisson: each example's chance per step"
    )
    steps: int = Field(ge=1, le=10**9, description="LoRA steps plus gate steps")
    accountant: Literal["rdp"] = "rdp"
    library: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_.+ -]+$", examples=["opacus 1.6.0"])

    def summary(self) -> str:
        """`ε = 8.00, δ = 1e-05 (DP-SGD, rdp)`: how pages and the CLI show it."""
        return f"ε = {self.epsilon:.2f}, δ = {self.delta:.0e} (DP-SGD, {self.accountant})"


def accounted_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str
) -> float:
    """The epsilon that `accountant` gives DP-SGD run with these settings, at `delta`."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")
    from opacus.accountants import RDPAccountant

    rdp = RDPAccountant()
    rdp.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is valid, only perhaps not tightest.
        warnings.simplefilter("ignore", UserWarning)
        return float(rdp.get_epsilon(delta))


def noise_multiplier_for(
    *, epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest noise multiplier (to Opacus' search tolerance) with which `steps` steps
    at `sample_rate` spend at most `epsilon` at `delta`."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


class WeakestGuarantee(BaseModel):
    """What a set of experts (a release) promises its contributors, at the weakest.

    `epsilon` and `delta` are the largest among the experts when every one has a guarantee,
    None when `without` > 0: an expert without DP promises nothing, so neither does the set.
    """

    experts: int = Field(ge=0)
    without: int = Field(ge=0, description="experts trained without a DP guarantee")
    epsilon: float | None = None
    delta: float | None = None

    def summary(self) -> str:
        if self.experts == 0:
            return "no experts"
        if self.without:
            return f"no DP guarantee ({self.without} of {self.experts} experts without DP)"
        return f"every expert DP, weakest ε = {self.epsilon:.2f}, δ = {self.delta:.0e}"


def weakest_guarantee(guarantees: Sequence[PrivacyGuarantee | None]) -> WeakestGuarantee:
    """The weakest of `guarantees` (one per expert; None: trained without DP)."""
    given = [g for g in guarantees if g is not None]
    without = len(guarantees) - len(given)
    if without or not given:
        return WeakestGuarantee(experts=len(guarantees), without=without)
    return WeakestGuarantee(
        experts=len(guarantees),
        without=0,
        epsilon=max(g.epsilon for g in given),
        delta=max(g.delta for g in given),
    )


def default_delta(examples: int) -> float:
    """1e-5, or 1 / (10 n) when that is smaller: delta must be well below 1 / n, the chance
    at which a mechanism could publish one example outright and still claim delta."""
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    return min(1e-5, 1 / (10 * examples))


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_MAX_GRAD_NORM",
    "PRIVACY_FORMAT_VERSION",
    "PrivacyGuarantee",
    "WeakestGuarantee",
    "accounted_epsilon",
    "default_delta",
    "noise_multiplier_for",
    "weakest_guarantee",
]
