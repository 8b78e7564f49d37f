"""Service routes: health and the start-up report."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sqlalchemy import text

import phatgoose
from coordinator.core.deps import MaintainerDep, SessionDep

router = APIRouter(tags=["service"])


class Health(BaseModel):
    status: str
    version: str
    database: str


@router.get("/health", summary="Liveness and database reachability")
def health(session: SessionDep) -> Health:
    session.execute(text("SELECT 1"))
    return Health(
        status="ok", version=phatgoose.__version__, database=session.get_bind().dialect.name
    )


@router.get("/admin/startup-report", summary="What the start-up checks found (maintainers)")
def startup_report(request: Request, _maintainer: MaintainerDep) -> dict[str, Any]:
    report = request.app.state.startup_report
    return {"healthy": report.healthy, **asdict(report)}
