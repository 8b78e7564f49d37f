"""The precision benchmark on a tiny model: both precisions run, losses are paired, and the
scoring comparison counts what it says."""

import pytest

from benchmarks.precision_effects import (
    markdown,
    matmul_speed,
    scoring_agreement,
    stage_timings,
)
from benchmarks.zero_shot import load_tasks
from phatgoose.models import model_fingerprint
from protocol import BaseModelIdentity
from tests.benchmarks.test_zero_shot import letter_counts, tasks_dir, tiny_config  # noqa: F401
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama, tiny_tokenizer


def test_stages_train_in_both_precisions_and_pair_the_validation_losses(tasks_dir):  # noqa: F811
    config = tiny_config(validation_fraction=0.3)
    task = next(t for t in load_tasks(config, tasks_dir) if t.held_in)
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    base = BaseModelIdentity(name="tiny", fingerprint=model_fingerprint(model))
    record = stage_timings(model, tokenizer, task, config, base=base, say=lambda _m: None)
    runs = record["runs"]
    assert set(runs) == {"float32", "bfloat16"}
    for run in runs.values():
        assert run["lora_seconds"] > 0 and run["gate_seconds"] > 0
        assert run["lora_steps"] == config.steps
    assert set(record["speedup_bf16_over_fp32"]) == {
        "lora_seconds",
        "gate_seconds",
        "vector_seconds",
    }
    validation = record["validation"]
    assert validation["n"] >= 1
    # The paired mean is the difference of the two means (same examples, same order).
    difference = validation["bfloat16_expert"]["mean"] - validation["float32_expert"]["mean"]
    assert validation["paired"]["mean"] == pytest.approx(difference)
    assert "| lora |" in markdown({"stages": record})


def test_scoring_compares_both_precisions_on_the_same_examples(tasks_dir):  # noqa: F811
    config = tiny_config()
    tasks = load_tasks(config, tasks_dir)
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    experts = [random_expert(model, name=f"e{i}", rank=2, seed=i) for i in range(3)]
    record = scoring_agreement(model, tokenizer, tasks, experts, config, say=lambda _m: None)
    assert set(record) == {"base", "phatgoose"}
    for method, rows in record.items():
        assert set(rows) == {t.name for t in tasks}, method
        for row in rows.values():
            assert row["n"] == config.n_eval
            assert 0 <= row["agree"] <= row["n"]
            accuracy = row["accuracy"]
            paired = accuracy["bfloat16"]["mean"] - accuracy["float32"]["mean"]
            assert row["bf16_minus_fp32"]["mean"] == pytest.approx(paired)
            # Mean log-probabilities of a tiny random model move by well under 0.1.
            assert 0 < row["max_abs_score_difference"] < 0.1
    table = markdown({"scoring": record})
    assert "| base | all |" in table and "| phatgoose | all |" in table


def test_matmul_speed_times_both_precisions_of_both_shapes():
    record = matmul_speed(repeats=1)
    assert set(record["products"]) == {"1024x576x576", "1024x576x1536"}
    for row in record["products"].values():
        assert row["float32_ms"] > 0 and row["bfloat16_ms"] > 0
        assert row["speedup"] == pytest.approx(row["float32_ms"] / row["bfloat16_ms"])
    assert "| 1024x576x1536 |" in markdown({"matmul": record})
