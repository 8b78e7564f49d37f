"""The SQL behind the pages. Every list is filtered, sorted and paginated in the database
(limit/offset), so a page costs the same with ten experts or ten thousand.

A release's score on a task is its latest evaluation result for that task (highest id):
re-evaluating a release replaces its scores on the leaderboard, older results stay stored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Select, Subquery, and_, false, func, or_, select
from sqlalchemy.orm import Session

from coordinator.base_models.models import BaseModelRecord
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.models import EvaluationJob, EvaluationResult, JobState
from coordinator.experts.models import Expert, ExpertVersion
from coordinator.releases.models import Release, ReleaseExpert

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
BASELINE_METHODS = ("base", "merged")
ORACLE = "oracle"


class Split(StrEnum):
    """Which tasks a view covers: held-in ones, held-out ones, or all."""

    ALL = "all"
    HELD_IN = "held-in"
    HELD_OUT = "held-out"


OTHER = "other"


def task_groups(session: Session) -> dict[str, str]:
    """Task -> `held-in` or `held-out`: the benchmark suite's lists (BENCHMARK.md), then
    every finished evaluation's declared `task_groups` (the newest job wins)."""
    # Imported here: phatgoose.bigbench brings torch, which the pages do not otherwise need.
    from phatgoose.bigbench import HELD_IN_TASKS, HELD_OUT_TASKS

    groups = {task: Split.HELD_IN.value for task in HELD_IN_TASKS}
    groups |= {task: Split.HELD_OUT.value for task in HELD_OUT_TASKS}
    specs = session.scalars(
        select(EvaluationJob.spec)
        .where(EvaluationJob.state == JobState.DONE)
        .order_by(EvaluationJob.id)
    )
    for spec in specs:
        declared = (spec or {}).get("task_groups") or {}
        for key, group in (("held_in", Split.HELD_IN), ("held_out", Split.HELD_OUT)):
            for task in declared.get(key) or []:
                groups[str(task)] = group.value
    return groups


def _split_condition(split: Split, groups: dict[str, str]) -> ColumnElement[bool] | None:
    if split == Split.ALL:
        return None
    return EvaluationResult.task.in_(sorted(t for t, g in groups.items() if g == split.value))


def _latest_result_ids() -> Select[tuple[int]]:
    """Ids of the newest result of every (release, task) from a finished (`done`) job,
    the rule of `coordinator.evaluations.service.latest_scores`, as SQL to sort and page by."""
    return (
        select(func.max(EvaluationResult.id))
        .join(EvaluationJob, EvaluationJob.id == EvaluationResult.job_id)
        .where(EvaluationJob.state == JobState.DONE)
        .group_by(EvaluationResult.release_id, EvaluationResult.task)
    )


def _result_conditions(
    split: Split = Split.ALL, groups: dict[str, str] | None = None
) -> list[ColumnElement[bool]]:
    conditions = [EvaluationResult.id.in_(_latest_result_ids())]
    split_condition = _split_condition(split, groups or {})
    if split_condition is not None:
        conditions.append(split_condition)
    return conditions


def _release_conditions(base_model: str | None, method: str | None) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if base_model:
        conditions.append(BaseModelRecord.name == base_model)
    if method:
        conditions.append(Release.method == method)
    return conditions


def single_expert_releases(
    session: Session, *, base_model: str | None = None, version_ids: Sequence[int] | None = None
) -> dict[int, tuple[Release, ExpertVersion, str]]:
    """The Oracle's candidates, by release id: (release, its one expert, base model name).

    A single-expert release is method `single` (the expert its manifest names) or any
    method but `base` over exactly one expert.
    """
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
            Release.method != "base",
            *_release_conditions(base_model, None),
        )
    )
    if version_ids is not None:
        query = query.where(ExpertVersion.id.in_(list(version_ids)))
    found: dict[int, tuple[Release, ExpertVersion, str]] = {}
    for release, version, base_name in session.execute(query):
        chosen = release.manifest.get("expert") if release.method == "single" else None
        if chosen in (None, version.expert.full_name, version.ref):
            found[release.id] = (release, version, base_name)
    return found


def clamp_page(limit: int, offset: int) -> tuple[int, int]:
    return max(1, min(limit, MAX_PAGE_SIZE)), max(0, offset)


# --- scores ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """One task's accuracy with its standard error; `source` names the release it came from
    when the row is computed (the Oracle)."""

    accuracy: float
    stderr: float
    n: int
    evaluator_version: str
    created_at: datetime
    result_id: int
    source: str | None = None
    source_number: int | None = None

    @classmethod
    def of(cls, result: EvaluationResult, source: Release | None = None) -> Score:
        return cls(
            accuracy=result.accuracy,
            stderr=result.stderr,
            n=result.n,
            evaluator_version=result.evaluator_version,
            created_at=result.created_at,
            result_id=result.id,
            source=release_label(source) if source is not None else None,
            source_number=source.number if source is not None else None,
        )


def release_label(release: Release) -> str:
    k = f", k={release.top_k}" if release.top_k else ""
    return f"#{release.number} {release.method}{k}"


def release_kind(method: str) -> str:
    if method in BASELINE_METHODS:
        return "baseline"
    if method == ORACLE:
        return "oracle"
    return "release"


@dataclass
class BoardRow:
    """A leaderboard row: a release, or the Oracle computed from single-expert releases."""

    kind: str  # release | baseline | oracle
    label: str
    method: str
    base_model: str
    scores: dict[str, Score]
    number: int | None = None
    top_k: int | None = None
    experts: int = 0
    created_at: datetime | None = None

    @property
    def mean(self) -> float | None:
        """Unweighted mean over the tasks this row has a score for."""
        if not self.scores:
            return None
        return sum(s.accuracy for s in self.scores.values()) / len(self.scores)

    @property
    def mean_stderr(self) -> float | None:
        """Standard error of that mean, the tasks' errors taken as independent."""
        if not self.scores:
            return None
        return math.sqrt(sum(s.stderr**2 for s in self.scores.values())) / len(self.scores)

    def group_mean(self, groups: dict[str, str], group: str) -> float | None:
        """Mean over this row's tasks of one group (`held-in`, `held-out`)."""
        values = [s.accuracy for task, s in self.scores.items() if groups.get(task) == group]
        return sum(values) / len(values) if values else None

    @property
    def evaluator_versions(self) -> list[str]:
        return sorted({s.evaluator_version for s in self.scores.values()})

    @property
    def evaluated_at(self) -> datetime | None:
        return max((s.created_at for s in self.scores.values()), default=None)


@dataclass
class Board:
    tasks: list[str]
    rows: list[BoardRow]
    oracles: list[BoardRow]
    total: int
    limit: int
    offset: int
    sort: str
    descending: bool
    groups: dict[str, str] = field(default_factory=dict)
    group_columns: list[str] = field(default_factory=list)  # group means shown beside the mean
    base_models: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)


SORT_KEYS = ("mean", "release", "method", "base_model", "experts", "date", "held-in", "held-out")
GROUPS = (Split.HELD_IN.value, Split.HELD_OUT.value)


def _expert_counts() -> Subquery:
    return (
        select(ReleaseExpert.release_id.label("release_id"), func.count().label("experts"))
        .group_by(ReleaseExpert.release_id)
        .subquery()
    )


def leaderboard(
    session: Session,
    *,
    base_model: str | None = None,
    method: str | None = None,
    split: Split = Split.ALL,
    sort: str = "mean",
    descending: bool = True,
    limit: int = PAGE_SIZE,
    offset: int = 0,
) -> Board:
    """Evaluated releases against tasks, one page of them, sorted in SQL.

    `sort` is one of `SORT_KEYS` or `task:<name>` (a task column); rows missing a sort
    value come last either way. The Oracle rows (one per base model) are computed over all
    single-expert releases, whatever the page.
    """
    limit, offset = clamp_page(limit, offset)
    groups = task_groups(session)
    release_filter = _release_conditions(base_model, method if method != ORACLE else None)
    result_filter = _result_conditions(split, groups)

    tasks = list(
        session.scalars(
            select(EvaluationResult.task)
            .join(Release, Release.id == EvaluationResult.release_id)
            .join(BaseModelRecord, BaseModelRecord.id == Release.base_model_id)
            .where(*result_filter, *release_filter)
            .distinct()
            .order_by(EvaluationResult.task)
        )
    )
    per_release = (
        select(
            EvaluationResult.release_id.label("release_id"),
            func.avg(EvaluationResult.accuracy).label("mean"),
            func.max(EvaluationResult.created_at).label("evaluated_at"),
        )
        .where(*result_filter)
        .group_by(EvaluationResult.release_id)
        .subquery()
    )
    expert_counts = _expert_counts()
    experts = func.coalesce(expert_counts.c.experts, 0)
    query = (
        select(Release, BaseModelRecord.name, experts)
        .join(per_release, per_release.c.release_id == Release.id)
        .join(BaseModelRecord, BaseModelRecord.id == Release.base_model_id)
        .outerjoin(expert_counts, expert_counts.c.release_id == Release.id)
        .where(*release_filter)
    )
    if method == ORACLE:
        query = query.where(false())
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0

    sort_column: ColumnElement[Any]
    if sort.startswith("task:"):
        sort_column = (
            select(EvaluationResult.accuracy)
            .where(
                EvaluationResult.release_id == Release.id,
                EvaluationResult.task == sort.removeprefix("task:"),
                *result_filter,
            )
            .scalar_subquery()
        )
    else:
        sort = sort if sort in SORT_KEYS else "mean"
        sort_column = {
            "mean": per_release.c.mean,
            "release": Release.number,
            "method": Release.method,
            "base_model": BaseModelRecord.name,
            "experts": experts,
            "date": per_release.c.evaluated_at,
            "held-in": _group_mean(Split.HELD_IN, groups),
            "held-out": _group_mean(Split.HELD_OUT, groups),
        }[sort]
    ordered = sort_column.desc() if descending else sort_column.asc()
    page = session.execute(
        query.order_by(ordered.nulls_last(), Release.number).limit(limit).offset(offset)
    ).all()

    shown = set(tasks)
    latest = evaluations.latest_scores(session, [release.id for release, _, _ in page])
    rows = [
        BoardRow(
            kind=release_kind(release.method),
            label=release_label(release),
            method=release.method,
            base_model=base_name,
            scores={
                task: Score.of(score.result)
                for task, score in latest.get(release.id, {}).items()
                if task in shown
            },
            number=release.number,
            top_k=release.top_k,
            experts=count,
            created_at=release.created_at,
        )
        for release, base_name, count in page
    ]
    show_oracle = method in (None, "", ORACLE)
    return Board(
        tasks=tasks,
        rows=rows,
        oracles=oracle_rows(session, base_model=base_model, split=split, groups=groups)
        if show_oracle
        else [],
        total=total,
        limit=limit,
        offset=offset,
        sort=sort,
        descending=descending,
        groups=groups,
        group_columns=[g for g in GROUPS if any(groups.get(t) == g for t in tasks)]
        if split == Split.ALL
        else [],
        base_models=base_model_names(session),
        methods=[*release_methods(session), ORACLE],
    )


def _group_mean(group: Split, groups: dict[str, str]) -> ColumnElement[Any]:
    """A release's mean over the tasks of one group, as a correlated subquery to sort by."""
    return (
        select(func.avg(EvaluationResult.accuracy))
        .where(EvaluationResult.release_id == Release.id, *_result_conditions(group, groups))
        .scalar_subquery()
    )


def oracle_rows(
    session: Session,
    *,
    base_model: str | None = None,
    split: Split = Split.ALL,
    groups: dict[str, str] | None = None,
) -> list[BoardRow]:
    """Per base model, per task: the best single-expert release's score on that task."""
    groups = groups if groups is not None else task_groups(session)
    candidates = single_expert_releases(session, base_model=base_model)
    if not candidates:
        return []
    results = session.scalars(
        select(EvaluationResult)
        .where(
            EvaluationResult.release_id.in_(list(candidates)), *_result_conditions(split, groups)
        )
        .order_by(EvaluationResult.release_id)
    )
    best: dict[str, dict[str, tuple[EvaluationResult, Release]]] = {}
    for result in results:
        release, _version, base_name = candidates[result.release_id]
        tasks = best.setdefault(base_name, {})
        if result.task not in tasks or result.accuracy > tasks[result.task][0].accuracy:
            tasks[result.task] = (result, release)
    return [
        BoardRow(
            kind="oracle",
            label="Oracle (best single expert per task)",
            method=ORACLE,
            base_model=base_name,
            scores={task: Score.of(result, release) for task, (result, release) in tasks.items()},
        )
        for base_name, tasks in sorted(best.items())
    ]


def base_model_names(session: Session) -> list[str]:
    return list(session.scalars(select(BaseModelRecord.name).order_by(BaseModelRecord.name)))


def release_methods(session: Session) -> list[str]:
    return list(session.scalars(select(Release.method).distinct().order_by(Release.method)))


@dataclass(frozen=True)
class MethodMean:
    """The best release of one method on a view: its mean accuracy over its tasks."""

    method: str
    label: str
    mean: float
    stderr: float
    tasks: int


def method_means(
    session: Session, *, base_model: str | None = None, split: Split = Split.ALL
) -> list[MethodMean]:
    """For each method, its best release's mean accuracy (plus the Oracle), best first."""
    groups = task_groups(session)
    per_release = session.execute(
        select(
            Release,
            func.avg(EvaluationResult.accuracy),
            func.sum(EvaluationResult.stderr * EvaluationResult.stderr),
            func.count(),
        )
        .join(EvaluationResult, EvaluationResult.release_id == Release.id)
        .join(BaseModelRecord, BaseModelRecord.id == Release.base_model_id)
        .where(*_result_conditions(split, groups), *_release_conditions(base_model, None))
        .group_by(Release.id)
    ).all()
    best: dict[str, MethodMean] = {}
    candidates = [
        MethodMean(
            method=release.method,
            label=release_label(release),
            mean=float(mean),
            stderr=math.sqrt(float(squares or 0.0)) / count,
            tasks=int(count),
        )
        for release, mean, squares, count in per_release
    ]
    for row in oracle_rows(session, base_model=base_model, split=split, groups=groups):
        if row.mean is not None and row.mean_stderr is not None:
            candidates.append(
                MethodMean(ORACLE, f"{row.base_model}", row.mean, row.mean_stderr, len(row.scores))
            )
    for candidate in candidates:
        current = best.get(candidate.method)
        if current is None or candidate.mean > current.mean:
            best[candidate.method] = candidate
    return sorted(best.values(), key=lambda m: (-m.mean, m.method))


# --- releases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseSummary:
    release: Release
    base_model: str
    experts: int
    tasks: int
    mean: float | None


@dataclass(frozen=True)
class ReleasePage:
    items: list[ReleaseSummary]
    total: int
    limit: int
    offset: int


def list_releases(
    session: Session,
    *,
    base_model: str | None = None,
    method: str | None = None,
    limit: int = PAGE_SIZE,
    offset: int = 0,
) -> ReleasePage:
    """Releases, newest first, with their expert count and evaluated tasks."""
    limit, offset = clamp_page(limit, offset)
    expert_counts = _expert_counts()
    scores = (
        select(
            EvaluationResult.release_id.label("release_id"),
            func.count().label("tasks"),
            func.avg(EvaluationResult.accuracy).label("mean"),
        )
        .where(*_result_conditions())
        .group_by(EvaluationResult.release_id)
        .subquery()
    )
    query = (
        select(
            Release,
            BaseModelRecord.name,
            func.coalesce(expert_counts.c.experts, 0),
            func.coalesce(scores.c.tasks, 0),
            scores.c.mean,
        )
        .join(BaseModelRecord, BaseModelRecord.id == Release.base_model_id)
        .outerjoin(expert_counts, expert_counts.c.release_id == Release.id)
        .outerjoin(scores, scores.c.release_id == Release.id)
        .where(*_release_conditions(base_model, method))
    )
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(query.order_by(Release.number.desc()).limit(limit).offset(offset)).all()
    return ReleasePage(
        items=[
            ReleaseSummary(release, base_name, experts, tasks, mean)
            for release, base_name, experts, tasks, mean in rows
        ],
        total=total,
        limit=limit,
        offset=offset,
    )


def base_model_of(session: Session, release: Release) -> BaseModelRecord | None:
    return session.get(BaseModelRecord, release.base_model_id)


def release_versions(session: Session, release: Release) -> list[ExpertVersion]:
    """The release's expert versions in its order."""
    return list(
        session.scalars(
            select(ExpertVersion)
            .join(ReleaseExpert, ReleaseExpert.expert_version_id == ExpertVersion.id)
            .where(ReleaseExpert.release_id == release.id)
            .order_by(ReleaseExpert.position)
        )
    )


def release_results(session: Session, release: Release) -> list[EvaluationResult]:
    """The release's newest finished result on every task it was evaluated on, by task."""
    latest = evaluations.latest_scores(session, [release.id]).get(release.id, {})
    return [latest[task].result for task in sorted(latest)]


@dataclass(frozen=True)
class OracleChoice:
    """The best single expert on a task among a release's experts."""

    version: ExpertVersion
    release_number: int
    accuracy: float


def oracle_choices(
    session: Session, versions: Sequence[ExpertVersion], tasks: Iterable[str]
) -> dict[str, OracleChoice]:
    """Per task, the version (of `versions`) whose single-expert release scored best on it;
    tasks with no evaluated single-expert release of these versions are absent."""
    task_list = list(tasks)
    if not versions or not task_list:
        return {}
    candidates = single_expert_releases(session, version_ids=[v.id for v in versions])
    if not candidates:
        return {}
    by_id = {version.id: version for version in versions}
    results = session.scalars(
        select(EvaluationResult)
        .where(
            EvaluationResult.release_id.in_(list(candidates)),
            EvaluationResult.task.in_(task_list),
            *_result_conditions(),
        )
        .order_by(EvaluationResult.release_id)
    )
    best: dict[str, OracleChoice] = {}
    for result in results:
        release, version, _base = candidates[result.release_id]
        current = best.get(result.task)
        if current is None or result.accuracy > current.accuracy:
            best[result.task] = OracleChoice(by_id[version.id], release.number, result.accuracy)
    return best


def result_by_id(session: Session, result_id: int) -> EvaluationResult | None:
    return session.get(EvaluationResult, result_id)


# --- catalog -----------------------------------------------------------------------------


class CatalogStatus(StrEnum):
    """Filter on an expert's latest version."""

    ALL = "all"
    ACTIVE = "active"
    YANKED = "yanked"


@dataclass(frozen=True)
class CatalogEntry:
    latest: ExpertVersion
    versions: int


@dataclass(frozen=True)
class CatalogPage:
    items: list[CatalogEntry]
    total: int
    limit: int
    offset: int
    namespaces: list[str]
    base_models: list[str]


def search_experts(
    session: Session,
    *,
    text: str | None = None,
    namespace: str | None = None,
    base_model: str | None = None,
    status: CatalogStatus = CatalogStatus.ALL,
    limit: int = PAGE_SIZE,
    offset: int = 0,
) -> CatalogPage:
    """Experts (one entry each, described by their latest version), by namespace and name.

    `text` matches, case-insensitively, a substring of the name (with or without its
    namespace) or of the latest version's description.
    """
    limit, offset = clamp_page(limit, offset)
    latest = (
        select(
            ExpertVersion.expert_id.label("expert_id"),
            func.max(ExpertVersion.number).label("number"),
            func.count().label("versions"),
        )
        .group_by(ExpertVersion.expert_id)
        .subquery()
    )
    query = (
        select(ExpertVersion, latest.c.versions)
        .join(
            latest,
            and_(
                ExpertVersion.expert_id == latest.c.expert_id,
                ExpertVersion.number == latest.c.number,
            ),
        )
        .join(Expert, Expert.id == ExpertVersion.expert_id)
    )
    if text:
        needle = text.strip().lower()
        description = func.lower(ExpertVersion.manifest["description"].as_string())
        query = query.where(
            or_(
                func.lower(Expert.name).contains(needle, autoescape=True),
                func.lower(Expert.namespace + "/" + Expert.name).contains(needle, autoescape=True),
                description.contains(needle, autoescape=True),
            )
        )
    if namespace:
        query = query.where(Expert.namespace == namespace)
    if base_model:
        query = query.join(
            BaseModelRecord, BaseModelRecord.id == ExpertVersion.base_model_id
        ).where(BaseModelRecord.name == base_model)
    if status == CatalogStatus.ACTIVE:
        query = query.where(ExpertVersion.yanked_at.is_(None))
    elif status == CatalogStatus.YANKED:
        query = query.where(ExpertVersion.yanked_at.is_not(None))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(
        query.order_by(Expert.namespace, Expert.name).limit(limit).offset(offset)
    ).all()
    namespaces = list(
        session.scalars(select(Expert.namespace).distinct().order_by(Expert.namespace).limit(500))
    )
    return CatalogPage(
        items=[CatalogEntry(version, count) for version, count in rows],
        total=total,
        limit=limit,
        offset=offset,
        namespaces=namespaces,
        base_models=base_model_names(session),
    )


def releases_using(session: Session, expert: Expert, limit: int = 50) -> list[tuple[Release, int]]:
    """Releases that include any version of `expert`, newest first, with the version."""
    rows = session.execute(
        select(Release, ExpertVersion.number)
        .join(ReleaseExpert, ReleaseExpert.release_id == Release.id)
        .join(ExpertVersion, ExpertVersion.id == ReleaseExpert.expert_version_id)
        .where(ExpertVersion.expert_id == expert.id)
        .order_by(Release.number.desc())
        .limit(limit)
    ).all()
    return [(release, number) for release, number in rows]
