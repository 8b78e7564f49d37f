"""Examples, their text format, and how they become tensors for training and scoring.

One format for training and scoring (../shared/BENCHMARK.md): a continuation (a target or
an answer choice) follows the prompt directly when the prompt ends in whitespace, else
after one space.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A prompt with either answer choices (multiple choice) or a free-text target."""

    prompt: str
    choices: tuple[str, ...] = ()
    answer: int | None = None
    target: str | None = None

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices)

    @property
    def target_text(self) -> str:
        """The text a model is trained to produce for this example."""
        if self.target is not None:
            return self.target
        if self.answer is None:
            raise ValueError("a multiple-choice example without an answer has no target")
        return self.choices[self.answer]


def join_continuation(prompt: str, continuation: str) -> str:
    """The single place where a prompt and its continuation are joined into one text."""
    return prompt + continuation_suffix(prompt, continuation)


def continuation_suffix(prompt: str, continuation: str) -> str:
    """The continuation exactly as it is appended to the prompt."""
    if not prompt or prompt[-1].isspace():
        return continuation
    return " " + continuation
