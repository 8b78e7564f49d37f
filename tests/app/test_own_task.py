"""Each demo expert on its own task: expert and base on the same examples, paired gain."""

import math

import pytest
from torch import nn

from app.demo import own_task_grid, own_task_verdict
from app.own_task import OwnTaskScore, own_task_scores, paired_gain
from phatgoose.data import Example
from phatgoose.evaluation import evaluate_task
from phatgoose.routing import RoutedLinear, build_routed_model, unroute_model
from tests.phatgoose.experts import random_expert

EXAMPLES = [
    Example(prompt=f"{word} is a", choices=("colour", "number", "animal"), answer=i % 3)
    for i, word in enumerate(["red", "two", "cat", "blue", "nine", "dog", "green", "ten"])
]


def test_the_gain_is_the_mean_paired_difference_with_its_standard_error():
    expert = [True, True, False, True]
    base = [False, True, False, False]

    gain, stderr = paired_gain(expert, base)

    # differences 1, 0, 0, 1: mean 0.5, sample variance 1/3
    assert gain == 0.5
    assert stderr == pytest.approx(math.sqrt(1 / 3 / 4))


def test_models_that_agree_everywhere_have_no_gain_and_no_error():
    assert paired_gain([True, False, True], [True, False, True]) == (0.0, 0.0)


def test_paired_outcomes_must_be_paired():
    with pytest.raises(ValueError, match="equal, non-zero counts: 2, 1"):
        paired_gain([True, False], [True])


def test_expert_and_base_accuracies_are_those_evaluate_task_gives(llama, tokenizer):
    expert = random_expert(llama, name="colours", rank=4, seed=3)
    base = evaluate_task(llama, tokenizer, EXAMPLES, task="t", batch_size=3, progress=False)
    build_routed_model(llama, [expert], method="single", expert="colours")
    alone = evaluate_task(llama, tokenizer, EXAMPLES, task="t", batch_size=3, progress=False)
    unroute_model(llama)

    [score] = own_task_scores(
        llama,
        tokenizer,
        [("demo-1/colours@1", expert, "colours_task", EXAMPLES)],
        batch_size=3,
        max_length=64,
    )

    assert (score.expert, score.task, score.n) == ("demo-1/colours@1", "colours_task", 8)
    assert score.base_accuracy == base.accuracy
    assert score.expert_accuracy == alone.accuracy
    assert score.gain == pytest.approx(alone.accuracy - base.accuracy)
    assert score.expert_only - score.base_only == round(score.gain * score.n)
    # The model is handed back as it came: no routed linear left in it.
    assert not any(isinstance(m, RoutedLinear) for m in llama.modules())
    assert all(type(m) is nn.Linear for n, m in llama.named_modules() if n.endswith("q_proj"))


def test_the_demo_prints_accuracies_gain_and_a_verdict():
    scores = [
        OwnTaskScore("demo-1/navigate@1", "navigate", 40, 0.70, 0.50, 0.20, 0.07, 10, 2),
        OwnTaskScore("demo-2/hyperbaton@1", "hyperbaton", 40, 0.55, 0.50, 0.05, 0.04, 4, 2),
        OwnTaskScore("demo-3/colors@1", "colors", 40, 0.40, 0.45, -0.05, 0.03, 1, 3),
    ]

    grid = own_task_grid(scores)

    assert grid.rows[0] == ("navigate", "40", "0.70", "0.50", "+0.20 ± 0.07", "10 / 2")
    assert grid.rows[2][4] == "-0.05 ± 0.03"
    assert own_task_verdict(scores) == (
        "2 of 3 expert(s) beat the base model on their own task, 1 by more than two "
        "standard errors; not: colors"
    )
