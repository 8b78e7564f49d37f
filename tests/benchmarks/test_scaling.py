"""The scaling curve: pools of the zero-shot run's cached experts, scored through its cache."""

import json

import pytest
from typer.testing import CliRunner

from app.cli import app
from benchmarks.scaling import Pool, draw_pools, markdown, plot, run_scaling
from benchmarks.zero_shot import NotCached, run_zero_shot
from tests.benchmarks.test_zero_shot import letter_counts, tiny_config, write_task
from tests.tiny import tiny_llama, tiny_tokenizer

HELD_IN = ["alpha", "beta", "delta"]


@pytest.fixture
def tasks_dir(tmp_path):
    root = tmp_path / "tasks"
    write_task(root, "alpha", ["yes", "no"], 14)
    write_task(root, "beta", ["up", "down", "left"], 14)
    write_task(root, "delta", ["on", "off"], 14)
    write_task(root, "gamma", ["hot", "cold"], 8)
    write_task(root, "omega", ["in", "out", "over"], 10)
    return root


def config(**overrides):
    values = dict(held_in=HELD_IN, held_out=["gamma", "omega"], n_eval_held_out=6)
    return tiny_config(**(values | overrides))


def scored_files(cache_dir):
    return set((cache_dir / "evaluations").glob("*.json"))


def test_pools_are_seeded_distinct_and_end_with_the_full_pool():
    experts = [f"e{i}" for i in range(12)]
    pools = draw_pools(experts, [2, 4, 8], per_size=3, seed=0)
    assert [p.size for p in pools] == [2, 2, 2, 4, 4, 4, 8, 8, 8, 12]
    for pool in pools:
        # members distinct and in the run's order (so a pool's cache identity is canonical)
        assert list(pool.experts) == sorted(set(pool.experts), key=experts.index)
        assert len(pool.experts) == pool.size
    for size in (2, 4, 8):
        assert len({p.experts for p in pools if p.size == size}) == 3
    assert pools[-1] == Pool(12, tuple(experts))
    assert draw_pools(experts, [2, 4, 8], per_size=3, seed=0) == pools
    assert draw_pools(experts, [2, 4, 8], per_size=3, seed=1) != pools
    # Every pool when a size has no more than asked for; sizes at or above all: the full pool.
    small = draw_pools(["a", "b", "c"], [2, 3, 8], per_size=3, seed=0)
    assert [p.experts for p in small] == [("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]
    with pytest.raises(ValueError, match="pool sizes must be >= 1"):
        draw_pools(experts, [0, 2], per_size=3, seed=0)


def test_scaling_reuses_the_zero_shot_runs_experts_and_scores(tmp_path, tasks_dir):
    kwargs = dict(cache_dir=tmp_path / "cache", tasks_dir=tasks_dir, progress=False)
    full = run_zero_shot(
        config(methods=["base", "phatgoose", "merged"]),
        base_model=(tiny_llama(), tiny_tokenizer()),
        embedder=letter_counts,
        **kwargs,
    )
    # A smaller run over two of the experts (the same cache keys: trains nothing).
    pair = run_zero_shot(
        config(methods=["phatgoose"], held_in=["alpha", "beta"]),
        base_model=(tiny_llama(), tiny_tokenizer()),
        embedder=letter_counts,
        **kwargs,
    )
    assert all(e["cached"] for e in pair["experts"])
    before = scored_files(tmp_path / "cache")
    record = run_scaling(
        config(),
        base_model=(tiny_llama(), tiny_tokenizer()),
        sizes=[2],
        output=tmp_path / "scaling.json",
        say=lambda _: None,
        **kwargs,
    )
    assert [p["experts"] for p in record["pools"]] == [
        ["alpha", "beta"], ["alpha", "delta"], ["beta", "delta"], HELD_IN,
    ]  # fmt: skip
    # Scored anew: the pools no zero-shot run had, each method on each held-out task. The
    # base, the full pool and (alpha, beta)'s phatgoose came from the cache.
    new = scored_files(tmp_path / "cache") - before
    assert len(new) == (2 * 2 + 1) * 2
    held_out = ["gamma", "omega"]
    whole = record["pools"][-1]["methods"]
    for method in ("phatgoose", "merged"):
        expected = {t: full["methods"][method]["tasks"][t]["accuracy"] for t in held_out}
        assert whole[method]["tasks"] == expected
        # the same paired difference from the base as the zero-shot run's
        assert (
            whole[method]["vs_base"] == full["methods"][method]["paired"]["base"]["held_out_mean"]
        )
    assert record["pools"][0]["methods"]["phatgoose"]["tasks"] == {
        t: pair["methods"]["phatgoose"]["tasks"][t]["accuracy"] for t in held_out
    }
    assert record["base"]["held_out_mean"] == full["methods"]["base"]["held_out_mean"]["accuracy"]
    assert record["tasks"] == {"gamma": 6, "omega": 6}
    for pool in record["pools"]:
        for summary in pool["methods"].values():
            mean = sum(summary["tasks"].values()) / 2
            assert summary["held_out_mean"] == pytest.approx(mean)
            assert summary["vs_base"]["delta"] == pytest.approx(
                mean - record["base"]["held_out_mean"]
            )
    two, three = record["by_size"]["merged"]
    deltas = [p["methods"]["merged"]["vs_base"]["delta"] for p in record["pools"][:3]]
    assert (two["size"], two["pools"], three["size"], three["pools"]) == (2, 3, 3, 1)
    assert two["mean_delta"] == pytest.approx(sum(deltas) / 3)
    assert (two["min_delta"], two["max_delta"]) == (min(deltas), max(deltas))
    assert json.loads((tmp_path / "scaling.json").read_text()) == record
    table = markdown(record)
    assert "| 2 | alpha, delta | " in table and "| 3 | 1 | " in table
    assert plot(record, tmp_path / "scaling.png").stat().st_size > 0


def test_scaling_never_trains(tmp_path, tasks_dir):
    with pytest.raises(NotCached, match="the scaling curve never trains"):
        run_scaling(
            config(),
            cache_dir=tmp_path / "cache",
            tasks_dir=tasks_dir,
            base_model=(tiny_llama(), tiny_tokenizer()),
            progress=False,
        )
    assert not (tmp_path / "cache").exists()


def test_methods_with_parameters_are_refused(tmp_path, tasks_dir):
    with pytest.raises(ValueError, match="'ties' has hyper-parameters"):
        run_scaling(config(), cache_dir=tmp_path, tasks_dir=tasks_dir, methods=["ties"])
    with pytest.raises(ValueError, match="'base' is not a routing method over experts"):
        run_scaling(config(), cache_dir=tmp_path, tasks_dir=tasks_dir, methods=["base"])
    with pytest.raises(ValueError, match=r"pool sizes \[1\] are below top_k=2"):
        run_scaling(config(), cache_dir=tmp_path, tasks_dir=tasks_dir, sizes=[1, 2])


def test_the_command_scores_pools_of_a_zero_shot_runs_experts(tmp_path, monkeypatch):
    monkeypatch.setenv("PHATGOOSE_CACHE", str(tmp_path / "cache"))
    tasks = tmp_path / "cache" / "bigbench-1.0.0"
    for name in ("alpha", "beta", "delta", "gamma"):
        write_task(tasks, name, ["yes", "no"], 10)
    (tasks / ".complete.json").write_text("{}")
    model_dir = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    settings = vars(
        tiny_config(
            held_in=HELD_IN, held_out=["gamma"], max_vector_examples=4, base_model=str(model_dir)
        )
    )
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    common = [
        "--config", str(tmp_path / "settings.json"), "--device", "cpu", "--threads", "1",
        "--catalog", str(tmp_path / "catalog"), "--cache-dir", str(tmp_path / "scores"),
    ]  # fmt: skip
    runner = CliRunner()
    trained = runner.invoke(
        app,
        ["bench", "zero-shot", *common, "--methods", "base,phatgoose", "--no-publish",
         "--output", str(tmp_path / "zero-shot.json")],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    output = tmp_path / "scaling.json"
    result = runner.invoke(
        app,
        ["bench", "zero-shot-scaling", *common, "--sizes", "2", "--pools", "1",
         "--methods", "phatgoose", "--output", str(output)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(output.read_text())
    assert [p["size"] for p in record["pools"]] == [2, 3]
    zero_shot = json.loads((tmp_path / "zero-shot.json").read_text())
    assert (
        record["pools"][-1]["methods"]["phatgoose"]["held_out_mean"]
        == (zero_shot["methods"]["phatgoose"]["held_out_mean"]["accuracy"])
    )
    assert output.with_suffix(".md").is_file() and output.with_suffix(".png").is_file()
