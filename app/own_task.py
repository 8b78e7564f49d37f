"""Each demo expert alone on its own task, against the base model on the same examples.

The examples are the task's evaluation split (`load_bigbench_task` with the plan's `n_eval`
and seed), the split the coordinator's evaluation uses and the contributors never hold: a
contributor trains on the rest. Base and expert answer the same examples, so the gain is a
paired difference (`phatgoose.paired`, as on the leaderboard): expert accuracy minus base
accuracy with its 95% paired bootstrap interval and McNemar's exact p-value, far tighter
than the two accuracies' errors combined when the two models agree on most examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from phatgoose.data import Example
from phatgoose.evaluation import predicted_choice, score_choices
from phatgoose.expert import Expert
from phatgoose.paired import PairedDifference, paired_difference
from phatgoose.precision import Precision
from phatgoose.routing import build_routed_model, unroute_model


@dataclass(frozen=True)
class OwnTaskScore:
    """One expert on its own task's evaluation split, paired with the base model."""

    expert: str  # the catalog reference
    task: str
    expert_accuracy: float
    base_accuracy: float
    # expert - base on the same examples: delta, 95% interval, McNemar p, and the examples
    # only the expert (a_only) or only the base (b_only) answers right
    gain: PairedDifference

    @property
    def n(self) -> int:
        return self.gain.n


def correct_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_length: int,
    precision: Precision = "auto",
) -> list[bool]:
    """Per example, whether rank classification picks its answer (ties go to the first
    choice, as in `phatgoose.evaluation.evaluate_task`)."""
    scores = score_choices(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        max_length=max_length,
        progress=False,
        precision=precision,
    )
    return [
        predicted_choice(row) == example.answer
        for row, example in zip(scores, examples, strict=True)
    ]


def own_task_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    experts: Sequence[tuple[str, Expert, str, Sequence[Example]]],
    *,
    batch_size: int,
    max_length: int,
    precision: Precision = "auto",
) -> list[OwnTaskScore]:
    """Score the base model, then each expert alone (`single` routing), on each
    `(reference, expert, task, evaluation examples)`; `model` is handed back unrouted."""
    results = []
    for reference, expert, task, examples in experts:
        settings: dict[str, Any] = {
            "batch_size": batch_size,
            "max_length": max_length,
            "precision": precision,
        }
        base = correct_answers(model, tokenizer, examples, **settings)
        build_routed_model(model, [expert], method="single", expert=expert.name)
        try:
            alone = correct_answers(model, tokenizer, examples, **settings)
        finally:
            unroute_model(model)
        n = len(examples)
        results.append(
            OwnTaskScore(
                expert=reference,
                task=task,
                expert_accuracy=sum(alone) / n,
                base_accuracy=sum(base) / n,
                gain=paired_difference(alone, base),
            )
        )
    return results


def load_catalogued_expert(session: Any, blobs: Any, reference: str, directory: Path) -> Expert:
    """An expert version of the catalog, its stored files copied into `directory`."""
    from coordinator.experts.files import copy_version_files
    from coordinator.experts.service import resolve_ref

    version = resolve_ref(session, reference)
    return Expert.load(copy_version_files(session, blobs, version.files, directory))
