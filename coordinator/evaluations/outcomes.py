"""Per-example outcomes of one task's result: what paired comparisons are computed from.

For every example, in the order the evaluation split lists them: the index of the answer
choice the model picked and whether it was the right one (and, when the reporter knows it,
how many choices the example had). Two results on the same examples can then be compared
example by example (`coordinator.leaderboard.comparisons`), which detects far smaller
differences than the two accuracies' independent standard errors.

Stored as JSON in `evaluation_results.outcomes` (migration 0005):
`{"format": 1, "predictions": [0, 2, ...], "correct": [true, false, ...], "choices": [4, 4,
...]}` (`choices` only when known). Results stored before 0005 have none (NULL).

`check_outcomes` is the one validation every report goes through (a worker's
`record_result`, an `import_job`): a report that does not add up is refused with 422 before
anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.core.errors import Unprocessable

OUTCOMES_FORMAT = 1
# The most examples one result keeps outcomes for: a JSON column of about 12 bytes per
# example (120 kB here), and a bootstrap whose cost grows with it. Tasks scored on more
# examples are stored without outcomes (the worker says so); their comparisons say why.
MAX_OUTCOME_EXAMPLES = 10_000
# A BIG-bench example has a handful of choices; more than this is a malformed report.
MAX_CHOICES = 1_000


class InvalidOutcomes(Unprocessable):
    """A task's reported outcomes do not fit its result (422)."""

    error = "invalid_result"
    check = "outcomes"


@dataclass(frozen=True)
class ExampleOutcomes:
    """Per example, in order: the chosen answer's index and whether it was right; `choices`
    is each example's number of answer choices, when the reporter knows it."""

    predictions: tuple[int, ...]
    correct: tuple[bool, ...]
    choices: tuple[int, ...] | None = None

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def correct_count(self) -> int:
        return sum(self.correct)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": OUTCOMES_FORMAT,
            "predictions": list(self.predictions),
            "correct": list(self.correct),
        }
        if self.choices is not None:
            body["choices"] = list(self.choices)
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ExampleOutcomes:
        """The stored JSON back (written by `to_json` after `check_outcomes`)."""
        if body.get("format") != OUTCOMES_FORMAT:
            raise ValueError(
                f"outcomes of format {body.get('format')!r}; this coordinator reads "
                f"format {OUTCOMES_FORMAT}"
            )
        choices = body.get("choices")
        return cls(
            predictions=tuple(int(p) for p in body["predictions"]),
            correct=tuple(bool(c) for c in body["correct"]),
            choices=None if choices is None else tuple(int(c) for c in choices),
        )


def check_outcomes(
    task: str, accuracy: float, n: int, outcomes: ExampleOutcomes | None
) -> ExampleOutcomes | None:
    """`outcomes` checked against the result they come with, as plain tuples.

    Refused (`InvalidOutcomes`, 422): more than `MAX_OUTCOME_EXAMPLES` examples; lists whose
    length is not `n`; a prediction that is not an integer >= 0 (or not below its example's
    number of choices, when given); a `correct` entry that is not a boolean; a number of
    choices that is not an integer in 1..`MAX_CHOICES`; a number correct that is not
    `accuracy * n` rounded.
    """
    if outcomes is None:
        return None

    def refuse(problem: str, expected: str) -> InvalidOutcomes:
        return InvalidOutcomes(f"task {task!r}: {problem}", expected=expected)

    for name in ("predictions", "correct", "choices"):
        values = getattr(outcomes, name)
        if values is None and name == "choices":
            continue
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise refuse(f"outcomes.{name} is a {type(values).__name__}", "a list")
        if len(values) > MAX_OUTCOME_EXAMPLES:
            raise refuse(
                f"outcomes.{name} holds {len(values)} examples, more than the "
                f"{MAX_OUTCOME_EXAMPLES} whose outcomes are kept",
                f"at most {MAX_OUTCOME_EXAMPLES} examples (a larger result is reported "
                "without outcomes)",
            )
        if len(values) != n:
            raise refuse(
                f"outcomes.{name} holds {len(values)} entries for a result over n={n} examples",
                f"one entry per example: {n}",
            )
    predictions, correct, choices = outcomes.predictions, outcomes.correct, outcomes.choices
    for index, value in enumerate(correct):
        if not isinstance(value, bool):
            raise refuse(
                f"outcomes.correct[{index}] is {value!r} ({type(value).__name__})",
                "true or false",
            )
    if choices is not None:
        for index, count in enumerate(choices):
            if not _is_int(count) or not 1 <= count <= MAX_CHOICES:
                raise refuse(
                    f"outcomes.choices[{index}] is {count!r}",
                    f"an integer from 1 to {MAX_CHOICES}",
                )
    for index, prediction in enumerate(predictions):
        if not _is_int(prediction) or prediction < 0:
            raise refuse(
                f"outcomes.predictions[{index}] is {prediction!r}",
                "the index of the chosen answer: an integer >= 0",
            )
        if choices is not None and prediction >= choices[index]:
            raise refuse(
                f"outcomes.predictions[{index}] is {prediction}, but example {index} has "
                f"{choices[index]} choices",
                f"an index from 0 to {choices[index] - 1}",
            )
    right = sum(correct)
    # Reporters round accuracy (benchmarks write it with a few decimals): the count must be
    # the nearest integer to accuracy * n.
    if not math.isfinite(accuracy) or abs(right - accuracy * n) > 0.5 + 1e-9 * n:
        raise refuse(
            f"outcomes.correct holds {right} correct of {n}, but the accuracy is {accuracy!r} "
            f"({accuracy * n:g} of {n})",
            "as many correct examples as accuracy * n, rounded",
        )
    return ExampleOutcomes(
        predictions=tuple(predictions),
        correct=tuple(correct),
        choices=None if choices is None else tuple(choices),
    )


def _is_int(value: object) -> bool:
    # bool is an int subclass; `True` as an answer index is a malformed report.
    return isinstance(value, int) and not isinstance(value, bool)
