"""PHATGOOSE gates, trained after the LoRA with everything else frozen.

METHOD.md: `y = W u + (alpha/r) B A u * sigmoid(v^T u)`, only `v` trained (from zeros), with
the same data, objective and hyper-parameters as the LoRA, for about a tenth of the steps.
The gated linears are the routing package's own `RoutedLinear`s over the one expert with a
`GateRouter` (`routing.build_gated_model`); they are taken out again afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence

from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from phatgoose.data import Example
from phatgoose.expert import Expert
from phatgoose.models import model_fingerprint
from phatgoose.precision import resolve_precision
from phatgoose.routing.layer import RoutedLinear
from phatgoose.routing.model import build_gated_model, unroute_model
from phatgoose.routing.routers import GateRouter
from phatgoose.training.lora import TrainingConfig, optimise, split_validation
from phatgoose.training.plumbing import restored, seeded
from protocol import PrivacyGuarantee

log = logging.getLogger(__name__)


@contextlib.contextmanager
def gated_lora(
    model: nn.Module, expert: Expert, gates: dict[str, Tensor] | None = None
) -> Iterator[dict[str, RoutedLinear]]:
    """Temporarily put `expert`'s LoRA behind sigmoid gates into `model`.

    Gates start at zero unless given. Yields path -> gated `RoutedLinear` (its gate is
    `layer.router.gate`); on exit the original linears are back in place (the model is
    otherwise untouched).
    """
    build_gated_model(model, expert, gates)
    try:
        gated: dict[str, RoutedLinear] = {}
        for path in expert.module_paths():
            layer = model.get_submodule(path)
            assert isinstance(layer, RoutedLinear)
            gated[path] = layer
        yield gated
    finally:
        unroute_model(model)


def gate_of(layer: RoutedLinear) -> nn.Parameter:
    """The trainable gate vector `v [n]` of a linear that `gated_lora` put in."""
    if not isinstance(layer.router, GateRouter):
        raise TypeError(f"{layer.path} is routed by {type(layer.router).__name__}, not gated")
    return layer.router.gate


def train_gates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    expert: Expert,
    examples: Sequence[Example],
    *,
    config: TrainingConfig | None = None,
    progress: bool = True,
    loss_curve: list[float] | None = None,
) -> Expert:
    """Train `expert`'s PHATGOOSE gates with base and LoRA frozen; returns a new Expert.

    Uses the same training split (`split_validation`), objective, batch size, schedule shape
    and optimiser as the LoRA, for `config.resolved_gate_steps` steps. `loss_curve`, when
    given, receives every step's training loss.

    Under `config.dp` the gates continue the LoRA's DP-SGD run: the expert's guarantee then
    covers both (`_guarantee_after`); gates trained otherwise end the guarantee.
    """
    config = config or TrainingConfig()
    _warn_if_other_base(model, expert)
    training, _ = split_validation(examples, config)
    steps = config.resolved_gate_steps
    precision = resolve_precision(config.precision, next(model.parameters()).device)
    started = time.perf_counter()
    with restored(model), seeded(model, config.seed):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        with gated_lora(model, expert) as gated:
            losses = optimise(
                model,
                tokenizer,
                [gate_of(layer) for layer in gated.values()],
                training,
                steps=steps,
                learning_rate=config.resolved_gate_learning_rate,
                config=config,
                desc=f"gates {expert.name}",
                progress=progress,
                precision=precision,
            )
            gates = {p: gate_of(layer).detach().float().cpu().clone() for p, layer in gated.items()}
    if loss_curve is not None:
        loss_curve.extend(losses)
    window = losses[-max(1, math.ceil(steps / 10)) :]
    private = config.dp is not None
    log.info(
        "trained gates of %s: %d steps in %.1f s (%s), final loss %.4f",
        expert.name,
        steps,
        time.perf_counter() - started,
        precision.name,
        losses[-1],
    )
    return expert.with_gates(
        gates,
        gate_steps=steps,
        final_gate_loss=None if private else sum(window) / len(window),
        gate_precision=precision.name,
        privacy=_guarantee_after(expert, config, len(training), steps),
    )


def _guarantee_after(
    expert: Expert, config: TrainingConfig, examples: int, gate_steps: int
) -> PrivacyGuarantee | None:
    """The expert's guarantee once its gates are trained: the LoRA's run extended by the
    gate steps when both were private with the same plan, else none (with a warning when
    one was private: the other used the data without noise)."""
    earlier = expert.manifest.privacy
    if config.dp is None:
        if earlier is not None:
            _warn(f"gates of {expert.name!r} trained without DP: its LoRA's guarantee is dropped")
        return None
    plan = config.private_plan(examples)
    if earlier is None or not plan.matches(earlier):
        _warn(
            f"the LoRA of {expert.name!r} was not trained under this DP plan: gates trained "
            "with DP alone give the expert no guarantee"
        )
        return None
    return plan.guarantee(earlier.steps + gate_steps)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)
    log.warning(message)


def _warn_if_other_base(model: nn.Module, expert: Expert) -> None:
    fingerprint = model_fingerprint(model)
    if fingerprint != expert.manifest.base_model.fingerprint:
        message = (
            f"expert {expert.name!r} was made for base model "
            f"{expert.manifest.base_model.fingerprint}, this model is {fingerprint}"
        )
        warnings.warn(message, UserWarning, stacklevel=3)
        log.warning(message)
