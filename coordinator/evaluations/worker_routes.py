"""The job API of remote evaluation workers: lease a job, heartbeat, report each task's
result, then complete or fail the attempt.

A worker elsewhere needs only the coordinator's URL and a worker (or maintainer) token
(`require_worker`); it reads the release's files through the catalog's own download routes.
Every route calls the service functions the local worker calls (`claim_job`, `heartbeat`,
`record_result`, `complete_job`, `fail_attempt`): one lease logic for both. The worker's
`worker_id` is recorded under its token's name (`<token name>/<worker_id>`), so a token can
act only on the leases it took: another token that knows a worker's public id cannot
heartbeat, report or end that worker's job.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from coordinator.auth.models import Token
from coordinator.core.deps import SessionDep, WorkerDep
from coordinator.core.errors import ERROR_RESPONSE, Conflict
from coordinator.core.params import RowNumber
from coordinator.evaluations import service
from coordinator.evaluations.public_errors import redact
from coordinator.evaluations.schemas import (
    Alive,
    CompleteRequest,
    EvaluationDetail,
    FailRequest,
    HeartbeatRequest,
    LeasedJob,
    LeaseRequest,
    ResultReport,
    StoredResult,
)
from coordinator.evaluations.task_names import InvalidTask
from protocol.tasks import TASK_NAME_EXPECTED, TaskNameError, check_task_name

router = APIRouter(prefix="/evaluations", tags=["evaluation workers"])


class LeaseLostError(Conflict):
    """The job is not (or no longer) leased to this worker: its lease expired and another
    worker took it, or the attempt ended."""

    error = "lease_lost"
    check = "lease"


_LEASE_LOST: dict[str, Any] = {"description": "lease_lost: the job is no longer this worker's"}
_REFUSALS: dict[int | str, dict[str, Any]] = {
    401: ERROR_RESPONSE,
    403: ERROR_RESPONSE,
    422: ERROR_RESPONSE,
}


def scoped_worker_id(token: Token, worker_id: str) -> str:
    """The worker as job rows record it: under its token's name."""
    return f"{token.name}/{worker_id}"


def _lease_lost(error: service.LeaseLost) -> LeaseLostError:
    return LeaseLostError(
        str(error), expected="a job leased to this worker: stop it and lease another"
    )


@router.post(
    "/lease",
    response_model=LeasedJob,
    summary="Lease the oldest claimable evaluation job (workers and maintainers)",
    responses={
        200: {"description": "a job, leased to this worker until lease_expires_at"},
        204: {"description": "no job is claimable now: ask again later"},
        **_REFUSALS,
    },
)
def lease(body: LeaseRequest, session: SessionDep, token: WorkerDep) -> LeasedJob | Response:
    worker_id = scoped_worker_id(token, body.worker_id)
    job = service.claim_job(
        session, worker_id, lease_seconds=body.lease_seconds, max_attempts=body.max_attempts
    )
    if job is None:
        return Response(status_code=204)
    assert job.lease_expires_at is not None  # a running job has a lease
    release = service.job_release(session, job)
    return LeasedJob(
        id=job.id,
        release=release.number,
        attempts=job.attempts,
        worker_id=worker_id,
        lease_expires_at=job.lease_expires_at,
        spec=job.spec,
        done_tasks=sorted(service.done_tasks(session, job.id)),
        manifest=release.manifest,
        artifact_digest=release.artifact_digest,
        curation_error=service.curation_error(session, job, release),
    )


@router.post(
    "/{job_id}/heartbeat",
    summary="Extend the lease of a job this worker holds",
    responses={409: _LEASE_LOST, **_REFUSALS},
)
def heartbeat(
    job_id: RowNumber, body: HeartbeatRequest, session: SessionDep, token: WorkerDep
) -> Alive:
    worker_id = scoped_worker_id(token, body.worker_id)
    if not service.heartbeat(session, job_id, worker_id, lease_seconds=body.lease_seconds):
        raise _lease_lost(
            service.LeaseLost(f"evaluation {job_id} is no longer leased to {worker_id}")
        )
    return Alive()


@router.post(
    "/{job_id}/results",
    status_code=201,
    summary="Store one task's result of a job this worker holds",
    responses={
        409: {"description": "lease_lost, or result_exists: the task is stored already"},
        **_REFUSALS,
    },
)
def report_result(
    job_id: RowNumber, body: ResultReport, session: SessionDep, token: WorkerDep
) -> StoredResult:
    try:
        check_task_name(body.task)
    except TaskNameError as error:
        raise InvalidTask(
            str(error), expected=TASK_NAME_EXPECTED, extra={"task": body.task}
        ) from None
    score = service.TaskScore(
        task=body.task,
        accuracy=body.accuracy,
        stderr=body.stderr,
        n=body.n,
        evaluator_version=body.evaluator_version,
        seconds=body.seconds,
        routing_stats=None
        if body.routing_stats is None
        else body.routing_stats.model_dump(mode="json"),
        precision=body.precision,
        outcomes=None if body.outcomes is None else body.outcomes.to_outcomes(),
    )
    try:
        service.record_result(session, job_id, scoped_worker_id(token, body.worker_id), score)
    except service.LeaseLost as error:
        raise _lease_lost(error) from None
    return StoredResult(job=job_id, task=body.task)


@router.post(
    "/{job_id}/complete",
    summary="End a job this worker holds: every task is scored",
    responses={409: _LEASE_LOST, **_REFUSALS},
)
def complete(
    job_id: RowNumber, body: CompleteRequest, session: SessionDep, token: WorkerDep
) -> EvaluationDetail:
    try:
        service.complete_job(session, job_id, scoped_worker_id(token, body.worker_id))
    except service.LeaseLost as error:
        raise _lease_lost(error) from None
    return _detail(session, job_id)


@router.post(
    "/{job_id}/fail",
    summary="End this worker's attempt at a job: requeued, or failed (final, or out of attempts)",
    responses={409: _LEASE_LOST, **_REFUSALS},
)
def fail(
    job_id: RowNumber, body: FailRequest, session: SessionDep, token: WorkerDep
) -> EvaluationDetail:
    try:
        service.fail_attempt(
            session,
            job_id,
            scoped_worker_id(token, body.worker_id),
            redact(body.error),  # public: the worker should have sent nothing private
            max_attempts=body.max_attempts,
            final=body.final,
        )
    except service.LeaseLost as error:
        raise _lease_lost(error) from None
    return _detail(session, job_id)


def _detail(session: SessionDep, job_id: int) -> EvaluationDetail:
    job = service.get_job(session, job_id)
    return EvaluationDetail.of(
        job, service.release_number(session, job), service.job_results(session, job.id)
    )
