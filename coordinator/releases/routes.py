"""Release routes: thin wrappers over `coordinator.releases.service`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from coordinator.core.deps import MaintainerDep, ReaderDep, SessionDep
from coordinator.core.errors import ERROR_RESPONSE
from coordinator.core.params import PAGE_SIZE, Offset, PageLimit, RowNumber
from coordinator.evaluations import service as evaluations
from coordinator.leaderboard import service as leaderboard
from coordinator.releases import service
from coordinator.releases.models import Release
from coordinator.releases.schemas import (
    JobInfo,
    Method,
    ReleaseCreate,
    ReleaseDetail,
    ReleaseSummary,
    ScoreInfo,
    ScoresSummary,
    WithdrawRequest,
    release_url,
)

router = APIRouter(prefix="/releases", tags=["releases"])


@router.post(
    "",
    status_code=201,
    summary="Create a release (maintainers): a method, k and its params over expert versions",
    responses={401: ERROR_RESPONSE, 403: ERROR_RESPONSE, 409: ERROR_RESPONSE, 422: ERROR_RESPONSE},
)
def create_release(
    body: ReleaseCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    token: MaintainerDep,
) -> ReleaseDetail:
    release = service.create_release(session, request.app.state.blobs, body, by=token)
    response.headers["Location"] = release_url(release.number)
    return _detail(session, release)


@router.get(
    "",
    summary="List releases, one page by number (the total is in X-Total-Count)",
    responses={200: {"headers": {"X-Total-Count": {"description": "matching releases"}}}},
)
def list_releases(
    response: Response,
    session: SessionDep,
    _reader: ReaderDep,
    base_model: str | None = None,
    method: Method | None = None,
    limit: PageLimit = PAGE_SIZE,
    offset: Offset = 0,
) -> list[ReleaseSummary]:
    page = service.release_page(
        session, base_model=base_model, method=method, limit=limit, offset=offset
    )
    ids = [r.id for r in page.items]
    yanked = service.yanked_experts(session, ids)
    privacy = service.release_privacy(session, ids)
    response.headers["X-Total-Count"] = str(page.total)
    return [ReleaseSummary.of(r, yanked[r.id], privacy[r.id]) for r in page.items]


@router.get(
    "/{number}", summary="A release: experts, manifest and scores", responses={404: ERROR_RESPONSE}
)
def get_release(number: RowNumber, session: SessionDep, _reader: ReaderDep) -> ReleaseDetail:
    return _detail(session, service.get_release(session, number))


@router.post(
    "/{number}/withdraw",
    summary="Withdraw a release (maintainers): new evaluations of it are refused",
    responses={403: ERROR_RESPONSE, 404: ERROR_RESPONSE, 409: ERROR_RESPONSE},
)
def withdraw(
    number: RowNumber, body: WithdrawRequest, session: SessionDep, token: MaintainerDep
) -> ReleaseDetail:
    release = service.get_release(session, number)
    service.withdraw_release(session, release, by_name=token.name, reason=body.reason)
    return _detail(session, release)


@router.post(
    "/{number}/restore",
    summary="Undo a withdrawal (maintainers)",
    responses={403: ERROR_RESPONSE, 404: ERROR_RESPONSE, 409: ERROR_RESPONSE},
)
def restore(number: RowNumber, session: SessionDep, token: MaintainerDep) -> ReleaseDetail:
    release = service.get_release(session, number)
    service.restore_release(session, release, by_name=token.name)
    return _detail(session, release)


def _detail(session: SessionDep, release: Release) -> ReleaseDetail:
    yanked = service.yanked_experts(session, [release.id])[release.id]
    privacy = service.release_privacy(session, [release.id])[release.id]
    return ReleaseDetail.of_scored(release, _scores(session, release), yanked, privacy)


@router.get(
    "/{number}/manifest",
    summary="The artifact manifest phatgoose.load_release reads",
    responses={404: ERROR_RESPONSE},
)
def get_manifest(number: RowNumber, session: SessionDep, _reader: ReaderDep) -> dict[str, Any]:
    return service.get_release(session, number).manifest


# A release body lists its newest jobs only: maintainers may queue any number of them.
JOBS_LISTED = 100


def _scores(session: SessionDep, release: Release) -> ScoresSummary:
    scores = evaluations.latest_scores(session, [release.id]).get(release.id, {})
    total = evaluations.count_jobs(session, release=release.number)
    jobs = evaluations.list_jobs(
        session, release=release.number, limit=JOBS_LISTED, offset=max(0, total - JOBS_LISTED)
    )
    groups = leaderboard.task_groups(session)  # the leaderboard's rule, so both agree
    accuracies = {task: result.accuracy for task, result in scores.items()}
    return ScoresSummary(
        tasks={
            task: ScoreInfo(
                accuracy=result.accuracy,
                stderr=result.stderr,
                n=result.n,
                evaluator_version=result.evaluator_version,
                precision=result.precision,
                job_id=result.job_id,
                group=groups.get(task),
                routing_stats=result.routing_stats,
            )
            for task, result in sorted(scores.items())
        },
        mean_accuracy=leaderboard.mean_accuracy(list(accuracies.values())),
        group_means=leaderboard.group_means(accuracies, groups),
        evaluations=[JobInfo(id=j.id, state=j.state) for j in jobs],
        evaluations_total=total,
    )
