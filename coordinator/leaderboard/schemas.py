"""The leaderboard's JSON, and the paired comparisons of two releases' evaluations."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from protocol import API_VERSION, ApiVersion

if TYPE_CHECKING:
    from phatgoose.paired import PairedDifference


class LeaderboardCell(BaseModel):
    accuracy: float
    stderr: float
    n: int
    evaluator_version: str
    job_id: int
    has_outcomes: bool = Field(
        default=False, description="per-example outcomes are stored (paired comparisons)"
    )


# --- paired comparisons (coordinator.leaderboard.comparisons) ------------------------------


class PairedDelta(BaseModel):
    """accuracy(a) - accuracy(b) on the same examples (`phatgoose.paired.PairedDifference`)."""

    delta: float = Field(description="accuracy(a) - accuracy(b); of a mean: the mean of deltas")
    low: float = Field(description="the 95% paired bootstrap interval's lower end")
    high: float = Field(description="its upper end")
    p_value: float = Field(description="exact two-sided McNemar p-value")
    n: int = Field(description="examples compared (summed over tasks for a mean)")
    a_only: int = Field(description="examples a got right and b wrong")
    b_only: int = Field(description="examples b got right and a wrong")
    significant: bool = Field(description="the interval excludes 0")

    @classmethod
    def of(cls, difference: PairedDifference) -> PairedDelta:
        return cls.model_validate(difference.to_dict())


class ComparisonSpec(BaseModel):
    """What fixes the examples of an evaluation: two jobs with the same spec scored the
    same examples of each task."""

    tasks: list[str] = Field(description="sorted")
    examples_per_task: int
    seed: int


class TaskDelta(BaseModel):
    task: str
    group: str | None = Field(description="held_in, held_out, or null")
    a: float | None = Field(description="a's accuracy (null: no result)")
    b: float | None = Field(description="b's accuracy")
    n: int | None = Field(description="examples, when both have the same number")
    difference: PairedDelta | None = Field(description="null when not comparable: see reason")
    reason: str | None = Field(default=None, description="why there is no difference")


class MeanDelta(BaseModel):
    """The paired difference of an unweighted mean over tasks (tasks are the bootstrap's
    strata): every task must compare, or there is none."""

    tasks: list[str]
    a: float | None = Field(description="a's mean accuracy over these tasks")
    b: float | None = Field(description="b's mean accuracy over these tasks")
    difference: PairedDelta | None = Field(description="null when not comparable: see reason")
    reason: str | None = None


class EvaluationRef(BaseModel):
    """One side of a comparison: a release and the evaluation (job) compared."""

    release: int
    method: str
    label: str = Field(description="method, k and parameters, e.g. 'phatgoose, k=2'")
    base_model: str
    job_id: int | None = Field(description="the finished evaluation compared (null: none)")


class Comparison(BaseModel):
    """`GET /leaderboard/compare`: release a against release b on the same examples."""

    api_version: ApiVersion = API_VERSION
    a: EvaluationRef
    b: EvaluationRef
    comparable: bool = Field(description="a finished evaluation of each shares a spec")
    reason: str | None = Field(default=None, description="why not, when not comparable")
    spec: ComparisonSpec | None = None
    tasks: list[TaskDelta] = Field(default_factory=list, description="per task, by name")
    means: dict[str, MeanDelta] = Field(
        default_factory=dict, description="all, held_in, held_out (groups with tasks)"
    )
    resamples: int
    confidence: float


class VersusBase(BaseModel):
    """A leaderboard row's paired difference against the base model (docs/coordinator.md,
    "Comparisons"): null numbers with a reason when there is none."""

    base_release: int | None = Field(description="the base release compared against")
    job_id: int | None = Field(description="this release's evaluation compared")
    base_job_id: int | None = Field(description="the base release's evaluation compared")
    spec: ComparisonSpec | None = None
    mean: MeanDelta | None = Field(
        default=None, description="over the spec's tasks in view (the view's split)"
    )
    group_means: dict[str, MeanDelta] = Field(default_factory=dict, description="held_in, held_out")
    reason: str | None = Field(default=None, description="why there is no comparison")


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
    vs_base: VersusBase | None = Field(
        default=None, description="paired difference against the base on the same examples"
    )


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
