"""The zero-shot runner on a tiny model and tiny task files: structure and selection rules."""

import json
import math

import pytest
import torch

from benchmarks.zero_shot import (
    METHODS,
    PRIORITY,
    ROUTED_METHODS,
    ZeroShotConfig,
    best_individual_choice,
    load_config,
    markdown_table,
    oracle_choice,
    plot_means,
    run_zero_shot,
)
from phatgoose.evaluation import TaskResult
from protocol import METHOD_SPECS
from tests.tiny import tiny_llama, tiny_tokenizer

WORDS = ["red", "blue", "green", "gold"]


def write_task(root, name, choices, size):
    examples = []
    for i in range(size):
        word = WORDS[i % len(WORDS)]
        answer = choices[i % len(choices)]
        examples.append(
            {
                "input": f"{name} {word} {i}",
                "target_scores": {c: int(c == answer) for c in choices},
            }
        )
    (root / name).mkdir(parents=True)
    (root / name / "task.json").write_text(json.dumps({"name": name, "examples": examples}))


def letter_counts(texts):
    return torch.tensor(
        [[t.count("a") + 1.0, t.count("e") + 1.0, t.count("o") + 1.0] for t in texts]
    )


@pytest.fixture
def tasks_dir(tmp_path):
    root = tmp_path / "tasks"
    write_task(root, "alpha", ["yes", "no"], 14)
    write_task(root, "beta", ["up", "down", "left"], 14)
    write_task(root, "gamma", ["hot", "cold"], 6)
    return root


def tiny_config(**overrides):
    values = dict(
        held_in=["alpha", "beta"],
        held_out=["gamma"],
        n_eval=4,
        r=2,
        lora_alpha=4.0,
        steps=2,
        gate_steps=1,
        batch_size=2,
        learning_rate=1e-2,
        max_length=32,
        max_vector_examples=6,
        eval_batch_size=4,
    )
    values.update(overrides)
    return ZeroShotConfig(**values)


def test_runner_reports_every_method_per_task_with_n_and_stderr(tmp_path, tasks_dir):
    output = tmp_path / "out" / "result.json"
    record = run_zero_shot(
        tiny_config(),
        cache_dir=tmp_path / "cache",
        output=output,
        tasks_dir=tasks_dir,
        base_model=(tiny_llama(), tiny_tokenizer()),
        embedder=letter_counts,
        progress=False,
    )
    assert record["complete"]
    assert set(record["methods"]) == set(METHODS)
    for method, summary in record["methods"].items():
        assert set(summary["tasks"]) == {"alpha", "beta", "gamma"}, method
        for result in summary["tasks"].values():
            assert result["n"] == 4
            p = result["accuracy"]
            assert 0 <= p <= 1
            assert result["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 4))
            assert result["scored_tokens"] > 0
        assert summary["held_in_mean"]["tasks"] == 2
        assert summary["held_out_mean"]["tasks"] == 1
        assert summary["seconds_per_1k_scored_tokens"] > 0
    # oracle and best individual are taken from the single-expert results
    single = record["single_experts"]
    assert set(single) == {"alpha", "beta"}
    for task, expert in record["methods"]["oracle"]["choice"].items():
        assert record["methods"]["oracle"]["tasks"][task] == single[expert]["tasks"][task]
    best = record["methods"]["best_individual"]["choice"]
    assert record["methods"]["best_individual"]["tasks"] == single[best]["tasks"]
    assert json.loads(output.read_text())["complete"]
    assert "held-out mean" in markdown_table(record)
    assert plot_means(record, tmp_path / "plot.png").stat().st_size > 0


def test_rerun_loads_cached_experts_instead_of_training(tmp_path, tasks_dir):
    kwargs = dict(
        cache_dir=tmp_path / "cache",
        tasks_dir=tasks_dir,
        embedder=letter_counts,
        progress=False,
    )
    config = tiny_config(methods=["phatgoose"])
    first = run_zero_shot(config, base_model=(tiny_llama(), tiny_tokenizer()), **kwargs)
    second = run_zero_shot(config, base_model=(tiny_llama(), tiny_tokenizer()), **kwargs)
    assert [e["cached"] for e in first["experts"]] == [False, False]
    assert [e["cached"] for e in second["experts"]] == [True, True]
    assert second["methods"]["phatgoose"]["tasks"] == {
        t: {**r, "seconds": second["methods"]["phatgoose"]["tasks"][t]["seconds"]}
        for t, r in first["methods"]["phatgoose"]["tasks"].items()
    }
    # another hyper-parameter is another expert
    third = run_zero_shot(
        tiny_config(methods=["phatgoose"], steps=3),
        base_model=(tiny_llama(), tiny_tokenizer()),
        **kwargs,
    )
    assert [e["cached"] for e in third["experts"]] == [False, False]


def test_cached_only_reports_what_the_cache_holds_and_lists_the_rest(tmp_path, tasks_dir):
    kwargs = dict(
        cache_dir=tmp_path / "cache", tasks_dir=tasks_dir, embedder=letter_counts, progress=False
    )
    run_zero_shot(
        tiny_config(methods=["phatgoose"]), base_model=(tiny_llama(), tiny_tokenizer()), **kwargs
    )
    record = run_zero_shot(
        tiny_config(), base_model=(tiny_llama(), tiny_tokenizer()), cached_only=True, **kwargs
    )
    assert set(record["methods"]) == {"phatgoose"}
    assert set(record["not_run"]) == {
        "base",
        "merged",
        "single_experts",
        "arrow",
        "spectr",
        "phatgoose_example",
        "smear",
        "ties",
        "dare",
        "average_activation",
        "retrieval",
        "multitask",
    }
    assert not record["complete"]
    assert "Not run: multitask" in markdown_table(record)


def result(task, accuracy):
    return TaskResult(task=task, accuracy=accuracy, stderr=0.0, n=10, seconds=1.0, scored_tokens=10)


def test_oracle_picks_the_best_single_expert_per_task_first_on_ties():
    single = {
        "e1": {"t1": result("t1", 0.5), "t2": result("t2", 0.9), "t3": result("t3", 0.4)},
        "e2": {"t1": result("t1", 0.7), "t2": result("t2", 0.1), "t3": result("t3", 0.4)},
        "e3": {"t1": result("t1", 0.6), "t2": result("t2", 0.2), "t3": result("t3", 0.3)},
    }
    assert oracle_choice(single, ["t1", "t2", "t3"]) == {"t1": "e2", "t2": "e1", "t3": "e1"}


def test_best_individual_has_the_best_mean_over_tasks():
    single = {
        "e1": {"t1": result("t1", 0.9), "t2": result("t2", 0.1)},  # mean 0.5
        "e2": {"t1": result("t1", 0.6), "t2": result("t2", 0.6)},  # mean 0.6
        "e3": {"t1": result("t1", 0.2), "t2": result("t2", 0.8)},  # mean 0.5
    }
    assert best_individual_choice(single, ["t1", "t2"]) == "e2"
    assert best_individual_choice(single, ["t1"]) == "e1"
    assert best_individual_choice(single, ["t2"]) == "e3"


def test_config_layers_preset_file_and_overrides(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('steps = 5\nheld_out = ["winowhy"]\n')
    config = load_config("cpu", path, {"n_eval": 7, "r": None})
    assert (config.steps, config.held_out, config.n_eval, config.r) == (5, ["winowhy"], 7, 8)
    assert config.resolved_multitask_steps == 5 * len(config.held_in)
    with pytest.raises(ValueError, match="unknown setting"):
        load_config("cpu", None, {"stepz": 3})
    with pytest.raises(ValueError, match="both held-in and held-out"):
        load_config(None, None, {"held_in": ["a"], "held_out": ["a"]})


def test_the_benchmark_scores_every_routing_method_but_single_in_evaluation_order():
    assert set(ROUTED_METHODS) == {n for n, s in METHOD_SPECS.items() if not s.single_expert}
    assert ROUTED_METHODS == ("base", "phatgoose", "merged", "arrow", "spectr",
                              "phatgoose_example", "smear", "ties", "dare",
                              "average_activation", "retrieval")  # fmt: skip
    assert list(ROUTED_METHODS) == [m for m in PRIORITY if m in METHOD_SPECS]
    assert METHODS[len(ROUTED_METHODS) :] == ("oracle", "best_individual", "multitask")


def test_the_run_records_its_resolved_precision_and_caches_per_precision(tmp_path, tasks_dir):
    kwargs = dict(
        cache_dir=tmp_path / "cache", tasks_dir=tasks_dir, embedder=letter_counts, progress=False
    )
    auto = run_zero_shot(
        tiny_config(methods=["phatgoose"]), base_model=(tiny_llama(), tiny_tokenizer()), **kwargs
    )
    # `auto` is pinned to float32 for the suite; the record says what ran and why.
    assert auto["precision"] == {
        "precision": "float32",
        "requested": "auto",
        "reason": "PHATGOOSE_PRECISION=float32",
    }
    assert {r["precision"] for r in auto["methods"]["phatgoose"]["tasks"].values()} == {"float32"}
    # float32 asked for explicitly is what auto resolved to: the same cached experts.
    explicit = run_zero_shot(
        tiny_config(methods=["phatgoose"], precision="float32"),
        base_model=(tiny_llama(), tiny_tokenizer()),
        **kwargs,
    )
    assert [e["cached"] for e in explicit["experts"]] == [True, True]
    low = run_zero_shot(
        tiny_config(methods=["phatgoose"], precision="bfloat16"),
        base_model=(tiny_llama(), tiny_tokenizer()),
        **kwargs,
    )
    assert [e["cached"] for e in low["experts"]] == [False, False]  # other experts
    assert low["precision"]["precision"] == "bfloat16"
    assert {r["precision"] for r in low["methods"]["phatgoose"]["tasks"].values()} == {"bfloat16"}
