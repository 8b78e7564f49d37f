"""Evaluation jobs: the API, and the lease rules workers rely on (claim, heartbeat,
take-over after expiry, attempts, ownership of every write)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from coordinator.core.db import utcnow
from coordinator.evaluations import service
from coordinator.evaluations.models import EvaluationJob, JobState
from tests.coordinator.release_helpers import create_release, publish

SCORE = service.TaskScore(
    task="t1",
    accuracy=0.5,
    stderr=0.25,
    n=4,
    evaluator_version="test",
    seconds=0.1,
    routing_stats=None,
)


@pytest.fixture
def release(client, maintainer, alice, tiny_base, tmp_path):
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a")
    return create_release(client, maintainer, method="phatgoose", experts=["alice/a"])


def _queue(client, headers, **body):
    body = {"release": 1, "tasks": ["t1", "t2"], "examples_per_task": 4, **body}
    return client.post("/api/v1/evaluations", headers=headers, json=body)


def _job_ids(client, maintainer, count):
    return [_queue(client, maintainer).json()["id"] for _ in range(count)]


def test_queue_an_evaluation(client, maintainer, release):
    response = _queue(client, maintainer, seed=3)
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["Location"] == f"/api/v1/evaluations/{body['id']}"
    assert (body["release"], body["state"], body["attempts"], body["results"]) == (
        1,
        "queued",
        0,
        [],
    )
    assert body["spec"] == {
        "tasks": ["t1", "t2"],
        "examples_per_task": 4,
        "seed": 3,
        "requested_by": "carol",
    }


def test_get_an_evaluation(client, maintainer, release):
    job_id = _queue(client, maintainer).json()["id"]
    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert (body["id"], body["state"], body["worker_id"], body["error"]) == (
        job_id,
        "queued",
        None,
        None,
    )


def test_task_groups_are_kept_in_the_spec(client, maintainer, release):
    groups = {"held_in": ["t1"], "held_out": ["t2"]}
    body = _queue(client, maintainer, task_groups=groups).json()
    assert body["spec"]["task_groups"] == groups


def test_a_contributor_may_not_queue(client, alice, release):
    response = _queue(client, alice)
    assert response.status_code == 403
    assert "maintainer" in response.json()["detail"]["message"]


def test_queueing_needs_a_token(client, release):
    assert _queue(client, {}).status_code == 401


def test_an_unknown_release_is_404(client, maintainer, release):
    response = _queue(client, maintainer, release=9)
    assert response.status_code == 404
    assert response.json()["detail"]["message"] == "no release 9"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": []}, "at least 1 item"),
        ({"tasks": ["t1", "t1"]}, "tasks repeat: ['t1']"),
        ({"examples_per_task": 0}, "greater than or equal to 1"),
        ({"task_groups": {"held_in": ["t9"]}}, "not in tasks: ['t9']"),
        ({"task_groups": {"held_in": ["t1"], "held_out": ["t1"]}}, "both held in and held out"),
    ],
)
def test_a_malformed_spec_is_422(client, maintainer, release, change, message):
    response = _queue(client, maintainer, **change)
    assert response.status_code == 422
    assert message in response.text


def test_a_missing_evaluation_is_404(client):
    response = client.get("/api/v1/evaluations/5")
    assert response.status_code == 404
    assert response.json()["detail"]["message"] == "no evaluation 5"


def test_list_filters_by_state_and_release(app, client, maintainer, release):
    first, second = _job_ids(client, maintainer, 2)
    with app.state.sessionmaker() as session:
        service.claim_job(session, "w", lease_seconds=60)
    running = client.get("/api/v1/evaluations", params={"state": "running"}).json()
    assert [j["id"] for j in running] == [first]
    assert [j["id"] for j in client.get("/api/v1/evaluations", params={"release": 1}).json()] == [
        first,
        second,
    ]
    assert client.get("/api/v1/evaluations", params={"release": 2}).json() == []


# --- leases ----------------------------------------------------------------------------


def test_claim_leases_the_oldest_queued_job(app, client, maintainer, release):
    first, _second = _job_ids(client, maintainer, 2)
    with app.state.sessionmaker() as session:
        before = utcnow()
        job = service.claim_job(session, "w1", lease_seconds=60)
    assert (job.id, job.state, job.attempts, job.worker_id) == (first, "running", 1, "w1")
    assert timedelta(seconds=59) < job.lease_expires_at - before < timedelta(seconds=61)


def test_a_live_lease_is_not_claimed_again(app, client, maintainer, release):
    _job_ids(client, maintainer, 1)
    with app.state.sessionmaker() as session:
        assert service.claim_job(session, "w1", lease_seconds=60) is not None
        assert service.claim_job(session, "w2", lease_seconds=60) is None


def test_an_expired_lease_is_taken_over_with_another_attempt(app, client, maintainer, release):
    (job_id,) = _job_ids(client, maintainer, 1)
    with app.state.sessionmaker() as session:
        service.claim_job(session, "w1", lease_seconds=60)
        later = utcnow() + timedelta(seconds=61)
        job = service.claim_job(session, "w2", lease_seconds=60, now=later)
    assert (job.id, job.worker_id, job.attempts) == (job_id, "w2", 2)


def test_the_old_worker_can_neither_heartbeat_nor_write_after_a_take_over(
    app, client, maintainer, release
):
    (job_id,) = _job_ids(client, maintainer, 1)
    with app.state.sessionmaker() as session:
        service.claim_job(session, "w1", lease_seconds=60)
        service.claim_job(session, "w2", lease_seconds=60, now=utcnow() + timedelta(seconds=61))
        assert service.heartbeat(session, job_id, "w1", lease_seconds=60) is False
        with pytest.raises(service.LeaseLost, match=f"evaluation {job_id} is no longer leased"):
            service.record_result(session, job_id, "w1", SCORE)
        with pytest.raises(service.LeaseLost):
            service.complete_job(session, job_id, "w1")
        assert service.done_tasks(session, job_id) == set()


def test_heartbeat_extends_the_lease(app, client, maintainer, release):
    (job_id,) = _job_ids(client, maintainer, 1)
    with app.state.sessionmaker() as session:
        first = service.claim_job(session, "w1", lease_seconds=1).lease_expires_at
        assert service.heartbeat(session, job_id, "w1", lease_seconds=60) is True
        job = session.get(EvaluationJob, job_id)
        session.refresh(job)
    assert job.lease_expires_at - first > timedelta(seconds=58)


def test_a_lease_expiring_max_attempts_times_fails_the_job(app, client, maintainer, release):
    (job_id,) = _job_ids(client, maintainer, 1)
    with app.state.sessionmaker() as session:
        now = utcnow()
        for attempt in range(2):
            now += timedelta(seconds=61)
            assert service.claim_job(session, f"w{attempt}", lease_seconds=60, now=now)
        now += timedelta(seconds=61)
        assert service.claim_job(session, "w9", lease_seconds=60, max_attempts=2, now=now) is None
        job = service.get_job(session, job_id)
    assert (job.state, job.attempts) == ("failed", 2)
    assert "gave up after 2 attempts: the lease of worker w1 expired" in job.error


def test_a_failed_attempt_requeues_then_fails_at_max_attempts(app, client, maintainer, release):
    (job_id,) = _job_ids(client, maintainer, 1)
    with app.state.sessionmaker() as session:
        service.claim_job(session, "w1", lease_seconds=60)
        state = service.fail_attempt(session, job_id, "w1", "boom 1", max_attempts=2)
        assert state == JobState.QUEUED
        service.claim_job(session, "w2", lease_seconds=60)
        state = service.fail_attempt(session, job_id, "w2", "boom 2", max_attempts=2)
    assert state == JobState.FAILED
    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert (body["state"], body["attempts"], body["error"]) == ("failed", 2, "boom 2")


def test_results_of_the_lease_holder_are_stored(app, client, maintainer, release):
    (job_id,) = _job_ids(client, maintainer, 1)
    with app.state.sessionmaker() as session:
        service.claim_job(session, "w1", lease_seconds=60)
        service.record_result(session, job_id, "w1", SCORE)
        service.complete_job(session, job_id, "w1")
    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert body["state"] == "done"
    assert [(r["task"], r["accuracy"], r["stderr"], r["n"]) for r in body["results"]] == [
        ("t1", 0.5, 0.25, 4)
    ]


@pytest.mark.slow
def test_concurrent_claims_take_each_job_once(app, client, maintainer, release):
    job_ids = _job_ids(client, maintainer, 3)
    start = threading.Barrier(8)
    claimed: list[int | None] = []
    lock = threading.Lock()

    def claim(worker: int) -> None:
        start.wait()
        with app.state.sessionmaker() as session:
            job = service.claim_job(session, f"w{worker}", lease_seconds=60)
        with lock:
            claimed.append(job.id if job else None)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(i for i in claimed if i is not None) == job_ids
    assert claimed.count(None) == 5
    with app.state.sessionmaker() as session:
        jobs = [service.get_job(session, i) for i in job_ids]
    assert [j.attempts for j in jobs] == [1, 1, 1]
    assert len({j.worker_id for j in jobs}) == 3
