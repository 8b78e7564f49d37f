import contextlib
import copy
import dataclasses
import json
import math

import pytest
import torch

from phatgoose import evaluation
from phatgoose.data import Example, continuation_ids, prompt_ids
from phatgoose.evaluation import (
    TaskResult,
    evaluate_task,
    mean_accuracy,
    paired_outcomes,
    score_choices,
)
from phatgoose.routing import build_routed_model
from tests.phatgoose.experts import random_expert

# Prompts of different lengths in one batch, with and without trailing whitespace.
EXAMPLES = [
    Example(prompt="Q: is the sky blue?\nA:", choices=("yes", "no"), answer=0),
    Example(prompt="2+2=", choices=("4", "five", "22"), answer=0),
    Example(
        prompt="A much longer prompt, so that rows need padding.\nAnswer:\n",
        choices=("ok", "not ok"),
        answer=1,
    ),
]


def reference_score(model, tokenizer, prompt: str, choice: str) -> float:
    """Mean log-prob of the choice tokens, from one unpadded sequence."""
    context = prompt_ids(tokenizer, prompt)
    target = continuation_ids(tokenizer, prompt, choice, add_eos=False)
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            logits = model(input_ids=torch.tensor([context]), labels=torch.tensor([target])).logits[
                0
            ]
            logprobs = torch.log_softmax(logits, -1)
            picked = [logprobs[j, t] for j, t in enumerate(target)]
        else:
            logits = model(input_ids=torch.tensor([context + target])).logits[0]
            logprobs = torch.log_softmax(logits, -1)
            picked = [logprobs[len(context) + j - 1, t] for j, t in enumerate(target)]
    return float(sum(picked) / len(picked))


def test_batched_scores_equal_unbatched_reference(tiny_model, tokenizer):
    scores = score_choices(tiny_model, tokenizer, EXAMPLES, batch_size=4, progress=False)
    for example, row in zip(EXAMPLES, scores, strict=True):
        expected = [
            reference_score(tiny_model, tokenizer, example.prompt, c) for c in example.choices
        ]
        assert row == pytest.approx(expected, abs=1e-5)


def test_scores_do_not_depend_on_batch_size(tiny_model, tokenizer):
    one = score_choices(tiny_model, tokenizer, EXAMPLES, batch_size=1, progress=False)
    many = score_choices(tiny_model, tokenizer, EXAMPLES, batch_size=16, progress=False)
    assert [s for row in many for s in row] == pytest.approx(
        [s for row in one for s in row], abs=1e-5
    )


def test_choice_after_newline_is_not_preceded_by_a_space(llama, tokenizer):
    newline = Example(prompt="A:\n", choices=("yes",), answer=0)
    spaced = Example(prompt="A:", choices=("yes",), answer=0)
    (newline_score,), (spaced_score,) = score_choices(
        llama, tokenizer, [newline, spaced], progress=False
    )
    assert newline_score == pytest.approx(
        reference_score(llama, tokenizer, "A:\n", "yes"), abs=1e-5
    )
    assert spaced_score == pytest.approx(reference_score(llama, tokenizer, "A:", "yes"), abs=1e-5)
    # "yes" is 3 tokens after a newline, " yes" 4 tokens after "A:": different scores.
    assert len(continuation_ids(tokenizer, "A:\n", "yes", add_eos=False)) == 3
    assert len(continuation_ids(tokenizer, "A:", "yes", add_eos=False)) == 4
    assert newline_score != pytest.approx(spaced_score, abs=1e-6)


def test_long_prompts_are_truncated_from_the_left(llama, tokenizer):
    long_prompt = "x" * 100 + "The end:"
    truncated = score_choices(
        llama, tokenizer, [Example(long_prompt, ("a", "b"), 0)], max_length=12, progress=False
    )
    # 12 tokens = the last 10 prompt characters + " a" (2 tokens).
    expected = reference_score(llama, tokenizer, long_prompt[-10:], "a")
    assert truncated[0][0] == pytest.approx(expected, abs=1e-5)


class FixedScorer(torch.nn.Module):
    """A causal "model" whose next-token log-probs prefer one character everywhere."""

    def __init__(self, tokenizer, favourite: str) -> None:
        super().__init__()
        self.config = type("Config", (), {"is_encoder_decoder": False})()
        self.vocab = len(tokenizer)
        self.favourite = tokenizer.convert_tokens_to_ids(favourite)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favourite] = 10.0
        return type("Output", (), {"logits": logits})()


def test_accuracy_and_stderr_on_a_constructed_case(tokenizer):
    model = FixedScorer(tokenizer, "b")
    examples = [
        Example("Q:\n", ("a", "b"), answer=1),  # predicts "b": right
        Example("Q:\n", ("b", "a"), answer=0),  # right
        Example("Q:\n", ("a", "b"), answer=0),  # wrong
        Example("Q:\n", ("bb", "a", "c"), answer=0),  # right
    ]
    result = evaluate_task(model, tokenizer, examples, task="constructed", progress=False)
    assert result.task == "constructed"
    assert result.n == 4
    assert result.accuracy == 0.75
    assert result.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert result.scored_tokens == 2 + 2 + 2 + 4
    assert result.to_dict()["accuracy"] == 0.75
    assert result.predictions == (1, 0, 1, 0)  # the index of "b" (or of the longest "bb")
    assert result.correct == (True, True, False, True)


def test_a_result_with_outcomes_survives_json():
    result = TaskResult(
        "t", 0.5, 0.25, n=2, seconds=1.0, scored_tokens=4, predictions=(2, 0), correct=(True, False)
    )
    loaded = TaskResult(**json.loads(json.dumps(result.to_dict())))
    assert loaded == result
    assert loaded.has_outcomes


def test_a_result_recorded_without_outcomes_still_loads():
    old = {"task": "t", "accuracy": 1.0, "stderr": 0.0, "n": 3, "seconds": 1.0, "scored_tokens": 3}
    result = TaskResult(**old)
    assert result.correct == () and not result.has_outcomes


def test_outcomes_must_match_the_number_of_examples():
    with pytest.raises(ValueError, match="task 't': 1 per-example outcomes for n=2"):
        TaskResult("t", 1.0, 0.0, n=2, seconds=1.0, scored_tokens=2, correct=(True,))


def test_paired_outcomes_pairs_results_on_the_same_examples():
    a = TaskResult("t", 0.5, 0.0, 2, 1.0, 2, predictions=(0, 1), correct=(True, False))
    b = TaskResult("t", 1.0, 0.0, 2, 1.0, 2, predictions=(0, 0), correct=(True, True))
    assert paired_outcomes(a, b) == ((True, False), (True, True))
    with pytest.raises(ValueError, match="different tasks: 't' and 'u'"):
        paired_outcomes(a, dataclasses.replace(b, task="u"))
    with pytest.raises(ValueError, match="on 2 and 1 examples"):
        paired_outcomes(a, TaskResult("t", 1.0, 0.0, 1, 1.0, 1, correct=(True,)))
    with pytest.raises(ValueError, match="the second result has no per-example outcomes"):
        paired_outcomes(a, TaskResult("t", 1.0, 0.0, 2, 1.0, 2))


def test_ties_go_to_the_first_choice(tokenizer):
    model = FixedScorer(tokenizer, "z")
    examples = [Example("Q:\n", ("a", "b"), answer=0), Example("Q:\n", ("a", "b"), answer=1)]
    assert evaluate_task(model, tokenizer, examples, task="t", progress=False).accuracy == 0.5


def test_mean_accuracy_weights_tasks_equally():
    results = [
        TaskResult("a", accuracy=1.0, stderr=0.0, n=10, seconds=1.0, scored_tokens=10),
        TaskResult("b", accuracy=0.5, stderr=0.1, n=1000, seconds=1.0, scored_tokens=10),
    ]
    assert mean_accuracy(results) == 0.75


def test_evaluate_task_rejects_examples_without_an_answer(llama, tokenizer):
    with pytest.raises(ValueError, match="example 1 is not multiple choice"):
        evaluate_task(llama, tokenizer, [EXAMPLES[0], Example("free", target="text")], task="t")


def test_an_empty_prompt_is_scored_after_the_eos_token(llama, tokenizer):
    # BIG-bench's misconceptions_russian has no input: its choices are bare statements.
    scores = score_choices(llama, tokenizer, [Example("", ("ab", "c"), 0)], progress=False)
    eos = tokenizer.eos_token_id
    for choice, score in zip(("ab", "c"), scores[0], strict=True):
        target = continuation_ids(tokenizer, "", choice, add_eos=False)
        with torch.no_grad():
            logprobs = torch.log_softmax(
                llama(input_ids=torch.tensor([[eos, *target]])).logits[0], -1
            )
        expected = sum(float(logprobs[j, t]) for j, t in enumerate(target)) / len(target)
        assert score == pytest.approx(expected, abs=1e-5)


def test_encoder_decoder_prompts_are_truncated_to_max_length(t5, tokenizer):
    long_prompt = "y" * 50 + "Last:"
    truncated = score_choices(
        t5, tokenizer, [Example(long_prompt, ("ab", "c"), 0)], max_length=8, progress=False
    )
    expected = reference_score(t5, tokenizer, long_prompt[-8:], "ab")
    assert truncated[0][0] == pytest.approx(expected, abs=1e-5)


def test_each_forward_sees_the_prompt_of_every_row(monkeypatch, llama, tokenizer):
    # A retrieval router routes row r by the text `queries` gives it: row r's own prompt.
    current: list[str] = []
    forwards: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []

    @contextlib.contextmanager
    def recording_queries(model, texts):
        current[:] = texts
        yield

    def record(_module, _args, kwargs):
        forwards.append((list(current), kwargs["input_ids"], kwargs["attention_mask"]))

    monkeypatch.setattr(evaluation, "queries", recording_queries)
    llama.register_forward_pre_hook(record, with_kwargs=True)
    score_choices(llama, tokenizer, EXAMPLES, batch_size=4, progress=False)

    by_prompt = {e.prompt: e for e in EXAMPLES}
    prompts_read = []
    for texts, input_ids, mask in forwards:
        assert len(texts) == input_ids.shape[0]
        for text, ids, row_mask in zip(texts, input_ids.tolist(), mask.tolist(), strict=True):
            # The choices' pass also masks the cached prompt: its own tokens are the last.
            real = [t for t, m in zip(ids, row_mask[-len(ids) :], strict=True) if m]
            choices = [
                continuation_ids(tokenizer, text, c, add_eos=False) for c in by_prompt[text].choices
            ]
            if real == prompt_ids(tokenizer, text):  # the prompt pass: each prompt once
                prompts_read.append(text)
            else:  # the choices' pass: a choice of this row's example, without its last token
                assert real in [c[:-1] for c in choices]
    assert sorted(prompts_read) == sorted(e.prompt for e in EXAMPLES)
    # At most 4 (example, choice) rows per batch, longest first: examples {2, 0}, then {1};
    # each batch is read as its prompts, then as its choices after the cached prompts.
    assert [input_ids.shape[0] for _, input_ids, _ in forwards] == [2, 4, 1, 3]


def test_routed_model_scores_equal_its_unbatched_reference(tiny_model, tokenizer):
    # PHATGOOSE routes every token on its own, so padding in a batch must change nothing.
    experts = [random_expert(tiny_model, name=f"e{i}", rank=2, seed=i) for i in range(3)]
    routed = build_routed_model(tiny_model, experts, method="phatgoose", top_k=2)
    scores = score_choices(routed, tokenizer, EXAMPLES, batch_size=8, progress=False)
    for example, row in zip(EXAMPLES, scores, strict=True):
        expected = [reference_score(routed, tokenizer, example.prompt, c) for c in example.choices]
        assert row == pytest.approx(expected, abs=1e-5)


def test_one_token_choices_are_scored_from_the_prompt_forward_alone(llama, tokenizer):
    # After "\n", a one-character choice is one token: no second forward for it, while "bc"
    # in the same batch needs one.
    examples = [Example("Pick:\n", ("a", "bc", "d"), 0), Example("Then:\n", ("x", "y"), 1)]
    assert len(continuation_ids(tokenizer, "Pick:\n", "a", add_eos=False)) == 1
    scores = score_choices(llama, tokenizer, examples, batch_size=8, progress=False)
    for example, row in zip(examples, scores, strict=True):
        expected = [reference_score(llama, tokenizer, example.prompt, c) for c in example.choices]
        assert row == pytest.approx(expected, abs=1e-5)


def test_peft_and_retrieval_models_score_as_one_sequence_per_choice(llama, tokenizer):
    from peft import LoraConfig, get_peft_model

    from phatgoose.routing import queries
    from tests.phatgoose.test_routing_retrieval import letter_counts, retrieval_experts

    peft_model = get_peft_model(
        copy.deepcopy(llama),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    retrieval = build_routed_model(
        copy.deepcopy(llama), retrieval_experts(llama), "retrieval", embedder=letter_counts
    )
    for model in (peft_model, retrieval):
        scores = score_choices(model, tokenizer, EXAMPLES, batch_size=4, progress=False)
        for example, row in zip(EXAMPLES, scores, strict=True):
            with queries(model, [example.prompt]):
                expected = [
                    reference_score(model, tokenizer, example.prompt, c) for c in example.choices
                ]
            assert row == pytest.approx(expected, abs=1e-5)
