"""The leaderboard's JSON."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

API_VERSION = 1


class LeaderboardCell(BaseModel):
    accuracy: float
    stderr: float
    n: int
    evaluator_version: str
    job_id: int


class LeaderboardRow(BaseModel):
    release: int
    method: str
    top_k: int | None
    expert: str | None
    base_model: str
    experts: list[str] = Field(description="namespace/name@version of each expert")
    notes: str
    created_at: datetime
    scores: dict[str, LeaderboardCell] = Field(description="task -> its newest finished score")
    mean_accuracy: float | None = Field(description="unweighted mean over the scored tasks")
    group_means: dict[str, float] = Field(description="mean over held_in / held_out tasks")


class Leaderboard(BaseModel):
    api_version: Literal[1] = API_VERSION
    tasks: list[str] = Field(description="every task some listed release was scored on")
    task_groups: dict[str, str] = Field(description="task -> held_in or held_out, where tagged")
    releases: list[LeaderboardRow]
    filters: dict[str, str | None]
