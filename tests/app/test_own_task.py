"""Each demo expert on its own task: expert and base on the same examples, paired gain."""

import pytest
from torch import nn

from app.demo import own_task_grid, own_task_verdict
from app.own_task import OwnTaskScore, own_task_scores
from phatgoose.data import Example
from phatgoose.evaluation import evaluate_task
from phatgoose.paired import PairedDifference, paired_difference
from phatgoose.routing import RoutedLinear, build_routed_model, unroute_model
from tests.phatgoose.experts import random_expert

EXAMPLES = [
    Example(prompt=f"{word} is a", choices=("colour", "number", "animal"), answer=i % 3)
    for i, word in enumerate(["red", "two", "cat", "blue", "nine", "dog", "green", "ten"])
]


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
    # the gain is phatgoose.paired's, on the two models' per-example outcomes
    assert score.gain == paired_difference(alone.correct, base.correct)
    assert score.gain.delta == pytest.approx(alone.accuracy - base.accuracy)
    # The model is handed back as it came: no routed linear left in it.
    assert not any(isinstance(m, RoutedLinear) for m in llama.modules())
    assert all(type(m) is nn.Linear for n, m in llama.named_modules() if n.endswith("q_proj"))


def gain(delta, low, high, p_value, a_only, b_only, n=40):
    return PairedDifference(delta, low, high, p_value, n, a_only, b_only)


def test_the_demo_prints_accuracies_the_paired_gain_and_a_verdict():
    scores = [
        OwnTaskScore(
            "demo-1/navigate@1", "navigate", 0.70, 0.50, gain(0.20, 0.08, 0.32, 0.0386, 10, 2)
        ),
        OwnTaskScore(
            "demo-2/hyperbaton@1", "hyperbaton", 0.55, 0.50, gain(0.05, -0.05, 0.15, 0.6875, 4, 2)
        ),
        OwnTaskScore(
            "demo-3/colors@1", "colors", 0.40, 0.45, gain(-0.05, -0.15, 0.05, 0.625, 1, 3)
        ),
        OwnTaskScore(
            "demo-4/dates@1", "dates", 0.10, 0.60, gain(-0.50, -0.65, -0.35, 0.00001, 0, 20)
        ),
    ]

    grid = own_task_grid(scores)

    assert grid.rows[0] == (
        "navigate", "40", "0.70", "0.50", "+0.20 [+0.08, +0.32] ▲", "0.039", "10 / 2",
    )  # fmt: skip
    # marked only where the interval excludes 0, ▼ below it
    assert grid.rows[1][4] == "+0.05 [-0.05, +0.15]"
    assert grid.rows[2][4] == "-0.05 [-0.15, +0.05]"
    assert grid.rows[3][4:6] == ("-0.50 [-0.65, -0.35] ▼", "<0.001")
    assert own_task_verdict(scores) == (
        "2 of 4 expert(s) beat the base model on their own task, 1 with a 95% interval "
        "above 0; not: colors, dates"
    )
