"""The leaderboard JSON: releases x tasks from finished evaluations, means, groups, filters."""

from __future__ import annotations

import pytest

from coordinator.evaluations import service as evaluations
from tests.coordinator.release_helpers import create_release, publish


@pytest.fixture
def releases(client, maintainer, alice, tiny_base, tmp_path):
    """1: phatgoose over alice/a and alice/b; 2: arrow over alice/a; 3: base."""
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0)
    publish(client, alice, tiny_base, tmp_path / "b", "alice/b", seed=1)
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "alice/b"])
    create_release(client, maintainer, method="arrow", experts=["alice/a"])
    create_release(client, maintainer, method="base", base_model="tiny")


def _evaluate(app, client, maintainer, release, accuracies, *, finish=True, groups=None):
    """Queue a job and play a worker that stores `accuracies` (task -> accuracy)."""
    body = {"release": release, "tasks": list(accuracies), "examples_per_task": 10}
    if groups:
        body["task_groups"] = groups
    job_id = client.post("/api/v1/evaluations", headers=maintainer, json=body).json()["id"]
    with app.state.sessionmaker() as session:
        evaluations.claim_job(session, "w", lease_seconds=60)
        for task, accuracy in accuracies.items():
            score = evaluations.TaskScore(task, accuracy, 0.1, 10, "v1", 1.0, None)
            evaluations.record_result(session, job_id, "w", score)
        if finish:
            evaluations.complete_job(session, job_id, "w")
    return job_id


def test_empty_leaderboard_lists_releases_without_scores(client, releases):
    board = client.get("/leaderboard").json()
    assert board["tasks"] == []
    assert [
        (r["release"], r["method"], r["scores"], r["mean_accuracy"]) for r in board["releases"]
    ] == [
        (1, "phatgoose", {}, None),
        (2, "arrow", {}, None),
        (3, "base", {}, None),
    ]
    assert board["releases"][0]["experts"] == ["alice/a@1", "alice/b@1"]


def test_scores_and_mean_per_release(app, client, maintainer, releases):
    job_id = _evaluate(app, client, maintainer, 1, {"t1": 0.5, "t2": 0.75})
    _evaluate(app, client, maintainer, 3, {"t1": 0.25})
    board = client.get("/leaderboard").json()
    assert board["tasks"] == ["t1", "t2"]
    first, _, third = board["releases"]
    assert first["scores"]["t1"] == {
        "accuracy": 0.5,
        "stderr": 0.1,
        "n": 10,
        "evaluator_version": "v1",
        "job_id": job_id,
        "has_outcomes": False,
    }
    assert (first["mean_accuracy"], third["mean_accuracy"]) == (0.625, 0.25)


def test_the_newest_finished_score_wins(app, client, maintainer, releases):
    _evaluate(app, client, maintainer, 1, {"t1": 0.5})
    newer = _evaluate(app, client, maintainer, 1, {"t1": 0.9})
    cell = client.get("/leaderboard").json()["releases"][0]["scores"]["t1"]
    assert (cell["accuracy"], cell["job_id"]) == (0.9, newer)


def test_unfinished_jobs_are_not_on_the_leaderboard(app, client, maintainer, releases):
    _evaluate(app, client, maintainer, 1, {"t1": 0.5}, finish=False)
    assert client.get("/leaderboard").json()["releases"][0]["scores"] == {}


def test_group_means_follow_the_job_s_task_groups(app, client, maintainer, releases):
    groups = {"held_in": ["t1", "t2"], "held_out": ["t3"]}
    _evaluate(app, client, maintainer, 1, {"t1": 0.5, "t2": 1.0, "t3": 0.2}, groups=groups)
    board = client.get("/leaderboard").json()
    assert board["task_groups"] == {"t1": "held_in", "t2": "held_in", "t3": "held_out"}
    assert board["releases"][0]["group_means"] == {"held_in": 0.75, "held_out": 0.2}


def test_filter_by_method(client, releases):
    board = client.get("/leaderboard", params={"method": "arrow"}).json()
    assert [r["release"] for r in board["releases"]] == [2]
    assert board["filters"] == {"base_model": None, "method": "arrow"}


def test_filter_by_base_model(client, releases):
    assert len(client.get("/leaderboard", params={"base_model": "tiny"}).json()["releases"]) == 3
    assert client.get("/leaderboard", params={"base_model": "other"}).json()["releases"] == []


def test_an_unknown_method_filter_is_422(client, releases):
    assert client.get("/leaderboard", params={"method": "magic"}).status_code == 422


def test_the_api_path_serves_the_same_json(app, client, maintainer, releases):
    _evaluate(app, client, maintainer, 2, {"t1": 0.5})
    assert client.get("/api/v1/leaderboard").json() == client.get("/leaderboard").json()


def test_release_detail_summarises_its_scores(app, client, maintainer, releases):
    job_id = _evaluate(
        app, client, maintainer, 1, {"t1": 0.5, "t2": 1.0}, groups={"held_out": ["t2"]}
    )
    scores = client.get("/api/v1/releases/1").json()["scores"]
    assert scores["mean_accuracy"] == 0.75
    assert scores["group_means"] == {"held_out": 1.0}
    assert scores["tasks"]["t2"]["group"] == "held_out"
    assert scores["evaluations"] == [{"id": job_id, "state": "done"}]
