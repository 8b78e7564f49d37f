"""Paired comparisons: the leaderboard's difference against the base and the comparison of
any two releases (JSON and page) are `phatgoose.paired` on the stored per-example outcomes,
only between evaluations on the same examples, with a reason everywhere else."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from sqlalchemy import select

from coordinator.auth.models import Token
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.outcomes import ExampleOutcomes
from coordinator.evaluations.schemas import EvaluationCreate, TaskGroups
from coordinator.leaderboard import comparisons
from phatgoose.paired import paired_difference, paired_mean_difference
from tests.coordinator.release_helpers import create_release, publish
from tests.coordinator.web_helpers import table_rows

N = 40
GROUPS = {"held_in": ["t1", "t2"], "held_out": ["t3"]}
BASE, SINGLE, ROUTED = 1, 2, 3


def _outcomes(seed: int, p: float, n: int = N) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < p for _ in range(n)]


# Per release, per task: which examples it gets right (the base is the weakest).
OUTCOMES = {
    BASE: {"t1": _outcomes(1, 0.4), "t2": _outcomes(2, 0.5), "t3": _outcomes(3, 0.45)},
    SINGLE: {"t1": _outcomes(11, 0.8), "t2": _outcomes(12, 0.55), "t3": _outcomes(13, 0.5)},
}


@pytest.fixture(autouse=True)
def _empty_cache():
    comparisons.STATISTICS.clear()
    yield
    comparisons.STATISTICS.clear()


@pytest.fixture
def releases(client, maintainer, alice, tiny_base, tmp_path) -> None:
    """1: base; 2: single over alice/a; 3: phatgoose over alice/a."""
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a")
    create_release(client, maintainer, method="base", base_model="tiny")
    create_release(client, maintainer, method="single", experts=["alice/a"])
    create_release(client, maintainer, method="phatgoose", experts=["alice/a"], top_k=1)


def _evaluate(
    app,
    release: int,
    correct: Mapping[str, Sequence[bool]],
    *,
    examples_per_task: int = N,
    seed: int = 0,
    keep_outcomes: bool = True,
) -> int:
    """A finished evaluation of `release` whose result on each task has these outcomes
    (answer 0 right, 1 wrong, of two choices), as a worker reports it."""
    with app.state.sessionmaker() as session:
        maintainer = session.scalar(select(Token).where(Token.role == "maintainer"))
        assert maintainer is not None
        groups = {g: [t for t in tasks if t in correct] for g, tasks in GROUPS.items()}
        job = evaluations.create_job(
            session,
            EvaluationCreate(
                release=release,
                tasks=list(correct),
                examples_per_task=examples_per_task,
                seed=seed,
                task_groups=TaskGroups(**groups),
            ),
            by=maintainer,
        )
        assert evaluations.claim_job(session, "w", lease_seconds=60) is not None
        for task, right in correct.items():
            n, accuracy = len(right), sum(right) / len(right)
            outcomes = ExampleOutcomes(
                predictions=tuple(0 if r else 1 for r in right),
                correct=tuple(right),
                choices=(2,) * n,
            )
            score = evaluations.TaskScore(
                task=task,
                accuracy=accuracy,
                stderr=(accuracy * (1 - accuracy) / n) ** 0.5,
                n=n,
                evaluator_version="test",
                seconds=0.1,
                routing_stats=None,
                outcomes=outcomes if keep_outcomes else None,
            )
            evaluations.record_result(session, job.id, "w", score)
        evaluations.complete_job(session, job.id, "w")
        return job.id


def _pairs(a: int, b: int, tasks: Sequence[str]) -> dict[str, tuple[list[bool], list[bool]]]:
    return {task: (OUTCOMES[a][task], OUTCOMES[b][task]) for task in tasks}


def _row(client, release: int, **params: Any) -> dict[str, Any]:
    board = client.get("/leaderboard", params=params).json()
    return next(row for row in board["releases"] if row["release"] == release)


# --- the leaderboard's difference against the base ----------------------------------------


def test_leaderboard_delta_vs_base_equals_phatgoose_paired_on_the_same_outcomes(
    app, client, releases
):
    base_job = _evaluate(app, BASE, OUTCOMES[BASE])
    job = _evaluate(app, SINGLE, OUTCOMES[SINGLE])
    vs = _row(client, SINGLE)["vs_base"]
    assert (vs["base_release"], vs["job_id"], vs["base_job_id"], vs["reason"]) == (
        BASE,
        job,
        base_job,
        None,
    )
    assert vs["spec"] == {"tasks": ["t1", "t2", "t3"], "examples_per_task": N, "seed": 0}
    everything = paired_mean_difference(_pairs(SINGLE, BASE, ["t1", "t2", "t3"]))
    held_in = paired_mean_difference(_pairs(SINGLE, BASE, ["t1", "t2"]))
    held_out = paired_mean_difference(_pairs(SINGLE, BASE, ["t3"]))
    assert vs["mean"]["difference"] == everything.to_dict()
    assert vs["group_means"]["held_in"]["difference"] == held_in.to_dict()
    assert vs["group_means"]["held_out"]["difference"] == held_out.to_dict()
    assert vs["group_means"]["held_in"]["tasks"] == ["t1", "t2"]
    a_mean = sum(sum(OUTCOMES[SINGLE][t]) / N for t in ("t1", "t2")) / 2
    assert vs["group_means"]["held_in"]["a"] == pytest.approx(a_mean)
    # The difference is of the means the row shows.
    row = _row(client, SINGLE)
    base_row = _row(client, BASE)
    assert everything.delta == pytest.approx(row["mean_accuracy"] - base_row["mean_accuracy"])


def test_the_difference_covers_the_view_s_tasks(app, client, releases):
    _evaluate(app, BASE, OUTCOMES[BASE])
    _evaluate(app, SINGLE, OUTCOMES[SINGLE])
    vs = _row(client, SINGLE, split="held_out")["vs_base"]
    assert vs["mean"]["tasks"] == ["t3"]
    assert (
        vs["mean"]["difference"] == paired_mean_difference(_pairs(SINGLE, BASE, ["t3"])).to_dict()
    )


def test_the_base_s_own_row_is_the_reference(app, client, releases):
    base_job = _evaluate(app, BASE, OUTCOMES[BASE])
    vs = _row(client, BASE)["vs_base"]
    assert (vs["base_release"], vs["job_id"], vs["base_job_id"], vs["mean"]) == (
        BASE,
        base_job,
        base_job,
        None,
    )
    assert "the base's evaluation" in vs["reason"]


def test_the_base_is_its_newest_evaluation_on_the_same_spec(app, client, releases):
    _evaluate(app, BASE, OUTCOMES[BASE])
    newer = {task: [not r for r in right] for task, right in OUTCOMES[BASE].items()}
    newest_same_spec = _evaluate(app, BASE, newer)
    _evaluate(app, BASE, OUTCOMES[BASE], seed=1)  # newer still, but other examples
    _evaluate(app, SINGLE, OUTCOMES[SINGLE])
    vs = _row(client, SINGLE)["vs_base"]
    assert vs["base_job_id"] == newest_same_spec
    expected = paired_mean_difference({t: (OUTCOMES[SINGLE][t], newer[t]) for t in newer})
    assert vs["mean"]["difference"] == expected.to_dict()


def test_a_release_evaluated_on_other_examples_has_no_difference_and_says_why(
    app, client, releases
):
    _evaluate(app, BASE, OUTCOMES[BASE])
    _evaluate(
        app, SINGLE, {t: right[:20] for t, right in OUTCOMES[SINGLE].items()}, examples_per_task=20
    )
    vs = _row(client, SINGLE)["vs_base"]
    assert (vs["base_release"], vs["mean"], vs["group_means"]) == (None, None, {})
    assert "same tasks, examples per task and seed" in vs["reason"]


def test_results_without_outcomes_have_no_difference_and_say_why(app, client, releases):
    _evaluate(app, BASE, OUTCOMES[BASE])
    _evaluate(app, SINGLE, OUTCOMES[SINGLE], keep_outcomes=False)
    vs = _row(client, SINGLE)["vs_base"]
    assert vs["base_release"] == BASE and vs["mean"]["difference"] is None
    assert "no per-example outcomes for #2" in vs["mean"]["reason"]
    assert vs["mean"]["a"] == _row(client, SINGLE)["mean_accuracy"]  # the means still show
    assert vs["group_means"]["held_out"]["difference"] is None


def test_a_withdrawn_base_is_no_reference(app, client, maintainer, releases):
    _evaluate(app, BASE, OUTCOMES[BASE])
    _evaluate(app, SINGLE, OUTCOMES[SINGLE])
    response = client.post(
        f"/api/v1/releases/{BASE}/withdraw", headers=maintainer, json={"reason": "broken"}
    )
    assert response.status_code == 200, response.text
    vs = _row(client, SINGLE)["vs_base"]
    assert vs["base_release"] is None and vs["mean"] is None


def test_statistics_are_computed_once_per_pair_of_evaluations(app, client, releases, monkeypatch):
    _evaluate(app, BASE, OUTCOMES[BASE])
    _evaluate(app, SINGLE, OUTCOMES[SINGLE])
    first = client.get("/leaderboard").json()
    assert len(comparisons.STATISTICS) == 3  # all, held-in and held-out means

    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("recomputed a cached statistic")

    monkeypatch.setattr(comparisons, "paired_mean_difference", fail)
    assert client.get("/leaderboard").json() == first
    assert client.get("/ui/leaderboard").status_code == 200


# --- any two releases ----------------------------------------------------------------------


def test_compare_two_releases_per_task_and_per_group(app, client, releases):
    base_job = _evaluate(app, BASE, OUTCOMES[BASE])
    job = _evaluate(app, SINGLE, OUTCOMES[SINGLE])
    response = client.get("/leaderboard/compare", params={"a": SINGLE, "b": BASE})
    assert response.status_code == 200, response.text
    body = response.json()
    assert client.get("/api/v1/leaderboard/compare", params={"a": SINGLE, "b": BASE}).json() == body
    assert (body["comparable"], body["reason"]) == (True, None)
    assert (body["a"]["release"], body["a"]["job_id"], body["a"]["method"]) == (
        SINGLE,
        job,
        "single",
    )
    assert (body["b"]["release"], body["b"]["job_id"]) == (BASE, base_job)
    assert (body["resamples"], body["confidence"]) == (10_000, 0.95)
    assert [t["task"] for t in body["tasks"]] == ["t1", "t2", "t3"]
    for task in body["tasks"]:
        a, b = OUTCOMES[SINGLE][task["task"]], OUTCOMES[BASE][task["task"]]
        assert task["difference"] == paired_difference(a, b).to_dict()
        assert (task["a"], task["b"], task["n"]) == (sum(a) / N, sum(b) / N, N)
    assert task["group"] == "held_out"
    assert set(body["means"]) == {"all", "held_in", "held_out"}
    assert body["means"]["held_in"]["difference"] == (
        paired_mean_difference(_pairs(SINGLE, BASE, ["t1", "t2"])).to_dict()
    )
    # The leaderboard's difference is the same statistic.
    vs = _row(client, SINGLE)["vs_base"]
    assert vs["group_means"]["held_in"] == body["means"]["held_in"]


def test_releases_evaluated_on_different_examples_do_not_compare(app, client, releases):
    _evaluate(app, BASE, OUTCOMES[BASE])
    _evaluate(
        app, SINGLE, {t: right[:20] for t, right in OUTCOMES[SINGLE].items()}, examples_per_task=20
    )
    body = client.get("/leaderboard/compare", params={"a": SINGLE, "b": BASE}).json()
    assert (body["comparable"], body["tasks"], body["means"]) == (False, [], {})
    assert "share a spec" in body["reason"]
    assert "20 examples per task" in body["reason"] and f"{N} examples per task" in body["reason"]


def test_a_task_scored_on_different_numbers_of_examples_does_not_compare(app, client, releases):
    _evaluate(app, BASE, OUTCOMES[BASE])
    fewer = {**OUTCOMES[SINGLE], "t2": OUTCOMES[SINGLE]["t2"][:30]}  # a smaller task file
    _evaluate(app, SINGLE, fewer)
    body = client.get("/leaderboard/compare", params={"a": SINGLE, "b": BASE}).json()
    t1, t2, _ = body["tasks"]
    assert t1["difference"] is not None
    assert (t2["difference"], t2["n"]) == (None, None)
    assert "different numbers of examples: 30 (#2) and 40 (#1)" in t2["reason"]
    assert body["means"]["held_in"]["difference"] is None
    assert "t2" in body["means"]["held_in"]["reason"]
    assert body["means"]["held_out"]["difference"] == (
        paired_mean_difference(_pairs(SINGLE, BASE, ["t3"])).to_dict()
    )


def test_compare_picks_the_evaluations_asked_for(app, client, releases):
    older = _evaluate(app, SINGLE, OUTCOMES[SINGLE])
    _evaluate(app, SINGLE, OUTCOMES[BASE])
    base_job = _evaluate(app, BASE, OUTCOMES[BASE])
    params = {"a": SINGLE, "b": BASE, "a_job": older, "b_job": base_job}
    body = client.get("/leaderboard/compare", params=params).json()
    assert body["a"]["job_id"] == older
    assert body["means"]["all"]["difference"] == (
        paired_mean_difference(_pairs(SINGLE, BASE, ["t1", "t2", "t3"])).to_dict()
    )
    newest = client.get("/leaderboard/compare", params={"a": SINGLE, "b": BASE}).json()
    assert newest["means"]["all"]["difference"]["delta"] == 0  # the newest is the base's copy


def test_compare_filters_by_examples_per_task_and_seed(app, client, releases):
    _evaluate(app, BASE, OUTCOMES[BASE])
    _evaluate(app, SINGLE, OUTCOMES[SINGLE])
    params = {"a": SINGLE, "b": BASE}
    assert client.get("/leaderboard/compare", params={**params, "seed": 0}).json()["comparable"]
    body = client.get("/leaderboard/compare", params={**params, "examples_per_task": 7}).json()
    assert body["comparable"] is False
    assert "no finished evaluation matching the filters" in body["reason"]


def test_compare_refuses_an_evaluation_of_another_release_and_unknown_releases(
    app, client, releases
):
    base_job = _evaluate(app, BASE, OUTCOMES[BASE])
    params = {"a": SINGLE, "b": BASE, "a_job": base_job}
    response = client.get("/leaderboard/compare", params=params)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert (detail["error"], detail["check"]) == ("invalid_comparison", "evaluation")
    assert (
        f"evaluation {base_job} is not a finished evaluation of release {SINGLE}"
        in (detail["message"])
    )
    assert client.get("/leaderboard/compare", params={"a": 99, "b": BASE}).status_code == 404
    assert client.get("/leaderboard/compare", params={"a": 0, "b": BASE}).status_code == 422
    unevaluated = client.get("/leaderboard/compare", params={"a": ROUTED, "b": BASE}).json()
    assert unevaluated["comparable"] is False
    assert unevaluated["reason"] == f"release {ROUTED} has no finished evaluation"


# --- the pages -----------------------------------------------------------------------------


def test_the_compare_page_marks_only_differences_whose_interval_excludes_zero(
    app, client, releases
):
    _evaluate(app, BASE, {"t1": [False] * N, "t2": OUTCOMES[BASE]["t2"], "t3": [True] * N})
    _evaluate(app, SINGLE, {"t1": [True] * N, "t2": OUTCOMES[BASE]["t2"], "t3": [False] * N})
    response = client.get("/ui/compare", params={"a": SINGLE, "b": BASE})
    assert response.status_code == 200, response.text
    t1, t2, t3 = table_rows(response.text, "comparison-tasks")
    assert t1[:5] == ["t1", "held-in", str(N), "1.000", "0.000"]
    assert t1[5] == "▲ +1.000 [+1.000, +1.000]"
    assert t2[5] == "+0.000 [+0.000, +0.000]"  # shown, not marked
    assert t3[5].startswith("▼ -1.000")
    means = {row[0]: row for row in table_rows(response.text, "comparison-means")}
    assert set(means) == {"all (3)", "held-in (2)", "held-out (1)"}
    assert means["held-in (2)"][3] == "▲ +0.500 [+0.500, +0.500]"


def test_the_compare_page_says_why_releases_do_not_compare(app, client, releases):
    _evaluate(app, BASE, OUTCOMES[BASE])
    _evaluate(app, SINGLE, OUTCOMES[SINGLE], keep_outcomes=False)
    html = client.get("/ui/compare", params={"a": SINGLE, "b": BASE}).text
    rows = table_rows(html, "comparison-tasks")
    assert all("no per-example outcomes for #2" in row[5] for row in rows)
    html = client.get("/ui/compare", params={"a": ROUTED, "b": BASE}).text
    assert f"Not comparable: release {ROUTED} has no finished evaluation." in html
    assert client.get("/ui/compare", params={"a": 99, "b": BASE}).status_code == 404
    refused = client.get("/ui/compare", params={"a": SINGLE, "b": BASE, "a_job": 1})
    assert refused.status_code == 422 and "not a finished evaluation" in refused.text
    assert client.get("/ui/compare").status_code == 200  # the form alone


def test_the_leaderboard_and_release_pages_link_to_the_comparison(app, client, releases):
    base_job = _evaluate(app, BASE, {t: [False] * N for t in ("t1", "t2", "t3")})
    job = _evaluate(app, SINGLE, {t: [True] * N for t in ("t1", "t2", "t3")})
    html = client.get("/ui/leaderboard").text
    link = f"/ui/compare?a={SINGLE}&amp;b={BASE}&amp;a_job={job}&amp;b_job={base_job}"
    assert link in html
    rows = {row[0].split()[0]: row for row in table_rows(html, "leaderboard")}
    # After the mean and the held-in and held-out means: the view's mean, then each group.
    assert rows[f"#{SINGLE}"][7] == (
        "▲ +1.000 [+1.000, +1.000] held-in ▲ +1.000 [+1.000, +1.000] "
        "held-out ▲ +1.000 [+1.000, +1.000]"
    )
    assert rows[f"#{BASE}"][7] == "–"
    release = client.get(f"/ui/releases/{SINGLE}").text
    assert link in release and f'href="/ui/compare?a={SINGLE}"' in release
    assert "Against the base:" in release and "▲ +1.000" in release
