"""API bodies of evaluation jobs and their results."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from coordinator.core.params import DB_INT_MAX
from coordinator.evaluations.models import EvaluationJob, EvaluationResult
from coordinator.evaluations.public_errors import redact
from protocol import API_PREFIX, API_VERSION, ApiVersion


class TaskGroups(BaseModel):
    held_in: list[str] = Field(default_factory=list)
    held_out: list[str] = Field(default_factory=list)


class EvaluationCreate(BaseModel):
    """A release x a benchmark: task names, examples per task, the split's seed."""

    # Bounded like every release number (a 64-bit one was a 500 on SQLite: fuzzing).
    release: int = Field(ge=1, le=DB_INT_MAX, description="the release number")
    tasks: list[str] = Field(
        min_length=1,
        max_length=1000,
        description="BIG-bench task names: lowercase ASCII letters, digits and '_' (or "
        "parent/subtask, when the coordinator knows the tasks directory)",
        examples=[["hyperbaton", "navigate"]],
    )
    examples_per_task: int = Field(ge=1, le=1_000_000, examples=[60])
    seed: int = 0
    task_groups: TaskGroups | None = Field(
        default=None,
        description="which tasks are held in (have an expert) and held out (zero-shot); "
        "the leaderboard reports a mean per group",
    )
    allow_yanked: bool = Field(
        default=False,
        description="evaluate even though some of the release's experts are yanked",
    )
    allow_withdrawn: bool = Field(
        default=False, description="evaluate even though the release is withdrawn"
    )

    @model_validator(mode="after")
    def _check_tasks(self) -> EvaluationCreate:
        # Not stripped: a name is taken exactly as sent and checked against the task-name
        # rule (coordinator.evaluations.task_names), so `parity\n` is refused, not renamed.
        names = list(self.tasks)
        if any(not n or len(n) > 200 for n in names):
            raise ValueError("task names are 1 to 200 characters")
        if len(set(names)) != len(names):
            raise ValueError(f"tasks repeat: {sorted({n for n in names if names.count(n) > 1})}")
        self.tasks = names
        if self.task_groups is not None:
            grouped = self.task_groups.held_in + self.task_groups.held_out
            unknown = sorted(set(grouped) - set(names))
            if unknown:
                raise ValueError(f"task_groups name tasks that are not in tasks: {unknown}")
            both = sorted(set(self.task_groups.held_in) & set(self.task_groups.held_out))
            if both:
                raise ValueError(f"tasks both held in and held out: {both}")
        return self


class ResultInfo(BaseModel):
    task: str
    accuracy: float
    stderr: float
    n: int
    evaluator_version: str
    precision: str | None = Field(
        default=None, description="what the model computed in: float32 or bfloat16"
    )
    seconds: float | None
    routing_stats: dict[str, Any] | None = Field(
        description="per-layer expert frequencies (docs/coordinator.md, 'Routing statistics')"
    )
    has_outcomes: bool = Field(
        default=False,
        description="per-example outcomes are stored (GET /evaluations/{id}/outcomes/{task})",
    )
    created_at: datetime

    @classmethod
    def of(cls, result: EvaluationResult) -> ResultInfo:
        return cls(
            task=result.task,
            accuracy=result.accuracy,
            stderr=result.stderr,
            n=result.n,
            evaluator_version=result.evaluator_version,
            precision=result.precision,
            seconds=result.seconds,
            routing_stats=result.routing_stats,
            has_outcomes=result.has_outcomes,
            created_at=result.created_at,
        )


class OutcomesInfo(BaseModel):
    """One task's per-example outcomes (docs/coordinator.md, "Per-example outcomes")."""

    api_version: ApiVersion = API_VERSION
    job_id: int
    task: str
    n: int
    accuracy: float
    predictions: list[int] = Field(description="per example, the chosen answer's index")
    correct: list[bool] = Field(description="per example, whether that answer was right")
    choices: list[int] | None = Field(
        default=None, description="per example, its number of choices (when reported)"
    )


class EvaluationDetail(BaseModel):
    api_version: ApiVersion = API_VERSION
    id: int
    release: int
    spec: dict[str, Any]
    state: Literal["queued", "running", "done", "failed"]
    attempts: int
    worker_id: str | None
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    results: list[ResultInfo]
    url: str

    @classmethod
    def of(
        cls, job: EvaluationJob, release_number: int, results: list[EvaluationResult]
    ) -> EvaluationDetail:
        return cls(
            id=job.id,
            release=release_number,
            spec=job.spec,
            state=job.state,
            attempts=job.attempts,
            # Public: no paths or host names, also in rows written before the redaction.
            worker_id=None if job.worker_id is None else redact(job.worker_id),
            lease_expires_at=job.lease_expires_at,
            heartbeat_at=job.heartbeat_at,
            error=None if job.error is None else redact(job.error),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            results=[ResultInfo.of(r) for r in results],
            url=f"{API_PREFIX}/evaluations/{job.id}",
        )
