"""API bodies of credit (docs/coordinator.md, "Credit: leave-one-out contributions")."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from coordinator.evaluations.schemas import EvaluationSpec
from coordinator.leaderboard.schemas import ComparisonSpec, MeanDelta, TaskDelta
from protocol import API_VERSION, ApiVersion

CreditState = Literal["done", "queued", "running", "failed", "missing"]


class CreditCreate(EvaluationSpec):
    """The benchmark credit is computed on: the same body and rules as `POST /evaluations`
    without the release (it is in the path)."""


class CreditQueued(BaseModel):
    """`POST /releases/{n}/credit`: the full evaluation and one leave-one-out evaluation
    per expert on the spec, those that existed and those queued now."""

    api_version: ApiVersion = API_VERSION
    release: int
    spec: ComparisonSpec
    full_job: int = Field(description="the evaluation of the whole release on the spec")
    leave_out_jobs: dict[str, int] = Field(
        description="per expert (namespace/name@version), its leave-one-out evaluation"
    )
    queued: list[int] = Field(description="the jobs queued by this request (empty: none new)")


class ExpertCredit(BaseModel):
    """One expert's contribution: the release minus the release without it."""

    ref: str = Field(description="namespace/name@version")
    namespace: str = Field(description="who contributed it")
    routing_share: float | None = Field(
        description="its share of the routing decisions in the full evaluation (the routing "
        "statistics' `overall`, averaged over tasks); null for methods that route nothing "
        "per token (merges) or before the full evaluation has results"
    )
    state: CreditState = Field(
        description="its leave-one-out evaluation on the spec: done, queued, running, "
        "failed, or missing (never queued)"
    )
    job_id: int | None = Field(description="that leave-one-out evaluation")
    error: str | None = Field(default=None, description="why it failed, when it did")
    means: dict[str, MeanDelta] = Field(
        default_factory=dict,
        description="full - without it, of the mean over all tasks (`all`) and of each group's "
        "(held_in, held_out): a = the release, b = without the expert; positive = it helps. "
        "Empty until both evaluations are done",
    )
    tasks: list[TaskDelta] = Field(default_factory=list, description="the same, per task")
    compare_url: str | None = Field(
        default=None, description="the same pair on the comparison page (per task)"
    )


class ReleaseCredit(BaseModel):
    """`GET /releases/{n}/credit`: every expert's leave-one-out contribution on one spec."""

    api_version: ApiVersion = API_VERSION
    release: int
    method: str
    spec: ComparisonSpec | None = Field(description="the benchmark compared on (null: none yet)")
    full_job: int | None = Field(description="the full evaluation on the spec")
    full_state: CreditState = Field(description="its state")
    reason: str | None = Field(default=None, description="why nothing is computed, if so")
    experts: list[ExpertCredit]
    resamples: int
    confidence: float
