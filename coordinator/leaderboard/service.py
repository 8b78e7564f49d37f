"""The leaderboard: releases x tasks, filtered, ranked and paged in SQL.

`rank_releases` is the one query behind `GET /leaderboard` (`leaderboard`, its JSON) and the
web pages (`coordinator.web.queries` only shapes its rows), so the two cannot disagree. Each
rule is written once, here or where it is cited:

- a release's score on a task: its newest result from a finished job, never a leave-one-out
  one (`coordinator.evaluations.service.latest_result_ids`);
- a task's group, `held_in` or `held_out`: what the newest finished job declaring it said
  (`task_groups` in the job's spec), else the BENCHMARK.md suite lists (`task_groups`);
- a row's mean: unweighted over the tasks in view it was scored on, with the standard error
  `sqrt(sum of stderr^2) / tasks` (`mean_accuracy`, `stderr_of_mean`), and likewise per group
  (`group_means`);
- the Oracle: per base model and task, the best score of any single-expert release
  (`oracle_scores`); a method's best release is its release with the highest mean
  (`best_release_per_method`);
- a row's paired difference against the base model on the same examples
  (`comparisons.versus_base`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Subquery, func, or_, select
from sqlalchemy.orm import QueryableAttribute, Session

from coordinator.base_models.models import BaseModelRecord
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.models import EvaluationJob, EvaluationResult, JobState
from coordinator.experts.models import ExpertVersion
from coordinator.leaderboard import comparisons
from coordinator.leaderboard.schemas import (
    Leaderboard,
    LeaderboardCell,
    LeaderboardRow,
    VersusBase,
)
from coordinator.releases.models import Release, ReleaseExpert
from protocol.methods import METHOD_SPECS

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
ORACLE = "oracle"


class Split(StrEnum):
    """Which tasks a view covers. The page's older spelling (`held-in`, `held-out`) is
    accepted as an alias, so addresses people saved keep working."""

    ALL = "all"
    HELD_IN = "held_in"
    HELD_OUT = "held_out"

    @classmethod
    def _missing_(cls, value: object) -> Split | None:
        if isinstance(value, str):
            spelled = value.replace("-", "_")
            return next((split for split in cls if split.value == spelled), None)
        return None


TASK_GROUPS: tuple[str, ...] = (Split.HELD_IN.value, Split.HELD_OUT.value)
TASK_SORT_PREFIX = "task:"
SORT_KEYS: tuple[str, ...] = (
    "mean",
    *TASK_GROUPS,
    "release",
    "method",
    "base_model",
    "experts",
    "date",
)
# For query validation: every key (`_` or `-`, the alias), or `task:<name>`.
SORT_PATTERN = (
    "^(" + "|".join(key.replace("_", "[_-]") for key in SORT_KEYS) + f"|{TASK_SORT_PREFIX}.+)$"
)


def sort_key(value: str) -> str | None:
    """`value` in its one spelling (`held-in` -> `held_in`) when it names a sort key
    (`SORT_KEYS` or `task:<name>`), else None."""
    if value.startswith(TASK_SORT_PREFIX):
        return value if len(value) > len(TASK_SORT_PREFIX) else None
    spelled = value.replace("-", "_")
    return spelled if spelled in SORT_KEYS else None


# --- the rules ---------------------------------------------------------------------------


def task_groups(session: Session) -> dict[str, str]:
    """Task -> `held_in` or `held_out`: the benchmark suite's lists (BENCHMARK.md), then
    every finished evaluation's declared `task_groups` (the newest job wins)."""
    # Imported here: phatgoose.bigbench brings torch, which most requests do not need.
    from phatgoose.bigbench import HELD_IN_TASKS, HELD_OUT_TASKS

    groups = {task: Split.HELD_IN.value for task in HELD_IN_TASKS}
    groups |= {task: Split.HELD_OUT.value for task in HELD_OUT_TASKS}
    specs = session.scalars(
        select(EvaluationJob.spec)
        .where(EvaluationJob.state == JobState.DONE, evaluations.counts_as_scores())
        .order_by(EvaluationJob.id)
    )
    for spec in specs:
        declared = (spec or {}).get("task_groups") or {}
        for group in TASK_GROUPS:
            for task in declared.get(group) or []:
                groups[str(task)] = group
    return groups


def mean_accuracy(accuracies: Sequence[float]) -> float | None:
    """Unweighted mean over tasks; None without any."""
    return sum(accuracies) / len(accuracies) if accuracies else None


def stderr_of_mean(stderrs: Sequence[float]) -> float | None:
    """Standard error of that mean, the tasks' errors taken as independent."""
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs) if stderrs else None


def group_means(
    accuracy_by_task: Mapping[str, float], groups: Mapping[str, str]
) -> dict[str, float]:
    """Mean accuracy per task group over the tasks given (groups without a task are absent)."""
    by_group: dict[str, list[float]] = {}
    for task, accuracy in accuracy_by_task.items():
        if task in groups:
            by_group.setdefault(groups[task], []).append(accuracy)
    return {group: sum(v) / len(v) for group, v in sorted(by_group.items())}


def results_in_view(
    split: Split = Split.ALL, groups: Mapping[str, str] | None = None
) -> list[ColumnElement[bool]]:
    """Conditions on `EvaluationResult`: the scores that count, on the view's tasks."""
    conditions: list[ColumnElement[bool]] = [
        EvaluationResult.id.in_(evaluations.latest_result_ids())
    ]
    if split != Split.ALL:
        if groups is None:
            raise ValueError(f"the {split.value} view needs the task groups (task_groups())")
        tasks = sorted(task for task, group in groups.items() if group == split.value)
        conditions.append(EvaluationResult.task.in_(tasks))
    return conditions


def release_summaries(view: Sequence[ColumnElement[bool]] | None = None) -> Subquery:
    """Per release, over its scores in `view` (default: every task): `mean`, `squares` (the
    sum of squared standard errors), `tasks` and `evaluated_at` (the newest score's date)."""
    return (
        select(
            EvaluationResult.release_id.label("release_id"),
            func.avg(EvaluationResult.accuracy).label("mean"),
            func.sum(EvaluationResult.stderr * EvaluationResult.stderr).label("squares"),
            func.count().label("tasks"),
            func.max(EvaluationResult.created_at).label("evaluated_at"),
        )
        .where(*(view if view is not None else results_in_view()))
        .group_by(EvaluationResult.release_id)
        .subquery()
    )


def latest_results(
    session: Session,
    release_ids: Iterable[int],
    view: Sequence[ColumnElement[bool]] | None = None,
) -> dict[int, dict[str, EvaluationResult]]:
    """Per release id, per task in `view` (default: every task): the score that counts."""
    ids = list(release_ids)
    if not ids:
        return {}
    found: dict[int, dict[str, EvaluationResult]] = {}
    for result in session.scalars(
        select(EvaluationResult).where(
            EvaluationResult.release_id.in_(ids),
            *(view if view is not None else results_in_view()),
        )
    ):
        found.setdefault(result.release_id, {})[result.task] = result
    return found


def release_conditions(
    base_model: str | None, method: str | None, *, include_withdrawn: bool = False
) -> list[ColumnElement[bool]]:
    """Filters on `Release` (joined to `BaseModelRecord` for the base model's name).
    Withdrawn releases rank nowhere unless asked for: curation took them out."""
    conditions: list[ColumnElement[bool]] = []
    if not include_withdrawn:
        conditions.append(Release.withdrawn_at.is_(None))
    if base_model:
        conditions.append(BaseModelRecord.name == base_model)
    if method:
        conditions.append(Release.method == method)
    return conditions


def expert_counts() -> Subquery:
    """Per release id: how many expert versions it routes over (`experts`)."""
    return (
        select(ReleaseExpert.release_id.label("release_id"), func.count().label("experts"))
        .group_by(ReleaseExpert.release_id)
        .subquery()
    )


# --- the ranking -------------------------------------------------------------------------


@dataclass(frozen=True)
class RankedRelease:
    """One row: a release with its scores on the view's tasks."""

    release: Release
    base_model: str
    experts: int
    scores: dict[str, EvaluationResult]

    @property
    def mean(self) -> float | None:
        return mean_accuracy([r.accuracy for r in self.scores.values()])

    @property
    def mean_stderr(self) -> float | None:
        return stderr_of_mean([r.stderr for r in self.scores.values()])

    @property
    def evaluated_at(self) -> datetime | None:
        return max((r.created_at for r in self.scores.values()), default=None)

    def group_means(self, groups: Mapping[str, str]) -> dict[str, float]:
        return group_means({task: r.accuracy for task, r in self.scores.items()}, groups)


@dataclass(frozen=True)
class LeaderboardView:
    """Which releases, against which tasks, in which order, which page.

    `sort` is one of `SORT_KEYS` or `task:<name>` (`held-in` and `held-out` are accepted
    too); rows without a value come last either way, ties go by release number.
    `evaluated_only` keeps the releases with at least one score in view; withdrawn releases
    are left out unless `include_withdrawn`. `limit=None`: every row; `limit=0`: no row,
    only the tasks and the total.
    """

    base_model: str | None = None
    method: str | None = None
    split: Split = Split.ALL
    evaluated_only: bool = False
    include_withdrawn: bool = False
    sort: str = "release"
    descending: bool = False
    limit: int | None = None
    offset: int = 0


@dataclass(frozen=True)
class Ranking:
    """One page of ranked releases and what the whole ranking covers."""

    releases: list[RankedRelease]
    tasks: list[str]  # every task in view some matching release (on any page) was scored on
    task_groups: dict[str, str]  # task (of `tasks`) -> held_in | held_out, where known
    total: int  # matching releases on all pages
    view: LeaderboardView  # as asked, its sort key in its one spelling
    # Release id (of the page's rows) -> its paired difference against the base.
    versus_base: dict[int, VersusBase] = field(default_factory=dict)


def rank_releases(session: Session, view: LeaderboardView = LeaderboardView()) -> Ranking:
    """Releases against the view's tasks, sorted and paged in SQL."""
    key = sort_key(view.sort)
    if key is None:
        raise ValueError(
            f"unknown sort key {view.sort!r}; expected one of {SORT_KEYS} or task:<name>"
        )
    groups = task_groups(session)
    in_view = results_in_view(view.split, groups)
    by_release = release_conditions(
        view.base_model, view.method, include_withdrawn=view.include_withdrawn
    )

    tasks = list(
        session.scalars(
            select(EvaluationResult.task)
            .join(Release, Release.id == EvaluationResult.release_id)
            .join(BaseModelRecord, BaseModelRecord.id == Release.base_model_id)
            .where(*in_view, *by_release)
            .distinct()
            .order_by(EvaluationResult.task)
        )
    )
    summaries = release_summaries(in_view)
    counts = expert_counts()
    experts = func.coalesce(counts.c.experts, 0)
    query = (
        select(Release, BaseModelRecord.name, experts)
        .join(BaseModelRecord, BaseModelRecord.id == Release.base_model_id)
        .outerjoin(counts, counts.c.release_id == Release.id)
        .join(summaries, summaries.c.release_id == Release.id, isouter=not view.evaluated_only)
        .where(*by_release)
    )
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0

    column = _sort_column(key, in_view, groups, summaries, experts)
    ordered = column.desc() if view.descending else column.asc()
    query = query.order_by(ordered.nulls_last(), Release.number).offset(view.offset)
    if view.limit is not None:
        query = query.limit(view.limit)
    page = session.execute(query).all()
    scores = latest_results(session, [release.id for release, _, _ in page], in_view)
    versus_base = comparisons.versus_base(
        session,
        [release for release, _, _ in page],
        groups=groups,
        view_group=None if view.split == Split.ALL else view.split.value,
    )
    return Ranking(
        releases=[
            RankedRelease(release, base_name, count, scores.get(release.id, {}))
            for release, base_name, count in page
        ],
        tasks=tasks,
        task_groups={task: groups[task] for task in tasks if task in groups},
        total=total,
        view=dataclasses.replace(view, sort=key),
        versus_base=versus_base,
    )


def _sort_column(
    key: str,
    view: Sequence[ColumnElement[bool]],
    groups: Mapping[str, str],
    summaries: Subquery,
    experts: ColumnElement[Any],
) -> ColumnElement[Any] | QueryableAttribute[Any]:
    if key.startswith(TASK_SORT_PREFIX):
        return (
            select(EvaluationResult.accuracy)
            .where(
                EvaluationResult.release_id == Release.id,
                EvaluationResult.task == key.removeprefix(TASK_SORT_PREFIX),
                *view,
            )
            .scalar_subquery()
        )
    if key in TASK_GROUPS:
        # The group's mean over the view's tasks, as the rows compute it.
        return (
            select(func.avg(EvaluationResult.accuracy))
            .where(
                EvaluationResult.release_id == Release.id,
                EvaluationResult.task.in_(sorted(t for t, g in groups.items() if g == key)),
                *view,
            )
            .scalar_subquery()
        )
    columns: dict[str, ColumnElement[Any] | QueryableAttribute[Any]] = {
        "mean": summaries.c.mean,
        "release": Release.number,
        "method": Release.method,
        "base_model": BaseModelRecord.name,
        "experts": experts,
        "date": summaries.c.evaluated_at,
    }
    return columns[key]


def leaderboard(session: Session, view: LeaderboardView = LeaderboardView()) -> Leaderboard:
    """`rank_releases` as the JSON of `GET /leaderboard`."""
    ranking = rank_releases(session, view)
    view = ranking.view
    return Leaderboard(
        tasks=ranking.tasks,
        task_groups=ranking.task_groups,
        releases=[
            _json_row(row, ranking.task_groups, ranking.versus_base.get(row.release.id))
            for row in ranking.releases
        ],
        filters={"base_model": view.base_model, "method": view.method},
        split=view.split.value,
        evaluated_only=view.evaluated_only,
        sort=view.sort,
        order="desc" if view.descending else "asc",
        total=ranking.total,
        limit=view.limit,
        offset=view.offset,
    )


def _json_row(
    row: RankedRelease, groups: Mapping[str, str], vs_base: VersusBase | None
) -> LeaderboardRow:
    release = row.release
    return LeaderboardRow(
        release=release.number,
        method=release.method,
        top_k=release.top_k,
        method_params=release.method_params,
        expert=release.manifest.get("expert"),
        base_model=row.base_model,
        experts=[e["ref"] for e in release.manifest.get("experts", [])],
        notes=release.notes,
        created_at=release.created_at,
        withdrawn=release.withdrawn_at is not None,
        scores={
            task: LeaderboardCell(
                accuracy=result.accuracy,
                stderr=result.stderr,
                n=result.n,
                evaluator_version=result.evaluator_version,
                job_id=result.job_id,
                has_outcomes=result.has_outcomes,
            )
            for task, result in sorted(row.scores.items())
        },
        mean_accuracy=row.mean,
        mean_stderr=row.mean_stderr,
        group_means=row.group_means(groups),
        evaluated_at=row.evaluated_at,
        vs_base=vs_base,
    )


# --- the Oracle and each method's best ---------------------------------------------------


# Methods whose release over one expert is not that expert alone: none at all (base), or a
# merge with hyper-parameters, which changes even one update (TIES trims it, DARE drops
# entries). Token routers over one expert give it weight 1; merged averages it with itself.
NOT_THE_EXPERT_ALONE: tuple[str, ...] = tuple(
    name
    for name, spec in METHOD_SPECS.items()
    if not spec.takes_experts or (spec.params and not spec.takes_top_k)
)


@dataclass(frozen=True)
class SingleExpertRelease:
    release: Release
    version: ExpertVersion
    base_model: str


def single_expert_releases(
    session: Session, *, base_model: str | None = None, version_ids: Sequence[int] | None = None
) -> dict[int, SingleExpertRelease]:
    """The Oracle's candidates, by release id: method `single` (the expert its manifest
    names) or a method over exactly one expert that scores it alone (not
    `NOT_THE_EXPERT_ALONE`)."""
    one_expert = (
        select(ReleaseExpert.release_id)
        .group_by(ReleaseExpert.release_id)
        .having(func.count() == 1)
    )
    query = (
        select(Release, ExpertVersion, BaseModelRecord.name)
        .join(ReleaseExpert, ReleaseExpert.release_id == Release.id)
        .join(ExpertVersion, ExpertVersion.id == ReleaseExpert.expert_version_id)
        .join(BaseModelRecord, BaseModelRecord.id == Release.base_model_id)
        .where(
            or_(Release.method == "single", Release.id.in_(one_expert)),
            Release.method.not_in(NOT_THE_EXPERT_ALONE),
            *release_conditions(base_model, None),
        )
    )
    if version_ids is not None:
        query = query.where(ExpertVersion.id.in_(list(version_ids)))
    found: dict[int, SingleExpertRelease] = {}
    for release, version, base_name in session.execute(query):
        chosen = release.manifest.get("expert") if release.method == "single" else None
        if chosen in (None, version.expert.full_name, version.ref):
            found[release.id] = SingleExpertRelease(release, version, base_name)
    return found


@dataclass(frozen=True)
class OracleScore:
    """The best single-expert score on a task: the result, its release and its expert."""

    result: EvaluationResult
    release: Release
    version: ExpertVersion


def oracle_scores(
    session: Session,
    *,
    base_model: str | None = None,
    split: Split = Split.ALL,
    groups: Mapping[str, str] | None = None,
    version_ids: Sequence[int] | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, dict[str, OracleScore]]:
    """Per base model, per task: the best score of any single-expert release (of
    `version_ids`, when given); on a tie the first release wins."""
    candidates = single_expert_releases(session, base_model=base_model, version_ids=version_ids)
    if not candidates:
        return {}
    if split != Split.ALL and groups is None:
        groups = task_groups(session)
    query = (
        select(EvaluationResult)
        .where(EvaluationResult.release_id.in_(list(candidates)), *results_in_view(split, groups))
        .order_by(EvaluationResult.release_id)
    )
    if tasks is not None:
        query = query.where(EvaluationResult.task.in_(list(tasks)))
    best: dict[str, dict[str, OracleScore]] = {}
    for result in session.scalars(query):
        candidate = candidates[result.release_id]
        by_task = best.setdefault(candidate.base_model, {})
        current = by_task.get(result.task)
        if current is None or result.accuracy > current.result.accuracy:
            by_task[result.task] = OracleScore(result, candidate.release, candidate.version)
    return dict(sorted(best.items()))


@dataclass(frozen=True)
class MethodBest:
    """A method's best release on a view (the Oracle's row for `oracle`, `release` None)."""

    method: str
    release: Release | None
    base_model: str
    mean: float
    stderr: float
    tasks: int


def best_release_per_method(
    session: Session, *, base_model: str | None = None, split: Split = Split.ALL
) -> list[MethodBest]:
    """For each method, its release with the highest mean (plus the Oracle), best first."""
    groups = task_groups(session) if split != Split.ALL else None
    summaries = release_summaries(results_in_view(split, groups))
    rows = session.execute(
        select(
            Release, BaseModelRecord.name, summaries.c.mean, summaries.c.squares, summaries.c.tasks
        )
        .join(summaries, summaries.c.release_id == Release.id)
        .join(BaseModelRecord, BaseModelRecord.id == Release.base_model_id)
        .where(*release_conditions(base_model, None))
        .order_by(Release.number)
    ).all()
    candidates = [
        MethodBest(
            method=release.method,
            release=release,
            base_model=base_name,
            mean=float(mean),
            stderr=math.sqrt(float(squares or 0.0)) / int(count),
            tasks=int(count),
        )
        for release, base_name, mean, squares, count in rows
    ]
    for base_name, by_task in oracle_scores(
        session, base_model=base_model, split=split, groups=groups
    ).items():
        results = [score.result for score in by_task.values()]
        mean = mean_accuracy([r.accuracy for r in results])
        stderr = stderr_of_mean([r.stderr for r in results])
        if mean is not None and stderr is not None:
            candidates.append(MethodBest(ORACLE, None, base_name, mean, stderr, len(results)))
    best: dict[str, MethodBest] = {}
    for candidate in candidates:
        current = best.get(candidate.method)
        if current is None or candidate.mean > current.mean:
            best[candidate.method] = candidate
    return sorted(best.values(), key=lambda m: (-m.mean, m.method))
