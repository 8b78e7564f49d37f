"""`phatgoose bench zero-shot --jobs N`: the run split into processes, planned and for real."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from benchmarks.parallel import Job, plan, scoring_jobs, threads_per_job
from benchmarks.zero_shot import ZeroShotConfig, resolve_device
from tests.benchmarks.test_zero_shot import tiny_config, write_task
from tests.tiny import tiny_llama, tiny_tokenizer


def test_experts_share_the_processes_then_multitask_trains_alone():
    config = tiny_config(methods=["phatgoose", "multitask"], held_in=["alpha", "beta", "delta"])
    phases = plan(config, jobs=2, train_only=True)
    assert [(phase.desc, phase.fatal) for phase in phases] == [
        ("experts", True), ("multitask", True),
    ]  # fmt: skip
    # Three experts in two processes, dealt in turn: one process trains two.
    assert phases[0].jobs == [
        Job("train-alpha+delta", ("--train-only", "--held-in", "alpha,delta",
                                  "--methods", "phatgoose")),
        Job("train-beta", ("--train-only", "--held-in", "beta", "--methods", "phatgoose")),
    ]  # fmt: skip
    assert phases[1].jobs == [Job("train-multitask", ("--train-only", "--methods", "multitask"))]
    assert [p.desc for p in plan(config, jobs=2)] == ["experts", "multitask", "scoring"]
    # One job per expert when there are processes enough; none when no method needs them.
    assert len(plan(config, jobs=8)[0].jobs) == 3
    assert [p.desc for p in plan(tiny_config(methods=["base"]), jobs=4)] == ["scoring"]
    # CPU threads: the cores shared by the processes that run at once.
    assert threads_per_job(phases[0], jobs=2, cpus=16) == 8
    assert threads_per_job(phases[1], jobs=2, cpus=16) == 16


def test_scoring_packs_methods_and_single_experts_into_the_jobs():
    config = tiny_config(methods=["base", "phatgoose", "oracle", "best_individual"])
    # One process per unit when there are enough.
    jobs = scoring_jobs(config, jobs=4)
    assert [job.label for job in jobs] == [
        "score-base", "score-phatgoose", "score-single-alpha", "score-single-beta",
    ]  # fmt: skip
    # alpha's job scores alpha's expert alone; every task keeps its role (a held-in task
    # turned held-out would be scored on other examples than the assembly looks up).
    assert jobs[2].args == ("--methods", "best_individual", "--single-experts", "alpha")
    # Two processes: the methods share one, the single experts the other.
    jobs = scoring_jobs(config, jobs=2)
    assert [job.args for job in jobs] == [
        ("--methods", "base,phatgoose"),
        ("--methods", "best_individual", "--single-experts", "alpha,beta"),
    ]
    assert scoring_jobs(tiny_config(methods=["phatgoose"]), jobs=3) == [
        Job("score-phatgoose", ("--methods", "phatgoose"))
    ]
    # Long labels (log names) stay short and file-safe.
    suite = [f"suite/task_{i:02}" for i in range(12)]
    many = tiny_config(methods=["best_individual"], held_in=suite)
    (job,) = scoring_jobs(many, jobs=1)
    assert job.label == "score-single-suite_task_00+11-more"


def test_multitask_gets_the_experts_budget_in_sequences():
    config = tiny_config(steps=10, batch_size=2)  # two experts: 40 sequences
    assert (config.resolved_multitask_steps, config.resolved_multitask_batch_size) == (20, 2)
    wide = tiny_config(steps=10, batch_size=2, multitask_batch_size=6)
    assert (wide.resolved_multitask_steps, wide.resolved_multitask_batch_size) == (7, 6)
    assert wide.training_config(batch_size=6).batch_size == 6
    with pytest.raises(ValueError, match="multitask_batch_size must be None or >= 1"):
        ZeroShotConfig(multitask_batch_size=0)


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")


@pytest.fixture
def offline_run(tmp_path, monkeypatch):
    """The command line of a two-expert run whose jobs (real processes) find the tasks
    and a tiny base model on disk; the caller adds methods and options."""
    monkeypatch.setenv("PHATGOOSE_CACHE", str(tmp_path / "cache"))
    tasks = tmp_path / "cache" / "bigbench-1.0.0"
    write_task(tasks, "alpha", ["yes", "no"], 14)
    write_task(tasks, "beta", ["up", "down", "left"], 14)
    write_task(tasks, "gamma", ["hot", "cold"], 6)
    (tasks / ".complete.json").write_text("{}")
    model_dir = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    settings = {
        k: v
        for k, v in vars(tiny_config(max_vector_examples=4)).items()
        if k not in ("held_in", "held_out", "methods")
    }
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    return [
        "bench", "zero-shot", "--config", str(tmp_path / "settings.json"),
        "--held-in", "alpha,beta", "--held-out", "gamma", "--base-model", str(model_dir),
        "--jobs", "2", "--device", "cpu", "--threads", "1",
        "--catalog", str(tmp_path / "catalog"),
    ]  # fmt: skip


def test_parallel_run_trains_scores_assembles_and_publishes(tmp_path, offline_run):
    output = tmp_path / "results" / "parallel.json"
    arguments = [*offline_run, "--methods", "phatgoose,best_individual", "--output", str(output)]
    result = CliRunner().invoke(app, arguments)

    assert result.exit_code == 0, result.output
    record = json.loads(output.read_text())
    assert record["complete"] and not record["not_run"]
    assert sorted(record["parallel"]["job_seconds"]) == [
        "score-phatgoose", "score-single-alpha+beta", "train-alpha", "train-beta",
    ]  # fmt: skip
    for method in ("phatgoose", "best_individual"):
        assert sorted(record["methods"][method]["tasks"]) == ["alpha", "beta", "gamma"]
    assert sorted(record["single_experts"]) == ["alpha", "beta"]
    assert sorted(record["leaderboard"]["releases"]) == ["best_individual", "phatgoose"]
    # The assembly read every expert from the catalog the jobs filled.
    assert all(e["cached"] for e in record["experts"])


def test_a_failed_scoring_job_keeps_the_others_results_and_fails_the_run(
    tmp_path, offline_run, monkeypatch
):
    from benchmarks import parallel

    def with_a_broken_job(config, jobs):
        return [*scoring_jobs(config, jobs), Job("score-broken", ("--methods", "no_such_method"))]

    monkeypatch.setattr(parallel, "scoring_jobs", with_a_broken_job)
    output = tmp_path / "results" / "partial.json"
    result = CliRunner().invoke(
        app, [*offline_run, "--methods", "phatgoose", "--output", str(output)]
    )

    assert result.exit_code == 1
    assert "1 of 2 scoring jobs failed: score-broken (log: " in result.output
    record = json.loads(output.read_text())
    assert record["parallel"]["failed_jobs"] == ["score-broken"]
    assert sorted(record["methods"]["phatgoose"]["tasks"]) == ["alpha", "beta", "gamma"]
    assert (
        "unknown methods"
        in (Path(record["parallel"]["workdir"]) / "logs" / "score-broken.log").read_text()
    )
