"""The zero-shot runner on a tiny model and tiny task files: structure and selection rules."""

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.zero_shot import (
    METHODS,
    PAIRED_SETTINGS,
    PRIORITY,
    ROUTED_METHODS,
    SPECTR_CANDIDATES,
    EvaluationCache,
    ZeroShotConfig,
    add_paired_differences,
    best_individual_choice,
    cache_key,
    load_config,
    load_tasks,
    markdown_table,
    oracle_choice,
    paired_table,
    plot_means,
    record_json,
    run_zero_shot,
)
from phatgoose.bigbench import HELD_IN_TASKS, HELD_OUT_TASKS, load_bigbench_task
from phatgoose.evaluation import TaskResult
from phatgoose.paired import paired_difference, paired_mean_difference
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
        n_eval_held_out=4,
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
    assert json.loads(output.read_text()) == record
    assert "held-out mean" in markdown_table(record)
    assert plot_means(record, tmp_path / "plot.png").stat().st_size > 0


def test_runner_compares_every_method_with_base_and_phatgoose_example_by_example(
    tmp_path, tasks_dir
):
    record = run_zero_shot(
        tiny_config(methods=["base", "phatgoose", "merged"]),
        cache_dir=tmp_path / "cache",
        tasks_dir=tasks_dir,
        base_model=(tiny_llama(), tiny_tokenizer()),
        embedder=letter_counts,
        progress=False,
    )
    methods = record["methods"]
    for summary in methods.values():
        for result in summary["tasks"].values():
            assert len(result["correct"]) == len(result["predictions"]) == 4
            assert sum(result["correct"]) / 4 == result["accuracy"]
    assert set(methods["base"]["paired"]) == {"phatgoose"}
    assert set(methods["phatgoose"]["paired"]) == {"base"}
    assert set(methods["merged"]["paired"]) == {"base", "phatgoose"}
    vs_base = methods["merged"]["paired"]["base"]
    merged, base = methods["merged"]["tasks"], methods["base"]["tasks"]
    for task in ("alpha", "beta", "gamma"):
        expected = paired_difference(merged[task]["correct"], base[task]["correct"])
        assert vs_base["tasks"][task] == expected.to_dict()
        assert vs_base["tasks"][task]["delta"] == pytest.approx(
            merged[task]["accuracy"] - base[task]["accuracy"]
        )
    held_in = {t: (merged[t]["correct"], base[t]["correct"]) for t in ("alpha", "beta")}
    assert vs_base["held_in_mean"] == paired_mean_difference(held_in).to_dict()
    assert vs_base["held_out_mean"]["n"] == 4
    assert record["paired_statistics"]["references"] == ["base", "phatgoose"]
    report = markdown_table(record)
    assert "Paired difference from base" in report
    assert "Paired difference from phatgoose" in report


def outcomes_result(task, correct):
    return TaskResult(
        task=task,
        accuracy=sum(correct) / len(correct),
        stderr=0.0,
        n=len(correct),
        seconds=1.0,
        scored_tokens=len(correct),
        predictions=tuple(0 if c else 1 for c in correct),
        correct=tuple(correct),
    )


def constructed_record():
    """base, phatgoose and merged on one held-in and one held-out task of 40 examples:
    phatgoose gets the held-in task right where the base fails; merged is the base."""
    base = {"inner": [False] * 40, "outer": [True, False] * 20}
    phatgoose = {"inner": [True] * 40, "outer": [True] * 20 + [False] * 20}
    return {
        "tasks": {
            "inner": {"held_in": True, "n_scored": 40},
            "outer": {"held_in": False, "n_scored": 40},
        },
        "methods": {
            name: {"tasks": {t: outcomes_result(t, c).to_dict() for t, c in outcomes.items()}}
            for name, outcomes in (("base", base), ("phatgoose", phatgoose), ("merged", base))
        },
    }


def test_paired_table_marks_a_difference_only_where_its_interval_excludes_zero():
    record = constructed_record()
    add_paired_differences(record)
    phatgoose = record["methods"]["phatgoose"]["paired"]["base"]
    assert (
        phatgoose["tasks"]["inner"]["delta"] == 1.0 and phatgoose["tasks"]["inner"]["significant"]
    )
    assert phatgoose["tasks"]["outer"]["delta"] == 0.0
    assert not phatgoose["tasks"]["outer"]["significant"]  # 10 gained, 10 lost
    table = paired_table(record, "base")
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    # columns: phatgoose, merged (the base is not compared with itself)
    assert rows["| task"] == "| task | phatgoose | merged |"
    assert (
        rows["| inner (held-in)"]
        == "| inner (held-in) | +100.0 [+100.0, +100.0] ▲ | +0.0 [+0.0, +0.0] |"
    )
    assert rows["| outer"].startswith("| outer | +0.0 [-")
    assert "▲" not in rows["| outer"] and "▼" not in rows["| outer"]
    assert "| **held-in mean** | **+100.0 [+100.0, +100.0] ▲** p=1.8e-12 |" in table
    vs_phatgoose = paired_table(record, "phatgoose")
    assert "| inner (held-in) | -100.0 [-100.0, -100.0] ▼ | -100.0 [-100.0, -100.0] ▼ |" in (
        vs_phatgoose
    )


def test_paired_differences_already_computed_are_kept():
    record = constructed_record()
    add_paired_differences(record)
    first = record["methods"]["merged"]["paired"]
    add_paired_differences(record)
    assert record["methods"]["merged"]["paired"] is first
    assert PAIRED_SETTINGS["confidence"] == 0.95


def test_a_cached_result_without_outcomes_is_a_miss(tmp_path):
    cache = EvaluationCache(tmp_path, tiny_config(), "fingerprint")
    identity = {"method": "base"}
    old = result("alpha", 0.5)  # as cached before outcomes were kept
    cache.put(identity, old)
    assert cache.get(identity, "alpha") is None
    new = outcomes_result("alpha", [True, False] * 5)
    cache.put(identity, new)  # the re-scored result replaces it
    assert cache.get(identity, "alpha") == new


def test_the_record_json_keeps_lists_of_scalars_on_one_line():
    record = {
        "correct": [True, False, True],
        "predictions": [0, 2, 1],
        "names": ["a", "b"],
        "why": "not in the cache ([1,\n 2])",
        "nested": {"values": [0.5, -1e-05, None]},
    }
    text = record_json(record)
    assert json.loads(text) == record
    assert '"correct": [true, false, true]' in text
    assert '"predictions": [0, 2, 1]' in text
    assert '"values": [0.5, -1e-05, null]' in text
    assert '"names": [\n    "a",' in text  # strings keep json's layout


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


def test_spectr_settings_are_chosen_on_held_in_tasks_only(tmp_path, tasks_dir):
    record = run_zero_shot(
        tiny_config(methods=["spectr"]),
        cache_dir=tmp_path / "cache",
        tasks_dir=tasks_dir,
        base_model=(tiny_llama(), tiny_tokenizer()),
        embedder=letter_counts,
        progress=False,
    )
    spectr = record["methods"]["spectr"]
    selection = spectr["selection"]
    assert selection["tasks"] == ["alpha", "beta"]
    assert [c["params"] for c in selection["candidates"]] == list(SPECTR_CANDIDATES)
    means = [c["held_in_mean"] for c in selection["candidates"]]
    assert selection["chosen"] == selection["candidates"][means.index(max(means))]["params"]
    assert spectr["params"] == selection["chosen"]
    assert spectr["held_in_mean"]["accuracy"] == pytest.approx(max(means))
    # Four settings scored on the two held-in tasks; only the chosen one on the held-out.
    assert len(list((tmp_path / "cache" / "evaluations").glob("*.json"))) == 4 * 2 + 1


def test_one_candidate_fixes_the_parameters_and_bad_candidates_are_refused():
    fixed = tiny_config(param_candidates={"spectr": [{"score": "spectrum"}]})
    assert fixed.param_candidates == {"spectr": [{"score": "spectrum"}]}
    with pytest.raises(ValueError, match="'phatgoose' is not a method with parameters"):
        tiny_config(param_candidates={"phatgoose": [{}]})
    with pytest.raises(ValueError, match=r"param_candidates\['ties'\]: .*'density'"):
        tiny_config(param_candidates={"ties": [{"density": 2.0}]})
    with pytest.raises(ValueError, match="at least one setting"):
        tiny_config(param_candidates={"dare": []})


def scored_files(cache_dir):
    return set((cache_dir / "evaluations").glob("*.json"))


def test_held_out_tasks_score_up_to_n_eval_held_out_examples_of_the_seeded_shuffle(tasks_dir):
    write_task(tasks_dir, "delta", ["on", "off"], 30)
    config = tiny_config(held_out=["gamma", "delta"], n_eval=4, n_eval_held_out=10)
    tasks = {t.name: t for t in load_tasks(config, tasks_dir)}
    shuffled = load_bigbench_task("delta", n_eval=0, seed=0, tasks_dir=tasks_dir).training
    assert tasks["delta"].evaluation == shuffled[:10]
    assert tasks["delta"].training == []
    assert len(tasks["gamma"].evaluation) == 6  # all of a smaller task
    # Held-in tasks keep their evaluation split and training pool.
    alpha = load_bigbench_task("alpha", n_eval=4, seed=0, tasks_dir=tasks_dir)
    assert (tasks["alpha"].evaluation, tasks["alpha"].training) == (
        alpha.evaluation,
        alpha.training,
    )
    # The first n_eval of them are the evaluation split the task had before held-out tasks
    # had their own count: cpu-4 (n_eval_held_out = n_eval) scores the committed examples.
    before = load_bigbench_task("delta", n_eval=4, seed=0, tasks_dir=tasks_dir).evaluation
    assert tasks["delta"].evaluation[:4] == before
    other_seed = load_tasks(
        tiny_config(held_out=["delta"], n_eval_held_out=10, split_seed=1), tasks_dir
    )
    assert other_seed[-1].evaluation != tasks["delta"].evaluation
    with pytest.raises(ValueError, match="n_eval_held_out must be >= 1"):
        tiny_config(n_eval_held_out=0)


def test_more_held_out_examples_rescore_held_out_tasks_only_and_keep_the_experts(
    tmp_path, tasks_dir
):
    kwargs = dict(
        cache_dir=tmp_path / "cache", tasks_dir=tasks_dir, embedder=letter_counts, progress=False
    )
    methods = ["base", "phatgoose"]
    first = run_zero_shot(
        tiny_config(methods=methods, n_eval_held_out=4),
        base_model=(tiny_llama(), tiny_tokenizer()),
        **kwargs,
    )
    files = scored_files(tmp_path / "cache")
    assert len(files) == 2 * 3
    second = run_zero_shot(
        tiny_config(methods=methods, n_eval_held_out=6),
        base_model=(tiny_llama(), tiny_tokenizer()),
        **kwargs,
    )
    # The experts' cache keys do not depend on the held-out tasks: nothing is retrained.
    assert [e["cached"] for e in second["experts"]] == [True, True]
    assert [e["key"] for e in second["experts"]] == [e["key"] for e in first["experts"]]
    # Only the held-out task was scored again (once per method), on all six examples.
    assert len(scored_files(tmp_path / "cache") - files) == 2
    assert second["tasks"]["gamma"]["n_scored"] == 6
    assert second["tasks"]["gamma"]["choices"] == [2] * 6  # hot, cold
    assert first["tasks"]["beta"]["choices"] == [3] * 4
    for method in methods:
        assert second["methods"][method]["tasks"]["gamma"]["n"] == 6
        for task in ("alpha", "beta"):
            assert second["methods"][method]["tasks"][task] == first["methods"][method]["tasks"][
                task
            ] | {"seconds": second["methods"][method]["tasks"][task]["seconds"]}
    # eval_limit caps held-in and held-out tasks alike.
    limited = run_zero_shot(
        tiny_config(methods=["base"], n_eval_held_out=6, eval_limit=3),
        base_model=(tiny_llama(), tiny_tokenizer()),
        **kwargs,
    )
    assert {t: info["n_scored"] for t, info in limited["tasks"].items()} == {
        "alpha": 3,
        "beta": 3,
        "gamma": 3,
    }


def test_the_held_out_identity_of_a_cached_score_names_its_example_count(tmp_path):
    config = tiny_config(n_eval_held_out=4)
    cache = EvaluationCache(tmp_path, config, "fingerprint")
    more = EvaluationCache(tmp_path, tiny_config(n_eval_held_out=5), "fingerprint")
    identity = {"method": "base"}
    assert cache.path(identity, "gamma") != more.path(identity, "gamma")  # held out
    assert cache.path(identity, "alpha") == more.path(identity, "alpha")  # held in
    # The same task held in is another set of examples, so another entry.
    roles_swapped = EvaluationCache(tmp_path, config, "fingerprint", held_out=["alpha"])
    assert roles_swapped.path(identity, "alpha") != cache.path(identity, "alpha")


def test_the_cpu_preset_is_the_whole_suite_and_cpu_4_the_committed_one():
    cpu = load_config("cpu")
    assert (cpu.held_in, cpu.held_out) == (list(HELD_IN_TASKS), list(HELD_OUT_TASKS))
    assert cpu.methods == list(METHODS)
    assert (cpu.n_eval, cpu.n_eval_held_out, cpu.single_experts_on_held_out) == (80, 300, True)
    four = load_config("cpu-4")
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    committed = json.loads((results / "zero-shot-cpu-bf16.json").read_text())["config"]
    # Every setting the committed run recorded is cpu-4's (the method list has grown since).
    for key, value in committed.items():
        if key != "methods":
            assert getattr(four, key) == value, key
    assert four.n_eval_held_out == committed["n_eval"]  # the same held-out examples
    # One training recipe: the four shared experts have the same cache keys in both.
    assert cpu.training_config() == four.training_config()
    assert cache_key("navigate", "f", cpu, cpu.training_config()) == cache_key(
        "navigate", "f", four, four.training_config()
    )


def test_own_task_gain_is_each_expert_alone_on_its_task_against_the_base(tmp_path, tasks_dir):
    record = run_zero_shot(
        tiny_config(methods=["base", "best_individual"]),
        cache_dir=tmp_path / "cache",
        tasks_dir=tasks_dir,
        base_model=(tiny_llama(), tiny_tokenizer()),
        embedder=letter_counts,
        progress=False,
    )
    gains = record["own_task_gains"]
    assert set(gains) == {"alpha", "beta"}
    base = record["methods"]["base"]["tasks"]
    for expert, gain in gains.items():
        own = record["single_experts"][expert]["tasks"][expert]
        assert (gain["task"], gain["n"]) == (expert, 4)
        assert (gain["expert"], gain["base"]) == (own["accuracy"], base[expert]["accuracy"])
        expected = paired_difference(own["correct"], base[expert]["correct"], **PAIRED_SETTINGS)
        assert gain["paired"] == expected.to_dict()
    table = markdown_table(record)
    assert "Own-task gain per expert" in table
    alpha = gains["alpha"]
    row = f"| alpha | alpha | 4 | {alpha['base']:.3f} | {alpha['expert']:.3f} | "
    assert row in table
    # Without the base, there is nothing to compare with.
    alone = run_zero_shot(
        tiny_config(methods=["best_individual"]),
        cache_dir=tmp_path / "cache",
        tasks_dir=tasks_dir,
        base_model=(tiny_llama(), tiny_tokenizer()),
        embedder=letter_counts,
        progress=False,
    )
    assert "own_task_gains" not in alone


def test_single_experts_on_held_in_tasks_only(tmp_path, tasks_dir):
    record = run_zero_shot(
        tiny_config(
            methods=["base", "oracle", "best_individual"], single_experts_on_held_out=False
        ),
        cache_dir=tmp_path / "cache",
        tasks_dir=tasks_dir,
        base_model=(tiny_llama(), tiny_tokenizer()),
        embedder=letter_counts,
        progress=False,
    )
    for summary in record["single_experts"].values():
        assert set(summary["tasks"]) == {"alpha", "beta"}
    oracle = record["methods"]["oracle"]
    assert set(oracle["choice"]) == set(oracle["tasks"]) == {"alpha", "beta"}
    assert oracle["held_out_mean"] is None
    best = record["methods"]["best_individual"]
    assert best["chosen_on"] == ["alpha", "beta"]
    assert "gamma" not in best["tasks"]
    assert len(scored_files(tmp_path / "cache")) == 3 + 2 * 2  # base, two experts on two
    assert "single experts scored and chosen on held-in tasks only" in markdown_table(record)


def test_single_experts_scored_in_shares_add_up_to_the_selections(tmp_path, tasks_dir):
    kwargs = dict(
        cache_dir=tmp_path / "cache", tasks_dir=tasks_dir, embedder=letter_counts, progress=False
    )
    config = tiny_config(methods=["oracle", "best_individual"])
    for share in (["alpha"], ["beta"]):
        part = run_zero_shot(
            config, base_model=(tiny_llama(), tiny_tokenizer()), single_experts=share, **kwargs
        )
        assert list(part["single_experts"]) == share
        assert part["methods"] == {}  # a share cannot select among all the experts
    assert len(scored_files(tmp_path / "cache")) == 2 * 3
    whole = run_zero_shot(
        config, base_model=(tiny_llama(), tiny_tokenizer()), cached_only=True, **kwargs
    )
    assert whole["complete"]
    assert set(whole["methods"]) == {"oracle", "best_individual"}
    with pytest.raises(ValueError, match=r"single_experts \['gamma'\] are not held-in tasks"):
        run_zero_shot(
            config, base_model=(tiny_llama(), tiny_tokenizer()), single_experts=["gamma"], **kwargs
        )
