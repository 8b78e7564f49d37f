"""Release routes: thin wrappers over `coordinator.releases.service`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from coordinator.core.deps import MaintainerDep, ReaderDep, SessionDep
from coordinator.core.errors import ERROR_RESPONSE
from coordinator.evaluations import service as evaluations
from coordinator.leaderboard import service as leaderboard
from coordinator.releases import service
from coordinator.releases.schemas import (
    JobInfo,
    Method,
    ReleaseCreate,
    ReleaseDetail,
    ReleaseSummary,
    ScoreInfo,
    ScoresSummary,
    release_url,
)

# Ids are 32-bit integers in the database: a larger one is a 422, not a 500.
RowNumber = Annotated[int, Path(ge=1, le=2**31 - 1)]

router = APIRouter(prefix="/releases", tags=["releases"])


@router.post(
    "",
    status_code=201,
    summary="Create a release (maintainers): a method and k over expert versions",
    responses={401: ERROR_RESPONSE, 403: ERROR_RESPONSE, 409: ERROR_RESPONSE, 422: ERROR_RESPONSE},
)
def create_release(
    body: ReleaseCreate, response: Response, session: SessionDep, token: MaintainerDep
) -> ReleaseDetail:
    release = service.create_release(session, body, by=token)
    response.headers["Location"] = release_url(release.number)
    return ReleaseDetail.of_scored(release, _scores(session, release.id))


@router.get("", summary="List releases")
def list_releases(
    session: SessionDep,
    _reader: ReaderDep,
    base_model: str | None = None,
    method: Method | None = None,
) -> list[ReleaseSummary]:
    releases = service.list_releases(session, base_model=base_model, method=method)
    return [ReleaseSummary.of(r) for r in releases]


@router.get(
    "/{number}", summary="A release: experts, manifest and scores", responses={404: ERROR_RESPONSE}
)
def get_release(number: RowNumber, session: SessionDep, _reader: ReaderDep) -> ReleaseDetail:
    release = service.get_release(session, number)
    return ReleaseDetail.of_scored(release, _scores(session, release.id))


@router.get(
    "/{number}/manifest",
    summary="The artifact manifest phatgoose.load_release reads",
    responses={404: ERROR_RESPONSE},
)
def get_manifest(number: RowNumber, session: SessionDep, _reader: ReaderDep) -> dict[str, Any]:
    return service.get_release(session, number).manifest


def _scores(session: SessionDep, release_id: int) -> ScoresSummary:
    scores = evaluations.latest_scores(session, [release_id]).get(release_id, {})
    jobs = evaluations.list_jobs_of_release(session, release_id)
    groups = leaderboard.task_groups(session)  # the leaderboard's rule, so both agree
    accuracies = {task: result.accuracy for task, result in scores.items()}
    return ScoresSummary(
        tasks={
            task: ScoreInfo(
                accuracy=result.accuracy,
                stderr=result.stderr,
                n=result.n,
                evaluator_version=result.evaluator_version,
                job_id=result.job_id,
                group=groups.get(task),
                routing_stats=result.routing_stats,
            )
            for task, result in sorted(scores.items())
        },
        mean_accuracy=leaderboard.mean_accuracy(list(accuracies.values())),
        group_means=leaderboard.group_means(accuracies, groups),
        evaluations=[JobInfo(id=j.id, state=j.state) for j in jobs],
    )
