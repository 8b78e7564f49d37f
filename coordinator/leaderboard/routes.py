"""`GET /leaderboard` (and `/api/v1/leaderboard`): releases x tasks as JSON, one page of
`service.rank_releases`, the query the web pages read too; `GET /leaderboard/compare` (and
`/api/v1/leaderboard/compare`): two releases on the same examples, `comparisons.compare`."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from coordinator.core.deps import ReaderDep, SessionDep
from coordinator.core.errors import ERROR_RESPONSE
from coordinator.core.params import DB_INT_MAX, Offset
from coordinator.leaderboard import comparisons, service
from coordinator.leaderboard.schemas import Comparison, Leaderboard
from coordinator.leaderboard.service import MAX_PAGE_SIZE, PAGE_SIZE, SORT_PATTERN, Split
from coordinator.releases.schemas import Method
from protocol import API_PREFIX

router = APIRouter(tags=["leaderboard"])


@router.get("/leaderboard", summary="Releases x tasks: accuracy, stderr, n; means per release")
@router.get(f"{API_PREFIX}/leaderboard", include_in_schema=False)
def get_leaderboard(
    session: SessionDep,
    _reader: ReaderDep,
    base_model: str | None = None,
    method: Method | None = None,
    split: Annotated[
        Split, Query(description="tasks in view: all, held_in or held_out (held-in accepted)")
    ] = Split.ALL,
    evaluated_only: Annotated[
        bool, Query(description="only releases scored on a task in view (as the web page)")
    ] = False,
    include_withdrawn: Annotated[
        bool, Query(description="also rank releases a maintainer withdrew (left out by default)")
    ] = False,
    sort: Annotated[
        str,
        Query(
            pattern=SORT_PATTERN,
            description="mean, held_in, held_out, release, method, base_model, experts, date "
            "or task:<name>; rows without a value come last",
        ),
    ] = "release",
    order: Literal["asc", "desc"] = "asc",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = PAGE_SIZE,
    offset: Offset = 0,
) -> Leaderboard:
    view = service.LeaderboardView(
        base_model=base_model,
        method=method,
        split=split,
        evaluated_only=evaluated_only,
        include_withdrawn=include_withdrawn,
        sort=sort,
        descending=order == "desc",
        limit=limit,
        offset=offset,
    )
    return service.leaderboard(session, view)


ReleaseNumber = Annotated[int, Query(ge=1, le=DB_INT_MAX, description="a release number")]


@router.get(
    "/leaderboard/compare",
    summary="Release a against release b on the same examples: paired differences per task "
    "and of the held-in and held-out means",
    responses={404: ERROR_RESPONSE, 422: ERROR_RESPONSE},
)
@router.get(f"{API_PREFIX}/leaderboard/compare", include_in_schema=False)
def compare_releases(
    session: SessionDep,
    _reader: ReaderDep,
    a: ReleaseNumber,
    b: ReleaseNumber,
    a_job: Annotated[
        int | None,
        Query(
            ge=1, le=DB_INT_MAX, description="the evaluation of a to compare (default: see docs)"
        ),
    ] = None,
    b_job: Annotated[
        int | None, Query(ge=1, le=DB_INT_MAX, description="the evaluation of b to compare")
    ] = None,
    # Compared in Python, never in SQL: no database bound needed.
    examples_per_task: Annotated[
        int | None, Query(ge=1, description="only evaluations on this many examples per task")
    ] = None,
    seed: Annotated[int | None, Query(description="only evaluations with this seed")] = None,
) -> Comparison:
    return comparisons.compare(
        session,
        a,
        b,
        groups=service.task_groups(session),
        a_job=a_job,
        b_job=b_job,
        examples_per_task=examples_per_task,
        seed=seed,
    )
