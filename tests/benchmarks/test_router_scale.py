"""The router-scale measurement on a tiny model: what it reports, and its paired statistics."""

import pytest

from benchmarks.router_scale import (
    TaskOutcome,
    markdown,
    paired_difference,
    run_router_scale,
)
from benchmarks.zero_shot import BenchmarkTask, ZeroShotConfig
from phatgoose.data import Example
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama, tiny_tokenizer


def examples(word, answers, size):
    return [
        Example(prompt=f"{word} {i}", choices=answers, answer=i % len(answers)) for i in range(size)
    ]


def test_identical_outcomes_differ_by_exactly_zero():
    outcome = TaskOutcome("alpha", [True, False, True, True], 0.5)
    difference = paired_difference([outcome], [outcome])
    assert difference == {
        "mean_difference": 0.0,
        "ci95_low": 0.0,
        "ci95_high": 0.0,
        "p_value": 1.0,
        "examples_gained": 0,
        "examples_lost": 0,
    }


def test_a_paired_difference_counts_gains_and_losses_per_example():
    before = [TaskOutcome("a", [True, False, False, False], 0.5)]
    after = [TaskOutcome("a", [False, True, True, False], 0.5)]
    difference = paired_difference(before, after)
    assert difference["mean_difference"] == pytest.approx(0.25)
    assert (difference["examples_gained"], difference["examples_lost"]) == (2, 1)
    assert difference["p_value"] == 1.0  # 2 vs 1 discordant: nothing to tell
    assert difference["ci95_low"] <= 0.25 <= difference["ci95_high"]


def test_unpaired_outcomes_are_refused():
    with pytest.raises(ValueError, match="unpaired"):
        paired_difference([TaskOutcome("a", [True], 0.5)], [TaskOutcome("b", [True], 0.5)])


def test_the_record_covers_both_numerics_and_the_longer_gates():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    tasks = [
        BenchmarkTask(name, True, examples(word, answers, 4), examples(word, answers, 8))
        for name, word, answers in [
            ("alpha", "red", ("yes", "no")),
            ("beta", "blue", ("up", "down")),
        ]
    ]
    experts = [
        random_expert(model, name=f"bench/{t.name}", rank=2, seed=z) for z, t in enumerate(tasks)
    ]
    config = ZeroShotConfig(
        held_in=["alpha", "beta"], held_out=[], n_eval=4, r=2, lora_alpha=4.0, steps=2,
        gate_steps=1, batch_size=2, max_length=32, eval_batch_size=4,
    )  # fmt: skip
    record = run_router_scale(
        model, tokenizer, experts, tasks, config, more_gate_steps=(2,), say=lambda _: None
    )
    assert record["tasks"] == ["alpha", "beta"]
    assert set(record["numerics"]) == {"1", "2"}
    for summary in [record["numerics"]["1"], record["numerics"]["2"]]:
        assert 0 <= summary["mean_accuracy"] <= 1
        assert all(0 <= share <= 1 for share in summary["own_expert_share"].values())
    longer = record["gate_steps"]["2"]
    assert set(longer["final_gate_loss"]) == {"bench/alpha", "bench/beta"}
    assert [len(curve) for curve in longer["gate_loss_curve"].values()] == [2, 2]
    assert longer["gates"]["bench/alpha"]["modules"] == len(experts[0].gates)
    assert "numerics 2 (2)" in markdown(record)
