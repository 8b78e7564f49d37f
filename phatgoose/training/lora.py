"""The LoRA expert (through PEFT), and the training loop and objective gates share.

METHOD.md: per adapted linear `W` with input activation `u`, `y = W u + (alpha/r) B A u`,
A and B trained, B starting at zero, minimising the cross-entropy of the target tokens
(`data.collate_for_training`). The loss takes logits only before target tokens and packs
rows where `packs_sequences(model)`. The caller's model is handed back exactly as it was:
PEFT's wrappers are unloaded without merging; flags, mode and random state are restored.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import phatgoose
from phatgoose.data import IGNORE_INDEX, Example, batches, collate_for_training, pack_sequences
from phatgoose.expert import Expert, ExpertError, lora_summary
from phatgoose.models import default_target_modules, forward_accepts
from phatgoose.precision import (
    PRECISIONS,
    ComputePrecision,
    Precision,
    autocast_off,
    compute_in,
    resolve_precision,
)
from phatgoose.training.plumbing import (
    base_model_identity,
    check_expert_name,
    eval_mode,
    is_encoder_decoder,
    restored,
    seeded,
    to_device,
)
from phatgoose.training.privacy import (
    DifferentialPrivacy,
    PrivatePlan,
    dp_optimizer,
    plan_privacy,
    poisson_batches,
    private_generator,
    set_per_example_gradients,
)
from protocol import BaseModelIdentity, ExpertManifest, TrainingSummary

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
    `gate_learning_rate` (default `learning_rate`) on the same training split. `precision`
    is the compute precision (`phatgoose.precision`: `auto` is bfloat16 where the hardware
    has native bfloat16 matrix units); the trained parameters stay float32 either way.

    `dp` trains LoRA and gates with DP-SGD (`training.privacy`): Poisson-sampled batches of
    expected size `batch_size`, per-example clipping and noise, and no validation split (a
    checkpoint picked by the loss on private examples would be a release of them: the last
    one is kept).
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
    precision: Precision = "auto"
    dp: DifferentialPrivacy | None = None

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
            ("precision", self.precision in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
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

    def private_plan(self, examples: int) -> PrivatePlan:
        """DP-SGD's settings over `examples` training examples, for the LoRA's and the
        gates' steps together (requires `dp`)."""
        if self.dp is None:
            raise ValueError("TrainingConfig.dp is not set: this training is not private")
        return plan_privacy(
            self.dp,
            examples=examples,
            batch_size=self.batch_size,
            total_steps=self.steps + self.resolved_gate_steps,
        )


def split_validation(
    examples: Sequence[Example], config: TrainingConfig
) -> tuple[list[Example], list[Example]]:
    """`(training, validation)`: a seeded shuffle; the first few examples are validation
    (none under DP, see `TrainingConfig`)."""
    if not examples:
        raise ValueError("no training examples")
    n = len(examples)
    n_val = 0
    if config.validation_fraction > 0 and n >= 2 and config.dp is None:
        n_val = round(config.validation_fraction * n)
        n_val = min(max(n_val, 1), config.max_validation_examples, n - 1)
    order = list(range(n))
    random.Random(config.seed).shuffle(order)
    validation = [examples[i] for i in order[:n_val]]
    training = [examples[i] for i in order[n_val:]]
    return training, validation


# --------------------------------------------------------------------------- the loss
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
    if not is_encoder_decoder(model) and forward_accepts(model, "position_ids"):
        device = next(model.parameters()).device
        model_config: Any = model.config
        vocab = int(model_config.vocab_size)
        generator = torch.Generator().manual_seed(0)
        first, second = (torch.randint(vocab, (1, n), generator=generator) for n in (5, 3))
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]], device=device)
        with eval_mode(model), torch.no_grad():
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


def target_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_length: int,
) -> Tensor:
    """The training objective on `examples` as one batch, with its graph: cross-entropy per
    target token (of one example: DP-SGD's per-example loss)."""
    enc_dec = is_encoder_decoder(model)
    batch = collate_for_training(
        tokenizer, examples, max_length=max_length, is_encoder_decoder=enc_dec
    )
    loss_sum, count = _target_loss_sum(model, to_device(batch, model), enc_dec)
    return loss_sum / max(count, 1)


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
    enc_dec = is_encoder_decoder(model)
    total, count = 0.0, 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate_for_training(
                tokenizer,
                examples[start : start + batch_size],
                max_length=max_length,
                is_encoder_decoder=enc_dec,
            )
            loss, n = _target_loss_sum(model, to_device(batch, model), enc_dec)
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


def optimise(
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
    precision: ComputePrecision,
    on_eval: tuple[int, Callable[[int], dict[str, str]]] | None = None,
) -> list[float]:
    """The shared loop of LoRA and gate training, in `precision`; returns the loss of every
    step.

    `on_eval = (every, evaluate)` calls `evaluate(step)` every `every` steps and at the last
    step (in `precision` too); what it returns is shown on the progress bar. Under
    `config.dp` each step is DP-SGD's (`training.privacy`); the losses returned are then the
    sampled batches' own, for the progress bar only: they are not private.
    """
    packs_sequences(model)  # checked (and cached) in float32, before any bfloat16 copy
    device = next(model.parameters()).device
    private = config.dp is not None
    if private:
        plan = config.private_plan(len(training))
        optimizer: torch.optim.Optimizer = dp_optimizer(
            parameters, plan, learning_rate=learning_rate, weight_decay=config.weight_decay
        )
        stream = poisson_batches(
            training, plan.sample_rate, private_generator(plan, torch.device("cpu"))
        )
    else:
        optimizer = torch.optim.AdamW(
            parameters, lr=learning_rate, weight_decay=config.weight_decay
        )
        stream = batches(training, config.batch_size, seed=config.seed)
    scheduler = _warmup_then_linear_decay(
        getattr(optimizer, "original_optimizer", optimizer), steps, config.warmup_ratio
    )

    def batch_loss(examples: list[Example]) -> Tensor:
        return target_loss(model, tokenizer, examples, max_length=config.max_length)

    losses: list[float] = []
    postfix: dict[str, str] = {}
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False)
    with compute_in(precision, model):
        for step in bar:
            model.train()
            if private:
                loss_value = set_per_example_gradients(
                    parameters, next(stream), lambda example: batch_loss([example])
                )
            else:
                loss = batch_loss(next(stream))
                loss.backward()
                loss_value = loss.item()
            with autocast_off(device.type):  # Opacus' clipping (an einsum) in float32
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_value)
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
    resume_from: Expert | None = None,
) -> Expert:
    """Train a LoRA expert through PEFT; returns it without gates (`train_gates` adds them).

    The LoRA state kept is the one with the lowest validation loss among the evaluations
    (every `eval_every` steps and at the last step); without a validation split it is the
    last one. `base_model` defaults to `model`'s name and weight fingerprint.

    `resume_from` continues training an earlier version: its LoRA (rank, alpha, target
    modules and tensors) is where training starts, in place of a fresh initialisation;
    `config.r`, `lora_alpha` and `target_modules` are then ignored.

    Under `config.dp` the manifest states the guarantee of the LoRA's steps (`train_gates`
    extends it to the gates'), and no loss: a loss on private examples is not private.
    """
    config = config or TrainingConfig()
    check_expert_name(name)
    if config.dp is not None and resume_from is not None:
        raise ExpertError(
            "cannot resume training under differential privacy: the earlier version's "
            "training is not covered by this run's guarantee (its data may be the same); "
            "train a new expert with --dp-epsilon instead"
        )
    precision = resolve_precision(config.precision, next(model.parameters()).device)
    training, validation = split_validation(examples, config)
    targets = config.target_modules or default_target_modules(model)
    if base_model is None:
        base_model = base_model_identity(model)
    if resume_from is not None:
        earlier = resume_from.manifest.base_model
        if earlier.fingerprint != base_model.fingerprint:
            raise ExpertError(
                f"cannot resume from {resume_from.manifest.name}: it was trained on base model "
                f"{earlier.name} ({earlier.fingerprint}), this model is {base_model.name} "
                f"({base_model.fingerprint})"
            )
        lora_config = copy.deepcopy(resume_from.lora_config)
        lora_config.inference_mode = False
    else:
        lora_config = LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # PEFT: int; scale = alpha/r
            lora_dropout=config.lora_dropout,
            target_modules=list(targets),
        )

    started = time.perf_counter()
    best = _Checkpoint()
    with restored(model), seeded(model, config.seed):  # seeds LoRA's A initialisation
        peft_model = get_peft_model(model, lora_config)
        if resume_from is not None:
            _load_lora(peft_model, resume_from)
        try:

            def evaluate(step: int) -> dict[str, str]:
                if not validation:
                    best.step, best.state = step, _lora_state(peft_model)
                    return {}
                loss = mean_target_loss(
                    peft_model,
                    tokenizer,
                    validation,
                    batch_size=config.batch_size,
                    max_length=config.max_length,
                )
                log.debug("%s: step %d, validation loss %.4f", name, step, loss)
                if loss < best.loss:
                    best.loss, best.step, best.state = loss, step, _lora_state(peft_model)
                return {"val": f"{loss:.4f}", "best": f"{best.loss:.4f}@{best.step}"}

            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            losses = optimise(
                peft_model,
                tokenizer,
                trainable,
                training,
                steps=config.steps,
                learning_rate=config.learning_rate,
                config=config,
                desc=f"LoRA {name}",
                progress=progress,
                precision=precision,
                on_eval=(config.resolved_eval_every, evaluate),
            )
        finally:
            peft_model.unload()  # removes the LoRA layers without merging them
    seconds = time.perf_counter() - started
    log.info(
        "trained LoRA %s: %d steps in %.1f s (%s); kept step %s (validation loss %s)",
        name,
        config.steps,
        seconds,
        precision.name,
        best.step,
        "n/a" if best.state is None or not validation else f"{best.loss:.4f}",
    )

    lora_weights = best.state
    assert lora_weights is not None  # the last step is always evaluated
    window = losses[-config.resolved_eval_every :]
    private = config.dp is not None
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
            final_loss=None if private else sum(window) / len(window),
            best_validation_loss=best.loss if validation else None,
            seconds=seconds,
            precision=precision.name,
        ),
        privacy=config.private_plan(len(training)).guarantee(config.steps) if private else None,
        library_version=phatgoose.__version__,
    )
    saved_config = copy.deepcopy(lora_config)
    saved_config.inference_mode = True  # as PeftModel.save_pretrained writes it
    return Expert(manifest=manifest, lora_config=saved_config, lora_weights=lora_weights)


@dataclass
class _Checkpoint:
    """The LoRA state kept so far: the lowest validation loss, its step and tensors."""

    loss: float = math.inf
    step: int | None = None
    state: dict[str, Tensor] | None = None


def _load_lora(peft_model: PeftModel, expert: Expert) -> None:
    """Start from `expert`'s LoRA tensors: every one must find its place, and every LoRA
    parameter must get one (a partial load would train a different adapter)."""
    # torch's `_IncompatibleKeys`, typed by PEFT as a bare namedtuple.
    result: Any = set_peft_model_state_dict(peft_model, expert.lora_weights)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if unexpected or missing:
        raise ExpertError(
            f"cannot resume from {expert.manifest.name}: its LoRA does not fit this model "
            f"(unexpected {unexpected[:3]}, missing {missing[:3]})"
        )


def _lora_state(peft_model: PeftModel) -> dict[str, Tensor]:
    """The LoRA tensors under the keys PEFT saves, copied to the CPU (training goes on in
    place; an expert is a package, wherever it was trained)."""
    return {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in get_peft_model_state_dict(peft_model).items()
    }
