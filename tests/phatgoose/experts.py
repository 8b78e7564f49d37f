"""Random experts for tests: real shapes and PEFT keys, random values, no training."""

import torch
from peft import LoraConfig
from torch import nn

import phatgoose
from phatgoose.expert import Expert, lora_summary
from phatgoose.models import default_target_modules, linear_module_paths, model_fingerprint
from protocol import BaseModelIdentity, ExpertManifest, TrainingSummary, lora_key


def random_expert(
    model: nn.Module,
    *,
    name: str,
    rank: int,
    seed: int,
    target_modules: list[str] | None = None,
    with_average_activation: bool = False,
) -> Expert:
    """An expert over `model` with random A, B (B non-zero, so updates matter) and gates.

    `lora_alpha = 2 * rank` (scale 2). Gates and average activations are standard normal;
    A and B are scaled so that `scale * B A u` is of the order of `u`.
    """
    targets = default_target_modules(model) if target_modules is None else target_modules
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(seed)

    lora_weights: dict[str, torch.Tensor] = {}
    gates: dict[str, torch.Tensor] = {}
    activations: dict[str, torch.Tensor] = {}
    for path in linear_module_paths(model, targets):
        linear = modules[path]
        n, d = linear.in_features, linear.out_features
        lora_weights[lora_key(path, "A")] = torch.randn(rank, n, generator=generator) / n**0.5
        lora_weights[lora_key(path, "B")] = torch.randn(d, rank, generator=generator) / (
            2 * rank**0.5
        )
        gates[path] = torch.randn(n, generator=generator)
        activations[path] = torch.randn(n, generator=generator)

    lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets))
    manifest = ExpertManifest(
        name=name,
        base_model=BaseModelIdentity(
            name=getattr(model.config, "name_or_path", "") or "tiny",
            fingerprint=model_fingerprint(model),
        ),
        lora=lora_summary(lora_config, modules=len(gates)),
        training=TrainingSummary(examples=0, steps=0, gate_steps=1),
        has_average_activation=with_average_activation,
        library_version=phatgoose.__version__,
    )
    return Expert(
        manifest=manifest,
        lora_config=lora_config,
        lora_weights=lora_weights,
        gates=gates,
        average_activations=activations if with_average_activation else None,
    )
