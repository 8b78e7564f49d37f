"""Does a gate's scale decide routing? Router numerics 1 against 2, on held-in tasks only.

Router numerics 1 standardised router rows with LayerNorm's eps (1e-5) under the square
root; freshly trained gates have variances of that order, so eps shrank each expert's row by
its own factor. Numerics 2 divides a row by its own standard deviation (docs/routing.md).
On the zero-shot preset's cached experts (`phatgoose bench zero-shot --train-only` trains
them), this measures, never on held-out tasks (nothing here is tuned, but the evidence run
must stay untouched):

1. the gates: per expert, the variance of each module's gate and the factor
   `sqrt(var / (var + 1e-5))` by which numerics 1 shrank that row;
2. for each numerics: every held-in task's PHATGOOSE accuracy, per example (so the two are
   paired), and the share of top-k routing slots that go to the task's own expert;
3. gate steps: the gates retrained for more steps than the preset gives them, their final
   gate loss and variance, and the same accuracy and own-expert share under numerics 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.zero_shot import BenchmarkTask, ZeroShotConfig
from phatgoose.evaluation import predicted_choice, score_choices
from phatgoose.expert import Expert
from phatgoose.paired import paired_mean_difference
from phatgoose.routing import build_routed_model, capture_routing, unroute_model
from phatgoose.routing.routers import STANDARDISE_EPS
from phatgoose.training import train_gates

BOOTSTRAP_SAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    """One routed model on one held-in task: per-example correctness and routing shares."""

    task: str
    correct: list[bool]
    own_expert_share: float  # of all top-k slots over every routed module and token

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def gate_statistics(expert: Expert) -> dict[str, float]:
    """Per-module gate variances (biased, as standardisation uses) and numerics 1's
    shrink factor `sqrt(var / (var + eps))`: their minimum, median and maximum."""
    variances = [float(g.double().var(unbiased=False)) for g in expert.gates.values()]
    shrink = [math.sqrt(v / (v + STANDARDISE_EPS)) for v in variances]
    return {
        "modules": len(variances),
        "variance_min": min(variances),
        "variance_median": statistics.median(variances),
        "variance_max": max(variances),
        "shrink_min": min(shrink),
        "shrink_median": statistics.median(shrink),
        "shrink_max": max(shrink),
    }


def score_routed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    experts: Sequence[Expert],
    tasks: Sequence[BenchmarkTask],
    config: ZeroShotConfig,
    *,
    router_numerics: int,
) -> list[TaskOutcome]:
    """PHATGOOSE over `experts` on each task's evaluation split; task i's own expert is the
    one named like it (`owner[task]`)."""
    names = [e.name for e in experts]
    build_routed_model(model, experts, "phatgoose", config.top_k, router_numerics=router_numerics)
    try:
        outcomes = []
        for task in tasks:
            examples = task.evaluation[: config.eval_limit]
            with capture_routing(model) as stats:
                scores = score_choices(
                    model, tokenizer, examples, batch_size=config.eval_batch_size,
                    max_length=config.resolved_eval_max_length, progress=False,
                    precision=config.precision,
                )  # fmt: skip
            correct = [
                predicted_choice(row) == example.answer
                for row, example in zip(scores, examples, strict=True)
            ]
            totals = torch.stack(list(stats.counts.values())).sum(0).double()
            own = names.index(_owner(task.name, names))
            share = float(totals[own] / totals.sum())
            outcomes.append(TaskOutcome(task.name, correct, share))
        return outcomes
    finally:
        unroute_model(model)


def _owner(task: str, names: Sequence[str]) -> str:
    from benchmarks.zero_shot import expert_name

    wanted = expert_name(task)
    for name in names:
        if name.rsplit("/", 1)[-1] == wanted:
            return name
    raise ValueError(f"no expert of task {task!r} (named {wanted!r}) among {list(names)}")


def paired_difference(
    before: Sequence[TaskOutcome], after: Sequence[TaskOutcome], *, seed: int = 0
) -> dict[str, float]:
    """Mean over tasks of (after - before) accuracy, on the same examples, with a 95%
    bootstrap interval (examples resampled within each task, tasks weighted equally) and
    McNemar's p-value: `phatgoose.paired.paired_mean_difference`, in this record's keys."""
    tasks = {}
    for b, a in zip(before, after, strict=True):
        if b.task != a.task or len(b.correct) != len(a.correct):
            raise ValueError(f"unpaired outcomes: {b.task} and {a.task}")
        tasks[b.task] = (a.correct, b.correct)
    difference = paired_mean_difference(tasks, resamples=BOOTSTRAP_SAMPLES, seed=seed)
    return {
        "mean_difference": difference.delta,
        "ci95_low": difference.low,
        "ci95_high": difference.high,
        "p_value": difference.p_value,
        "examples_gained": difference.a_only,
        "examples_lost": difference.b_only,
    }


def run_router_scale(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    experts: Sequence[Expert],
    tasks: Sequence[BenchmarkTask],
    config: ZeroShotConfig,
    *,
    more_gate_steps: Sequence[int] = (64,),
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole measurement (module docstring) as a JSON-ready record."""
    held_in = [t for t in tasks if t.held_in]
    if any(not t.held_in for t in tasks):
        say("router-scale: held-out tasks are ignored (never measured here)")
    record: dict[str, Any] = {
        "tasks": [t.name for t in held_in],
        "examples_per_task": {t.name: len(t.evaluation[: config.eval_limit]) for t in held_in},
        "top_k": config.top_k,
        "preset_gate_steps": config.training_config().resolved_gate_steps,
        "gates": {e.name: gate_statistics(e) for e in experts},
        "numerics": {},
        "gate_steps": {},
    }
    outcomes: dict[int, list[TaskOutcome]] = {}
    for numerics in (1, 2):
        started = time.perf_counter()
        outcomes[numerics] = score_routed(
            model, tokenizer, experts, held_in, config, router_numerics=numerics
        )
        record["numerics"][str(numerics)] = _summary(outcomes[numerics])
        say(
            f"numerics {numerics}: held-in accuracy "
            f"{record['numerics'][str(numerics)]['mean_accuracy']:.3f} "
            f"({time.perf_counter() - started:.0f} s)"
        )
    record["numerics_2_minus_1"] = paired_difference(outcomes[1], outcomes[2])

    by_task = {t.name: t for t in held_in}
    for steps in more_gate_steps:
        started = time.perf_counter()
        retrained, curves = [], {}
        for expert in experts:
            task = by_task[_task_of(expert.name, by_task)]
            training = dataclasses.replace(config.training_config(), gate_steps=steps)
            curve: list[float] = []
            retrained.append(
                train_gates(
                    model, tokenizer, expert, task.training, config=training, progress=False,
                    loss_curve=curve,
                )
            )  # fmt: skip
            curves[expert.name] = [round(loss, 4) for loss in curve]
        scored = score_routed(model, tokenizer, retrained, held_in, config, router_numerics=2)
        record["gate_steps"][str(steps)] = {
            "gates": {e.name: gate_statistics(e) for e in retrained},
            "final_gate_loss": {e.name: e.manifest.training.final_gate_loss for e in retrained},
            "gate_loss_curve": curves,
            "numerics_2": _summary(scored),
            "minus_preset_gates": paired_difference(outcomes[2], scored),
            "seconds": round(time.perf_counter() - started, 1),
        }
        say(f"{steps} gate steps: held-in accuracy {_summary(scored)['mean_accuracy']:.3f}")
    record["preset_final_gate_loss"] = {
        e.name: e.manifest.training.final_gate_loss for e in experts
    }
    return record


def _task_of(expert: str, tasks: dict[str, BenchmarkTask]) -> str:
    from benchmarks.zero_shot import expert_name

    short = expert.rsplit("/", 1)[-1]
    return next(name for name in tasks if expert_name(name) == short)


def _summary(outcomes: Sequence[TaskOutcome]) -> dict[str, Any]:
    return {
        "mean_accuracy": statistics.fmean(o.accuracy for o in outcomes),
        "accuracy": {o.task: o.accuracy for o in outcomes},
        "own_expert_share": {o.task: round(o.own_expert_share, 4) for o in outcomes},
        "mean_own_expert_share": statistics.fmean(o.own_expert_share for o in outcomes),
    }


def markdown(record: dict[str, Any]) -> str:
    """The record as the tables docs/benchmarks.md quotes."""
    lines = [
        "| expert | gate variance (min / median / max) | numerics 1 shrink (min / median) |",
        "|---|---|---|",
    ]
    for name, g in record["gates"].items():
        lines.append(
            f"| {name} | {g['variance_min']:.1e} / {g['variance_median']:.1e} / "
            f"{g['variance_max']:.1e} | {g['shrink_min']:.2f} / {g['shrink_median']:.2f} |"
        )
    lines += ["", "| held-in task | n | " + " | ".join(_columns(record)) + " |"]
    lines.append("|---|---|" + "---|" * len(_columns(record)))
    summaries = [record["numerics"]["1"], record["numerics"]["2"]] + [
        run["numerics_2"] for run in record["gate_steps"].values()
    ]
    for task in record["tasks"]:
        cells = [
            f"{s['accuracy'][task]:.3f} ({100 * s['own_expert_share'][task]:.0f}%)"
            for s in summaries
        ]
        n = record["examples_per_task"][task]
        lines.append(f"| {task} | {n} | " + " | ".join(cells) + " |")
    means = [
        f"**{s['mean_accuracy']:.3f}** ({100 * s['mean_own_expert_share']:.0f}%)" for s in summaries
    ]
    lines.append("| mean | | " + " | ".join(means) + " |")
    d = record["numerics_2_minus_1"]
    lines += [
        "",
        "Accuracy (share of top-k slots routed to the task's own expert). Numerics 2 - 1: "
        f"{d['mean_difference']:+.3f} [95% CI {d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}], "
        f"{d['examples_gained']} examples gained, {d['examples_lost']} lost.",
    ]
    for steps, run in record["gate_steps"].items():
        d = run["minus_preset_gates"]
        lines.append(
            f"{steps} gate steps - {record['preset_gate_steps']} (numerics 2): "
            f"{d['mean_difference']:+.3f} [95% CI {d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]."
        )
    return "\n".join(lines) + "\n"


def _columns(record: dict[str, Any]) -> list[str]:
    preset = record["preset_gate_steps"]
    return [f"numerics 1 ({preset} gate steps)", f"numerics 2 ({preset})"] + [
        f"numerics 2 ({steps})" for steps in record["gate_steps"]
    ]


def write(record: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(record))
