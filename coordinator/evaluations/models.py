from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, CheckConstraint, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, column_property, mapped_column

from coordinator.core.db import Base, UTCDateTime, utcnow


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class EvaluationJob(Base):
    """A release evaluated on `spec` (`{"tasks": [...], "examples_per_task": n, "seed": s}`;
    with `"leave_out": "ns/name@version"`, the release without that expert, for credit: such
    a job is never the release's scores, `service.counts_as_scores`).

    A worker leases a queued job (`worker_id`, `lease_expires_at`) and heartbeats; a job whose
    lease expired can be taken again, counting `attempts`.
    """

    __tablename__ = "evaluation_jobs"
    __table_args__ = (
        CheckConstraint("state IN ('queued', 'running', 'done', 'failed')", name="state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED, index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class EvaluationResult(Base):
    """One task's score for a release: accuracy with its standard error over `n` examples."""

    __tablename__ = "evaluation_results"
    __table_args__ = (UniqueConstraint("job_id", "task"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("evaluation_jobs.id", ondelete="CASCADE"))
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), index=True)
    task: Mapped[str] = mapped_column(String(200))
    accuracy: Mapped[float]
    stderr: Mapped[float]
    n: Mapped[int]
    evaluator_version: Mapped[str] = mapped_column(String(64))
    # What the model computed in: "float32" or "bfloat16" (phatgoose.precision).
    precision: Mapped[str | None] = mapped_column(String(16))
    seconds: Mapped[float | None]
    routing_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Per-example outcomes (coordinator.evaluations.outcomes), NULL for results stored
    # before migration 0005. Loaded only when read: a leaderboard page holds hundreds of
    # results and needs them only on a comparison's cache miss.
    outcomes: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), deferred=True)
    has_outcomes: Mapped[bool] = column_property(outcomes.is_not(None))
