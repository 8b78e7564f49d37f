"""Evaluation jobs: queueing, leasing to workers, results.

A job's life: `queued` -> `running` (a worker holds a lease it renews by heartbeats) ->
`done`, or back to `queued` after a failed attempt, or `failed` after `max_attempts`.
A worker that dies stops heartbeating; once its lease expires any worker may claim the
job again (counting another attempt). Claims are atomic: PostgreSQL takes the row with
`SELECT ... FOR UPDATE SKIP LOCKED`, SQLite serialises writers with `BEGIN IMMEDIATE`.
Every write a worker makes for a job (a task's result, a heartbeat, the end) first checks,
under the row lock, that the job is still leased to it: a worker that lost its lease can
write nothing, so no task is stored twice and a job is never finished by two workers.
Workers on the coordinator's machine call these functions directly (`coordinator.worker`);
remote ones reach the same functions through the job API
(`coordinator.evaluations.worker_routes`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Select, func, or_, select, update
from sqlalchemy.orm import Session

from coordinator.auth.models import Token
from coordinator.core.db import begin_write, utcnow
from coordinator.core.errors import Conflict, NotFound, Unprocessable
from coordinator.evaluations.models import EvaluationJob, EvaluationResult, JobState
from coordinator.evaluations.outcomes import ExampleOutcomes, check_outcomes
from coordinator.evaluations.schemas import DEFAULT_MAX_ATTEMPTS as DEFAULT_MAX_ATTEMPTS
from coordinator.evaluations.schemas import EvaluationCreate
from coordinator.releases import service as releases
from coordinator.releases.models import Release
from protocol.methods import METHOD_SPECS
from protocol.precision import ComputePrecisionName

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """The job is no longer leased to this worker (expired and taken by another, or ended)."""


class ResultExists(Conflict):
    """The job already holds a result on this task (409): each task is stored once."""

    error = "result_exists"
    check = "result"


class NotAJobTask(Unprocessable):
    """A result on a task the job does not list (422)."""

    error = "invalid_result"
    check = "task"


class InvalidLeaveOut(Unprocessable):
    """A leave-one-out evaluation the release cannot have (422): the expert is not one of
    its experts, or its method routes over none, or it has a single expert."""

    error = "invalid_leave_out"
    check = "leave_out"


def create_job(session: Session, request: EvaluationCreate, *, by: Token | str) -> EvaluationJob:
    """Queue `request` (by a token, or by an operator's name); a `leave_out` is checked
    against the release (`check_leave_out`)."""
    release = releases.get_release(session, request.release)
    job = new_job(session, release, request, by=by)
    begin_write(session)
    session.add(job)
    session.commit()
    log_queued(job, release)
    return job


def new_job(
    session: Session, release: Release, request: EvaluationCreate, *, by: Token | str
) -> EvaluationJob:
    """The queued job of `request` on `release`, checked as `create_job` checks it
    (curation, `leave_out`) and not yet added: `create_job` adds and commits it, a release
    channel adds it in the transaction that creates its release (`coordinator.channels`)."""
    check_curation(
        session, release, allow_withdrawn=request.allow_withdrawn, allow_yanked=request.allow_yanked
    )
    if request.leave_out is not None:
        check_leave_out(release, request.leave_out)
    spec = job_spec(request)
    spec["requested_by"] = by if isinstance(by, str) else by.name
    return EvaluationJob(release_id=release.id, spec=spec, state=JobState.QUEUED)


def log_queued(job: EvaluationJob, release: Release) -> None:
    leave_out = job.spec.get("leave_out")
    log.info(
        "queued evaluation %d: release %d on %d task(s)%s by %s",
        job.id,
        release.number,
        len(job.spec.get("tasks") or []),
        f" without {leave_out}" if leave_out else "",
        job.spec.get("requested_by"),
    )


def release_refs(release: Release) -> list[str]:
    """The release's experts as its manifest names them (namespace/name@version), in order."""
    return [str(entry["ref"]) for entry in release.manifest.get("experts") or []]


def check_leave_out(release: Release, ref: str) -> None:
    """`InvalidLeaveOut` (422) unless the release can be evaluated without `ref`: its method
    routes or merges over its experts (not `base`, nor `single`, whose one expert is the
    whole release), it has at least 2 experts, and `ref` is one of them."""
    spec = METHOD_SPECS.get(release.method)  # type: ignore[call-overload]
    refs = release_refs(release)
    if spec is None or not spec.takes_experts or spec.single_expert:
        raise InvalidLeaveOut(
            f"release {release.number} uses method {release.method!r}, which does not route "
            "or merge over its experts: leaving one out measures nothing",
            expected="a release whose method routes or merges over experts (not base or single)",
        )
    if len(refs) < 2:
        raise InvalidLeaveOut(
            f"release {release.number} has {len(refs)} expert(s): without it nothing is left "
            "to route over",
            expected="a release with at least 2 experts",
        )
    if ref not in refs:
        raise InvalidLeaveOut(
            f"{ref!r} is not an expert of release {release.number}",
            expected=f"one of {', '.join(refs)}",
        )


def is_leave_out(spec: Mapping[str, Any] | None) -> bool:
    """Whether a job's spec is a leave-one-out evaluation (for credit), which never counts
    as its release's scores."""
    return (spec or {}).get("leave_out") is not None


def counts_as_scores() -> ColumnElement[bool]:
    """`is_leave_out`'s negation as SQL on `EvaluationJob`: the jobs whose results may be a
    release's scores (every query of scores, comparisons and task groups uses it)."""
    return EvaluationJob.spec["leave_out"].as_string().is_(None)


def job_spec(request: EvaluationCreate) -> dict[str, Any]:
    """What a job records of its request (the release is the job's row); an override is
    recorded only when used, so jobs with the same spec are the same experiment."""
    unused = {name for name in ("allow_yanked", "allow_withdrawn") if not getattr(request, name)}
    return request.model_dump(mode="json", exclude={"release", *unused}, exclude_none=True)


def check_curation(
    session: Session, release: Release, *, allow_withdrawn: bool, allow_yanked: bool
) -> None:
    """A withdrawn release, or one with yanked experts, is evaluated only on request: its
    scores would rank what curation took out. Checked when a job is queued and again when
    a worker runs it (curation may act in between); `Conflict` says why."""
    if release.withdrawn_at is not None and not allow_withdrawn:
        raise Conflict(
            f"release {release.number} is withdrawn ({release.withdrawn_reason}); pass "
            "allow_withdrawn: true to evaluate it anyway",
            check="withdrawn",
            expected="a release that is not withdrawn, or allow_withdrawn: true",
        )
    yanked = releases.yanked_experts(session, [release.id])[release.id]
    if yanked and not allow_yanked:
        raise Conflict(
            f"release {release.number} has yanked experts: {', '.join(yanked)}; pass "
            "allow_yanked: true to evaluate it anyway",
            check="yanked",
            expected="a release without yanked experts, or allow_yanked: true",
        )


def curation_error(session: Session, job: EvaluationJob, release: Release) -> str | None:
    """Why a worker must not run `job` now (`check_curation` with the overrides its spec
    records), or None. Every worker asks this, the local one directly and a remote one in
    the lease reply, so both give a withdrawn release's job the same verdict."""
    try:
        check_curation(
            session,
            release,
            allow_withdrawn=bool(job.spec.get("allow_withdrawn")),
            allow_yanked=bool(job.spec.get("allow_yanked")),
        )
    except Conflict as error:
        return error.message
    return None


def job_release(session: Session, job: EvaluationJob) -> Release:
    release = session.get(Release, job.release_id)
    assert release is not None  # a foreign key
    return release


def get_job(session: Session, job_id: int) -> EvaluationJob:
    job = session.get(EvaluationJob, job_id)
    if job is None:
        raise NotFound(f"no evaluation {job_id}")
    return job


def _jobs_query(release: int | None, state: str | None) -> Select[EvaluationJob]:
    query = select(EvaluationJob)
    if release is not None:
        query = query.join(Release, EvaluationJob.release_id == Release.id).where(
            Release.number == release
        )
    if state is not None:
        query = query.where(EvaluationJob.state == state)
    return query


def list_jobs(
    session: Session,
    *,
    release: int | None = None,
    state: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[EvaluationJob]:
    """Jobs by id; `limit=None`: all of them."""
    query = _jobs_query(release, state).order_by(EvaluationJob.id).offset(offset)
    return list(session.scalars(query if limit is None else query.limit(limit)))


def count_jobs(session: Session, *, release: int | None = None, state: str | None = None) -> int:
    query = _jobs_query(release, state).subquery()
    return session.scalar(select(func.count()).select_from(query)) or 0


def list_jobs_of_release(session: Session, release_id: int) -> list[EvaluationJob]:
    return list(
        session.scalars(
            select(EvaluationJob)
            .where(EvaluationJob.release_id == release_id)
            .order_by(EvaluationJob.id)
        )
    )


def job_results(session: Session, job_id: int) -> list[EvaluationResult]:
    return list(
        session.scalars(
            select(EvaluationResult)
            .where(EvaluationResult.job_id == job_id)
            .order_by(EvaluationResult.id)
        )
    )


def task_outcomes(
    session: Session, job_id: int, task: str
) -> tuple[EvaluationResult, ExampleOutcomes]:
    """A job's result on `task` and its per-example outcomes; `NotFound` says which is
    missing (the job, its result on the task, or outcomes for it)."""
    job = get_job(session, job_id)
    result = session.scalar(
        select(EvaluationResult).where(
            EvaluationResult.job_id == job.id, EvaluationResult.task == task
        )
    )
    if result is None:
        raise NotFound(f"evaluation {job_id} has no result on task {task!r}")
    if result.outcomes is None:
        raise NotFound(
            f"evaluation {job_id}'s result on task {task!r} has no per-example outcomes "
            "(stored before the coordinator kept them, or over more examples than are kept)",
            check="outcomes",
        )
    return result, ExampleOutcomes.from_json(result.outcomes)


def release_number(session: Session, job: EvaluationJob) -> int:
    number = session.scalar(select(Release.number).where(Release.id == job.release_id))
    assert number is not None
    return number


# --- leases ----------------------------------------------------------------------------


def claim_job(
    session: Session,
    worker_id: str,
    *,
    lease_seconds: float,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    now: datetime | None = None,
) -> EvaluationJob | None:
    """Lease the oldest claimable job to `worker_id`: queued, or running with an expired
    lease. A job whose lease expired `max_attempts` times goes to `failed` instead."""
    while True:
        now = now or utcnow()
        begin_write(session)
        job = session.scalar(
            select(EvaluationJob)
            .where(
                or_(
                    EvaluationJob.state == JobState.QUEUED,
                    (EvaluationJob.state == JobState.RUNNING)
                    & (EvaluationJob.lease_expires_at < now),
                )
            )
            .order_by(EvaluationJob.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if job is None:
            session.commit()
            return None
        if job.state == JobState.RUNNING and job.attempts >= max_attempts:
            lost = job.worker_id
            _finish(job, JobState.FAILED, now)
            job.error = (
                f"gave up after {job.attempts} attempts: the lease of worker {lost} expired "
                "(it stopped heartbeating, e.g. it crashed)"
            )
            session.commit()
            log.error("evaluation %d failed: %s", job.id, job.error)
            continue
        if job.state == JobState.RUNNING:
            log.warning(
                "evaluation %d: lease of %s expired; %s takes it over",
                job.id,
                job.worker_id,
                worker_id,
            )
        job.state = JobState.RUNNING
        job.attempts += 1
        job.worker_id = worker_id
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        job.heartbeat_at = now
        job.started_at = job.started_at or now
        session.commit()
        return job


def heartbeat(session: Session, job_id: int, worker_id: str, *, lease_seconds: float) -> bool:
    """Extend the lease; False when the job is no longer leased to `worker_id`."""
    now = utcnow()
    begin_write(session)
    renewed = cast(
        CursorResult[Any],
        session.execute(  # an UPDATE's result has a rowcount
            update(EvaluationJob)
            .where(
                EvaluationJob.id == job_id,
                EvaluationJob.worker_id == worker_id,
                EvaluationJob.state == JobState.RUNNING,
            )
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now)
        ),
    ).rowcount
    session.commit()
    return bool(renewed)


def _owned(session: Session, job_id: int, worker_id: str) -> EvaluationJob:
    """Begin a write holding the job's row, if it is still leased to `worker_id`."""
    begin_write(session)
    job = session.scalar(
        select(EvaluationJob)
        .where(
            EvaluationJob.id == job_id,
            EvaluationJob.worker_id == worker_id,
            EvaluationJob.state == JobState.RUNNING,
        )
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if job is None:
        session.rollback()
        raise LeaseLost(f"evaluation {job_id} is no longer leased to {worker_id}")
    return job


@dataclass(frozen=True)
class TaskScore:
    task: str
    accuracy: float
    stderr: float
    n: int
    evaluator_version: str
    seconds: float
    routing_stats: dict[str, Any] | None
    precision: ComputePrecisionName | None = None  # None: not recorded
    # Per example: the chosen answer and whether it was right (None: not reported).
    outcomes: ExampleOutcomes | None = None


def record_result(session: Session, job_id: int, worker_id: str, score: TaskScore) -> None:
    """Store one task's score, only while the job is leased to `worker_id`. Outcomes that
    do not fit the score are refused (`InvalidOutcomes`, 422) before anything is written,
    as is a task the job does not list (`NotAJobTask`, 422); a task already stored is
    `ResultExists` (409)."""
    outcomes = check_outcomes(score.task, score.accuracy, score.n, score.outcomes)
    job = _owned(session, job_id, worker_id)
    tasks = job.spec.get("tasks")
    if not isinstance(tasks, list) or score.task not in tasks:
        session.rollback()
        raise NotAJobTask(
            f"evaluation {job_id} has no task {score.task!r}",
            expected="one of the job's tasks (its spec)",
            extra={"task": score.task},
        )
    stored = session.scalar(
        select(EvaluationResult.id).where(
            EvaluationResult.job_id == job_id, EvaluationResult.task == score.task
        )
    )
    if stored is not None:
        session.rollback()
        raise ResultExists(
            f"evaluation {job_id} already has a result on task {score.task!r}",
            expected="one result per task",
            extra={"task": score.task},
        )
    session.add(_result_row(job, score, outcomes))
    session.commit()


def _result_row(
    job: EvaluationJob, score: TaskScore, outcomes: ExampleOutcomes | None
) -> EvaluationResult:
    """The row of a score whose outcomes `check_outcomes` returned."""
    return EvaluationResult(
        job_id=job.id,
        release_id=job.release_id,
        task=score.task,
        accuracy=score.accuracy,
        stderr=score.stderr,
        n=score.n,
        evaluator_version=score.evaluator_version,
        seconds=score.seconds,
        routing_stats=score.routing_stats,
        precision=score.precision,
        outcomes=None if outcomes is None else outcomes.to_json(),
    )


def done_tasks(session: Session, job_id: int) -> set[str]:
    """Tasks a job already has results for (an attempt after a crash resumes after them)."""
    tasks = set(
        session.scalars(select(EvaluationResult.task).where(EvaluationResult.job_id == job_id))
    )
    session.commit()
    return tasks


def complete_job(session: Session, job_id: int, worker_id: str) -> None:
    """Mark the job done. Completing again a job this same worker completed is not an
    error: it is a retry whose first answer was lost on the way back (remote workers)."""
    try:
        job = _owned(session, job_id, worker_id)
    except LeaseLost:
        completed = session.scalar(
            select(EvaluationJob.id).where(
                EvaluationJob.id == job_id,
                EvaluationJob.worker_id == worker_id,
                EvaluationJob.state == JobState.DONE,
            )
        )
        session.rollback()
        if completed is None:
            raise
        return
    _finish(job, JobState.DONE, utcnow())
    job.error = None
    session.commit()


def fail_attempt(
    session: Session,
    job_id: int,
    worker_id: str,
    error: str,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    final: bool = False,
) -> JobState:
    """After an attempt raised: back to the queue, or `failed` once attempts are used up,
    or at once when `final` (an error no further attempt can cure: a task name that breaks
    the rule, a release curated out)."""
    job = _owned(session, job_id, worker_id)
    job.error = error[:10_000]
    if final or job.attempts >= max_attempts:
        _finish(job, JobState.FAILED, utcnow())
    else:
        job.state = JobState.QUEUED
        job.worker_id = None
        job.lease_expires_at = None
    session.commit()
    return JobState(job.state)


def _finish(job: EvaluationJob, state: JobState, now: datetime) -> None:
    job.state = state
    job.finished_at = now
    job.lease_expires_at = None


def import_job(
    session: Session,
    request: EvaluationCreate,
    scores: Sequence[TaskScore],
    *,
    by: Token,
    source: Mapping[str, Any],
) -> EvaluationJob:
    """A finished job holding scores computed outside the workers (e.g. a benchmark run).

    The job and its results are written in one transaction and the job is `done` from the
    start, so no worker ever claims it and the leaderboard never sees half of it.
    `source` (JSON) goes to `spec["source"]`: where the scores come from and how.
    """
    release = releases.get_release(session, request.release)
    tasks = [score.task for score in scores]
    if sorted(tasks) != sorted(request.tasks):
        raise ValueError(
            f"imported scores must cover the job's tasks exactly once: tasks {request.tasks}, "
            f"scores for {tasks}"
        )
    checked = [check_outcomes(s.task, s.accuracy, s.n, s.outcomes) for s in scores]
    spec = request.model_dump(mode="json", exclude={"release"}, exclude_none=True)
    spec["requested_by"] = by.name
    spec["source"] = dict(source)
    now = utcnow()
    begin_write(session)
    job = EvaluationJob(
        release_id=release.id,
        spec=spec,
        state=JobState.DONE,
        attempts=1,
        worker_id=f"import:{by.name}",
        started_at=now,
        finished_at=now,
    )
    session.add(job)
    session.flush()
    session.add_all(
        _result_row(job, score, outcomes) for score, outcomes in zip(scores, checked, strict=True)
    )
    session.commit()
    log.info(
        "imported evaluation %d: release %d on %d task(s) by %s",
        job.id,
        release.number,
        len(scores),
        by.name,
    )
    return job


# --- scores ----------------------------------------------------------------------------


def latest_result_ids() -> Select[Any]:
    """The rule for a release's score on a task, as SQL: the id of the newest result (the
    highest id) of every (release, task) from a finished (`done`) job that is not a
    leave-one-out one (`counts_as_scores`). Re-evaluating a release replaces its scores;
    older results stay stored."""
    return (
        select(func.max(EvaluationResult.id))
        .join(EvaluationJob, EvaluationJob.id == EvaluationResult.job_id)
        .where(EvaluationJob.state == JobState.DONE, counts_as_scores())
        .group_by(EvaluationResult.release_id, EvaluationResult.task)
    )


def latest_scores(
    session: Session, release_ids: list[int]
) -> dict[int, dict[str, EvaluationResult]]:
    """Per release id, per task: its result chosen by `latest_result_ids`. Task groups and
    means come from the leaderboard service, the one rule for both."""
    if not release_ids:
        return {}
    results = session.scalars(
        select(EvaluationResult).where(
            EvaluationResult.release_id.in_(release_ids),
            EvaluationResult.id.in_(latest_result_ids()),
        )
    )
    scores: dict[int, dict[str, EvaluationResult]] = {}
    for result in results:
        scores.setdefault(result.release_id, {})[result.task] = result
    return scores
