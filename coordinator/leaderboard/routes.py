"""`GET /leaderboard` (and `/api/v1/leaderboard`): releases x tasks as JSON, one page of
`service.rank_releases`, the query the web pages read too."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from coordinator.core.deps import ReaderDep, SessionDep
from coordinator.core.params import Offset
from coordinator.leaderboard import service
from coordinator.leaderboard.schemas import Leaderboard
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
