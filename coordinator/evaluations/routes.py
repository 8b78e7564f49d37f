"""Evaluation routes: queue a job (maintainers), read its state and results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from coordinator.core.deps import MaintainerDep, ReaderDep, SessionDep
from coordinator.core.errors import ERROR_RESPONSE
from coordinator.evaluations import service
from coordinator.evaluations.models import JobState
from coordinator.evaluations.schemas import EvaluationCreate, EvaluationDetail
from protocol import API_PREFIX

# Ids are 32-bit integers in the database: a larger one is a 422, not a 500.
RowNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]

router = APIRouter(prefix="/evaluations", tags=["evaluations"])


@router.post(
    "",
    status_code=201,
    summary="Queue an evaluation of a release (maintainers); a worker runs it",
    responses={401: ERROR_RESPONSE, 403: ERROR_RESPONSE, 404: ERROR_RESPONSE, 422: ERROR_RESPONSE},
)
def create_evaluation(
    body: EvaluationCreate, response: Response, session: SessionDep, token: MaintainerDep
) -> EvaluationDetail:
    job = service.create_job(session, body, by=token)
    response.headers["Location"] = f"{API_PREFIX}/evaluations/{job.id}"
    return EvaluationDetail.of(job, body.release, [])


@router.get("", summary="List evaluations")
def list_evaluations(
    session: SessionDep,
    _reader: ReaderDep,
    release: int | None = None,
    state: JobState | None = None,
) -> list[EvaluationDetail]:
    jobs = service.list_jobs(session, release=release, state=state)
    return [
        EvaluationDetail.of(
            j, service.release_number(session, j), service.job_results(session, j.id)
        )
        for j in jobs
    ]


@router.get(
    "/{job_id}", summary="An evaluation: state, attempts, results", responses={404: ERROR_RESPONSE}
)
def get_evaluation(job_id: RowNumber, session: SessionDep, _reader: ReaderDep) -> EvaluationDetail:
    job = service.get_job(session, job_id)
    return EvaluationDetail.of(
        job, service.release_number(session, job), service.job_results(session, job.id)
    )
