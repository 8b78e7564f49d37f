"""A membership-inference audit of a contributor's expert (issue 22, section 2).

One held-in BIG-bench task is split, once and seeded, into three disjoint sets: members
(the expert's training data), non-members (held out: the attack's negatives and the set
own-task accuracy is measured on) and a shadow set (another contributor's data from the
same task). Then:

- `lora`: the contributor's recipe without DP (LoRA, then gates) on the members;
- `dp-eps8`, `dp-eps1`: the same under DP-SGD at those epsilons (`TrainingConfig.dp`);
- `gates`: what the gates alone reveal: a LoRA trained on the shadow set, then gates
  trained on the members over it (the gated model is scored);
- `retrieval`: the opt-in retrieval embeddings of the members, matched against each
  candidate's own embedding.

Attacks (`benchmarks.membership`): the loss-threshold attack scores a candidate by minus its
loss (mean cross-entropy of its target tokens, the training objective) under the expert;
the calibrated attack by the loss the expert removes from a reference model's (the base
model; for `gates`, the shadow LoRA with its gates at their zero start), which cancels how
hard an example is in itself. Each reports AUC and TPR at 1% FPR with bootstrap intervals.
The retrieval attack scores by the largest cosine similarity to a shipped embedding.

The expert for the loss attacks is the one a contributor ships: LoRA and gates, scored as
the gated model (its gates in front of its LoRA), which is how PHATGOOSE uses it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.membership import LOW_FPR, audit_attack, max_cosine_similarity
from phatgoose.bigbench import load_bigbench_task
from phatgoose.data import IGNORE_INDEX, Example, collate_for_training
from phatgoose.embeddings import embed_texts
from phatgoose.evaluation import evaluate_task
from phatgoose.expert import Expert
from phatgoose.models import load_base_model
from phatgoose.precision import compute_in, resolve_precision
from phatgoose.training import (
    DifferentialPrivacy,
    TrainingConfig,
    gated_lora,
    train_expert,
    train_gates,
)
from phatgoose.training.privacy import set_per_example_gradients
from protocol.privacy import DEFAULT_MAX_GRAD_NORM

log = logging.getLogger(__name__)

VARIANTS = ("lora", "dp-eps8", "dp-eps1", "gates")


@dataclass(frozen=True)
class PrivacyAuditConfig:
    """The audit's settings: the contributor's CPU recipe (client.training.CPU_DEFAULTS)
    without its validation split, so that every member is trained on."""

    base_model: str = "smollm2-135m"
    task: str = "social_iqa"
    members: int = 256
    non_members: int = 256
    shadow: int = 256
    r: int = 8
    lora_alpha: float = 16.0
    steps: int = 80
    gate_steps: int = 16
    batch_size: int = 8
    max_length: int = 192
    learning_rate: float = 1e-3
    epsilons: tuple[float, ...] = (8.0, 1.0)
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    gradient_norm_examples: int = 64
    seed: int = 0
    resamples: int = 2000

    def training(self, epsilon: float | None = None) -> TrainingConfig:
        return TrainingConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            steps=self.steps,
            gate_steps=self.gate_steps,
            batch_size=self.batch_size,
            max_length=self.max_length,
            learning_rate=self.learning_rate,
            validation_fraction=0.0,
            seed=self.seed,
            dp=None
            if epsilon is None
            else DifferentialPrivacy(epsilon=epsilon, max_grad_norm=self.max_grad_norm),
        )


@dataclass(frozen=True)
class Splits:
    members: list[Example]
    non_members: list[Example]
    shadow: list[Example]


def split_task(config: PrivacyAuditConfig, tasks_dir: Path | None = None) -> Splits:
    """Members, non-members and shadow: consecutive slices of the task's seeded shuffle."""
    pool = load_bigbench_task(config.task, n_eval=0, seed=config.seed, tasks_dir=tasks_dir).training
    needed = config.members + config.non_members + config.shadow
    if needed > len(pool):
        raise ValueError(f"{config.task} has {len(pool)} examples; the audit needs {needed}")
    a, b = config.members, config.members + config.non_members
    return Splits(pool[:a], pool[a:b], pool[b:needed])


def example_losses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_length: int,
    batch_size: int = 16,
) -> np.ndarray:
    """Each example's mean cross-entropy over its target tokens (the training objective,
    per example rather than per batch), in eval mode and the model's auto precision."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("example_losses scores causal models (the audit's SmolLM2)")
    precision = resolve_precision("auto", next(model.parameters()).device)
    losses: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), compute_in(precision, model):
            for start in range(0, len(examples), batch_size):
                batch = collate_for_training(
                    tokenizer,
                    examples[start : start + batch_size],
                    max_length=max_length,
                    is_encoder_decoder=False,
                )
                labels = batch.pop("labels")[:, 1:]
                logits = model(**batch, use_cache=False).logits[:, :-1].float()
                tokens = nn.functional.cross_entropy(
                    logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
                )
                counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
                losses.extend((tokens.sum(dim=1) / counts).tolist())
    finally:
        model.train(was_training)
    return np.asarray(losses)


def lora_gradient_norms(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
    config: PrivacyAuditConfig,
) -> dict[str, float]:  # fmt: skip
    """Quartiles of the per-example gradient norm of a LoRA at PEFT's start (B = 0) and of
    the non-DP expert's LoRA: what the clipping norm is chosen against."""
    from peft import LoraConfig, get_peft_model

    from phatgoose.models import default_target_modules
    from phatgoose.training.lora import target_loss
    from phatgoose.training.plumbing import restored, seeded

    with restored(model), seeded(model, config.seed):
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=config.r,
                lora_alpha=config.lora_alpha,  # type: ignore[arg-type]
                target_modules=default_target_modules(model),
            ),
        )
        try:
            parameters = [p for p in peft_model.parameters() if p.requires_grad]

            set_per_example_gradients(
                parameters,
                examples,
                lambda e: target_loss(peft_model, tokenizer, [e], max_length=config.max_length),
            )
            squared = sum(
                p.grad_sample.reshape(len(examples), -1).pow(2).sum(dim=1)  # type: ignore[attr-defined]
                for p in parameters
            )
            norms = torch.as_tensor(squared).sqrt().numpy()
            for p in parameters:
                p.grad_sample = None  # type: ignore[attr-defined]
        finally:
            peft_model.unload()
    q1, median, q3 = np.quantile(norms, [0.25, 0.5, 0.75])
    return {
        "examples": len(examples),
        "min": float(norms.min()),
        "q1": float(q1),
        "median": float(median),
        "q3": float(q3),
        "max": float(norms.max()),
    }


def _audits(
    member_scores: np.ndarray, non_member_scores: np.ndarray, config: PrivacyAuditConfig
) -> dict[str, Any]:
    audit = audit_attack(
        member_scores, non_member_scores, fpr=LOW_FPR, resamples=config.resamples, seed=0
    )
    return {**dataclasses.asdict(audit), "roc": _roc(member_scores, non_member_scores)}


def _roc(members: np.ndarray, non_members: np.ndarray, points: int = 200) -> list[list[float]]:
    """(FPR, TPR) pairs at every threshold a non-member sets (thinned to `points`)."""
    thresholds = np.unique(np.concatenate([members, non_members]))[::-1]
    step = max(1, len(thresholds) // points)
    curve = [
        [float(np.mean(non_members >= t)), float(np.mean(members >= t))] for t in thresholds[::step]
    ]
    return [[0.0, 0.0], *curve, [1.0, 1.0]]


def run(
    config: PrivacyAuditConfig,
    *,
    tasks_dir: Path | None = None,
    variants: Sequence[str] = VARIANTS,
    retrieval: bool = True,
    cache: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] = lambda record: None,
) -> dict[str, Any]:
    """The audit; `cache` (an earlier record of the same config) skips what it holds, and
    `save(record)` is called after every part, so an interrupted run resumes."""
    record: dict[str, Any] = cache or {}
    if record.get("config") not in (None, _config_dict(config)):
        raise ValueError("the cached record is of another configuration; start a fresh one")
    record["config"] = _config_dict(config)
    record.setdefault("variants", {})
    splits = split_task(config, tasks_dir)
    record["splits"] = {
        "task": config.task,
        "members": len(splits.members),
        "non_members": len(splits.non_members),
        "shadow": len(splits.shadow),
    }
    model, tokenizer = load_base_model(config.base_model)
    record["precision"] = resolve_precision("auto", next(model.parameters()).device).name

    def losses() -> tuple[np.ndarray, np.ndarray]:
        return (
            example_losses(model, tokenizer, splits.members, max_length=config.max_length),
            example_losses(model, tokenizer, splits.non_members, max_length=config.max_length),
        )

    def accuracy() -> dict[str, float]:
        result = evaluate_task(
            model, tokenizer, splits.non_members, task=config.task, progress=False
        )
        member_result = evaluate_task(
            model, tokenizer, splits.members, task=config.task, progress=False
        )
        return {"non_members": result.accuracy, "members": member_result.accuracy}

    if "base" not in record:
        started = time.perf_counter()
        base_members, base_non = losses()
        record["base"] = {
            "loss_members": base_members.tolist(),
            "loss_non_members": base_non.tolist(),
            "accuracy": accuracy(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        save(record)
    base_members = np.asarray(record["base"]["loss_members"])
    base_non = np.asarray(record["base"]["loss_non_members"])

    if "gradient_norms" not in record:
        record["gradient_norms"] = lora_gradient_norms(
            model, tokenizer, splits.members[: config.gradient_norm_examples], config
        )
        save(record)

    def scored(
        expert: Expert, reference: tuple[np.ndarray, np.ndarray], seconds: float
    ) -> dict[str, Any]:
        with gated_lora(model, expert, expert.gates):
            members, non = losses()
            acc = accuracy()
        return {
            "privacy": None
            if expert.manifest.privacy is None
            else expert.manifest.privacy.model_dump(),
            "training_seconds": round(seconds, 1),
            "accuracy": acc,
            "mean_loss": {"members": float(members.mean()), "non_members": float(non.mean())},
            "loss_attack": _audits(-members, -non, config),
            "calibrated_attack": _audits(reference[0] - members, reference[1] - non, config),
        }

    def train(examples: list[Example], epsilon: float | None, name: str) -> tuple[Expert, float]:
        started = time.perf_counter()
        training = config.training(epsilon)
        lora = train_expert(model, tokenizer, examples, name=name, config=training)
        expert = train_gates(model, tokenizer, lora, examples, config=training)
        return expert, time.perf_counter() - started

    epsilons = {f"dp-eps{e:g}": e for e in config.epsilons}
    for variant in variants:
        if variant in record["variants"]:
            continue
        log.info("privacy audit: %s", variant)
        if variant == "lora" or variant in epsilons:
            expert, seconds = train(splits.members, epsilons.get(variant), variant)
            record["variants"][variant] = scored(expert, (base_members, base_non), seconds)
        elif variant == "gates":
            started = time.perf_counter()
            training = config.training()
            shadow = train_expert(model, tokenizer, splits.shadow, name="shadow", config=training)
            with gated_lora(model, shadow, _zero_gates(model, shadow)):
                reference = losses()
            expert = train_gates(model, tokenizer, shadow, splits.members, config=training)
            record["variants"][variant] = scored(expert, reference, time.perf_counter() - started)
        else:
            raise ValueError(f"unknown variant {variant!r}; expected some of {VARIANTS}")
        save(record)

    if retrieval and "retrieval" not in record:
        shipped = embed_texts([e.prompt for e in splits.members])
        members = embed_texts([e.prompt for e in splits.members])
        non = embed_texts([e.prompt for e in splits.non_members])
        member_scores = max_cosine_similarity(shipped.numpy(), members.numpy())
        non_scores = max_cosine_similarity(shipped.numpy(), non.numpy())
        nearest = (members @ shipped.T).argmax(dim=1)
        identified = float((nearest == torch.arange(len(members))).float().mean())
        duplicates = int(
            sum(e.prompt in {m.prompt for m in splits.members} for e in splits.non_members)
        )
        record["retrieval"] = {
            "identified": identified,
            "non_members_with_a_member_prompt": duplicates,
            "attack": _audits(member_scores, non_scores, config),
        }
        save(record)
    return record


def _zero_gates(model: nn.Module, expert: Expert) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {path: torch.zeros(modules[path].in_features) for path in expert.module_paths()}


def _config_dict(config: PrivacyAuditConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


# ------------------------------------------------------------------------------ report
def _interval(audit: dict[str, Any], key: str) -> str:
    return f"{audit[key]:.3f} [{audit[key + '_low']:.3f}, {audit[key + '_high']:.3f}]"


def markdown(record: dict[str, Any], machine: dict[str, Any]) -> str:
    """The audit as a table: per variant, the guarantee, both attacks and accuracy."""
    config, splits = record["config"], record["splits"]
    base = record["base"]["accuracy"]
    lines = [
        "# Membership-inference audit",
        "",
        f"`{machine.get('command', 'phatgoose bench privacy')}`, {machine.get('date', '')}, "
        f"{machine.get('cpu', '')}, load at start {machine.get('load_average_start')}, "
        f"at end {machine.get('load_average_end')}; compute {record.get('precision')}.",
        "",
        f"Task `{splits['task']}` (held-in): {splits['members']} members (trained on), "
        f"{splits['non_members']} non-members (held out; own-task accuracy is theirs), "
        f"{splits['shadow']} shadow examples. Recipe: r={config['r']}, {config['steps']} "
        f"LoRA + {config['gate_steps']} gate steps of batch {config['batch_size']} at lr "
        f"{config['learning_rate']:g}, no validation split; DP clip "
        f"{config['max_grad_norm']:g}. AUC and TPR at {LOW_FPR:.0%} FPR with 95% bootstrap "
        "intervals (members and non-members resampled apart). Chance: AUC 0.5, TPR 0.01.",
        "",
        "| expert | guarantee | loss attack AUC | TPR@1%FPR | calibrated AUC | TPR@1%FPR "
        "| accuracy (non-members) | accuracy (members) | training s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| base model | - | - | - | - | - | {base['non_members']:.3f} | "
        f"{base['members']:.3f} | - |",
    ]
    for name, result in record["variants"].items():
        guarantee = result["privacy"]
        stated = (
            "none"
            if guarantee is None
            else f"ε={guarantee['epsilon']:.2f}, δ={guarantee['delta']:.0e}"
        )
        loss, calibrated = result["loss_attack"], result["calibrated_attack"]
        lines.append(
            f"| {name} | {stated} | {_interval(loss, 'auc')} | {_interval(loss, 'tpr')} | "
            f"{_interval(calibrated, 'auc')} | {_interval(calibrated, 'tpr')} | "
            f"{result['accuracy']['non_members']:.3f} | {result['accuracy']['members']:.3f} | "
            f"{result['training_seconds']:.0f} |"
        )
    if "retrieval" in record:
        r = record["retrieval"]
        lines += [
            "",
            f"Retrieval embeddings (MiniLM, all {splits['members']} members shipped): a "
            f"member's own input is its nearest shipped embedding for {r['identified']:.1%} "
            f"of members; max-cosine attack AUC {_interval(r['attack'], 'auc')}, TPR@1%FPR "
            f"{_interval(r['attack'], 'tpr')} ({r['non_members_with_a_member_prompt']} "
            "non-members share a member's exact prompt).",
        ]
    norms = record.get("gradient_norms")
    if norms:
        lines += [
            "",
            f"Per-example gradient norm of a fresh LoRA over {norms['examples']} members "
            f"(what the clip is chosen against): min {norms['min']:.3g}, median "
            f"{norms['median']:.3g}, quartiles {norms['q1']:.3g} to {norms['q3']:.3g}, max "
            f"{norms['max']:.3g}.",
        ]
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> None:
    """ROC curves of the loss attack on log axes (the low-FPR region is what matters), and
    accuracy against the attack's AUC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, result in record["variants"].items():
        curve = np.asarray(result["loss_attack"]["roc"])
        left.plot(
            curve[:, 0], curve[:, 1], label=f"{name} (AUC {result['loss_attack']['auc']:.2f})"
        )
    if "retrieval" in record:
        curve = np.asarray(record["retrieval"]["attack"]["roc"])
        left.plot(curve[:, 0], curve[:, 1], "--", label="retrieval embeddings")
    grid = np.logspace(-3, 0, 50)
    left.plot(grid, grid, ":", color="grey", label="chance")
    left.set(xscale="log", yscale="log", xlim=(1e-3, 1), ylim=(1e-3, 1.05))
    left.set(xlabel="false-positive rate", ylabel="true-positive rate")
    left.set_title("loss-threshold attack, members vs held-out")
    left.legend(fontsize=8)
    base = record["base"]["accuracy"]["non_members"]
    right.axhline(base, color="grey", linestyle=":", label="base model")
    for name, result in record["variants"].items():
        audit = result["calibrated_attack"]
        right.errorbar(
            audit["auc"],
            result["accuracy"]["non_members"],
            xerr=[[audit["auc"] - audit["auc_low"]], [audit["auc_high"] - audit["auc"]]],
            fmt="o",
            capsize=3,
            label=name,
        )
    right.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    right.set(xlabel="calibrated attack AUC (95% interval)", ylabel="own-task accuracy (held out)")
    right.set_title("utility against leakage")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
