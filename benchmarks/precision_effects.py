"""bfloat16 against float32 on the real model: what each stage costs, and what it changes.

0. Matrix products: SmolLM2's two linear shapes at 1024 tokens, float32 against bfloat16.
   Run with `ONEDNN_MAX_CPU_ISA=AVX512_CORE` (or `AVX2`) to see a CPU without native
   bfloat16 units, where `auto` keeps float32.
1. Stages: one held-in task's expert is trained twice with the preset's settings, in float32
   and in bfloat16 (LoRA, gates, contributor vectors), each stage timed.
2. Training quality: both experts' validation losses, each example's loss measured in
   float32 (the same yardstick for both), compared pairwise (mean difference and its
   standard error over the validation examples).
3. Scoring: every task of the preset, the base model and PHATGOOSE over the preset's experts
   (the zero-shot cache's, trained in the machine's `auto` precision), each scored in float32
   and in bfloat16: how often the predictions agree, both accuracies with standard errors,
   their paired difference, and the time each took.

Nothing here is tuned or selected: it measures what changing the precision does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.zero_shot import BenchmarkTask, ZeroShotConfig
from phatgoose.evaluation import mean_with_stderr, predicted_choice, score_choices
from phatgoose.expert import Expert
from phatgoose.pipeline import train_contributor_expert
from phatgoose.routing import build_routed_model, unroute_model
from phatgoose.training import mean_target_loss, split_validation
from protocol import BaseModelIdentity, Precision

PRECISIONS: tuple[Precision, Precision] = ("float32", "bfloat16")
Say = Callable[[str], None]


def matmul_speed(repeats: int = 10) -> dict[str, Any]:
    """Milliseconds per `[1024, 576] x [576, d]` product (d = 576, 1536) in each precision."""
    generator = torch.Generator().manual_seed(0)
    rows: dict[str, Any] = {}
    for width in (576, 1536):
        a = torch.randn(1024, 576, generator=generator)
        b = torch.randn(576, width, generator=generator)
        times = {}
        for precision, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            x, y = a.to(dtype), b.to(dtype)
            for _ in range(3):  # warm-up: oneDNN picks and caches its kernel
                x @ y
            started = time.perf_counter()
            for _ in range(repeats):
                x @ y
            times[precision] = 1000 * (time.perf_counter() - started) / repeats
        rows[f"1024x576x{width}"] = {
            **{f"{p}_ms": t for p, t in times.items()},
            "speedup": times["float32"] / times["bfloat16"],
        }
    return {"onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "products": rows}


def stage_timings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: BenchmarkTask,
    config: ZeroShotConfig,
    *,
    base: BaseModelIdentity,
    say: Say = print,
) -> dict[str, Any]:
    """Train `task`'s expert in each precision; per stage seconds, the bf16 / fp32 speed-up
    and the paired validation losses (every loss measured in float32)."""
    runs: dict[str, dict[str, Any]] = {}
    experts: dict[str, Expert] = {}
    for precision in PRECISIONS:
        training = dataclasses.replace(config.training_config(), precision=precision)
        timings: dict[str, float] = {}
        experts[precision] = train_contributor_expert(
            model, tokenizer, task.training, name=f"precision-{precision}", config=training,
            base_model=base, average_activation=True, retrieval=False,
            max_vector_examples=config.max_vector_examples, progress=False, timings=timings,
            say=lambda _message: None,
        )  # fmt: skip
        summary = experts[precision].manifest.training
        runs[precision] = {
            **timings,
            "lora_steps": summary.steps,
            "gate_steps": summary.gate_steps,
            "final_loss": summary.final_loss,
            "best_validation_loss_own_precision": summary.best_validation_loss,
        }
        say(f"{task.name} in {precision}: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    training = config.training_config()
    _, validation = split_validation(task.training, training)
    losses = {
        precision: _per_example_losses(model, tokenizer, expert, validation, training.max_length)
        for precision, expert in experts.items()
    }
    speedup = {
        stage: runs["float32"][stage] / runs["bfloat16"][stage]
        for stage in runs["float32"]
        if stage.endswith("_seconds") and runs["bfloat16"].get(stage)
    }
    return {
        "task": task.name,
        "runs": runs,
        "speedup_bf16_over_fp32": speedup,
        "validation": {
            "n": len(validation),
            "float32_expert": _mean(losses["float32"]),
            "bfloat16_expert": _mean(losses["bfloat16"]),
            "paired": _paired(
                [b - a for a, b in zip(losses["float32"], losses["bfloat16"], strict=True)]
            ),
        },
    }


def _per_example_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    expert: Expert,
    examples: Sequence[Any],
    max_length: int,
) -> list[float]:
    """Each example's target cross-entropy with `expert` applied, in float32."""
    build_routed_model(model, [expert], method="single", expert=expert.name)
    try:
        return [
            mean_target_loss(model, tokenizer, [example], batch_size=1, max_length=max_length)
            for example in examples
        ]
    finally:
        unroute_model(model)


def scoring_agreement(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[BenchmarkTask],
    experts: Sequence[Expert],
    config: ZeroShotConfig,
    *,
    say: Say = print,
) -> dict[str, Any]:
    """Per method (base, phatgoose) and task: predictions and accuracy in each precision."""
    record: dict[str, Any] = {}
    for method in ("base", "phatgoose"):
        if method == "phatgoose":
            build_routed_model(model, experts, "phatgoose", config.top_k)
        try:
            record[method] = {
                task.name: _score_both(model, tokenizer, task, config) for task in tasks
            }
        finally:
            if method == "phatgoose":
                unroute_model(model)
        rows = record[method].values()
        agree = sum(r["agree"] for r in rows)
        total = sum(r["n"] for r in rows)
        say(f"{method}: predictions agree on {agree} of {total} examples")
    return record


def _score_both(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: BenchmarkTask,
    config: ZeroShotConfig,
) -> dict[str, Any]:
    examples = task.evaluation[: config.eval_limit]
    correct: dict[str, list[int]] = {}
    predictions: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    scores: dict[str, list[list[float]]] = {}
    for precision in PRECISIONS:
        started = time.perf_counter()
        scores[precision] = score_choices(
            model, tokenizer, examples, batch_size=config.eval_batch_size,
            max_length=config.resolved_eval_max_length, progress=False, precision=precision,
        )  # fmt: skip
        seconds[precision] = time.perf_counter() - started
        predictions[precision] = [predicted_choice(row) for row in scores[precision]]
        correct[precision] = [
            int(p == ex.answer) for p, ex in zip(predictions[precision], examples, strict=True)
        ]
    gaps = [
        abs(a - b)
        for row32, row16 in zip(scores["float32"], scores["bfloat16"], strict=True)
        for a, b in zip(row32, row16, strict=True)
    ]
    n = len(examples)
    return {
        "n": n,
        "agree": sum(
            a == b for a, b in zip(predictions["float32"], predictions["bfloat16"], strict=True)
        ),
        "accuracy": {p: _mean([float(c) for c in correct[p]]) for p in PRECISIONS},
        "bf16_minus_fp32": _paired(
            [float(b - a) for a, b in zip(correct["float32"], correct["bfloat16"], strict=True)]
        ),
        "max_abs_score_difference": max(gaps),
        "seconds": seconds,
    }


def _mean(values: Sequence[float]) -> dict[str, float]:
    mean, stderr = mean_with_stderr(values)
    return {"mean": mean, "stderr": stderr}


def _paired(differences: Sequence[float]) -> dict[str, Any]:
    """Mean paired difference, its standard error and a normal 95% interval."""
    stats = _mean(differences)
    half = 1.96 * stats["stderr"]
    return {**stats, "ci95": [stats["mean"] - half, stats["mean"] + half]}


def markdown(record: dict[str, Any]) -> str:
    """The report's tables."""
    lines = []
    matmul = record.get("matmul")
    if matmul:
        isa = matmul["onednn_max_cpu_isa"] or "not restricted"
        lines += [
            f"Matrix products (ms, ONEDNN_MAX_CPU_ISA {isa}):",
            "",
            "| product | float32 | bfloat16 | speed-up |",
            "|---|---|---|---|",
        ]
        for shape, r in matmul["products"].items():
            lines.append(
                f"| {shape} | {r['float32_ms']:.2f} | {r['bfloat16_ms']:.2f} | "
                f"{r['speedup']:.2f}x |"
            )
        lines.append("")
    stages = record.get("stages")
    if stages:
        runs = stages["runs"]
        lines += [
            f"Stages of one expert ({stages['task']}), seconds:",
            "",
            "| stage | float32 | bfloat16 | speed-up |",
            "|---|---|---|---|",
        ]
        for stage, ratio in stages["speedup_bf16_over_fp32"].items():
            lines.append(
                f"| {stage.removesuffix('_seconds')} | {runs['float32'][stage]:.1f} | "
                f"{runs['bfloat16'][stage]:.1f} | {ratio:.2f}x |"
            )
        val = stages["validation"]
        paired = val["paired"]
        lines += [
            "",
            f"Validation loss (n = {val['n']}, every loss computed in float32): "
            f"float32 expert {val['float32_expert']['mean']:.4f}, bfloat16 expert "
            f"{val['bfloat16_expert']['mean']:.4f}; paired difference (bf16 - fp32) "
            f"{paired['mean']:+.4f} ± {paired['stderr']:.4f} "
            f"(95% CI {paired['ci95'][0]:+.4f} to {paired['ci95'][1]:+.4f}).",
            "",
        ]
    scoring = record.get("scoring", {})
    if scoring:
        lines += [
            "| method | task | n | agree | acc fp32 | acc bf16 | bf16 - fp32 (± se) | "
            "max score gap | s fp32 | s bf16 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, tasks in scoring.items():
            for task, r in tasks.items():
                acc, diff = r["accuracy"], r["bf16_minus_fp32"]
                lines.append(
                    f"| {method} | {task} | {r['n']} | {r['agree'] / r['n']:.1%} | "
                    f"{acc['float32']['mean']:.3f} ± {acc['float32']['stderr']:.3f} | "
                    f"{acc['bfloat16']['mean']:.3f} ± {acc['bfloat16']['stderr']:.3f} | "
                    f"{diff['mean']:+.3f} ± {diff['stderr']:.3f} | "
                    f"{r['max_abs_score_difference']:.3f} | {r['seconds']['float32']:.1f} | "
                    f"{r['seconds']['bfloat16']:.1f} |"
                )
            agree = sum(r["agree"] for r in tasks.values())
            total = sum(r["n"] for r in tasks.values())
            fp32 = sum(r["seconds"]["float32"] for r in tasks.values())
            bf16 = sum(r["seconds"]["bfloat16"] for r in tasks.values())
            lines.append(
                f"| {method} | all | {total} | {agree / total:.1%} | | | | | {fp32:.1f} | "
                f"{bf16:.1f} |"
            )
    return "\n".join(lines) + "\n"


def write(record: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(record))
