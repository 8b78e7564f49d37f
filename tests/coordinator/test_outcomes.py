"""Per-example outcomes: stored with each result, served by the API, and checked against the
result they come with before anything is written (a worker's report and an import alike)."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.auth.service import list_tokens
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.outcomes import (
    MAX_OUTCOME_EXAMPLES,
    ExampleOutcomes,
    InvalidOutcomes,
)
from coordinator.evaluations.schemas import EvaluationCreate
from coordinator.worker import example_outcomes
from phatgoose.data import Example
from phatgoose.evaluation import TaskResult
from tests.coordinator.release_helpers import create_release

WORKER = "w1"
# 4 examples of 3 choices: the model picked 0, 2, 1, 1; the first and last were right.
GOOD = ExampleOutcomes(
    predictions=(0, 2, 1, 1), correct=(True, False, False, True), choices=(3,) * 4
)


def _score(outcomes: Any, *, accuracy: float = 0.5, n: int = 4) -> evaluations.TaskScore:
    return evaluations.TaskScore(
        task="t1",
        accuracy=accuracy,
        stderr=0.25,
        n=n,
        evaluator_version="test",
        seconds=0.1,
        routing_stats=None,
        outcomes=outcomes,
    )


@pytest.fixture
def job_id(app, client, maintainer) -> int:
    """A job of a base release, leased to `WORKER`."""
    create_release(client, maintainer, method="base", base_model="tiny")
    body = {"release": 1, "tasks": ["t1"], "examples_per_task": 4}
    job = client.post("/api/v1/evaluations", headers=maintainer, json=body).json()["id"]
    with app.state.sessionmaker() as session:
        assert evaluations.claim_job(session, WORKER, lease_seconds=60) is not None
    return int(job)


def _record(app, job_id: int, score: evaluations.TaskScore) -> None:
    with app.state.sessionmaker() as session:
        evaluations.record_result(session, job_id, WORKER, score)


def test_a_result_keeps_its_outcomes_and_the_api_serves_them(app, client, job_id):
    _record(app, job_id, _score(GOOD))
    (result,) = client.get(f"/api/v1/evaluations/{job_id}").json()["results"]
    assert result["has_outcomes"] is True
    response = client.get(f"/api/v1/evaluations/{job_id}/outcomes/t1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["task"], body["n"], body["accuracy"]) == ("t1", 4, 0.5)
    assert body["predictions"] == [0, 2, 1, 1]
    assert body["correct"] == [True, False, False, True]
    assert body["choices"] == [3, 3, 3, 3]


def test_outcomes_without_the_number_of_choices_are_kept_without_it(app, client, job_id):
    _record(app, job_id, _score(ExampleOutcomes((5, 0, 0, 9), (True, True, False, False))))
    body = client.get(f"/api/v1/evaluations/{job_id}/outcomes/t1").json()
    assert (body["predictions"], body["choices"]) == ([5, 0, 0, 9], None)


def test_a_result_without_outcomes_says_so(app, client, job_id):
    _record(app, job_id, _score(None))
    (result,) = client.get(f"/api/v1/evaluations/{job_id}").json()["results"]
    assert result["has_outcomes"] is False
    response = client.get(f"/api/v1/evaluations/{job_id}/outcomes/t1")
    assert response.status_code == 404
    assert response.json()["detail"]["check"] == "outcomes"
    assert "no per-example outcomes" in response.json()["detail"]["message"]


def test_outcomes_of_a_task_the_job_did_not_score_are_404(client, job_id):
    response = client.get(f"/api/v1/evaluations/{job_id}/outcomes/t2")
    assert response.status_code == 404
    assert "no result on task 't2'" in response.json()["detail"]["message"]


def test_a_rounded_accuracy_matches_its_count(app, job_id):
    # One of three right, reported as 0.333: the count is accuracy * n rounded.
    outcomes = ExampleOutcomes((0, 1, 1), (True, False, False))
    _record(app, job_id, _score(outcomes, accuracy=0.333, n=3))
    with app.state.sessionmaker() as session:
        (row,) = evaluations.job_results(session, job_id)
        assert ExampleOutcomes.from_json(row.outcomes) == outcomes


BAD = {
    "predictions shorter than n": (
        ExampleOutcomes((0, 2, 1), GOOD.correct),
        "outcomes.predictions holds 3 entries for a result over n=4",
    ),
    "correct longer than n": (
        ExampleOutcomes(GOOD.predictions, (*GOOD.correct, True)),
        "outcomes.correct holds 5 entries",
    ),
    "choices of another length": (
        ExampleOutcomes(GOOD.predictions, GOOD.correct, (3, 3)),
        "outcomes.choices holds 2 entries",
    ),
    "predictions not a list": (
        ExampleOutcomes("0211", GOOD.correct),  # type: ignore[arg-type]
        "outcomes.predictions is a str",
    ),
    "a correct entry that is not a boolean": (
        ExampleOutcomes(GOOD.predictions, (1, 0, 0, 1)),  # type: ignore[arg-type]
        "outcomes.correct[0] is 1 (int)",
    ),
    "a negative prediction": (
        ExampleOutcomes((0, -1, 1, 1), GOOD.correct),
        "outcomes.predictions[1] is -1",
    ),
    "a boolean prediction": (
        ExampleOutcomes((0, True, 1, 1), GOOD.correct),
        "outcomes.predictions[1] is True",
    ),
    "a fractional prediction": (
        ExampleOutcomes((0, 1.5, 1, 1), GOOD.correct),  # type: ignore[arg-type]
        "outcomes.predictions[1] is 1.5",
    ),
    "a prediction past the example's choices": (
        ExampleOutcomes((0, 2, 1, 3), GOOD.correct, (3, 3, 3, 3)),
        "outcomes.predictions[3] is 3, but example 3 has 3 choices",
    ),
    "an example without choices": (
        ExampleOutcomes(GOOD.predictions, GOOD.correct, (3, 0, 3, 3)),
        "outcomes.choices[1] is 0",
    ),
    "a count of correct examples that is not the accuracy's": (
        ExampleOutcomes(GOOD.predictions, (True, True, True, False)),
        "outcomes.correct holds 3 correct of 4, but the accuracy is 0.5",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_outcomes_that_do_not_fit_the_result_are_refused_with_422(app, job_id, case):
    outcomes, message = BAD[case]
    with pytest.raises(InvalidOutcomes) as refused:
        _record(app, job_id, _score(outcomes))
    assert refused.value.status_code == 422
    body = refused.value.to_dict()
    assert (body["error"], body["check"]) == ("invalid_result", "outcomes")
    assert body["message"].startswith("task 't1': ")
    assert message in body["message"]
    assert body["expected"]
    with app.state.sessionmaker() as session:
        assert evaluations.job_results(session, job_id) == []  # nothing was written
    _record(app, job_id, _score(GOOD))  # the job is still the worker's: a good report lands


def test_outcomes_over_more_examples_than_are_kept_are_refused(app, job_id):
    n = MAX_OUTCOME_EXAMPLES + 1
    outcomes = ExampleOutcomes((0,) * n, (True,) * n)
    with pytest.raises(InvalidOutcomes, match=f"more than the {MAX_OUTCOME_EXAMPLES} whose"):
        _record(app, job_id, _score(outcomes, accuracy=1.0, n=n))


def test_an_import_with_outcomes_that_do_not_fit_writes_nothing(app, client, maintainer):
    create_release(client, maintainer, method="base", base_model="tiny")
    request = EvaluationCreate(release=1, tasks=["t1", "t2"], examples_per_task=4)
    good = _score(GOOD)
    bad = evaluations.TaskScore(**{**good.__dict__, "task": "t2", "accuracy": 0.75})
    with app.state.sessionmaker() as session:
        token = next(t for t in list_tokens(session) if t.is_maintainer)
        with pytest.raises(InvalidOutcomes, match="task 't2'"):
            evaluations.import_job(session, request, [good, bad], by=token, source={})
        assert evaluations.list_jobs(session) == []
        job = evaluations.import_job(session, request, [good, _score_t2()], by=token, source={})
        assert [r.has_outcomes for r in evaluations.job_results(session, job.id)] == [True, False]


def _score_t2() -> evaluations.TaskScore:
    return evaluations.TaskScore("t2", 0.75, 0.2, 4, "test", 0.1, None)


def test_the_worker_sends_outcomes_with_choices_and_none_past_the_limit():
    result = TaskResult("t1", 0.5, 0.25, 4, 1.0, 10, predictions=(0, 2, 1, 1), correct=GOOD.correct)
    examples = [Example(prompt="q", choices=("a", "b", "c"), answer=0)] * 4
    assert example_outcomes(result, examples) == GOOD
    n = MAX_OUTCOME_EXAMPLES + 1
    large = TaskResult("t1", 1.0, 0.0, n, 1.0, n, predictions=(0,) * n, correct=(True,) * n)
    assert example_outcomes(large, [examples[0]] * n) is None
