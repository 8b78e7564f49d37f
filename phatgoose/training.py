"""What a contributor computes: a LoRA expert (through PEFT), then its PHATGOOSE gates.

METHOD.md, per adapted linear `W` with input activation `u`:
- LoRA:  `y = W u + (alpha/r) B A u`, A and B trained, B starting at zero;
- gates: `y = W u + (alpha/r) B A u * sigmoid(v^T u)`, only `v` trained (from zeros),
  with the same data, objective and hyper-parameters, for about a tenth of the steps.
Both minimise the cross-entropy of the target tokens (`data.collate_for_training`).
Plus the contributor-side vectors of two baselines: average activations and (opt-in)
retrieval embeddings.

The caller's model is always handed back exactly as it was: PEFT's wrappers are unloaded
without merging, gated layers are swapped back out, `requires_grad` flags and the
train/eval mode are restored.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import re
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import phatgoose
from phatgoose.data import IGNORE_INDEX, Example, batches, collate_for_training, pack_sequences
from phatgoose.expert import Expert, ExpertError, lora_summary, read_lora_config
from phatgoose.models import default_target_modules, forward_accepts, model_fingerprint
from protocol import ADAPTER_WEIGHTS_FILE, BaseModelIdentity, ExpertManifest, TrainingSummary
from protocol.manifest import EXPERT_NAME_PATTERN

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- settings
@dataclass
class TrainingConfig:
    """Hyper-parameters of LoRA and gate training (paper defaults: r=16, lr 5e-3, 6% warm-up).

    `lora_alpha=32` gives the scale alpha/r = 2 at r = 16. The learning rate rises linearly
    over `warmup_ratio * steps` and then decays linearly to zero. A seeded
    `validation_fraction` of the examples (at most `max_validation_examples`, at least one
    when there are two or more examples; none when the fraction is 0) is held out; every
    `eval_every` steps (default a tenth of the run) and at the end, its loss picks the
    checkpoint that is kept. Gates train for `gate_steps` (default ceil(steps / 10)) at
    `gate_learning_rate` (default `learning_rate`) on the same training split.
    """

    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    learning_rate: float = 5e-3
    warmup_ratio: float = 0.06
    steps: int = 1000
    batch_size: int = 8
    max_length: int = 256
    validation_fraction: float = 0.1
    max_validation_examples: int = 200
    eval_every: int | None = None
    gate_steps: int | None = None
    gate_learning_rate: float | None = None
    seed: int = 0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            ("r", self.r >= 1, "an integer >= 1"),
            ("lora_alpha", self.lora_alpha > 0, "> 0"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio <= 1, "in [0, 1]"),
            ("steps", self.steps >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("max_length", self.max_length >= 2, "an integer >= 2"),
            ("validation_fraction", 0 <= self.validation_fraction < 1, "in [0, 1)"),
            ("max_validation_examples", self.max_validation_examples >= 1, ">= 1"),
            ("eval_every", self.eval_every is None or self.eval_every >= 1, "None or >= 1"),
            ("gate_steps", self.gate_steps is None or self.gate_steps >= 1, "None or >= 1"),
            (
                "gate_learning_rate",
                self.gate_learning_rate is None or self.gate_learning_rate > 0,
                "None or > 0",
            ),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
        ]
        for field_name, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"TrainingConfig.{field_name} must be {expected}, "
                    f"got {getattr(self, field_name)!r}"
                )
        if self.target_modules is not None and (
            not self.target_modules
            or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ValueError(
                f"TrainingConfig.target_modules must be None or a non-empty list of module "
                f"names, got {self.target_modules!r}"
            )

    @property
    def resolved_eval_every(self) -> int:
        return self.eval_every if self.eval_every is not None else max(1, self.steps // 10)

    @property
    def resolved_gate_steps(self) -> int:
        return self.gate_steps if self.gate_steps is not None else math.ceil(self.steps / 10)

    @property
    def resolved_gate_learning_rate(self) -> float:
        return (
            self.gate_learning_rate if self.gate_learning_rate is not None else self.learning_rate
        )


def split_validation(
    examples: Sequence[Example], config: TrainingConfig
) -> tuple[list[Example], list[Example]]:
    """`(training, validation)`: a seeded shuffle; the first few examples are validation."""
    if not examples:
        raise ValueError("no training examples")
    n = len(examples)
    n_val = 0
    if config.validation_fraction > 0 and n >= 2:
        n_val = round(config.validation_fraction * n)
        n_val = min(max(n_val, 1), config.max_validation_examples, n - 1)
    order = list(range(n))
    random.Random(config.seed).shuffle(order)
    validation = [examples[i] for i in order[:n_val]]
    training = [examples[i] for i in order[n_val:]]
    return training, validation


# --------------------------------------------------------------------------- the loss
def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _target_loss_sum(
    model: nn.Module, batch: dict[str, Tensor], is_encoder_decoder: bool
) -> tuple[Tensor, int]:
    """(sum of target-token cross-entropies, number of target tokens) for one batch."""
    if is_encoder_decoder:
        # The model shifts `labels` right into its decoder inputs; logits align with labels.
        logits = model(**batch, use_cache=False).logits
        labels = batch["labels"]
    else:
        if packs_sequences(model):
            batch = pack_sequences(batch)
        # Token t is predicted from positions < t: position p's logits meet label p + 1.
        labels = batch["labels"][:, 1:]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if forward_accepts(model, "logits_to_keep"):
            # Only the positions before a target token need the LM head, a few per row: the
            # head's 576 x 49152 product and its softmax over every prompt token would
            # otherwise be a fifth of a SmolLM2 step.
            keep = (labels != IGNORE_INDEX).any(dim=0).nonzero()[:, 0]
            logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
            labels = labels[:, keep]
        else:
            logits = model(**inputs, use_cache=False).logits[:, :-1]
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((labels != IGNORE_INDEX).sum())


_PACKING_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def packs_sequences(model: nn.Module) -> bool:
    """Whether training may pack `model`'s batches into shared rows (`data.pack_sequences`).

    Checked once per model, not assumed: two short sequences packed into one row must give
    the logits each gives alone. transformers' causal models pass (they tell packed
    sequences apart by their position ids); a model that ignores `position_ids`, or lets
    the sequences see each other, fails and is trained on padded rows.
    """
    if model in _PACKING_CHECKED:
        return _PACKING_CHECKED[model]
    packs = False
    if not _is_encoder_decoder(model) and forward_accepts(model, "position_ids"):
        device = next(model.parameters()).device
        vocab = int(model.config.vocab_size)
        generator = torch.Generator().manual_seed(0)
        first, second = (torch.randint(vocab, (1, n), generator=generator) for n in (5, 3))
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]], device=device)
        with _eval_mode(model), torch.no_grad():
            alone = [
                model(input_ids=ids.to(device), use_cache=False).logits for ids in (first, second)
            ]
            packed = model(
                input_ids=torch.cat([first, second], dim=1).to(device),
                position_ids=positions,
                use_cache=False,
            ).logits
        packs = torch.allclose(packed, torch.cat(alone, dim=1), rtol=1e-3, atol=1e-3)
    _PACKING_CHECKED[model] = packs
    return packs


def mean_target_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int = 256,
) -> float:
    """Cross-entropy per target token over all examples (the training objective), in eval mode."""
    if not examples:
        raise ValueError("mean_target_loss needs at least one example")
    enc_dec = _is_encoder_decoder(model)
    total, count = 0.0, 0
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate_for_training(
                tokenizer,
                examples[start : start + batch_size],
                max_length=max_length,
                is_encoder_decoder=enc_dec,
            )
            loss, n = _target_loss_sum(model, _to_device(batch, model), enc_dec)
            total += float(loss)
            count += n
    return total / max(count, 1)


def _warmup_then_linear_decay(
    optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor: linear warm-up to 1 over `warmup_ratio * steps`, then linear
    decay towards 0 at `steps` (the usual fine-tuning schedule)."""
    warmup = round(warmup_ratio * steps)

    # factor(t) = (t + 1) / warmup while t < warmup, else (steps - t) / (steps - warmup)
    def factor(step: int) -> float:  # `step` optimiser steps already taken
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _optimise(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    parameters: list[nn.Parameter],
    training: list[Example],
    *,
    steps: int,
    learning_rate: float,
    config: TrainingConfig,
    desc: str,
    progress: bool,
    on_eval: tuple[int, Callable[[int], dict[str, str]]] | None = None,
) -> list[float]:
    """The shared loop of LoRA and gate training; returns the loss of every step.

    `on_eval = (every, evaluate)` calls `evaluate(step)` every `every` steps and at the last
    step; what it returns is shown on the progress bar.
    """
    enc_dec = _is_encoder_decoder(model)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=config.weight_decay)
    scheduler = _warmup_then_linear_decay(optimizer, steps, config.warmup_ratio)
    stream = batches(training, config.batch_size, seed=config.seed)
    losses: list[float] = []
    postfix: dict[str, str] = {}
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False)
    for step in bar:
        batch = collate_for_training(
            tokenizer, next(stream), max_length=config.max_length, is_encoder_decoder=enc_dec
        )
        model.train()
        loss_sum, count = _target_loss_sum(model, _to_device(batch, model), enc_dec)
        loss = loss_sum / max(count, 1)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        postfix["loss"] = f"{losses[-1]:.4f}"
        if on_eval is not None and (step % on_eval[0] == 0 or step == steps):
            postfix.update(on_eval[1](step))
        bar.set_postfix(postfix, refresh=False)
    return losses


# ------------------------------------------------------------------------ LoRA expert
def train_expert(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    name: str,
    config: TrainingConfig | None = None,
    base_model: BaseModelIdentity | None = None,
    description: str = "",
    license: str = "Apache-2.0",
    progress: bool = True,
) -> Expert:
    """Train a LoRA expert through PEFT; returns it without gates (`train_gates` adds them).

    The LoRA state kept is the one with the lowest validation loss among the evaluations
    (every `eval_every` steps and at the last step); without a validation split it is the
    last one. `base_model` defaults to `model`'s name and weight fingerprint.
    """
    config = config or TrainingConfig()
    _check_name(name)
    training, validation = split_validation(examples, config)
    targets = config.target_modules or default_target_modules(model)
    if base_model is None:
        base_model = _identity_of(model)
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(targets),
    )

    started = time.perf_counter()
    best: dict[str, object] = {"loss": math.inf, "step": None, "state": None}
    with _restored(model), _seeded(model, config.seed):  # seeds LoRA's A initialisation
        peft_model = get_peft_model(model, lora_config)
        try:

            def evaluate(step: int) -> dict[str, str]:
                if not validation:
                    best.update(step=step, state=_lora_state(peft_model))
                    return {}
                loss = mean_target_loss(
                    peft_model,
                    tokenizer,
                    validation,
                    batch_size=config.batch_size,
                    max_length=config.max_length,
                )
                log.debug("%s: step %d, validation loss %.4f", name, step, loss)
                if loss < best["loss"]:
                    best.update(loss=loss, step=step, state=_lora_state(peft_model))
                return {"val": f"{loss:.4f}", "best": f"{best['loss']:.4f}@{best['step']}"}

            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            losses = _optimise(
                peft_model,
                tokenizer,
                trainable,
                training,
                steps=config.steps,
                learning_rate=config.learning_rate,
                config=config,
                desc=f"LoRA {name}",
                progress=progress,
                on_eval=(config.resolved_eval_every, evaluate),
            )
        finally:
            peft_model.unload()  # removes the LoRA layers without merging them
    seconds = time.perf_counter() - started
    log.info(
        "trained LoRA %s: %d steps in %.1f s; kept step %s (validation loss %s)",
        name,
        config.steps,
        seconds,
        best["step"],
        "n/a" if best["state"] is None or not validation else f"{best['loss']:.4f}",
    )

    lora_weights: dict[str, Tensor] = best["state"]  # type: ignore[assignment]
    window = losses[-config.resolved_eval_every :]
    manifest = ExpertManifest(
        name=name,
        description=description,
        base_model=base_model,
        lora=lora_summary(lora_config, modules=len(lora_weights) // 2),
        license=license,
        training=TrainingSummary(
            examples=len(training),
            steps=config.steps,
            gate_steps=0,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            final_loss=sum(window) / len(window),
            best_validation_loss=float(best["loss"]) if validation else None,
            seconds=seconds,
        ),
        library_version=phatgoose.__version__,
    )
    saved_config = copy.deepcopy(lora_config)
    saved_config.inference_mode = True  # as PeftModel.save_pretrained writes it
    return Expert(manifest=manifest, lora_config=saved_config, lora_weights=lora_weights)


def _lora_state(peft_model: PeftModel) -> dict[str, Tensor]:
    """The LoRA tensors under the keys PEFT saves, copied to the CPU (training goes on in
    place; an expert is a package, wherever it was trained)."""
    return {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in get_peft_model_state_dict(peft_model).items()
    }


# ---------------------------------------------------------------------------- gates
class GatedLoRALinear(nn.Module):
    """A frozen linear plus a frozen LoRA update scaled per token by a trainable gate.

    `y = W u + scale * B A u * sigmoid(v^T u)`; `v` starts at zero (a gate of 0.5).
    """

    def __init__(self, base: nn.Linear, lora_a: Tensor, lora_b: Tensor, scale: float) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", lora_a.detach().to(base.weight.dtype), persistent=False)
        self.register_buffer("lora_b", lora_b.detach().to(base.weight.dtype), persistent=False)
        self.scale = scale
        self.gate = nn.Parameter(torch.zeros(base.in_features, dtype=torch.float32))

    # Model code sometimes reads a linear's weight (e.g. T5 checks `wo.weight.dtype`).
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, u: Tensor) -> Tensor:
        update = (u @ self.lora_a.T) @ self.lora_b.T
        gate = torch.sigmoid(u.float() @ self.gate).unsqueeze(-1).to(u.dtype)
        return self.base(u) + self.scale * update * gate


@contextlib.contextmanager
def gated_lora(
    model: nn.Module, expert: Expert, gates: dict[str, Tensor] | None = None
) -> Iterator[dict[str, GatedLoRALinear]]:
    """Temporarily put `expert`'s LoRA behind sigmoid gates into `model`.

    Gates start at zero unless given. Yields path -> gated layer; on exit the original
    linears are back in place (the model is otherwise untouched).
    """
    modules = dict(model.named_modules())
    gated: dict[str, GatedLoRALinear] = {}
    originals: dict[str, nn.Linear] = {}
    try:
        for path in expert.module_paths():
            base = modules.get(path)
            a, b, scale = expert.lora_update(path)
            if not isinstance(base, nn.Linear):
                raise ExpertError(
                    f"expert {expert.name!r} adapts {path!r}, which is "
                    f"{'missing from' if base is None else type(base).__name__ + ' in'} this "
                    f"model (expected nn.Linear)"
                )
            if (base.out_features, base.in_features) != (b.shape[0], a.shape[1]):
                raise ExpertError(
                    f"expert {expert.name!r}, module {path}: update is {b.shape[0]}x{a.shape[1]} "
                    f"but the model's linear is {base.out_features}x{base.in_features}"
                )
            device = base.weight.device
            layer = GatedLoRALinear(base, a.to(device), b.to(device), scale).to(device)
            if gates is not None:
                with torch.no_grad():
                    layer.gate.copy_(gates[path])
            originals[path] = base
            gated[path] = layer
            _set_submodule(model, path, layer)
        yield gated
    finally:
        for path, base in originals.items():
            _set_submodule(model, path, base)


def train_gates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    expert: Expert,
    examples: Sequence[Example],
    *,
    config: TrainingConfig | None = None,
    progress: bool = True,
) -> Expert:
    """Train `expert`'s PHATGOOSE gates with base and LoRA frozen; returns a new Expert.

    Uses the same training split (`split_validation`), objective, batch size, schedule shape
    and optimiser as the LoRA, for `config.resolved_gate_steps` steps.
    """
    config = config or TrainingConfig()
    _warn_if_other_base(model, expert)
    training, _ = split_validation(examples, config)
    steps = config.resolved_gate_steps
    started = time.perf_counter()
    with _restored(model), _seeded(model, config.seed):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        with gated_lora(model, expert) as gated:
            losses = _optimise(
                model,
                tokenizer,
                [layer.gate for layer in gated.values()],
                training,
                steps=steps,
                learning_rate=config.resolved_gate_learning_rate,
                config=config,
                desc=f"gates {expert.name}",
                progress=progress,
            )
            gates = {p: layer.gate.detach().float().cpu().clone() for p, layer in gated.items()}
    window = losses[-max(1, math.ceil(steps / 10)) :]
    log.info(
        "trained gates of %s: %d steps in %.1f s, final loss %.4f",
        expert.name,
        steps,
        time.perf_counter() - started,
        losses[-1],
    )
    return expert.with_gates(gates, gate_steps=steps, final_gate_loss=sum(window) / len(window))


# ------------------------------------------------------- baselines' contributor vectors
def compute_average_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    paths: Sequence[str],
    examples: Sequence[Example],
    *,
    max_examples: int = 1000,
    max_length: int = 256,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Mean input activation `u` of each module over the non-padding tokens of the examples.

    Computed on the *base* model (no LoRA), by the contributor (METHOD.md, "Average
    activation"), over up to `max_examples` examples (a seeded sample when there are more)
    formatted as in training: prompt + target + EOS. In an encoder-decoder, encoder modules
    average over prompt tokens, decoder modules over target tokens, and cross-attention
    key/value projections (which read the encoder's output) over prompt tokens.
    """
    if not examples:
        raise ValueError("compute_average_activations needs at least one example")
    modules = dict(model.named_modules())
    for path in paths:
        if not isinstance(modules.get(path), nn.Linear):
            raise ValueError(f"{path!r} is not an nn.Linear of this model")
    chosen = _sample(examples, max_examples, seed)
    enc_dec = _is_encoder_decoder(model)
    # Sums stay on the model's device: a copy to the host per module and batch would make
    # a GPU wait hundreds of times per batch.
    device = next(model.parameters()).device
    sums = {
        p: torch.zeros(modules[p].in_features, dtype=torch.float64, device=device) for p in paths
    }
    counts = dict.fromkeys(paths, 0)
    # sequence length -> ([batch, length] float64 token mask on the device, its token count)
    masks: dict[int, tuple[Tensor, int]] = {}

    def hook_for(path: str):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            u = args[0]
            mask, tokens = masks[u.shape[-2]]
            sums[path] += (u.detach().double() * mask[..., None]).sum(dim=(0, 1))
            counts[path] += tokens

        return hook

    def set_mask(mask: Tensor) -> None:
        masks[mask.shape[1]] = (mask.to(device, torch.float64), int(mask.bool().sum()))

    # Unless the LM head is one of the modules, its output is not needed: a causal model
    # computes it for one position only.
    output_head = getattr(model, "get_output_embeddings", lambda: None)()
    head_averaged = any(modules[p] is output_head for p in paths)
    head = {}
    if not enc_dec and not head_averaged and forward_accepts(model, "logits_to_keep"):
        head = {"logits_to_keep": 1}
    handles = [modules[p].register_forward_pre_hook(hook_for(p)) for p in paths]
    try:
        with _eval_mode(model), torch.no_grad():
            for start in range(0, len(chosen), batch_size):
                batch = collate_for_training(
                    tokenizer,
                    chosen[start : start + batch_size],
                    max_length=max_length,
                    is_encoder_decoder=enc_dec,
                )
                masks.clear()
                if enc_dec:
                    labels = batch["labels"]
                    if labels.shape[1] == batch["input_ids"].shape[1]:
                        # Encoder and decoder inputs are told apart by length: make them
                        # differ with one more (masked, causally invisible) decoder slot.
                        pad = torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype)
                        labels = torch.cat([labels, pad], dim=1)
                    set_mask(batch["attention_mask"])
                    set_mask(labels != IGNORE_INDEX)
                    inputs = {**batch, "labels": labels}
                else:
                    set_mask(batch["attention_mask"])
                    inputs = {
                        "input_ids": batch["input_ids"],
                        "attention_mask": batch["attention_mask"],
                    }
                model(**_to_device(inputs, model), use_cache=False, **head)
    finally:
        for handle in handles:
            handle.remove()
    return {p: (sums[p] / max(counts[p], 1)).to("cpu", torch.float32) for p in paths}


PRIVACY_WARNING = (
    "retrieval embeddings are sentence embeddings of your private training inputs; "
    "they leak information about that data (texts can be partly reconstructed or "
    "matched from them). Publish them only if that is acceptable."
)


def compute_retrieval_embeddings(
    examples: Sequence[Example], *, max_examples: int = 1000, seed: int = 0
) -> Tensor:
    """MiniLM embeddings `[m, 384]` of up to `max_examples` training inputs (prompts).

    Warns (and logs) that these embeddings leak information about the private data.
    """
    if not examples:
        raise ValueError("compute_retrieval_embeddings needs at least one example")
    from phatgoose.embeddings import embed_texts  # loads sentence-transformers: import late

    warnings.warn(PRIVACY_WARNING, UserWarning, stacklevel=2)
    log.warning(PRIVACY_WARNING)
    chosen = _sample(examples, max_examples, seed)
    return embed_texts([ex.prompt for ex in chosen]).to(torch.float32).contiguous()


# ------------------------------------------------------------------ existing adapters
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
    _check_name(name)
    if isinstance(base_model, PeftModel):
        raise ValueError(
            "base_model must be the plain base model or its identity, not a PeftModel "
            "(its weights include the adapter)"
        )
    identity = base_model if isinstance(base_model, BaseModelIdentity) else _identity_of(base_model)

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

    modules = len({re.sub(r"\.lora_[AB]\.weight$", "", k) for k in weights})
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


# ------------------------------------------------------------------------- plumbing
def _check_name(name: str) -> None:
    if not re.match(EXPERT_NAME_PATTERN, name):
        raise ValueError(
            f"expert name {name!r} is invalid: expected lowercase letters, digits, '_', '.', "
            f"'-' (starting with a letter or digit), optionally 'namespace/name'"
        )


def _identity_of(model: nn.Module) -> BaseModelIdentity:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or "unknown"
    return BaseModelIdentity(name=name, fingerprint=model_fingerprint(model))


def _warn_if_other_base(model: nn.Module, expert: Expert) -> None:
    fingerprint = model_fingerprint(model)
    if fingerprint != expert.manifest.base_model.fingerprint:
        message = (
            f"expert {expert.name!r} was made for base model "
            f"{expert.manifest.base_model.fingerprint}, this model is {fingerprint}"
        )
        warnings.warn(message, UserWarning, stacklevel=3)
        log.warning(message)


def _sample(examples: Sequence[Example], limit: int, seed: int) -> list[Example]:
    if limit < 1:
        raise ValueError(f"max_examples must be >= 1, got {limit}")
    if len(examples) <= limit:
        return list(examples)
    return random.Random(seed).sample(list(examples), limit)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _to_device(batch: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(model: nn.Module, seed: int) -> Iterator[None]:
    """Seed torch's generators for a run, leaving the caller's random state as it was."""
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
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
