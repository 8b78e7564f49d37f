"""An existing PEFT LoRA adapter (a saved directory or a PeftModel) as an expert."""

from __future__ import annotations

import copy
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

import phatgoose
from phatgoose.expert import Expert, ExpertError, lora_summary, read_lora_config
from phatgoose.training.plumbing import base_model_identity, check_expert_name
from protocol import (
    ADAPTER_WEIGHTS_FILE,
    BaseModelIdentity,
    ExpertManifest,
    TrainingSummary,
    parse_lora_key,
)


def expert_from_peft(
    source: str | Path | PeftModel,
    *,
    name: str,
    base_model: BaseModelIdentity | nn.Module,
    description: str = "",
    license: str = "Apache-2.0",
) -> Expert:
    """Turn an existing PEFT LoRA adapter (a saved directory or a PeftModel) into an expert.

    The expert has no gates yet (`train_gates` adds them). `base_model` is the base model's
    identity, or the base model itself (unwrapped) to fingerprint.
    """
    check_expert_name(name)
    if isinstance(base_model, PeftModel):
        raise ValueError(
            "base_model must be the plain base model or its identity, not a PeftModel "
            "(its weights include the adapter)"
        )
    identity = (
        base_model if isinstance(base_model, BaseModelIdentity) else base_model_identity(base_model)
    )

    if isinstance(source, PeftModel):
        adapter = source.active_adapter
        lora_config = source.peft_config[adapter]
        if not isinstance(lora_config, LoraConfig):
            raise ExpertError(
                f"adapter {adapter!r} is {type(lora_config).__name__}; "
                "only LoRA adapters are experts"
            )
        lora_config = copy.deepcopy(lora_config)
        weights = {
            k: v.detach().to("cpu", copy=True).contiguous()
            for k, v in get_peft_model_state_dict(source, adapter_name=adapter).items()
        }
    else:
        directory = Path(source)
        lora_config = read_lora_config(directory)  # refuses other PEFT types
        weights_file = directory / ADAPTER_WEIGHTS_FILE
        if not weights_file.is_file():
            pickled = (directory / "adapter_model.bin").is_file()
            raise ExpertError(
                f"{weights_file}: missing"
                + (
                    "; only adapter_model.bin (pickle) is there, which is never loaded: "
                    "re-save the adapter with safe_serialization=True"
                    if pickled
                    else ""
                )
            )
        weights = load_file(str(weights_file))
    lora_config.inference_mode = True

    modules = len({parsed[0] for key in weights if (parsed := parse_lora_key(key))})
    manifest = ExpertManifest(
        name=name,
        description=description,
        base_model=identity,
        lora=lora_summary(lora_config, modules=modules),
        license=license,
        training=TrainingSummary(examples=0, steps=0, gate_steps=0),
        library_version=phatgoose.__version__,
    )
    return Expert(manifest=manifest, lora_config=lora_config, lora_weights=weights)
