"""Credit routes: queue (maintainers) and read each expert's leave-one-out contribution to a
release; thin wrappers over `coordinator.credit.service`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from coordinator.core.deps import MaintainerDep, ReaderDep, SessionDep, SettingsDep
from coordinator.core.errors import ERROR_RESPONSE
from coordinator.core.params import RowNumber
from coordinator.credit import service
from coordinator.credit.schemas import CreditCreate, CreditQueued, ReleaseCredit
from coordinator.evaluations.task_names import check_requested_tasks
from coordinator.releases import service as releases

router = APIRouter(prefix="/releases", tags=["credit"])


@router.post(
    "/{number}/credit",
    status_code=201,
    summary="Queue each expert's leave-one-out evaluation, and the full one, on a spec "
    "(maintainers; idempotent: 200 when every job existed)",
    responses={
        200: {"description": "nothing new queued: every job was queued, running or done"},
        401: ERROR_RESPONSE,
        403: ERROR_RESPONSE,
        404: ERROR_RESPONSE,
        409: ERROR_RESPONSE,
        422: ERROR_RESPONSE,
    },
)
def queue_credit(
    number: RowNumber,
    body: CreditCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    token: MaintainerDep,
) -> CreditQueued:
    check_requested_tasks(body, settings.tasks_dir)
    queued = service.queue_credit(session, number, body, by=token.name)
    if not queued.queued:
        response.status_code = 200
    return queued


@router.get(
    "/{number}/credit",
    summary="Each expert's leave-one-out contribution: the release minus the release "
    "without it, per task and of the held-in and held-out means, with paired intervals",
    responses={404: ERROR_RESPONSE},
)
def get_credit(
    number: RowNumber,
    session: SessionDep,
    _reader: ReaderDep,
    # Compared in Python, never in SQL: no database bound needed.
    examples_per_task: Annotated[
        int | None, Query(ge=1, description="only the spec with this many examples per task")
    ] = None,
    seed: Annotated[int | None, Query(description="only the spec with this seed")] = None,
    tasks: Annotated[
        list[str] | None,
        Query(max_length=1000, description="only the spec on exactly these tasks (repeat it)"),
    ] = None,
) -> ReleaseCredit:
    release = releases.get_release(session, number)
    return service.release_credit(
        session, release, examples_per_task=examples_per_task, seed=seed, tasks=tasks
    )
