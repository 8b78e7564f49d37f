"""The leaderboard's JSON."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from protocol import API_VERSION, ApiVersion


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
    method_params: dict[str, float | int | str] = Field(
        default_factory=dict, description="every hyper-parameter of the method, resolved"
    )
    expert: str | None
    base_model: str
    experts: list[str] = Field(description="namespace/name@version of each expert")
    notes: str
    created_at: datetime
    withdrawn: bool = Field(
        default=False, description="a maintainer withdrew it (listed only with include_withdrawn)"
    )
    scores: dict[str, LeaderboardCell] = Field(
        description="task (of the view) -> its newest finished score"
    )
    mean_accuracy: float | None = Field(description="unweighted mean over the scored tasks")
    mean_stderr: float | None = Field(
        default=None, description="standard error of that mean: sqrt(sum stderr^2) / tasks"
    )
    group_means: dict[str, float] = Field(description="mean over held_in / held_out tasks")
    evaluated_at: datetime | None = Field(default=None, description="the newest score's date")


class Leaderboard(BaseModel):
    api_version: ApiVersion = API_VERSION
    tasks: list[str] = Field(description="every task in view some matching release was scored on")
    task_groups: dict[str, str] = Field(description="task -> held_in or held_out, where known")
    releases: list[LeaderboardRow] = Field(description="one page of matching releases, in order")
    filters: dict[str, str | None]
    split: Literal["all", "held_in", "held_out"] = Field(
        default="all", description="the tasks in view"
    )
    evaluated_only: bool = Field(
        default=False, description="only releases with a score on a task in view"
    )
    sort: str = Field(default="release", description="the sort key (see GET /leaderboard)")
    order: Literal["asc", "desc"] = "asc"
    total: int = Field(default=0, description="matching releases on all pages")
    limit: int | None = Field(default=None, description="rows per page (null: every row)")
    offset: int = 0
