"""`GET /leaderboard` (and `/api/v1/leaderboard`): releases x tasks as JSON."""

from __future__ import annotations

from fastapi import APIRouter

from coordinator.core.deps import ReaderDep, SessionDep
from coordinator.leaderboard import service
from coordinator.leaderboard.schemas import Leaderboard
from coordinator.releases.schemas import Method

router = APIRouter(tags=["leaderboard"])


@router.get("/leaderboard", summary="Releases x tasks: accuracy, stderr, n; means per release")
@router.get("/api/v1/leaderboard", include_in_schema=False)
def get_leaderboard(
    session: SessionDep,
    _reader: ReaderDep,
    base_model: str | None = None,
    method: Method | None = None,
) -> Leaderboard:
    return service.leaderboard(session, base_model=base_model, method=method)
