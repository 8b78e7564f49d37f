"""Paired comparisons of two releases evaluated on the same examples.

Two finished evaluations (jobs) scored the same examples when their specs agree on the
tasks, `examples_per_task` and `seed` (the worker's split is fixed by them,
`coordinator.worker.EVALUATION_PROTOCOL`) and each task has the same n on both sides. Per
task, and for the unweighted means over tasks (all of them, held-in, held-out: the
leaderboard's task groups), the difference of accuracies comes from `phatgoose.paired`: a
95% paired bootstrap interval (examples resampled within tasks, tasks as strata for a mean)
and an exact McNemar p-value, computed from the results' per-example outcomes
(`coordinator.evaluations.outcomes`). Anything that does not compare gets a reason instead.

- `compare`: release a against release b (`GET /leaderboard/compare`, the compare page);
- `versus_base`: each leaderboard row against the base model on the same spec;
- `compare_jobs`: given pairs of evaluations (credit: a release against itself without one
  expert, `coordinator.credit`).

Leave-one-out evaluations (credit) are never a release's own: only a pair that names one
(`compare` with `a_job`/`b_job`, `compare_jobs`) compares it.

Computed on read, with a small in-process cache (`STATISTICS`): a finished job's results
never change, so a statistic is keyed by the two jobs (id and finish time) and the tasks it
covers. A leaderboard page computes only the pairs it has not seen, and reads outcomes from
the database only then; metadata (n, whether outcomes exist) is read every time, so reasons
are always current.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.base_models.models import BaseModelRecord
from coordinator.core.errors import CoordinatorError
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.models import EvaluationJob, EvaluationResult, JobState
from coordinator.evaluations.outcomes import MAX_OUTCOME_EXAMPLES, ExampleOutcomes
from coordinator.leaderboard.schemas import (
    Comparison,
    ComparisonSpec,
    EvaluationRef,
    MeanDelta,
    PairedDelta,
    TaskDelta,
    VersusBase,
)
from coordinator.releases import service as releases
from coordinator.releases.models import Release
from coordinator.releases.schemas import method_label
from phatgoose.paired import PairedDifference, paired_difference, paired_mean_difference

RESAMPLES = 10_000
CONFIDENCE = 0.95
SEED = 0  # fixed: the same pair always shows the same interval
ALL_TASKS = "all"  # the key of the mean over every task of the spec
BASE_METHOD = "base"
# Tasks named in a reason before "and N more".
_NAMED = 5


class ComparisonRejected(CoordinatorError):
    """A comparison asked for an evaluation that is not a finished one of its release."""

    status_code = 422
    error = "invalid_comparison"
    check = "evaluation"


# --- the cache ---------------------------------------------------------------------------


class StatisticsCache:
    """Paired differences by key, least recently used forgotten past `max_entries`.

    Threads (FastAPI runs page handlers in a pool) may compute the same key at once; both
    get the same value, since the statistics are deterministic."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._values: OrderedDict[Hashable, PairedDifference] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(
        self, key: Hashable, compute: Callable[[], PairedDifference]
    ) -> PairedDifference:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = compute()
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.max_entries:
                self._values.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


STATISTICS = StatisticsCache()


# --- what is compared --------------------------------------------------------------------


@dataclass(frozen=True)
class SpecKey:
    """What fixes an evaluation's examples: its tasks (as a set), examples per task, seed."""

    tasks: tuple[str, ...]
    examples_per_task: int
    seed: int

    @classmethod
    def of(cls, spec: Mapping[str, Any] | None) -> SpecKey | None:
        """The key of a job's spec; None for a spec that does not say (a row from elsewhere)."""
        spec = spec or {}
        tasks, examples, seed = (
            spec.get("tasks"),
            spec.get("examples_per_task"),
            spec.get("seed", 0),
        )
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
            return None
        if not isinstance(examples, int) or not isinstance(seed, int):
            return None
        return cls(tuple(sorted(set(tasks))), examples, seed)

    def schema(self) -> ComparisonSpec:
        return ComparisonSpec(
            tasks=list(self.tasks), examples_per_task=self.examples_per_task, seed=self.seed
        )

    def describe(self) -> str:
        return (
            f"{len(self.tasks)} task(s), {self.examples_per_task} examples per task, "
            f"seed {self.seed}"
        )


@dataclass(frozen=True)
class _Result:
    """What a comparison reads of a result before it needs the outcomes."""

    id: int
    task: str
    accuracy: float
    n: int
    has_outcomes: bool


@dataclass(frozen=True)
class _Side:
    """A release's finished evaluation, with its results by task."""

    release: Release
    job: EvaluationJob
    results: dict[str, _Result]

    @property
    def key(self) -> tuple[int, str | None]:
        # A finished job is never written again: its id and finish time name its results.
        finished = self.job.finished_at
        return (self.job.id, None if finished is None else finished.isoformat())

    @property
    def name(self) -> str:
        return f"#{self.release.number}"


class _Outcomes:
    """Loads the per-example outcomes of the results a request may compare, all in one
    query, and only when a statistic is not cached."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._wanted: set[int] = set()
        self._loaded: dict[int, dict[str, Any] | None] | None = None

    def want(self, ids: Iterable[int]) -> None:
        self._wanted.update(ids)

    def correct(self, result: _Result) -> tuple[bool, ...]:
        if self._loaded is None or result.id not in self._loaded:
            self._load(self._wanted | {result.id})
        assert self._loaded is not None
        body = self._loaded.get(result.id)
        if body is None:
            raise ValueError(f"result {result.id} ({result.task}) has no per-example outcomes")
        outcomes = ExampleOutcomes.from_json(body)
        if outcomes.n != result.n:
            raise ValueError(
                f"result {result.id} ({result.task}) stores {outcomes.n} outcomes for n={result.n}"
            )
        return outcomes.correct

    def _load(self, ids: set[int]) -> None:
        loaded = self._loaded if self._loaded is not None else {}
        missing = sorted(ids - set(loaded))
        for start in range(0, len(missing), 500):  # bounded IN lists
            chunk = missing[start : start + 500]
            rows = self.session.execute(
                select(EvaluationResult.id, EvaluationResult.outcomes).where(
                    EvaluationResult.id.in_(chunk)
                )
            )
            loaded.update({row_id: body for row_id, body in rows})
        self._loaded = loaded


def finished_jobs(
    session: Session, release_ids: Iterable[int], *, leave_out: bool = False
) -> dict[int, list[EvaluationJob]]:
    """Per release id, its finished evaluations, newest first; leave-one-out ones (credit)
    only with `leave_out`, since they are not the release's own."""
    found: dict[int, list[EvaluationJob]] = {}
    ids = sorted(set(release_ids))
    if not ids:
        return found
    query = (
        select(EvaluationJob)
        .where(EvaluationJob.release_id.in_(ids), EvaluationJob.state == JobState.DONE)
        .order_by(EvaluationJob.id.desc())
    )
    if not leave_out:
        query = query.where(evaluations.counts_as_scores())
    for job in session.scalars(query):
        found.setdefault(job.release_id, []).append(job)
    return found


def _results(session: Session, job_ids: Iterable[int]) -> dict[int, dict[str, _Result]]:
    """Per job id, its results by task (without their outcomes)."""
    found: dict[int, dict[str, _Result]] = {}
    ids = sorted(set(job_ids))
    for start in range(0, len(ids), 500):
        rows = session.execute(
            select(
                EvaluationResult.job_id,
                EvaluationResult.id,
                EvaluationResult.task,
                EvaluationResult.accuracy,
                EvaluationResult.n,
                EvaluationResult.has_outcomes,
            ).where(EvaluationResult.job_id.in_(ids[start : start + 500]))
        )
        for job_id, result_id, task, accuracy, n, has_outcomes in rows:
            found.setdefault(job_id, {})[task] = _Result(
                result_id, task, accuracy, n, bool(has_outcomes)
            )
    return found


# --- comparing two evaluations -----------------------------------------------------------


def _named(tasks: Sequence[str]) -> str:
    more = f" and {len(tasks) - _NAMED} more" if len(tasks) > _NAMED else ""
    return ", ".join(tasks[:_NAMED]) + more


def _task_reason(task: str, a: _Side, b: _Side) -> str | None:
    """Why `task` does not compare between `a` and `b`, or None when it does."""
    missing = [side.name for side in (a, b) if task not in side.results]
    if missing:
        return f"no result on this task in the evaluation of {' and '.join(missing)}"
    result_a, result_b = a.results[task], b.results[task]
    if result_a.n != result_b.n:
        return (
            f"different numbers of examples: {result_a.n} ({a.name}) and {result_b.n} "
            f"({b.name}); a paired comparison needs the same examples"
        )
    without = [side.name for side in (a, b) if not side.results[task].has_outcomes]
    if without:
        return (
            f"no per-example outcomes for {' and '.join(without)} (scored before the "
            f"coordinator kept them, or on more than {MAX_OUTCOME_EXAMPLES} examples)"
        )
    return None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class _Pair:
    """Two evaluations on one spec; computes (cached) per-task and mean differences."""

    def __init__(self, a: _Side, b: _Side, spec: SpecKey, outcomes: _Outcomes) -> None:
        self.a, self.b, self.spec, self.outcomes = a, b, spec, outcomes
        self.reasons = {task: _task_reason(task, a, b) for task in spec.tasks}
        outcomes.want(
            side.results[task].id
            for task, reason in self.reasons.items()
            if reason is None
            for side in (a, b)
        )

    def _correct(self, task: str) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
        return (
            self.outcomes.correct(self.a.results[task]),
            self.outcomes.correct(self.b.results[task]),
        )

    def task(self, task: str, group: str | None) -> TaskDelta:
        result_a, result_b = self.a.results.get(task), self.b.results.get(task)
        reason = self.reasons[task]
        difference = None
        if reason is None:
            try:
                difference = PairedDelta.of(
                    STATISTICS.get_or_compute(
                        ("task", self.a.key, self.b.key, task),
                        lambda: paired_difference(
                            *self._correct(task),
                            resamples=RESAMPLES,
                            confidence=CONFIDENCE,
                            seed=SEED,
                        ),
                    )
                )
            except ValueError as error:  # stored outcomes that do not read back
                reason = f"unreadable per-example outcomes: {error}"
        same_n = result_a is not None and result_b is not None and result_a.n == result_b.n
        return TaskDelta(
            task=task,
            group=group,
            a=None if result_a is None else result_a.accuracy,
            b=None if result_b is None else result_b.accuracy,
            n=result_a.n if same_n and result_a is not None else None,
            difference=difference,
            reason=reason,
        )

    def mean(self, tasks: Sequence[str]) -> MeanDelta:
        """The difference of the unweighted means over `tasks` (of the spec)."""
        tasks = sorted(tasks)
        a = _mean([self.a.results[t].accuracy for t in tasks if t in self.a.results])
        b = _mean([self.b.results[t].accuracy for t in tasks if t in self.b.results])
        blocked = [t for t in tasks if self.reasons[t] is not None]
        if blocked:
            first = self.reasons[blocked[0]]
            reason = (
                f"{len(blocked)} of its {len(tasks)} task(s) do not compare ({_named(blocked)}; "
                f"{blocked[0]}: {first}); the mean's difference needs every one"
            )
            return MeanDelta(tasks=tasks, a=a, b=b, difference=None, reason=reason)
        try:
            difference = STATISTICS.get_or_compute(
                ("mean", self.a.key, self.b.key, tuple(tasks)),
                lambda: paired_mean_difference(
                    {t: self._correct(t) for t in tasks},
                    resamples=RESAMPLES,
                    confidence=CONFIDENCE,
                    seed=SEED,
                ),
            )
        except ValueError as error:
            reason = f"unreadable per-example outcomes: {error}"
            return MeanDelta(tasks=tasks, a=a, b=b, difference=None, reason=reason)
        return MeanDelta(tasks=tasks, a=a, b=b, difference=PairedDelta.of(difference))

    def group_means(self, groups: Mapping[str, str]) -> dict[str, MeanDelta]:
        """The mean over every task of the spec (`all`) and over each group's tasks."""
        by_group: dict[str, list[str]] = {}
        for task in self.spec.tasks:
            if task in groups:
                by_group.setdefault(groups[task], []).append(task)
        return {name: self.mean(tasks) for name, tasks in sorted(by_group.items())}


# --- release a against release b ---------------------------------------------------------


def _reference(session: Session, release: Release, job: EvaluationJob | None) -> EvaluationRef:
    base = session.get(BaseModelRecord, release.base_model_id)
    return EvaluationRef(
        release=release.number,
        method=release.method,
        label=method_label(release.method, release.top_k, release.method_params or {}),
        base_model=base.name if base is not None else "?",
        job_id=None if job is None else job.id,
    )


def _candidates(
    session: Session,
    release: Release,
    job_id: int | None,
    examples_per_task: int | None,
    seed: int | None,
) -> list[EvaluationJob]:
    """The release's finished evaluations that may be compared, newest first: the one
    asked for (a leave-one-out one too: credit's pairs, `credit.service`), else every one
    matching the filters that is the release's own (not a leave-one-out one)."""
    jobs = finished_jobs(session, [release.id], leave_out=job_id is not None).get(release.id, [])
    if job_id is not None:
        chosen = [job for job in jobs if job.id == job_id]
        if not chosen:
            raise ComparisonRejected(
                f"evaluation {job_id} is not a finished evaluation of release {release.number}",
                expected=f"one of {[job.id for job in jobs]}" if jobs else "a finished one",
            )
        return chosen
    keys = [(job, SpecKey.of(job.spec)) for job in jobs]
    return [
        job
        for job, key in keys
        if key is not None
        and (examples_per_task is None or key.examples_per_task == examples_per_task)
        and (seed is None or key.seed == seed)
    ]


def _specs_text(jobs: Sequence[EvaluationJob]) -> str:
    specs = sorted({key.describe() for job in jobs if (key := SpecKey.of(job.spec))})
    return "; ".join(specs) if specs else "none"


def compare(
    session: Session,
    a_number: int,
    b_number: int,
    *,
    groups: Mapping[str, str],
    a_job: int | None = None,
    b_job: int | None = None,
    examples_per_task: int | None = None,
    seed: int | None = None,
) -> Comparison:
    """Release `a_number` against `b_number` (a - b) on the same examples.

    The evaluations compared: the ones asked for (`a_job`, `b_job`), else a's newest
    finished evaluation (matching `examples_per_task` and `seed` when given) for which b
    has a finished one on the same spec, with b's newest such one. `groups` is the
    leaderboard's task -> held_in | held_out. A release that does not exist is `NotFound`;
    a job that is not a finished one of its release `ComparisonRejected` (422); releases
    without a shared spec give `comparable: false` with the reason.
    """
    release_a = releases.get_release(session, a_number)
    release_b = releases.get_release(session, b_number)
    jobs_a = _candidates(session, release_a, a_job, examples_per_task, seed)
    jobs_b = _candidates(session, release_b, b_job, examples_per_task, seed)
    pair: tuple[EvaluationJob, EvaluationJob, SpecKey] | None = None
    for job_a in jobs_a:
        key = SpecKey.of(job_a.spec)
        job_b = next((j for j in jobs_b if key is not None and SpecKey.of(j.spec) == key), None)
        if key is not None and job_b is not None:
            pair = (job_a, job_b, key)
            break

    def refused(reason: str) -> Comparison:
        return Comparison(
            a=_reference(session, release_a, None),
            b=_reference(session, release_b, None),
            comparable=False,
            reason=reason,
            resamples=RESAMPLES,
            confidence=CONFIDENCE,
        )

    if pair is None:
        for release, jobs in ((release_a, jobs_a), (release_b, jobs_b)):
            if not jobs:
                filters = examples_per_task is not None or seed is not None
                return refused(
                    f"release {release.number} has no finished evaluation"
                    + (" matching the filters (examples_per_task, seed)" if filters else "")
                )
        return refused(
            f"no finished evaluations of releases {release_a.number} and {release_b.number} "
            "share a spec (the same tasks, examples per task and seed), so they did not score "
            f"the same examples: {release_a.number} has {_specs_text(jobs_a)}; "
            f"{release_b.number} has {_specs_text(jobs_b)}"
        )
    job_a, job_b, _spec = pair
    (comparison,) = compare_jobs(session, [(release_a, job_a, release_b, job_b)], groups=groups)
    return comparison


def compare_jobs(
    session: Session,
    pairs: Sequence[tuple[Release, EvaluationJob, Release, EvaluationJob]],
    *,
    groups: Mapping[str, str],
) -> list[Comparison]:
    """Each pair `(release a, its job, release b, its job)` compared, a - b, as `compare`
    gives it: per task and for the means (all tasks, each group of `groups`). The jobs of a
    pair must share a spec (`SpecKey`), else `ComparisonRejected`. Results and outcomes of
    every pair are read together, outcomes only for statistics not cached."""
    keys = []
    for release_a, job_a, release_b, job_b in pairs:
        key = SpecKey.of(job_a.spec)
        if key is None or key != SpecKey.of(job_b.spec):
            raise ComparisonRejected(
                f"evaluations {job_a.id} (release {release_a.number}) and {job_b.id} (release "
                f"{release_b.number}) do not share a spec, so they did not score the same "
                "examples",
                expected="two evaluations with the same tasks, examples per task and seed",
            )
        keys.append(key)
    results = _results(session, [job.id for _, a, _, b in pairs for job in (a, b)])
    outcomes = _Outcomes(session)
    compared = [
        _Pair(
            _Side(release_a, job_a, results.get(job_a.id, {})),
            _Side(release_b, job_b, results.get(job_b.id, {})),
            key,
            outcomes,
        )
        for (release_a, job_a, release_b, job_b), key in zip(pairs, keys, strict=True)
    ]
    return [
        Comparison(
            a=_reference(session, pair.a.release, pair.a.job),
            b=_reference(session, pair.b.release, pair.b.job),
            comparable=True,
            spec=pair.spec.schema(),
            tasks=[pair.task(task, groups.get(task)) for task in pair.spec.tasks],
            means={ALL_TASKS: pair.mean(pair.spec.tasks), **pair.group_means(groups)},
            resamples=RESAMPLES,
            confidence=CONFIDENCE,
        )
        for pair in compared
    ]


# --- every leaderboard row against the base ----------------------------------------------


def _base_evaluations(
    session: Session, base_model_ids: Iterable[int]
) -> dict[tuple[int, SpecKey], tuple[Release, EvaluationJob]]:
    """Per (base model id, spec): the newest finished evaluation of a release of method
    `base` (not withdrawn) on that base model."""
    found: dict[tuple[int, SpecKey], tuple[Release, EvaluationJob]] = {}
    ids = sorted(set(base_model_ids))
    if not ids:
        return found
    rows = session.execute(
        select(Release, EvaluationJob)
        .join(EvaluationJob, EvaluationJob.release_id == Release.id)
        .where(
            Release.method == BASE_METHOD,
            Release.withdrawn_at.is_(None),
            Release.base_model_id.in_(ids),
            EvaluationJob.state == JobState.DONE,
            evaluations.counts_as_scores(),
        )
        .order_by(EvaluationJob.id.desc())
    )
    for release, job in rows:
        key = SpecKey.of(job.spec)
        if key is not None:
            found.setdefault((release.base_model_id, key), (release, job))
    return found


def versus_base(
    session: Session,
    rows: Sequence[Release],
    *,
    groups: Mapping[str, str],
    view_group: str | None = None,
) -> dict[int, VersusBase]:
    """Per release id of `rows`, its paired difference against the base model.

    The pair: the release's newest finished evaluation on a spec that a base release
    (method `base`, same base model, not withdrawn) was evaluated on too, and that base
    release's newest finished evaluation on it. `mean` covers the spec's tasks in view
    (`view_group`: held_in or held_out; None: all of them), `group_means` each group's.
    """
    jobs = finished_jobs(session, [release.id for release in rows])
    bases = _base_evaluations(session, {release.base_model_id for release in rows})
    pairs: dict[int, tuple[EvaluationJob, Release, EvaluationJob, SpecKey]] = {}
    found: dict[int, VersusBase] = {}
    for release in rows:
        mine = jobs.get(release.id, [])
        for job in mine:
            key = SpecKey.of(job.spec)
            match = bases.get((release.base_model_id, key)) if key is not None else None
            if match is not None and key is not None:
                pairs[release.id] = (job, match[0], match[1], key)
                break
        else:
            found[release.id] = VersusBase(
                base_release=None,
                job_id=None,
                base_job_id=None,
                reason="not evaluated yet"
                if not mine
                else "no base release of this base model was evaluated on the same tasks, "
                "examples per task and seed as this release",
            )
    results = _results(
        session, [job.id for job, _, base_job, _ in pairs.values() for job in (job, base_job)]
    )
    outcomes = _Outcomes(session)
    compared: dict[int, _Pair] = {}
    for release in rows:
        if release.id not in pairs:
            continue
        job, base, base_job, key = pairs[release.id]
        if job.id == base_job.id:
            found[release.id] = VersusBase(
                base_release=base.number,
                job_id=job.id,
                base_job_id=base_job.id,
                spec=key.schema(),
                reason="this is the base's evaluation: the reference of the comparison",
            )
            continue
        mine_side = _Side(release, job, results.get(job.id, {}))
        base_side = _Side(base, base_job, results.get(base_job.id, {}))
        compared[release.id] = _Pair(mine_side, base_side, key, outcomes)
    for release_id, pair in compared.items():
        in_view = [
            task for task in pair.spec.tasks if view_group is None or groups.get(task) == view_group
        ]
        job, base, base_job, key = pairs[release_id]
        found[release_id] = VersusBase(
            base_release=base.number,
            job_id=job.id,
            base_job_id=base_job.id,
            spec=key.schema(),
            mean=pair.mean(in_view) if in_view else None,
            group_means=pair.group_means(groups),
            reason=None if in_view else "none of the compared evaluation's tasks is in view",
        )
    return found
