"""Rank classification: which answer choice does a model find most likely?

For each example and each choice, the score is the length-normalised log-likelihood of the
choice's tokens given the prompt (mean log-probability per choice token); the prediction is
the highest-scoring choice and the metric accuracy (METHOD.md, "Evaluation").

Tokens follow the rule shared with training (`data.prompt_ids`, `data.continuation_ids`):
prompt and continuation are tokenised separately and their ids concatenated, so a choice is
scored on exactly the tokens a trained expert learned to produce (minus the EOS).

A causal model with a key/value cache reads each prompt once: one forward over the batch's
prompts gives the first choice token's log-probabilities and the cache, which is then
repeated per choice for a second forward over the choices' remaining tokens. The choices of
a BIG-bench example share a prompt many times their length, so this costs about one forward
per example instead of one per choice (single-token choices need no second forward at all).
Routing decides each token from its own activation (or, for retrieval, from the row's
prompt), so the scores equal one forward per (prompt, choice) sequence.

Scoring computes in `precision` (`phatgoose.precision`; `auto` is bfloat16 where the
hardware multiplies it natively): products in bfloat16, the LM head, log-softmax and the
sums of log-probabilities in float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from phatgoose.data import Example, continuation_ids, pad_rows, prompt_ids
from phatgoose.models import cache_keyword, forward_accepts, returned_cache
from phatgoose.precision import ComputePrecision, Precision, compute_in, resolve_precision
from phatgoose.routing import queries, reorder_routing, routing_state
from protocol import ComputePrecisionName


@dataclass(frozen=True)
class _Pair:
    """One (example, choice) row to score."""

    example: int
    choice: int
    prompt_text: str
    prompt: list[int]
    continuation: list[int]


def score_choices(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
    precision: Precision = "auto",
) -> list[list[float]]:
    """Mean log-probability per token of every choice of every example, given its prompt.

    Works on causal and encoder-decoder models, plain or routed: every forward runs inside
    `routing.queries(model, prompts)` so a retrieval router sees each row's prompt.
    Prompts longer than `max_length` (together with the choice, for causal models) lose
    tokens from the left.
    """
    compute = resolve_precision(precision, next(model.parameters()).device)
    return _score(model, tokenizer, examples, batch_size, max_length, progress, compute)[0]


def _score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
    progress: bool,
    precision: ComputePrecision,
) -> tuple[list[list[float]], int]:
    """(scores, number of choice tokens scored), computed in `precision`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")
    device = next(model.parameters()).device
    cache_argument = None if is_encoder_decoder else cache_keyword(model)
    state = routing_state(model)
    if cache_argument is None and not is_encoder_decoder and state and state.prompt:
        # Without a cache, prompt and choice go through one forward, which would decide.
        raise ValueError(
            f"method {state.method!r} routes on the prompt alone, which scoring a causal "
            f"model without a key/value cache ({type(model).__name__}) cannot separate"
        )
    with torch.no_grad(), compute_in(precision, model):
        if cache_argument is not None:
            return _score_shared_prompts(
                model,
                tokenizer,
                examples,
                batch_size,
                max_length,
                progress,
                pad_id,
                device,
                cache_argument,
            )

        pairs = _encode_pairs(tokenizer, examples, max_length, is_encoder_decoder)
        # Similar lengths share a batch, so little compute goes to padding.
        order = sorted(
            range(len(pairs)), key=lambda i: -(len(pairs[i].prompt) + len(pairs[i].continuation))
        )
        scores = [[math.nan] * len(ex.choices) for ex in examples]
        batch_starts = range(0, len(order), batch_size)
        for start in tqdm(batch_starts, desc="scoring", unit="batch", disable=not progress):
            batch = [pairs[i] for i in order[start : start + batch_size]]
            with queries(model, [p.prompt_text for p in batch]):
                if is_encoder_decoder:
                    mean_logprobs = _score_encoder_decoder(model, batch, pad_id, device)
                else:
                    mean_logprobs = _score_causal(model, batch, pad_id, device)
            for pair, value in zip(batch, mean_logprobs.tolist(), strict=True):
                scores[pair.example][pair.choice] = value
        return scores, sum(len(p.continuation) for p in pairs)


def _choice_ids(
    tokenizer: PreTrainedTokenizerBase, example: Example, index: int
) -> list[list[int]]:
    """Token ids of every choice of example `index`, as joined to its prompt."""
    if not example.choices:
        raise ValueError(f"example {index} has no choices; rank classification needs them")
    choices = []
    for choice_index, choice in enumerate(example.choices):
        ids = continuation_ids(tokenizer, example.prompt, choice, add_eos=False)
        if not ids:
            raise ValueError(
                f"example {index}, choice {choice_index} ({choice!r}) has no tokens to score"
            )
        choices.append(ids)
    return choices


def _encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int,
    is_encoder_decoder: bool,
) -> list[_Pair]:
    """Token ids per (example, choice), truncated as `data.collate_for_training` does."""
    pairs = []
    for index, example in enumerate(examples):
        prompt = prompt_ids(tokenizer, example.prompt)
        for choice_index, continuation in enumerate(_choice_ids(tokenizer, example, index)):
            # A choice keeps its start; the prompt keeps its end (the part next to the answer).
            if is_encoder_decoder:  # encoder and decoder each hold max_length tokens
                continuation = continuation[:max_length]
                kept = prompt[-max_length:]
            else:  # one sequence of max_length tokens, at least one of them from the prompt
                continuation = continuation[: max_length - 1]
                kept = prompt[-(max_length - len(continuation)) :]
            pairs.append(_Pair(index, choice_index, example.prompt, kept, continuation))
    return pairs


@dataclass(frozen=True)
class _Prompted:
    """One example for shared-prompt scoring: its prompt and the ids of every choice."""

    example: int
    prompt_text: str
    prompt: list[int]
    choices: list[list[int]]


def _score_shared_prompts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
    progress: bool,
    pad_id: int,
    device: torch.device,
    cache_argument: str,
) -> tuple[list[list[float]], int]:
    """`_score` for causal models with a key/value cache: each prompt is read once.

    Truncation keeps every sequence within `max_length`: a choice keeps its first
    `max_length - 1` tokens, the prompt its last `max_length - longest choice` tokens (one
    cut for all the example's choices, so they share it).
    """
    prompted = []
    for index, example in enumerate(examples):
        choices = [ids[: max_length - 1] for ids in _choice_ids(tokenizer, example, index)]
        room = max_length - max(len(ids) for ids in choices)
        prompt = prompt_ids(tokenizer, example.prompt)[-room:]
        prompted.append(_Prompted(index, example.prompt, prompt, choices))
    # Similar lengths share a batch, so little compute goes to padding; a batch holds at
    # most `batch_size` (example, choice) rows, and at least one example.
    prompted.sort(key=lambda p: -(len(p.prompt) + max(len(ids) for ids in p.choices)))
    batches: list[list[_Prompted]] = []
    rows = 0
    for item in prompted:
        if not batches or rows + len(item.choices) > batch_size:
            batches.append([])
            rows = 0
        batches[-1].append(item)
        rows += len(item.choices)

    scores: list[list[float]] = [[] for _ in examples]
    for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
        for item, row in zip(
            batch, _score_prompted(model, batch, pad_id, device, cache_argument), strict=True
        ):
            scores[item.example] = row
    return scores, sum(len(ids) for item in prompted for ids in item.choices)


def _score_prompted(
    model: nn.Module,
    batch: list[_Prompted],
    pad_id: int,
    device: torch.device,
    cache_argument: str,
) -> list[list[float]]:
    """Mean log-probability of each choice of each example in `batch`; the forward takes
    its key/value cache as `cache_argument` (`models.cache_keyword`)."""
    input_ids, prompt_mask = _left_padded([item.prompt for item in batch], pad_id)
    # Left padding shifts every row; positions must count real tokens only.
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    with queries(model, [item.prompt_text for item in batch]):
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=prompt_mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=True,
            **_logits_to_keep(model, 1),
        )
    # The last prompt position predicts every choice's first token.
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
    sums = [[float(first[i, ids[0]]) for ids in item.choices] for i, item in enumerate(batch)]

    # The other tokens: one row per (example, choice) with more than one token, reading the
    # choice's tokens but its last after the example's cached prompt.
    rows = [(i, j) for i, item in enumerate(batch) for j, ids in enumerate(item.choices)]
    rows = [(i, j) for i, j in rows if len(batch[i].choices[j]) > 1]
    if rows:
        owner = torch.tensor([i for i, _ in rows])
        cache = returned_cache(out)
        cache.reorder_cache(owner.to(device))  # row r continues the prompt of example owner[r]
        reorder_routing(model, owner)  # and keeps the routing decided on that prompt
        inputs, choice_mask = pad_rows([batch[i].choices[j][:-1] for i, j in rows], pad_id)
        targets, _ = pad_rows([batch[i].choices[j][1:] for i, j in rows], 0)
        width = inputs.shape[1]
        positions = prompt_mask.sum(-1)[owner][:, None] + torch.arange(width)
        with queries(model, [batch[i].prompt_text for i, _ in rows]):
            logits = model(
                input_ids=inputs.to(device),
                attention_mask=torch.cat([prompt_mask[owner], choice_mask], dim=1).to(device),
                position_ids=positions.to(device),
                **{cache_argument: cache},
                use_cache=True,
            ).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None].to(device))
        picked = (logprobs[..., 0].cpu() * choice_mask).sum(-1)
        for (i, j), value in zip(rows, picked.tolist(), strict=True):
            sums[i][j] += value
    return [
        [total / len(ids) for total, ids in zip(row, item.choices, strict=True)]
        for row, item in zip(sums, batch, strict=True)
    ]


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, attention mask), every row ending at the last position."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _logits_to_keep(model: nn.Module, keep: int) -> dict[str, int]:
    return {"logits_to_keep": keep} if forward_accepts(model, "logits_to_keep") else {}


def _score_causal(
    model: nn.Module, batch: list[_Pair], pad_id: int, device: torch.device
) -> Tensor:
    """Left-padded rows `prompt + choice`; every choice ends at the last position, so only
    the last `longest choice + 1` positions need logits."""
    input_ids, attention_mask = _left_padded([p.prompt + p.continuation for p in batch], pad_id)
    # Left padding shifts every row; positions must count real tokens only.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(len(p.continuation) for p in batch) + 1

    kwargs: dict[str, object] = {"attention_mask": attention_mask.to(device)}
    if forward_accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids.to(device)
    if forward_accepts(model, "use_cache"):
        kwargs["use_cache"] = False  # one forward pass: a key/value cache is wasted memory
    kwargs.update(_logits_to_keep(model, keep))
    logits = model(input_ids=input_ids.to(device), **kwargs).logits[:, -keep:].float()
    logprobs = torch.log_softmax(logits, dim=-1)

    # The choice token at window position j is predicted by the logits at j - 1.
    targets = torch.full((len(batch), keep), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), keep))
    for i, pair in enumerate(batch):
        n = len(pair.continuation)
        targets[i, keep - n :] = torch.tensor(pair.continuation)
        mask[i, keep - n :] = 1
    token_logprobs = logprobs[:, :-1].gather(-1, targets[:, 1:, None].to(device))[..., 0]
    mask = mask[:, 1:].to(device)
    return ((token_logprobs * mask).sum(-1) / mask.sum(-1)).cpu()


def _score_encoder_decoder(
    model: nn.Module, batch: list[_Pair], pad_id: int, device: torch.device
) -> Tensor:
    """Encoder reads the prompt; the decoder is teacher-forced on the choice, all scored."""
    width = max(len(p.prompt) for p in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    label_width = max(len(p.continuation) for p in batch)
    labels = torch.full((len(batch), label_width), -100, dtype=torch.long)
    for i, pair in enumerate(batch):
        input_ids[i, : len(pair.prompt)] = torch.tensor(pair.prompt)
        attention_mask[i, : len(pair.prompt)] = 1
        labels[i, : len(pair.continuation)] = torch.tensor(pair.continuation)
    labels = labels.to(device)
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    decoder_inputs = (
        {"decoder_input_ids": prepare(labels=labels)} if callable(prepare) else {"labels": labels}
    )
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **decoder_inputs
    ).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    mask = labels != -100
    token_logprobs = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return ((token_logprobs * mask).sum(-1) / mask.sum(-1)).cpu()


@dataclass(frozen=True)
class TaskResult:
    """Accuracy of one model on one task, with its binomial standard error and cost.

    `predictions` and `correct` are the per-example outcomes in example order (the chosen
    choice's index, and whether it was the answer), which paired comparisons
    (`phatgoose.paired`) need; empty in results recorded before they were kept.
    """

    task: str
    accuracy: float
    stderr: float  # sqrt(p (1 - p) / n)
    n: int
    seconds: float
    scored_tokens: int  # choice tokens scored: the unit of "seconds per 1000 scored tokens"
    precision: ComputePrecisionName = "float32"  # what the model computed in
    predictions: tuple[int, ...] = ()
    correct: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        # Results read back from JSON carry lists; tuples keep the result hashable and equal
        # to the one that was written.
        object.__setattr__(self, "predictions", tuple(int(p) for p in self.predictions))
        object.__setattr__(self, "correct", tuple(bool(c) for c in self.correct))
        if self.correct and len(self.correct) != self.n:
            raise ValueError(
                f"task {self.task!r}: {len(self.correct)} per-example outcomes for n={self.n}"
            )
        if self.predictions and len(self.predictions) != len(self.correct):
            raise ValueError(
                f"task {self.task!r}: {len(self.predictions)} predictions but "
                f"{len(self.correct)} outcomes"
            )

    @property
    def has_outcomes(self) -> bool:
        """Whether the per-example outcomes were kept (paired comparisons need them)."""
        return len(self.correct) == self.n

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["predictions"] = list(self.predictions)
        data["correct"] = list(self.correct)
        return data


def paired_outcomes(a: TaskResult, b: TaskResult) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """The per-example outcomes of two results on the same examples, ready for
    `phatgoose.paired`; a clear error when they are not comparable example by example."""
    if a.task != b.task:
        raise ValueError(f"cannot pair results of different tasks: {a.task!r} and {b.task!r}")
    if a.n != b.n:
        raise ValueError(
            f"task {a.task!r}: cannot pair results on {a.n} and {b.n} examples; "
            "a paired comparison needs the same examples"
        )
    for name, result in (("first", a), ("second", b)):
        if not result.has_outcomes:
            raise ValueError(
                f"task {a.task!r}: the {name} result has no per-example outcomes "
                "(recorded before they were kept); score it again"
            )
    return a.correct, b.correct


def evaluate_task(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    task: str,
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
    precision: Precision = "auto",
) -> TaskResult:
    """Rank-classification accuracy on multiple-choice examples (ties go to the first choice),
    scored in `precision` (recorded in the result)."""
    if not examples:
        raise ValueError(f"task {task!r}: no examples to evaluate")
    for index, example in enumerate(examples):
        if not example.choices or example.answer is None:
            raise ValueError(
                f"task {task!r}: example {index} is not multiple choice with an answer"
            )
    compute = resolve_precision(precision, next(model.parameters()).device)
    start = time.perf_counter()
    scores, scored_tokens = _score(
        model, tokenizer, examples, batch_size, max_length, progress, compute
    )
    seconds = time.perf_counter() - start
    predictions = tuple(predicted_choice(row) for row in scores)
    correct = tuple(
        predicted == example.answer
        for predicted, example in zip(predictions, examples, strict=True)
    )
    n = len(examples)
    accuracy = sum(correct) / n
    return TaskResult(
        task=task,
        accuracy=accuracy,
        stderr=math.sqrt(accuracy * (1 - accuracy) / n),
        n=n,
        seconds=seconds,
        scored_tokens=scored_tokens,
        precision=compute.name,
        predictions=predictions,
        correct=correct,
    )


def predicted_choice(scores: Sequence[float]) -> int:
    """The choice rank classification picks from one example's scores (ties go to the
    first choice)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def mean_with_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error, sqrt(sample variance / n) (0 for a single value): for
    paired differences on the same examples, the error of the mean difference."""
    if not values:
        raise ValueError("mean_with_stderr needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def mean_accuracy(results: Sequence[TaskResult]) -> float:
    """Unweighted mean over tasks (each task counts once, whatever its size)."""
    if not results:
        raise ValueError("mean_accuracy needs at least one task result")
    return sum(r.accuracy for r in results) / len(results)
