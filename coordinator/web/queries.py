"""What the pages read. The leaderboard, its Oracle and the per-method bests come from
`coordinator.leaderboard.service` (the one source of the JSON API too); this module shapes
them for the templates and holds the page-only queries (releases, catalog search). Every
list is filtered, sorted and paginated in the database (limit/offset), so a page costs the
same with ten experts or ten thousand.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.orm import Session

from coordinator.base_models.models import BaseModelRecord
from coordinator.evaluations.models import EvaluationJob, EvaluationResult
from coordinator.experts.models import Expert, ExpertVersion
from coordinator.leaderboard import service as leaderboard
from coordinator.leaderboard.schemas import VersusBase
from coordinator.leaderboard.service import (
    MAX_PAGE_SIZE,
    ORACLE,
    PAGE_SIZE,
    TASK_GROUPS,
    Split,
)
from coordinator.releases.models import Release, ReleaseExpert
from coordinator.releases.schemas import method_label, method_settings
from protocol.methods import METHOD_SPECS

# Baselines: methods that give every input the same model, routing nothing (the base model,
# and merges: merged, TIES, DARE). Token routers, retrieval and single choose an expert.
BASELINE_METHODS: tuple[str, ...] = tuple(
    name
    for name, spec in METHOD_SPECS.items()
    if not (spec.takes_top_k or spec.single_expert or spec.needs)
)
OTHER = "other"


def group_label(group: str | None) -> str:
    """How a task group reads on a page: `held_in` -> `held-in`; no group -> `other`."""
    return group.replace("_", "-") if group else OTHER


def clamp_page(limit: int, offset: int) -> tuple[int, int]:
    return max(1, min(limit, MAX_PAGE_SIZE)), max(0, offset)


# --- leaderboard ---------------------------------------------------------------------------


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
    """`#3 phatgoose, k=2`, `#4 ties, density 0.2, scale 1`."""
    return f"#{release.number} " + release_method_label(release)


def release_method_label(release: Release) -> str:
    """`phatgoose, k=2`, `ties, density 0.2, scale 1`: the method, k and parameters."""
    return method_label(release.method, release.top_k, release.method_params or {})


def release_kind(method: str) -> str:
    if method in BASELINE_METHODS:
        return "baseline"
    if method == ORACLE:
        return "oracle"
    return "release"


@dataclass
class BoardRow:
    """A leaderboard row: a release, or the Oracle computed from single-expert releases.
    Its means follow the leaderboard service's rules."""

    kind: str  # release | baseline | oracle
    label: str
    method: str
    base_model: str
    scores: dict[str, Score]
    number: int | None = None
    top_k: int | None = None
    method_params: dict[str, float | int | str] = field(default_factory=dict)
    experts: int = 0
    created_at: datetime | None = None
    # The paired difference against the base (leaderboard.comparisons.versus_base); None
    # for the Oracle, which is no evaluation.
    vs_base: VersusBase | None = None

    @property
    def settings(self) -> str:
        """k and the method's parameters, as shown beside the method: `density 0.2, scale 1`."""
        return method_settings(self.top_k, self.method_params)

    @property
    def mean(self) -> float | None:
        return leaderboard.mean_accuracy([s.accuracy for s in self.scores.values()])

    @property
    def mean_stderr(self) -> float | None:
        return leaderboard.stderr_of_mean([s.stderr for s in self.scores.values()])

    def group_mean(self, groups: dict[str, str], group: str) -> float | None:
        """Mean over this row's tasks of one group (`held_in`, `held_out`)."""
        accuracies = {task: s.accuracy for task, s in self.scores.items()}
        return leaderboard.group_means(accuracies, groups).get(group)

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
    groups: dict[str, str] = field(default_factory=dict)  # task -> held_in | held_out
    group_columns: list[str] = field(default_factory=list)  # group means shown beside the mean
    base_models: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)


def board(
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
    """The leaderboard page: one page of `leaderboard.rank_releases` over the evaluated
    releases, plus the Oracle rows (one per base model, over all single-expert releases,
    whatever the page). An unknown `sort` falls back to the mean; `method=oracle` shows
    only the Oracle."""
    limit, offset = clamp_page(limit, offset)
    oracle_only = method == ORACLE
    view = leaderboard.LeaderboardView(
        base_model=base_model,
        method=None if oracle_only else method,
        split=split,
        evaluated_only=True,
        sort=leaderboard.sort_key(sort) or "mean",
        descending=descending,
        limit=0 if oracle_only else limit,  # the Oracle alone still needs the task columns
        offset=offset,
    )
    ranking = leaderboard.rank_releases(session, view)
    groups = ranking.task_groups
    rows = [
        BoardRow(
            kind=release_kind(row.release.method),
            label=release_label(row.release),
            method=row.release.method,
            base_model=row.base_model,
            scores={task: Score.of(result) for task, result in row.scores.items()},
            number=row.release.number,
            top_k=row.release.top_k,
            method_params=row.release.method_params or {},
            experts=row.experts,
            created_at=row.release.created_at,
            vs_base=ranking.versus_base.get(row.release.id),
        )
        for row in ranking.releases
    ]
    show_oracle = method in (None, "", ORACLE)
    return Board(
        tasks=ranking.tasks,
        rows=rows,
        oracles=oracle_rows(session, base_model=base_model, split=split) if show_oracle else [],
        total=0 if oracle_only else ranking.total,
        limit=limit,
        offset=offset,
        sort=ranking.view.sort,
        descending=ranking.view.descending,
        groups=groups,
        group_columns=[g for g in TASK_GROUPS if g in groups.values()]
        if split == Split.ALL
        else [],
        base_models=base_model_names(session),
        methods=[*release_methods(session), ORACLE],
    )


def oracle_rows(
    session: Session, *, base_model: str | None = None, split: Split = Split.ALL
) -> list[BoardRow]:
    """Per base model, per task: the best single-expert release's score on that task."""
    return [
        BoardRow(
            kind="oracle",
            label="Oracle (best single expert per task)",
            method=ORACLE,
            base_model=base_name,
            scores={task: Score.of(s.result, s.release) for task, s in by_task.items()},
        )
        for base_name, by_task in leaderboard.oracle_scores(
            session, base_model=base_model, split=split
        ).items()
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
    return [
        MethodMean(
            method=best.method,
            label=release_label(best.release) if best.release is not None else best.base_model,
            mean=best.mean,
            stderr=best.stderr,
            tasks=best.tasks,
        )
        for best in leaderboard.best_release_per_method(session, base_model=base_model, split=split)
    ]


# --- releases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseSummary:
    release: Release
    base_model: str
    experts: int
    tasks: int
    mean: float | None
    yanked: int = 0  # its experts yanked now


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
    """Releases, newest first, with their expert count, evaluated tasks and mean (the
    leaderboard's summary of every task)."""
    limit, offset = clamp_page(limit, offset)
    expert_counts = leaderboard.expert_counts()
    scores = leaderboard.release_summaries()
    yanked_counts = (
        select(ReleaseExpert.release_id, func.count().label("yanked"))
        .join(ExpertVersion, ExpertVersion.id == ReleaseExpert.expert_version_id)
        .where(ExpertVersion.yanked_at.is_not(None))
        .group_by(ReleaseExpert.release_id)
        .subquery()
    )
    query = (
        select(
            Release,
            BaseModelRecord.name,
            func.coalesce(expert_counts.c.experts, 0),
            func.coalesce(scores.c.tasks, 0),
            scores.c.mean,
            func.coalesce(yanked_counts.c.yanked, 0),
        )
        .join(BaseModelRecord, BaseModelRecord.id == Release.base_model_id)
        .outerjoin(expert_counts, expert_counts.c.release_id == Release.id)
        .outerjoin(scores, scores.c.release_id == Release.id)
        .outerjoin(yanked_counts, yanked_counts.c.release_id == Release.id)
        .where(*leaderboard.release_conditions(base_model, method, include_withdrawn=True))
    )
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(query.order_by(Release.number.desc()).limit(limit).offset(offset)).all()
    return ReleasePage(
        items=[
            ReleaseSummary(release, base_name, experts, tasks, mean, yanked)
            for release, base_name, experts, tasks, mean, yanked in rows
        ],
        total=total,
        limit=limit,
        offset=offset,
    )


def base_model_of(session: Session, release: Release) -> BaseModelRecord | None:
    return session.get(BaseModelRecord, release.base_model_id)


def release_results(session: Session, release: Release) -> list[EvaluationResult]:
    """The release's score on every task it was evaluated on (the leaderboard's rule), by
    task."""
    latest = leaderboard.latest_results(session, [release.id]).get(release.id, {})
    return [latest[task] for task in sorted(latest)]


@dataclass(frozen=True)
class OracleChoice:
    """The best single expert on a task among a release's experts."""

    version: ExpertVersion
    release_number: int
    accuracy: float


def oracle_choices(
    session: Session, versions: Sequence[ExpertVersion], tasks: Iterable[str]
) -> dict[str, OracleChoice]:
    """Per task, the version (of `versions`) whose single-expert release scored best on it:
    the Oracle restricted to these versions. Tasks with no evaluated single-expert release
    of these versions are absent."""
    task_list = list(tasks)
    if not versions or not task_list:
        return {}
    by_id = {version.id: version for version in versions}
    best: dict[str, OracleChoice] = {}
    # A release's versions share one base model, so at most one base model answers.
    for by_task in leaderboard.oracle_scores(
        session, version_ids=list(by_id), tasks=task_list
    ).values():
        for task, score in by_task.items():
            current = best.get(task)
            if current is None or score.result.accuracy > current.accuracy:
                best[task] = OracleChoice(
                    by_id[score.version.id], score.release.number, score.result.accuracy
                )
    return best


# Evaluation jobs shown on a release page: the newest ones (maintainers may queue any number).
JOBS_SHOWN = 20


@dataclass(frozen=True)
class JobPage:
    items: list[EvaluationJob]  # newest first
    total: int


def release_jobs(session: Session, release: Release, limit: int = JOBS_SHOWN) -> JobPage:
    """The release's newest evaluation jobs and how many it has, without loading them all."""
    where = EvaluationJob.release_id == release.id
    total = session.scalar(select(func.count()).select_from(EvaluationJob).where(where)) or 0
    items = session.scalars(
        select(EvaluationJob).where(where).order_by(EvaluationJob.id.desc()).limit(limit)
    )
    return JobPage(items=list(items), total=total)


@dataclass(frozen=True)
class VersionPage:
    items: list[ExpertVersion]  # newest first
    total: int
    limit: int
    offset: int


def expert_versions(
    session: Session, expert: Expert, *, limit: int = PAGE_SIZE, offset: int = 0
) -> VersionPage:
    """One page of an expert's versions, newest first (a contributor may publish many)."""
    limit, offset = clamp_page(limit, offset)
    where = ExpertVersion.expert_id == expert.id
    total = session.scalar(select(func.count()).select_from(ExpertVersion).where(where)) or 0
    items = session.scalars(
        select(ExpertVersion)
        .where(where)
        .order_by(ExpertVersion.number.desc())
        .limit(limit)
        .offset(offset)
    )
    return VersionPage(items=list(items), total=total, limit=limit, offset=offset)


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


def _manifest_description(session: Session) -> ColumnElement[str]:
    """The latest version's description, for matching. On SQLite, a manifest that is not
    valid JSON (a legacy row holding `Infinity`) makes `json_extract` fail the whole query:
    such a row gets no description rather than a 500 for every visitor. PostgreSQL's JSON
    type refuses invalid JSON on insert, so every stored manifest parses there."""
    description = ExpertVersion.manifest["description"].as_string()
    if session.get_bind().dialect.name != "sqlite":
        return description
    return case((func.json_valid(ExpertVersion.manifest) == 1, description), else_=None)


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
        description = func.lower(_manifest_description(session))
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
