"""`import_job`: results computed outside the workers land as one finished job."""

from __future__ import annotations

import pytest

from coordinator.evaluations import service as evaluations
from coordinator.evaluations.schemas import EvaluationCreate, TaskGroups
from tests.coordinator.release_helpers import create_release


def _request(release: int) -> EvaluationCreate:
    return EvaluationCreate(
        release=release,
        tasks=["t1", "t2"],
        examples_per_task=10,
        task_groups=TaskGroups(held_in=["t1"], held_out=["t2"]),
    )


def _score(task: str, accuracy: float) -> evaluations.TaskScore:
    return evaluations.TaskScore(task, accuracy, 0.1, 10, "bench-v1", 1.0, None)


def test_imported_job_is_done_with_its_results_and_on_the_leaderboard(app, client, maintainer):
    number = create_release(client, maintainer, method="base", base_model="tiny")["number"]
    with app.state.sessionmaker() as session:
        token = next(t for t in _tokens(session) if t.is_maintainer)
        job = evaluations.import_job(
            session,
            _request(number),
            [_score("t1", 0.5), _score("t2", 0.25)],
            by=token,
            source={"benchmark": "zero-shot"},
        )
        assert job.state == "done"
        assert job.spec["source"] == {"benchmark": "zero-shot"}
        assert job.spec["task_groups"] == {"held_in": ["t1"], "held_out": ["t2"]}
        assert {r.task: r.accuracy for r in evaluations.job_results(session, job.id)} == {
            "t1": 0.5,
            "t2": 0.25,
        }
        # nothing for a worker to claim
        assert evaluations.claim_job(session, "w", lease_seconds=60) is None
    row = client.get("/leaderboard").json()["releases"][0]
    assert row["group_means"] == {"held_in": 0.5, "held_out": 0.25}


def test_import_refuses_scores_that_do_not_match_the_tasks(app, client, maintainer):
    number = create_release(client, maintainer, method="base", base_model="tiny")["number"]
    with app.state.sessionmaker() as session:
        token = next(t for t in _tokens(session) if t.is_maintainer)
        with pytest.raises(ValueError, match="exactly once"):
            evaluations.import_job(
                session, _request(number), [_score("t1", 0.5)], by=token, source={}
            )
        assert evaluations.list_jobs(session) == []


def _tokens(session):
    from coordinator.auth.service import list_tokens

    return list_tokens(session)
