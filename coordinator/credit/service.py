"""Credit for contributors: each expert's leave-one-out contribution to a release.

An expert's contribution to release #n is what the release scores minus what it scores
without that expert, on the same examples. "Without it" is an ordinary evaluation job of the
release whose spec says `leave_out: "namespace/name@version"`: the worker builds the
release's model over the other experts (`phatgoose.load_release(exclude=...)`) and stores
results, routing statistics and per-example outcomes as for any job. Such jobs never count
as the release's scores (`evaluations.service.counts_as_scores`).

- `queue_credit`: the full evaluation and one leave-one-out evaluation per expert on a spec,
  each queued only when none is queued, running or done on that spec (idempotent; one write
  transaction holding the release's row, so two requests at once queue each job once);
  `auto_credit` does the same after an evaluation of a small release is queued.
- `release_credit`: per expert, full - without, per task and of the group means, from
  `leaderboard.comparisons.compare_jobs`: the very numbers `GET /leaderboard/compare` gives
  for the two jobs (a = the full evaluation, b = the leave-one-out one).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.core.db import begin_write
from coordinator.credit.schemas import (
    CreditQueued,
    CreditState,
    ExpertCredit,
    ReleaseCredit,
)
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.models import EvaluationJob, EvaluationResult, JobState
from coordinator.evaluations.public_errors import redact
from coordinator.evaluations.schemas import EvaluationCreate, EvaluationSpec
from coordinator.experts.models import Expert
from coordinator.leaderboard import comparisons
from coordinator.leaderboard import service as leaderboard
from coordinator.leaderboard.comparisons import ALL_TASKS, SpecKey
from coordinator.leaderboard.schemas import PairedDelta
from coordinator.releases import service as releases
from coordinator.releases.models import Release

log = logging.getLogger(__name__)

# A release's jobs read to find its credit: the newest ones (maintainers may queue any number).
JOBS_READ = 5000
# Releases whose credit an expert's page shows: the newest ones containing it.
RELEASES_SHOWN = 10
# A job that is or will be a result: a spec with one of these needs no new job.
_LIVE = (JobState.QUEUED, JobState.RUNNING, JobState.DONE)


def _ref_name(ref: str) -> str:
    """`namespace/name` of `namespace/name@version` (how routing statistics name experts)."""
    return ref.rsplit("@", 1)[0]


def check_creditable(release: Release) -> list[str]:
    """The release's expert refs; `InvalidLeaveOut` (422) when leaving one out means
    nothing (`evaluations.check_leave_out`: base or single, fewer than 2 experts)."""
    refs = evaluations.release_refs(release)
    evaluations.check_leave_out(release, refs[0] if refs else "")
    return refs


# --- queueing ----------------------------------------------------------------------------


def queue_credit(
    session: Session, number: int, request: EvaluationSpec, *, by: str
) -> CreditQueued:
    """Queue, on `request`'s spec, the full evaluation of release `number` and one
    leave-one-out evaluation per expert, each unless one is queued, running or done there.
    Refused as `POST /evaluations` refuses (curation: `Conflict`) and when the release
    cannot be credited (`InvalidLeaveOut`)."""
    release = releases.get_release(session, number)
    refs = check_creditable(release)
    evaluations.check_curation(
        session, release, allow_withdrawn=request.allow_withdrawn, allow_yanked=request.allow_yanked
    )
    return _queue(session, release, refs, request, by=by)


def auto_credit(session: Session, job: EvaluationJob, *, max_experts: int, by: str) -> list[int]:
    """After `job` (an evaluation of a whole release) was queued: when the release has at
    most `max_experts` experts (0: never) and can be credited, queue its leave-one-out
    evaluations on the same spec (`queue_credit`'s rule). The ids queued; [] otherwise."""
    if max_experts <= 0 or evaluations.is_leave_out(job.spec):
        return []
    release = evaluations.job_release(session, job)
    refs = evaluations.release_refs(release)
    if len(refs) > max_experts:
        return []
    try:
        check_creditable(release)
    except evaluations.InvalidLeaveOut:
        return []
    request = EvaluationSpec.model_validate(
        {name: job.spec[name] for name in EvaluationSpec.model_fields if name in job.spec}
    )
    queued = _queue(session, release, refs, request, by=by).queued
    if queued:
        log.info(
            "auto-credit: release %d has %d expert(s) (at most %d): queued leave-one-out "
            "evaluations %s",
            release.number,
            len(refs),
            max_experts,
            queued,
        )
    return queued


def _queue(
    session: Session, release: Release, refs: Sequence[str], request: EvaluationSpec, *, by: str
) -> CreditQueued:
    body = request.model_dump()
    key = SpecKey.of(body)
    assert key is not None  # EvaluationSpec checked the tasks, examples and seed
    begin_write(session)
    # PostgreSQL: holding the release's row serialises two requests for it (SQLite: the
    # write transaction does), so each job is queued once.
    session.execute(select(Release.id).where(Release.id == release.id).with_for_update())
    live: dict[str | None, int] = {}
    for job in session.scalars(
        select(EvaluationJob)
        .where(EvaluationJob.release_id == release.id, EvaluationJob.state.in_(_LIVE))
        .order_by(EvaluationJob.id)
    ):
        if SpecKey.of(job.spec) == key:
            live.setdefault(job.spec.get("leave_out"), job.id)
    queued: list[int] = []
    for ref in [None, *refs]:
        if ref in live:
            continue
        create = EvaluationCreate.model_validate(
            {**body, "release": release.number, "leave_out": ref}
        )
        spec = evaluations.job_spec(create)
        spec["requested_by"] = by
        job = EvaluationJob(release_id=release.id, spec=spec, state=JobState.QUEUED)
        session.add(job)
        session.flush()
        live[ref] = job.id
        queued.append(job.id)
    session.commit()
    if queued:
        log.info(
            "credit of release %d on %s: queued evaluations %s by %s",
            release.number,
            key.describe(),
            queued,
            by,
        )
    return CreditQueued(
        release=release.number,
        spec=key.schema(),
        full_job=live[None],
        leave_out_jobs={ref: live[ref] for ref in refs},
        queued=queued,
    )


# --- reading -----------------------------------------------------------------------------


def routing_shares(stats: Iterable[Mapping[str, Any] | None]) -> dict[str, float]:
    """Per expert name (namespace/name): its `overall` share of the routing decisions,
    averaged over the tasks whose statistics name it (none for merges: no statistics)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for one in stats:
        if not one:
            continue
        names, overall = one.get("experts"), one.get("overall")
        if not isinstance(names, list) or not isinstance(overall, list):
            continue
        if len(names) != len(overall):
            continue
        for name, share in zip(names, overall, strict=True):
            sums[str(name)] = sums.get(str(name), 0.0) + float(share)
            counts[str(name)] = counts.get(str(name), 0) + 1
    return {name: sums[name] / counts[name] for name in sums}


def _state(job: EvaluationJob | None) -> CreditState:
    return "missing" if job is None else JobState(job.state).value


def _preferred(jobs: Sequence[EvaluationJob]) -> EvaluationJob | None:
    """Of jobs on one spec (newest first): the newest done, else running, queued, failed."""
    for state in (JobState.DONE, JobState.RUNNING, JobState.QUEUED, JobState.FAILED):
        found = next((job for job in jobs if job.state == state), None)
        if found is not None:
            return found
    return None


def _chosen_full(
    fulls: Sequence[tuple[EvaluationJob, SpecKey]], done_leave_outs: set[SpecKey]
) -> tuple[EvaluationJob, SpecKey] | None:
    """The full evaluation credit is read on: the newest finished one with a finished
    leave-one-out one on its spec, else the newest finished, else the newest in the queue,
    else the newest (failed)."""
    rules = (
        lambda job, key: job.state == JobState.DONE and key in done_leave_outs,
        lambda job, key: job.state == JobState.DONE,
        lambda job, key: job.state in (JobState.QUEUED, JobState.RUNNING),
        lambda job, key: True,
    )
    for rule in rules:
        found = next(((job, key) for job, key in fulls if rule(job, key)), None)
        if found is not None:
            return found
    return None


def compare_url(number: int, full_job: int, leave_out_job: int) -> str:
    return f"/ui/compare?a={number}&b={number}&a_job={full_job}&b_job={leave_out_job}"


def release_credit(
    session: Session,
    release: Release,
    *,
    examples_per_task: int | None = None,
    seed: int | None = None,
    tasks: Collection[str] | None = None,
    refs: Collection[str] | None = None,
    groups: Mapping[str, str] | None = None,
) -> ReleaseCredit:
    """Every expert's (or those of `refs`) contribution to `release`, on the spec of the
    full evaluation `_chosen_full` picks among those matching the filters. `groups`: the
    leaderboard's task groups (read when not given)."""
    entries = [e for e in release.manifest.get("experts") or [] if refs is None or e["ref"] in refs]
    wanted_tasks = None if tasks is None else tuple(sorted(set(tasks)))
    jobs = session.scalars(
        select(EvaluationJob)
        .where(EvaluationJob.release_id == release.id)
        .order_by(EvaluationJob.id.desc())
        .limit(JOBS_READ)
    )
    fulls: list[tuple[EvaluationJob, SpecKey]] = []
    leave_outs: dict[tuple[str, SpecKey], list[EvaluationJob]] = {}
    for job in jobs:
        key = SpecKey.of(job.spec)
        if key is None:
            continue
        if evaluations.is_leave_out(job.spec):
            leave_outs.setdefault((str(job.spec["leave_out"]), key), []).append(job)
        elif (
            (examples_per_task is None or key.examples_per_task == examples_per_task)
            and (seed is None or key.seed == seed)
            and (wanted_tasks is None or key.tasks == wanted_tasks)
        ):
            fulls.append((job, key))
    done_keys = {
        key
        for (_, key), found in leave_outs.items()
        if any(j.state == JobState.DONE for j in found)
    }
    chosen = _chosen_full(fulls, done_keys)
    if chosen is None:
        filtered = tasks is not None or examples_per_task is not None or seed is not None
        return ReleaseCredit(
            release=release.number,
            method=release.method,
            spec=None,
            full_job=None,
            full_state="missing",
            reason=f"no evaluation of release {release.number}"
            + (" matches the filters" if filtered else "")
            + f": queue its credit (POST /api/v1/releases/{release.number}/credit)",
            experts=[
                ExpertCredit(
                    ref=e["ref"],
                    namespace=e["namespace"],
                    routing_share=None,
                    state="missing",
                    job_id=None,
                )
                for e in entries
            ],
            resamples=comparisons.RESAMPLES,
            confidence=comparisons.CONFIDENCE,
        )
    full, key = chosen
    shares = routing_shares(
        session.scalars(
            select(EvaluationResult.routing_stats).where(EvaluationResult.job_id == full.id)
        )
    )
    picked = {e["ref"]: _preferred(leave_outs.get((e["ref"], key), [])) for e in entries}
    pairs = {
        ref: job
        for ref, job in picked.items()
        if job is not None and job.state == JobState.DONE and full.state == JobState.DONE
    }
    compared = comparisons.compare_jobs(
        session,
        [(release, full, release, done) for done in pairs.values()],
        groups=leaderboard.task_groups(session) if groups is None else groups,
    )
    by_ref = dict(zip(pairs, compared, strict=True))
    experts = []
    for entry in entries:
        ref = entry["ref"]
        mine = picked[ref]
        comparison = by_ref.get(ref)
        experts.append(
            ExpertCredit(
                ref=ref,
                namespace=entry["namespace"],
                routing_share=shares.get(_ref_name(ref)),
                state=_state(mine),
                job_id=None if mine is None else mine.id,
                error=None if mine is None or mine.error is None else redact(mine.error),
                means={} if comparison is None else comparison.means,
                tasks=[] if comparison is None else comparison.tasks,
                compare_url=None
                if comparison is None or mine is None
                else compare_url(release.number, full.id, mine.id),
            )
        )
    return ReleaseCredit(
        release=release.number,
        method=release.method,
        spec=key.schema(),
        full_job=full.id,
        full_state=_state(full),
        reason=None
        if full.state == JobState.DONE
        else f"the full evaluation {full.id} is {full.state}",
        experts=experts,
        resamples=comparisons.RESAMPLES,
        confidence=comparisons.CONFIDENCE,
    )


# --- an expert's page --------------------------------------------------------------------


@dataclass(frozen=True)
class CreditLine:
    """`in release #n: +x.x held-out [lo, hi]`: one version's contribution to one release,
    of the held-out mean (or of all tasks' when no task of the spec is held out)."""

    release: int
    version: int
    ref: str
    group: str  # held_out | all
    difference: PairedDelta
    compare_url: str | None


def expert_credit_lines(
    session: Session, expert: Expert, *, limit: int = RELEASES_SHOWN
) -> list[CreditLine]:
    """The contributions of `expert`'s versions to the newest `limit` releases that contain
    one, where computed (newest release first)."""
    rows = releases.releases_containing(session, expert, limit=limit)
    groups = leaderboard.task_groups(session) if rows else {}
    lines = []
    for release, number in rows:
        ref = f"{expert.full_name}@{number}"
        if ref not in evaluations.release_refs(release):
            continue
        credit = release_credit(session, release, refs=[ref], groups=groups)
        for entry in credit.experts:
            for group in ("held_out", ALL_TASKS):
                mean = entry.means.get(group)
                if mean is not None and mean.difference is not None:
                    lines.append(
                        CreditLine(
                            release.number, number, ref, group, mean.difference, entry.compare_url
                        )
                    )
                    break
    return lines
