"""What every training job shares: handing the caller's model back as it was, and the
expert's name and base-model identity.

A run may change `requires_grad` flags, the train/eval mode and torch's random state;
`restored`, `eval_mode` and `seeded` undo each on the way out.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from phatgoose.models import model_fingerprint
from protocol import BaseModelIdentity
from protocol.manifest import EXPERT_NAME_PATTERN


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def to_device(batch: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def seeded(model: nn.Module, seed: int) -> Iterator[None]:
    """Seed torch's generators for a run, leaving the caller's random state as it was."""
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def restored(model: nn.Module) -> Iterator[None]:
    """Give `model` back with its original requires_grad flags and train/eval mode."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        yield
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags.get(name, parameter.requires_grad))
        for name, module in model.named_modules():
            module.training = modes.get(name, module.training)


def check_expert_name(name: str) -> None:
    if not re.match(EXPERT_NAME_PATTERN, name):
        raise ValueError(
            f"expert name {name!r} is invalid: expected lowercase letters, digits, '_', '.', "
            f"'-' (starting with a letter or digit), optionally 'namespace/name'"
        )


def base_model_identity(model: nn.Module) -> BaseModelIdentity:
    """The identity an expert records for `model`: its name and weight fingerprint."""
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or "unknown"
    return BaseModelIdentity(name=name, fingerprint=model_fingerprint(model))
