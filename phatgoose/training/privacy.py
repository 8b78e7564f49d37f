"""Differentially private training of an expert: DP-SGD over the LoRA and the gates together.

Every step samples each training example with probability q = batch_size / n (Poisson
sampling, which the accountant assumes), computes each sampled example's gradient on its
own, and hands them to Opacus' `DPOptimizer`, which clips each to `max_grad_norm`, sums
them, adds Gaussian noise and divides by the expected batch size before the wrapped AdamW
step. The noise multiplier is chosen once, for the LoRA's and the gates' steps together, so
that the whole expert spends at most the contributor's epsilon (`protocol.privacy`).

Per-example gradients come from one forward and backward pass per sampled example rather
than from Opacus' `GradSampleModule`: its hooks know `nn.Linear` (PEFT's LoRA factors) but
not the gated `RoutedLinear` the gates train in, and packed rows would mix examples. One
example per pass is exact for any module, and padding-free.

Sampling and noise draw from the operating system's entropy: a seeded generator would let
anyone who knows the seed subtract the noise. DP runs are therefore not repeatable.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from phatgoose.data import Example
from protocol.privacy import (
    ACCOUNTANTS,
    DEFAULT_MAX_GRAD_NORM,
    PrivacyGuarantee,
    accounted_epsilon,
    default_delta,
    noise_multiplier_for,
)

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer


@dataclass(frozen=True)
class DifferentialPrivacy:
    """A contributor's privacy budget for one expert: (epsilon, delta)-DP per example.

    `delta` defaults to `protocol.privacy.default_delta(n)` (1e-5, less for large data) and
    must stay below 1 / n. `noise_seed` makes sampling and noise repeatable, which voids the
    guarantee (the noise can be recomputed): for tests only; None draws from the OS.
    """

    epsilon: float
    delta: float | None = None
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    accountant: str = "rdp"
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("epsilon", math.isfinite(self.epsilon) and 0 < self.epsilon <= 1e6, "in (0, 1e6]"),
            (
                "delta",
                self.delta is None or (math.isfinite(self.delta) and 0 < self.delta < 1),
                "None or in (0, 1)",
            ),
            (
                "max_grad_norm",
                math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0,
                "> 0",
            ),
            ("accountant", self.accountant in ACCOUNTANTS, "one of " + ", ".join(ACCOUNTANTS)),
        ]
        for field_name, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"DifferentialPrivacy.{field_name} must be {expected}, "
                    f"got {getattr(self, field_name)!r}"
                )


@dataclass(frozen=True)
class PrivatePlan:
    """DP-SGD's settings for one training set: what both the LoRA and the gates run with."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    max_grad_norm: float
    expected_batch_size: float
    accountant: str
    noise_seed: int | None

    def guarantee(self, steps: int) -> PrivacyGuarantee:
        """What `steps` steps of this plan spend, as the manifest states it."""
        import opacus

        return PrivacyGuarantee(
            epsilon=accounted_epsilon(
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=steps,
                delta=self.delta,
                accountant=self.accountant,
            ),
            delta=self.delta,
            max_grad_norm=self.max_grad_norm,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=steps,
            accountant="rdp",
            library=f"opacus {opacus.__version__}",
        )

    def matches(self, guarantee: PrivacyGuarantee) -> bool:
        """Whether `guarantee` was spent by this plan (the gates continue the LoRA's run)."""
        return (
            math.isclose(guarantee.noise_multiplier, self.noise_multiplier, rel_tol=1e-9)
            and math.isclose(guarantee.sample_rate, self.sample_rate, rel_tol=1e-9)
            and guarantee.delta == self.delta
            and guarantee.max_grad_norm == self.max_grad_norm
        )


def plan_privacy(
    dp: DifferentialPrivacy, *, examples: int, batch_size: int, total_steps: int
) -> PrivatePlan:
    """The noise multiplier with which `total_steps` Poisson-sampled steps over `examples`
    examples (expected batch `batch_size`) spend at most `dp.epsilon`."""
    if examples < 1:
        raise ValueError("differentially private training needs at least one example")
    delta = dp.delta if dp.delta is not None else default_delta(examples)
    if delta >= 1 / examples:
        raise ValueError(
            f"delta {delta:g} is not below 1/n = {1 / examples:g} for {examples} examples: a "
            "mechanism that publishes one example outright would meet it; choose a smaller "
            "--dp-delta"
        )
    sample_rate = min(1.0, batch_size / examples)
    noise = noise_multiplier_for(
        epsilon=dp.epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=total_steps,
        accountant=dp.accountant,
    )
    return PrivatePlan(
        noise_multiplier=noise,
        sample_rate=sample_rate,
        delta=delta,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=sample_rate * examples,
        accountant=dp.accountant,
        noise_seed=dp.noise_seed,
    )


def poisson_batches(
    examples: Sequence[Example], sample_rate: float, generator: torch.Generator
) -> Iterator[list[Example]]:
    """Endless batches: each example in each batch independently with `sample_rate` (a
    batch may be empty; the step then adds noise alone, as the accountant assumes)."""
    while True:
        chosen = torch.rand(len(examples), generator=generator) < sample_rate
        yield [examples[i] for i in chosen.nonzero()[:, 0].tolist()]


def private_generator(plan: PrivatePlan, device: torch.device) -> torch.Generator:
    """The generator of sampling (on the CPU) or noise (on `device`): the OS's entropy
    unless the plan fixes a seed for a test."""
    seed = plan.noise_seed if plan.noise_seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def dp_optimizer(
    parameters: list[nn.Parameter], plan: PrivatePlan, *, learning_rate: float, weight_decay: float
) -> DPOptimizer:
    """AdamW behind Opacus' clipping and noise, with the noise generator from the plan."""
    from opacus.optimizers import DPOptimizer  # imported here: it costs a second at start-up

    device = parameters[0].device
    return DPOptimizer(
        torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        loss_reduction="mean",
        generator=private_generator(plan, device),
    )


def set_per_example_gradients(
    parameters: list[nn.Parameter],
    batch: Sequence[Example],
    example_loss: Callable[[Example], Tensor],
) -> float:
    """Put each example's gradient of `example_loss(example)` into `p.grad_sample`
    (`[len(batch), *p.shape]`, what `DPOptimizer` clips); returns the batch's mean loss
    (0 for an empty batch)."""
    samples: list[list[Tensor]] = [[] for _ in parameters]
    losses: list[float] = []
    for example in batch:
        loss = example_loss(example)
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        for sample, parameter, grad in zip(samples, parameters, grads, strict=True):
            sample.append(torch.zeros_like(parameter) if grad is None else grad.detach())
        losses.append(loss.item())
    for parameter, sample in zip(parameters, samples, strict=True):
        parameter.grad_sample = (  # type: ignore[attr-defined]  # Opacus' attribute
            torch.stack(sample) if sample else parameter.new_zeros((0, *parameter.shape))
        )
    return sum(losses) / len(losses) if losses else 0.0
