"""Publishing benchmark results: a method's hyper-parameters become its release's, and its
per-example outcomes the leaderboard's paired differences against the base."""

import pytest

from benchmarks import catalog as catalog_module
from benchmarks.catalog import BenchmarkCatalog, publish
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.outcomes import InvalidOutcomes
from coordinator.leaderboard import comparisons
from coordinator.leaderboard.schemas import PairedDelta
from coordinator.releases import service as releases
from phatgoose.paired import paired_difference, paired_mean_difference
from protocol import resolve_params
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama

RESULT = {"accuracy": 0.5, "stderr": 0.25, "n": 4, "seconds": 0.1, "precision": "float32"}


@pytest.fixture
def catalog(tmp_path):
    # Paired statistics are cached by job id and finish time, process-wide.
    comparisons.STATISTICS.clear()
    with BenchmarkCatalog(tmp_path / "catalog") as opened:
        yield opened


@pytest.fixture
def refs(catalog) -> dict[str, str]:
    """Two experts of different ranks in the catalog (TIES and DARE take them)."""
    model = tiny_llama()
    catalog.ensure_base_model(model, "tiny")
    return {
        name: catalog.register(
            random_expert(model, name=name, rank=rank, seed=seed), f"{seed:016x}"
        )
        for name, rank, seed in (("alpha", 2, 0), ("beta", 4, 1))
    }


def record(refs, methods):
    return {
        "config": {
            "base_model": "tiny",
            "top_k": 2,
            "n_eval": 4,
            "split_seed": 0,
            "max_length": 32,
        },
        "tasks": {"alpha": {"held_in": True}},
        "experts": [{"name": name, "ref": ref} for name, ref in refs.items()],
        "methods": {
            method: {"tasks": {"alpha": RESULT}, **({"params": params} if params else {})}
            for method, params in methods.items()
        },
    }


def release_params(catalog, number):
    with catalog.session() as session:
        release = releases.get_release(session, number)
        assert release.manifest["method_params"] == release.method_params
        return release.method_params


def test_a_method_run_with_its_defaults_publishes_them(catalog, refs):
    published = publish(catalog, record(refs, {"ties": None, "dare": None, "spectr": None}))
    for method in ("ties", "dare", "spectr"):
        assert release_params(catalog, published["releases"][method]) == resolve_params(method)


def test_the_params_a_run_records_are_its_releases(catalog, refs):
    published = publish(catalog, record(refs, {"ties": {"density": 0.5}}))
    assert release_params(catalog, published["releases"]["ties"]) == {"density": 0.5, "scale": 1.0}


def test_publishing_again_reuses_the_release_of_the_same_params_only(catalog, refs):
    first = publish(catalog, record(refs, {"ties": None}))["releases"]["ties"]
    assert publish(catalog, record(refs, {"ties": {"density": 0.2}}))["releases"]["ties"] == first
    other = publish(catalog, record(refs, {"ties": {"density": 0.5}}))["releases"]["ties"]
    assert other != first
    assert release_params(catalog, other)["density"] == 0.5


# ------------------------------------------------------------------ per-example outcomes
def scored(predictions: list[int], answers: list[int]) -> dict[str, object]:
    """A result as `TaskResult.to_dict` records it, from each example's prediction."""
    correct = [p == a for p, a in zip(predictions, answers, strict=True)]
    n, accuracy = len(correct), sum(correct) / len(correct)
    return {
        "accuracy": accuracy,
        "stderr": (accuracy * (1 - accuracy) / n) ** 0.5,
        "n": n,
        "seconds": 0.1,
        "precision": "float32",
        "predictions": predictions,
        "correct": correct,
    }


# Two held-in tasks and one held-out task, 8 examples each, every answer choice 0.
ANSWERS = [0] * 8
TASKS = {"alpha": True, "beta": True, "gamma": False}
OUTCOMES = {
    "base": {
        "alpha": scored([1, 1, 1, 1, 1, 1, 0, 0], ANSWERS),
        "beta": scored([0, 1, 1, 1, 1, 1, 1, 1], ANSWERS),
        "gamma": scored([0, 0, 1, 1, 1, 1, 1, 1], ANSWERS),
    },
    "dare": {  # every base answer right, and more
        "alpha": scored([0, 0, 0, 0, 0, 0, 0, 0], ANSWERS),
        "beta": scored([0, 0, 0, 0, 0, 0, 0, 0], ANSWERS),
        "gamma": scored([0, 0, 0, 0, 0, 1, 1, 1], ANSWERS),
    },
    "ties": {  # as many right as the base on gamma, on other examples
        "alpha": scored([1, 1, 1, 1, 1, 0, 0, 1], ANSWERS),
        "beta": scored([1, 0, 1, 1, 1, 1, 1, 1], ANSWERS),
        "gamma": scored([1, 1, 0, 0, 1, 1, 1, 1], ANSWERS),
    },
}


def outcome_record(refs, outcomes=OUTCOMES, **task_fields):
    """A record of `outcomes` (method -> task -> result) over `TASKS`; `task_fields` adds
    entries to every task of `record["tasks"]`."""
    body = record(refs, {method: None for method in outcomes})
    body["tasks"] = {t: {"held_in": held_in, **task_fields} for t, held_in in TASKS.items()}
    for method, results in outcomes.items():
        body["methods"][method]["tasks"] = results
    return body


def vs_base_of(catalog, number):
    [row] = [row for row in catalog.leaderboard().releases if row.release == number]
    assert row.vs_base is not None
    return row.vs_base


def expected_mean(method, tasks):
    return PairedDelta.of(
        paired_mean_difference(
            {t: (OUTCOMES[method][t]["correct"], OUTCOMES["base"][t]["correct"]) for t in tasks},
            resamples=comparisons.RESAMPLES,
            confidence=comparisons.CONFIDENCE,
            seed=comparisons.SEED,
        )
    )


def test_every_release_differs_from_the_base_as_phatgoose_paired_says(catalog, refs):
    published = publish(catalog, outcome_record(refs))
    assert published["without_outcomes"] == {}

    dare = vs_base_of(catalog, published["releases"]["dare"])
    held_in = dare.group_means["held_in"].difference
    # alpha: 6 right only for dare; beta: 7: (6/8 + 7/8) / 2
    assert held_in is not None and held_in.delta == pytest.approx(13 / 16)
    assert (held_in.a_only, held_in.b_only, held_in.significant) == (13, 0, True)
    for method in ("dare", "ties"):
        vs_base = vs_base_of(catalog, published["releases"][method])
        assert vs_base.group_means["held_in"].difference == expected_mean(method, ["alpha", "beta"])
        assert vs_base.group_means["held_out"].difference == expected_mean(method, ["gamma"])
        assert vs_base.mean is not None
        assert vs_base.mean.difference == expected_mean(method, ["alpha", "beta", "gamma"])
    # ties on gamma: two examples right only for it, two only for the base
    gamma = vs_base_of(catalog, published["releases"]["ties"]).group_means["held_out"]
    assert gamma.difference is not None
    assert (gamma.difference.delta, gamma.difference.significant) == (0.0, False)
    # the compare route's per-task numbers are the same statistics
    with catalog.session() as session:
        comparison = comparisons.compare(
            session,
            published["releases"]["dare"],
            published["releases"]["base"],
            groups={t: "held_in" if h else "held_out" for t, h in TASKS.items()},
        )
    [alpha] = [t for t in comparison.tasks if t.task == "alpha"]
    assert alpha.difference == PairedDelta.of(
        paired_difference(
            OUTCOMES["dare"]["alpha"]["correct"],
            OUTCOMES["base"]["alpha"]["correct"],
            resamples=comparisons.RESAMPLES,
            seed=comparisons.SEED,
        )
    )


def test_each_examples_number_of_choices_is_published_when_the_record_lists_it(catalog, refs):
    published = publish(catalog, outcome_record(refs, choices=[2, 3, 2, 3, 2, 3, 2, 3]))
    with catalog.session() as session:
        _, stored = evaluations.task_outcomes(session, published["jobs"]["ties"], "gamma")
    assert stored.predictions == (1, 1, 0, 0, 1, 1, 1, 1)
    assert stored.correct == (False, False, True, True, False, False, False, False)
    assert stored.choices == (2, 3, 2, 3, 2, 3, 2, 3)


def test_outcomes_that_do_not_fit_the_result_are_refused_naming_the_task(catalog, refs):
    broken = {**OUTCOMES["ties"]["beta"], "accuracy": 1.0}  # 7 of 8 right, not 8
    outcomes = {"ties": {**OUTCOMES["ties"], "beta": broken}}
    with pytest.raises(InvalidOutcomes, match="task 'beta'"):
        publish(catalog, outcome_record(refs, outcomes))


def test_a_job_published_without_outcomes_is_not_reused_for_results_with_them(catalog, refs):
    def without_outcomes(result):
        return {k: v for k, v in result.items() if k not in ("predictions", "correct")}

    old = {m: {t: without_outcomes(r) for t, r in rs.items()} for m, rs in OUTCOMES.items()}
    before = publish(catalog, outcome_record(refs, old))
    assert before["without_outcomes"] == {m: ["alpha", "beta", "gamma"] for m in OUTCOMES}
    for mean in vs_base_of(catalog, before["releases"]["dare"]).group_means.values():
        assert mean.difference is None and "no per-example outcomes" in (mean.reason or "")

    after = publish(catalog, outcome_record(refs))
    assert after["releases"] == before["releases"]
    assert all(after["jobs"][m] != before["jobs"][m] for m in OUTCOMES)
    vs_base = vs_base_of(catalog, after["releases"]["dare"])
    assert vs_base.job_id == after["jobs"]["dare"]
    assert vs_base.group_means["held_in"].difference == expected_mean("dare", ["alpha", "beta"])
    # the same results with their outcomes again: the new jobs are reused
    assert publish(catalog, outcome_record(refs))["jobs"] == after["jobs"]


def test_results_over_more_examples_than_the_coordinator_keeps_go_without_outcomes(
    catalog, refs, monkeypatch
):
    monkeypatch.setattr(catalog_module, "MAX_OUTCOME_EXAMPLES", 7)
    published = publish(catalog, outcome_record(refs))
    assert published["without_outcomes"] == {m: ["alpha", "beta", "gamma"] for m in OUTCOMES}
    with catalog.session() as session:
        [result] = [
            r for r in evaluations.job_results(session, published["jobs"]["dare"])
            if r.task == "alpha"
        ]  # fmt: skip
        assert (result.n, result.has_outcomes) == (8, False)
