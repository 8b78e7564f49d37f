"""Examples, their text format, and how they become tensors for training and scoring.

One format for training and scoring (../shared/BENCHMARK.md): a continuation (a target or
an answer choice) follows the prompt directly when the prompt ends in whitespace, else
after one space. Tokens: the prompt and the continuation are tokenised separately, without
special tokens, and concatenated, with the boundary before a prompt's trailing spaces
(`token_boundary`); training targets end with EOS (`continuation_ids`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads with the first batch, not with the data format
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase


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


# ------------------------------------------------------------------------------ loading
class DataFormatError(ValueError):
    """A data file is malformed: says which file, which line, which field, what was expected."""

    def __init__(
        self, path: str | Path, message: str, *, line: int | None = None, field: str | None = None
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field {field!r}: " if field is not None else ""
        super().__init__(f"{where}: {what}{message}")


# The two accepted record shapes. Unknown fields are refused: a misspelt "traget" would
# otherwise silently become an example without a target.
_FREE_TEXT_FIELDS = frozenset({"input", "target"})
_MULTIPLE_CHOICE_FIELDS = frozenset({"input", "choices", "answer"})
JSONL_FORMAT_HINT = (
    'one JSON object per line: {"input": str, "target": str} or '
    '{"input": str, "choices": [str, ...], "answer": int}'
)


def load_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file (UTF-8; blank lines skipped).

    Each line is `{"input": str, "target": str}` (free text) or
    `{"input": str, "choices": [str, ...], "answer": int}` (multiple choice: choices
    non-empty, distinct and non-empty strings; `answer` a 0-based index into them). No other
    fields are accepted. Raises `DataFormatError` naming the line and field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    except UnicodeDecodeError as error:
        raise DataFormatError(path, f"not UTF-8 text ({error})") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFormatError(
                path, f"not valid JSON ({error.msg}); expected {JSONL_FORMAT_HINT}", line=number
            ) from None
        examples.append(_example_from_record(record, path, number))
    if not examples:
        raise DataFormatError(path, f"no examples; expected {JSONL_FORMAT_HINT}")
    return examples


def _example_from_record(record: object, path: Path, line: int) -> Example:
    def fail(message: str, field: str | None = None) -> DataFormatError:
        return DataFormatError(path, message, line=line, field=field)

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}; {JSONL_FORMAT_HINT}")
    prompt = record.get("input")
    if not isinstance(prompt, str):
        raise fail(f"expected a string, got {_describe(prompt)}", "input")

    if "choices" in record or "answer" in record:
        _refuse_unknown_fields(record, _MULTIPLE_CHOICE_FIELDS, fail)
        choices = record.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"expected a non-empty list of strings, got {_describe(choices)}", "choices")
        for i, choice in enumerate(choices):
            if not isinstance(choice, str) or not choice:
                raise fail(
                    f"choice {i} must be a non-empty string, got {_describe(choice)}", "choices"
                )
        if len(set(choices)) != len(choices):
            duplicates = sorted({c for c in choices if choices.count(c) > 1})
            raise fail(f"choices must be distinct; repeated: {duplicates}", "choices")
        answer = record.get("answer")
        # bool is an int in Python, but `true` is not an index.
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise fail(f"expected an integer index into choices, got {_describe(answer)}", "answer")
        if not 0 <= answer < len(choices):
            raise fail(f"expected an index in 0..{len(choices) - 1}, got {answer}", "answer")
        return Example(prompt=prompt, choices=tuple(choices), answer=answer)

    _refuse_unknown_fields(record, _FREE_TEXT_FIELDS, fail)
    target = record.get("target")
    if not isinstance(target, str) or not target:
        raise fail(f"expected a non-empty string, got {_describe(target)}", "target")
    return Example(prompt=prompt, target=target)


def _refuse_unknown_fields(
    record: dict[str, Any], allowed: frozenset[str], fail: Callable[[str, str], DataFormatError]
) -> None:
    unknown = sorted(set(record) - allowed)
    if unknown:
        raise fail(f"unknown field(s) {unknown}; {JSONL_FORMAT_HINT}", unknown[0])


def _describe(value: object) -> str:
    if value is None:
        return "nothing (missing or null)"
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40]}{'...' if len(shown) > 40 else ''}"


def load_examples(path: str | Path) -> list[Example]:
    """Training examples from a `.jsonl` file or a BIG-bench `task.json` (or its directory).

    A BIG-bench task contributes all its examples (`n_eval=0`: no evaluation split held back).
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        return load_jsonl(path)
    if path.suffix == ".json" or (path.is_dir() and (path / "task.json").is_file()):
        from phatgoose.bigbench import load_bigbench_task  # heavy and optional: import late

        return load_bigbench_task(path, n_eval=0).training
    raise DataFormatError(
        path, "unknown data format; expected a .jsonl file or a BIG-bench task.json"
    )


def sample_examples(examples: Sequence[Example], limit: int, *, seed: int) -> list[Example]:
    """Up to `limit` of the examples: all of them, or a seeded sample when there are more
    (the contributor vectors' sample: average activations and retrieval embeddings)."""
    if limit < 1:
        raise ValueError(f"max_examples must be >= 1, got {limit}")
    if len(examples) <= limit:
        return list(examples)
    return random.Random(seed).sample(list(examples), limit)


# --------------------------------------------------------------------------- tokenising
# The token rule shared by training and scoring: the prompt and the continuation are
# tokenised SEPARATELY, both without special tokens, and their ids concatenated, so a
# continuation's tokens never depend on how a tokenizer would merge across the join.
# Training targets end with the EOS id; no BOS is added anywhere. An empty prompt (BIG-bench
# tasks such as misconceptions_russian score bare statements) becomes the EOS id alone: a
# causal model then scores the continuation as text that starts a document.

IGNORE_INDEX = -100  # positions the cross-entropy skips (PyTorch's and transformers' default)


def token_boundary(prompt: str, continuation: str) -> tuple[str, str]:
    """Split `join_continuation(prompt, continuation)` into the texts tokenised apart.

    A prompt's trailing spaces move to the continuation, so that BIG-bench's "\nA: " is
    followed by the usual word token (" yes") instead of a lone space and then "yes", a
    split the model rarely saw in pre-training (it cost SmolLM2 9-17 points of base
    accuracy on binary tasks). The joined text is unchanged.
    """
    kept = prompt.rstrip(" ") or prompt
    return kept, prompt[len(kept) :] + continuation_suffix(prompt, continuation)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt (no special tokens), up to the boundary of `token_boundary`;
    `[eos]` (or `[bos]` without an EOS) for a prompt with no tokens, so there is always
    something to condition on."""
    ids = list(tokenizer(token_boundary(prompt, "")[0], add_special_tokens=False)["input_ids"])
    if ids:
        return ids
    boundary = (
        tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    )
    if boundary is None:
        raise ValueError("an empty prompt needs an eos or bos token to condition on")
    return [boundary]


def continuation_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, continuation: str, *, add_eos: bool
) -> list[int]:
    """Token ids of a continuation as joined to its prompt (see `token_boundary`)."""
    text = token_boundary(prompt, continuation)[1]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; training targets end with EOS")
        ids.append(tokenizer.eos_token_id)
    return ids


def collate_for_training(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_length: int,
    is_encoder_decoder: bool,
) -> dict[str, Tensor]:
    """A right-padded training batch whose loss covers the target tokens (with EOS) only.

    Causal: `input_ids` = prompt + target, `labels` = -100 on prompt and padding. A sequence
    longer than `max_length` loses prompt tokens from the LEFT, so the target survives; a
    target that alone exceeds `max_length - 1` is cut on the right, keeping one prompt token.
    Encoder-decoder: `input_ids` = prompt (left-truncated to `max_length`), `labels` = target
    (right-truncated to `max_length`) padded with -100; the model shifts labels itself.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not examples:
        raise ValueError("collate_for_training needs at least one example")
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")

    encoded = [
        (
            prompt_ids(tokenizer, ex.prompt),
            continuation_ids(tokenizer, ex.prompt, ex.target_text, add_eos=True),
        )
        for ex in examples
    ]
    if is_encoder_decoder:
        inputs = [p[-max_length:] for p, _ in encoded]
        targets = [t[:max_length] for _, t in encoded]
        input_ids, attention_mask = pad_rows(inputs, pad_id)
        labels, _ = pad_rows(targets, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    sequences, label_rows = [], []
    for prompt, target in encoded:
        if prompt and len(target) > max_length - 1:
            target = target[: max_length - 1]
        target = target[:max_length]
        room = max_length - len(target)
        prompt = prompt[len(prompt) - room :] if len(prompt) > room else prompt
        sequences.append(prompt + target)
        label_rows.append([IGNORE_INDEX] * len(prompt) + target)
    input_ids, attention_mask = pad_rows(sequences, pad_id)
    labels, _ = pad_rows(label_rows, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_sequences(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A right-padded causal batch (`collate_for_training`) in fewer rows of the same width.

    Short sequences share a row (first fit, longest first), one after the other, with
    `position_ids` restarting at 0 for each and no attention mask: transformers' causal
    models recognise packed sequences that way and keep each one's attention within it.
    A batch mixing 180- and 40-token tasks then stops paying for 8 rows of 180. Rows stay
    as wide as the longest sequence, so attention costs no more than padded; a row's unused
    end is a segment of its own (token 0, labels ignored). Each sequence's first token is
    never a target (it would be predicted from the previous one). When no two sequences
    fit in one row, the batch is returned as it is.
    """
    import torch

    lengths = batch["attention_mask"].sum(dim=1).tolist()
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((r for r in range(len(rows)) if room[r] >= lengths[i]), None)
        if fits is None:
            rows.append([i])
            room.append(width - lengths[i])
        else:
            rows[fits].append(i)
            room[fits] -= lengths[i]
    if len(rows) == len(lengths):
        return batch

    device = batch["input_ids"].device
    input_ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    position_ids = torch.zeros_like(input_ids)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            n = lengths[i]
            input_ids[r, start : start + n] = batch["input_ids"][i, :n]
            labels[r, start + 1 : start + n] = batch["labels"][i, 1:n]
            position_ids[r, start : start + n] = torch.arange(n, device=device)
            start += n
        position_ids[r, start:] = torch.arange(width - start, device=device)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def pad_rows(rows: list[list[int]], value: int) -> tuple[Tensor, Tensor]:
    """Right-pad rows to one width (at least 1): (ids [b, width], mask [b, width])."""
    import torch

    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def batches(examples: Sequence[Example], batch_size: int, *, seed: int) -> Iterator[list[Example]]:
    """Endless batches: the examples reshuffled each epoch by one seeded generator.

    Epochs are concatenated, so every batch has exactly `batch_size` examples (a batch may
    span two epochs; with fewer examples than `batch_size`, examples repeat in a batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not examples:
        raise ValueError("batches needs at least one example")
    rng = random.Random(seed)
    batch: list[Example] = []
    while True:
        for index in rng.sample(range(len(examples)), len(examples)):
            batch.append(examples[index])
            if len(batch) == batch_size:
                yield batch
                batch = []
