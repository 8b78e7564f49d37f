"""Evaluation routes: queue a job (maintainers), read its state and results."""

from __future__ import annotations

from fastapi import APIRouter, Response

from coordinator.core.deps import MaintainerDep, ReaderDep, SessionDep, SettingsDep
from coordinator.core.errors import ERROR_RESPONSE
from coordinator.core.params import PAGE_SIZE, Offset, PageLimit, RowFilter, RowNumber
from coordinator.credit import service as credit
from coordinator.evaluations import service
from coordinator.evaluations.models import JobState
from coordinator.evaluations.schemas import EvaluationCreate, EvaluationDetail, OutcomesInfo
from coordinator.evaluations.task_names import check_requested_tasks
from protocol import API_PREFIX

# A page of the evaluation list (every job would be unbounded).

router = APIRouter(prefix="/evaluations", tags=["evaluations"])


@router.post(
    "",
    status_code=201,
    summary="Queue an evaluation of a release (maintainers); a worker runs it",
    responses={
        401: ERROR_RESPONSE,
        403: ERROR_RESPONSE,
        404: ERROR_RESPONSE,
        409: ERROR_RESPONSE,
        422: ERROR_RESPONSE,
    },
)
def create_evaluation(
    body: EvaluationCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    token: MaintainerDep,
) -> EvaluationDetail:
    check_requested_tasks(body, settings.tasks_dir)
    job = service.create_job(session, body, by=token)
    response.headers["Location"] = f"{API_PREFIX}/evaluations/{job.id}"
    # A small release's credit comes with its evaluation: N more jobs (docs, "Credit").
    credit_jobs = credit.auto_credit(
        session, job, max_experts=settings.auto_credit_max_experts, by=token.name
    )
    if credit_jobs:
        response.headers["X-Credit-Jobs"] = ",".join(map(str, credit_jobs))
    return EvaluationDetail.of(job, body.release, [])


@router.get(
    "",
    summary="List evaluations, oldest first, one page (X-Total-Count: all that match)",
    responses={422: ERROR_RESPONSE},
)
def list_evaluations(
    session: SessionDep,
    _reader: ReaderDep,
    response: Response,
    release: RowFilter = None,
    state: JobState | None = None,
    limit: PageLimit = PAGE_SIZE,
    offset: Offset = 0,
) -> list[EvaluationDetail]:
    # A page, not every job: maintainers may queue any number of evaluations. The body stays
    # a list (as before); the total is a header.
    total = service.count_jobs(session, release=release, state=state)
    response.headers["X-Total-Count"] = str(total)
    jobs = service.list_jobs(session, release=release, state=state, limit=limit, offset=offset)
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


@router.get(
    "/{job_id}/outcomes/{task:path}",
    summary="One task's per-example outcomes: chosen answers and whether each was right",
    responses={404: ERROR_RESPONSE},
)
def get_outcomes(
    job_id: RowNumber, task: str, session: SessionDep, _reader: ReaderDep
) -> OutcomesInfo:
    result, outcomes = service.task_outcomes(session, job_id, task)
    return OutcomesInfo(
        job_id=job_id,
        task=result.task,
        n=result.n,
        accuracy=result.accuracy,
        predictions=list(outcomes.predictions),
        correct=list(outcomes.correct),
        choices=None if outcomes.choices is None else list(outcomes.choices),
    )
