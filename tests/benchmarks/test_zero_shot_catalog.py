"""The zero-shot benchmark with a coordinator catalog as its expert cache and leaderboard."""

import pytest
import torch

from benchmarks.catalog import BenchmarkCatalog, cache_key_of
from benchmarks.zero_shot import run_zero_shot
from coordinator.evaluations import service as evaluations
from coordinator.experts import service as experts_service
from coordinator.leaderboard import comparisons
from coordinator.leaderboard.schemas import PairedDelta
from coordinator.releases import service as releases
from phatgoose.paired import paired_mean_difference
from protocol import TOP_K_METHODS
from tests.benchmarks.test_zero_shot import letter_counts, tasks_dir, tiny_config  # noqa: F401
from tests.tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def catalog(tmp_path):
    # Paired statistics are cached by job id and finish time, process-wide.
    comparisons.STATISTICS.clear()
    with BenchmarkCatalog(tmp_path / "catalog") as opened:
        yield opened


def run(config, cache_dir, tasks_dir, **kwargs):  # noqa: F811
    return run_zero_shot(
        config,
        cache_dir=cache_dir,
        tasks_dir=tasks_dir,
        base_model=(tiny_llama(), tiny_tokenizer()),
        embedder=embedder,
        progress=False,
        **kwargs,
    )


def embedder(texts):
    """Letter counts, padded to MiniLM's 384 dimensions (the catalog checks the width)."""
    return torch.nn.functional.pad(letter_counts(texts), (0, 381))


def accuracies(record, method):
    return {t: r["accuracy"] for t, r in record["methods"][method]["tasks"].items()}


def catalogued(catalog):
    with catalog.session() as session:
        return {
            v.ref: cache_key_of(v.manifest)
            for v in experts_service.list_versions(session, namespace="bench").items
        }


def test_second_run_with_the_same_catalog_trains_nothing(tmp_path, tasks_dir, catalog):  # noqa: F811
    config = tiny_config(methods=["phatgoose", "multitask"])
    first = run(config, tmp_path / "cache1", tasks_dir, catalog=catalog)
    assert [(e["source"], e["ref"]) for e in first["experts"]] == [
        ("trained", "bench/alpha@1"),
        ("trained", "bench/beta@1"),
    ]
    assert first["multitask"]["ref"] == "bench/multitask@1"  # registered with gates
    assert catalogued(catalog) == {
        "bench/alpha@1": first["experts"][0]["key"],
        "bench/beta@1": first["experts"][1]["key"],
        "bench/multitask@1": first["multitask"]["key"],
    }
    # an empty directory cache: the experts can only come from the catalog
    second = run(config, tmp_path / "cache2", tasks_dir, catalog=catalog)
    assert [e["source"] for e in second["experts"]] == ["catalog", "catalog"]
    assert second["multitask"]["source"] == "catalog"
    assert not any((tmp_path / "cache2").glob("*/expert.json"))
    for method in ("phatgoose", "multitask"):  # scored again: the same experts
        assert accuracies(second, method) == accuracies(first, method), method
    # other settings are other experts
    third = run(tiny_config(methods=["phatgoose"], steps=3), tmp_path / "cache2", tasks_dir,
                catalog=catalog)  # fmt: skip
    assert [(e["source"], e["ref"]) for e in third["experts"]] == [
        ("trained", "bench/alpha@2"),
        ("trained", "bench/beta@2"),
    ]


def test_directory_cache_packages_are_registered_into_the_catalog(tmp_path, tasks_dir, catalog):  # noqa: F811
    config = tiny_config(methods=["phatgoose", "multitask"])
    cache = tmp_path / "cache"
    legacy = run(config, cache, tasks_dir)  # no catalog: the directory cache of before
    assert all("ref" not in e for e in legacy["experts"])
    # --cached-only trains nothing: the task experts are registered as they are; the
    # multitask LoRA has no gates, which the catalog requires, so it stays out
    cached = run(config, cache, tasks_dir, catalog=catalog, cached_only=True)
    assert [(e["source"], e["ref"]) for e in cached["experts"]] == [
        ("directory", "bench/alpha@1"),
        ("directory", "bench/beta@1"),
    ]
    assert cached["multitask"]["ref"] is None
    assert "no gates" in cached["multitask"]["catalog"]
    assert cached["methods"]["multitask"] == legacy["methods"]["multitask"]
    # a normal run trains the multitask LoRA's gates and registers it
    trained = run(config, cache, tasks_dir, catalog=catalog)
    assert [e["source"] for e in trained["experts"]] == ["catalog", "catalog"]
    assert (trained["multitask"]["source"], trained["multitask"]["ref"]) == (
        "directory",
        "bench/multitask@1",
    )
    assert catalogued(catalog)["bench/alpha@1"] == legacy["experts"][0]["key"]
    again = run(config, cache, tasks_dir, catalog=catalog, cached_only=True)
    assert again["multitask"]["source"] == "catalog"
    assert again["complete"]


def test_publishing_puts_the_json_on_the_leaderboard_once(tmp_path, tasks_dir, catalog):  # noqa: F811
    record = run(tiny_config(), tmp_path / "cache", tasks_dir, catalog=catalog, publish=True)
    published = record["leaderboard"]
    assert set(published["releases"]) == set(record["methods"]) - {"oracle"}
    assert "oracle" in published["skipped"]
    board = catalog.leaderboard()
    rows = {row.release: row for row in board.releases}
    assert len(rows) == len(published["releases"])
    for method, number in published["releases"].items():
        row = rows[number]
        summary = record["methods"][method]
        expected_method = "single" if method in ("best_individual", "multitask") else method
        assert row.method == expected_method
        assert {t: c.accuracy for t, c in row.scores.items()} == {
            t: r["accuracy"] for t, r in summary["tasks"].items()
        }
        assert {t: c.n for t, c in row.scores.items()} == {
            t: r["n"] for t, r in summary["tasks"].items()
        }
        assert row.group_means["held_in"] == pytest.approx(summary["held_in_mean"]["accuracy"])
        assert row.group_means["held_out"] == pytest.approx(summary["held_out_mean"]["accuracy"])
        if method == "base":
            assert row.experts == []
        elif expected_method == "single":
            assert row.experts == [f"{row.expert}@1"]
        else:
            assert row.experts == ["bench/alpha@1", "bench/beta@1"]
            assert row.top_k == (2 if method in TOP_K_METHODS else None)
    best = record["methods"]["best_individual"]["choice"]
    assert rows[published["releases"]["best_individual"]].expert == f"bench/{best}"
    assert rows[published["releases"]["multitask"]].experts == ["bench/multitask@1"]
    with catalog.session() as session:
        job = evaluations.get_job(session, published["jobs"]["phatgoose"])
        assert job.spec["source"]["benchmark"] == "zero-shot"
        assert job.spec["examples_per_task"] == 4
        assert job.spec["source"]["n_eval_held_out"] == 4  # held-out tasks' own count
        assert job.spec["task_groups"] == {"held_in": ["alpha", "beta"], "held_out": ["gamma"]}
        counts = (len(releases.list_releases(session)), len(evaluations.list_jobs(session)))
    # publishing the same results again (from the caches) adds nothing
    again = run(tiny_config(), tmp_path / "cache", tasks_dir, catalog=catalog, publish=True,
                cached_only=True)  # fmt: skip
    assert again["leaderboard"]["releases"] == published["releases"]
    assert again["leaderboard"]["jobs"] == published["jobs"]
    with catalog.session() as session:
        assert (len(releases.list_releases(session)), len(evaluations.list_jobs(session))) == (
            counts
        )


def test_published_releases_differ_from_the_base_as_paired_statistics_on_the_record_say(
    tmp_path,
    tasks_dir,  # noqa: F811
    catalog,
):
    record = run(tiny_config(), tmp_path / "cache", tasks_dir, catalog=catalog, publish=True)
    published = record["leaderboard"]
    assert published["without_outcomes"] == {}
    groups = {
        "held_in": [t for t, info in record["tasks"].items() if info["held_in"]],
        "held_out": [t for t, info in record["tasks"].items() if not info["held_in"]],
    }
    base = record["methods"]["base"]["tasks"]
    rows = {row.release: row for row in catalog.leaderboard().releases}

    base_row = rows[published["releases"]["base"]]
    assert base_row.vs_base is not None and base_row.vs_base.reason is not None
    assert "the base's evaluation" in base_row.vs_base.reason
    for method, number in published["releases"].items():
        if method == "base":
            continue
        vs_base = rows[number].vs_base
        assert vs_base is not None and vs_base.base_release == published["releases"]["base"]
        assert (vs_base.job_id, vs_base.base_job_id) == (
            published["jobs"][method],
            published["jobs"]["base"],
        )
        mine = record["methods"][method]["tasks"]
        for group, tasks in groups.items():
            expected = paired_mean_difference(
                {t: (mine[t]["correct"], base[t]["correct"]) for t in tasks},
                resamples=comparisons.RESAMPLES,
                confidence=comparisons.CONFIDENCE,
                seed=comparisons.SEED,
            )
            assert vs_base.group_means[group].difference == PairedDelta.of(expected), (
                method,
                group,
            )
    # the outcomes stored are the record's, example by example
    with catalog.session() as session:
        for task, result in record["methods"]["phatgoose"]["tasks"].items():
            _, stored = evaluations.task_outcomes(session, published["jobs"]["phatgoose"], task)
            assert list(stored.predictions) == result["predictions"]
            assert list(stored.correct) == result["correct"]
