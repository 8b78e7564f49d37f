"""Write real, valid expert packages for tests, and edit their files afterwards.

The adapter is written by PEFT itself (`get_peft_model` + `save_pretrained`), so a package
these helpers write is exactly what a contributor's client produces.
"""

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from safetensors.numpy import load_file, save_file
from torch import nn

from protocol import (
    ADAPTER_CONFIG_FILE,
    AVERAGE_ACTIVATION_SUFFIX,
    GATE_SUFFIX,
    MANIFEST_FILE,
    RETRIEVAL_EMBEDDINGS_KEY,
    RETRIEVAL_FILE,
    ROUTER_FILE,
    BaseModelIdentity,
    BaseModelSpec,
    ExpertManifest,
    LinearModuleSpec,
    LoraSummary,
    PrivacyGuarantee,
    TrainingSummary,
)
from protocol.privacy import accounted_epsilon, noise_multiplier_for

# Any well-formed fingerprint will do here: admission only compares it with the spec's.
TEST_FINGERPRINT = "sha256:" + "ab" * 32
TARGET_MODULES = ("q_proj", "v_proj", "down_proj")


def base_spec(
    model: nn.Module, name: str = "tiny-llama", fingerprint: str = TEST_FINGERPRINT
) -> BaseModelSpec:
    """The spec of a model, from its `nn.Linear` modules."""
    return BaseModelSpec(
        name=name,
        fingerprint=fingerprint,
        architecture=model.config.model_type,
        is_encoder_decoder=model.config.is_encoder_decoder,
        linear_modules=[
            LinearModuleSpec(path=path, in_features=m.in_features, out_features=m.out_features)
            for path, m in model.named_modules()
            if isinstance(m, nn.Linear)
        ],
    )


def write_package(
    directory: Path,
    model: nn.Module,
    base: BaseModelSpec,
    *,
    r: int = 4,
    lora_alpha: int = 8,
    target_modules: Sequence[str] = TARGET_MODULES,
    average_activation: bool = True,
    retrieval_examples: int = 0,
    name: str = "alice/tiny-expert",
    seed: int = 0,
    dp_epsilon: float | None = None,
) -> Path:
    """Write a valid package for `model` (which PEFT wraps in place) into `directory`.

    `dp_epsilon`: the manifest states a DP-SGD guarantee of about that epsilon, consistent
    with its training summary (`dp_guarantee`); needs `average_activation=False`.
    """
    generator = torch.Generator().manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        task_type="SEQ_2_SEQ_LM" if base.is_encoder_decoder else "CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        # PEFT starts B at zero; a trained expert has a non-zero update.
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.copy_(0.01 * torch.randn(param.shape, generator=generator))
    directory.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(directory)
    (directory / "README.md").unlink(missing_ok=True)  # PEFT's model card is not a package file

    modules = [
        m for m in base.linear_modules if any(m.path.endswith("." + t) for t in target_modules)
    ]
    rng = np.random.default_rng(seed)
    router = {}
    for m in modules:
        router[m.path + GATE_SUFFIX] = (0.1 * rng.standard_normal(m.in_features)).astype(np.float32)
        if average_activation:
            router[m.path + AVERAGE_ACTIVATION_SUFFIX] = rng.standard_normal(m.in_features).astype(
                np.float32
            )
    save_file(router, str(directory / ROUTER_FILE))
    if retrieval_examples:
        embeddings = rng.standard_normal((retrieval_examples, 384)).astype(np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        save_file({RETRIEVAL_EMBEDDINGS_KEY: embeddings}, str(directory / RETRIEVAL_FILE))

    manifest = ExpertManifest(
        name=name,
        description="a test expert",
        base_model=BaseModelIdentity(name=base.name, fingerprint=base.fingerprint),
        lora=LoraSummary(
            r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), modules=len(modules)
        ),
        training=TrainingSummary(examples=8, steps=10, gate_steps=1, batch_size=4),
        has_average_activation=average_activation,
        has_retrieval_embeddings=retrieval_examples > 0,
        privacy=None if dp_epsilon is None else dp_guarantee(dp_epsilon, 8, 4, 11),
        library_version="0.1.0",
    )
    (directory / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    return directory


def dp_guarantee(
    epsilon: float, examples: int, batch_size: int, steps: int, delta: float = 1e-5
) -> PrivacyGuarantee:
    """The guarantee DP-SGD over `examples` examples (expected batch `batch_size`) for
    `steps` steps states, with the noise that spends about `epsilon` (the accountant's)."""
    rate = batch_size / examples
    noise = noise_multiplier_for(epsilon=epsilon, delta=delta, sample_rate=rate, steps=steps)
    return PrivacyGuarantee(
        epsilon=accounted_epsilon(
            noise_multiplier=noise, sample_rate=rate, steps=steps, delta=delta, accountant="rdp"
        ),
        delta=delta,
        max_grad_norm=1.0,
        noise_multiplier=noise,
        sample_rate=rate,
        steps=steps,
        library="opacus 1.6.0",
    )


def edit_tensors(path: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Load a safetensors file, let `edit` change the dict in place, write it back."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Load a JSON object, let `edit` change it in place, write it back."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_adapter_config(directory: Path, **changes: Any) -> None:
    edit_json(directory / ADAPTER_CONFIG_FILE, lambda config: config.update(changes))


def raw_safetensors(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    """A safetensors file from a header written by hand: u64 little-endian length + JSON."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data
