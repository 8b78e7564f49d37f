"""API bodies of evaluation jobs and their results, and of the job API remote workers use
(lease, heartbeat, results, complete, fail: `coordinator.evaluations.worker_routes`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    model_validator,
)

from coordinator.core.params import DB_INT_MAX
from coordinator.evaluations.models import EvaluationJob, EvaluationResult
from coordinator.evaluations.outcomes import (
    MAX_CHOICES,
    MAX_OUTCOME_EXAMPLES,
    ExampleOutcomes,
)
from coordinator.evaluations.public_errors import MAX_PUBLIC_ERROR, redact
from protocol import API_PREFIX, API_VERSION, ApiVersion
from protocol.methods import RoutingMethod
from protocol.precision import ComputePrecisionName

# Attempts at a job before it is marked failed (a worker's --max-attempts).
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS = 100
# A remote worker's lease: long enough that a heartbeat every third of it survives a slow
# network, short enough that a dead worker's job is taken over within the hour.
MIN_LEASE_SECONDS = 5.0
MAX_LEASE_SECONDS = 3600.0
# A worker's name in the job rows, which are public: the local worker's default is
# `worker-<pid>-<random>` (coordinator.worker.default_worker_id); no spaces, slashes or
# other characters that could pass for a path or markup.
WORKER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$"
# Routing statistics of one task: bounded so that a report stays a small JSON column.
MAX_ROUTING_EXPERTS = 10_000
MAX_ROUTING_LAYERS = 1_000


class TaskGroups(BaseModel):
    held_in: list[str] = Field(default_factory=list)
    held_out: list[str] = Field(default_factory=list)


class EvaluationSpec(BaseModel):
    """A benchmark: task names, examples per task, the split's seed (and the overrides of
    curation). `EvaluationCreate` adds the release; `POST /releases/{n}/credit` takes it
    as is, checked by the same rules."""

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
    def _check_tasks(self) -> Self:
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


class EvaluationCreate(EvaluationSpec):
    """A release x a benchmark: task names, examples per task, the split's seed."""

    # Bounded like every release number (a 64-bit one was a 500 on SQLite: fuzzing).
    release: int = Field(ge=1, le=DB_INT_MAX, description="the release number")
    leave_out: str | None = Field(
        default=None,
        max_length=200,
        description="a leave-one-out evaluation: the release without this expert "
        "(namespace/name@version, one of its experts), for that expert's credit "
        "(docs/coordinator.md, 'Credit'); such a job never counts as the release's scores",
        examples=["alice/hyperbaton@2"],
    )


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


# --- the job API of remote workers -------------------------------------------------------

WorkerId = Annotated[
    str,
    Field(
        pattern=WORKER_ID_PATTERN,
        description="the worker's name, 1 to 100 of A-Z a-z 0-9 . _ : - (public: no host "
        "name); the coordinator records it as <token name>/<worker_id>",
        examples=["worker-4242-1a2b3c4d"],
    ),
]
LeaseSeconds = Annotated[
    float,
    Field(
        ge=MIN_LEASE_SECONDS,
        le=MAX_LEASE_SECONDS,
        allow_inf_nan=False,
        description="the job is taken over when the worker misses heartbeats this long",
    ),
]
Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class _WorkerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker_id: WorkerId


class LeaseRequest(_WorkerBody):
    lease_seconds: LeaseSeconds
    max_attempts: int = Field(
        ge=1,
        le=MAX_ATTEMPTS,
        description="a job whose lease expired this many times is failed instead of leased",
    )


class HeartbeatRequest(_WorkerBody):
    lease_seconds: LeaseSeconds


class Alive(BaseModel):
    alive: Literal[True] = True


class LeasedJob(BaseModel):
    """A job leased to the worker, with everything it needs to run it: the spec, the tasks
    an earlier attempt already scored, the release's manifest (whose canonical sha256 is
    `artifact_digest`), and the curation verdict."""

    api_version: ApiVersion = API_VERSION
    id: int
    release: int = Field(description="the release number")
    attempts: int = Field(description="this attempt's number, 1 for the first")
    worker_id: str = Field(description="the worker as the job row records it")
    lease_expires_at: datetime
    spec: dict[str, Any]
    done_tasks: list[str] = Field(description="tasks already scored: skip them")
    manifest: dict[str, Any] = Field(description="the release manifest (release.json)")
    artifact_digest: str = Field(description="sha256: of the manifest's canonical JSON")
    curation_error: str | None = Field(
        description="set when the release was withdrawn, or an expert of it yanked, since "
        "the job was queued (without the override in its spec): fail the job at once, final"
    )


class RoutingStatsReport(BaseModel):
    """A task's routing statistics as the worker computes them (`coordinator.worker.
    routing_summary`; docs/coordinator.md, "Routing statistics"): experts x layers."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1]
    method: RoutingMethod
    top_k: StrictInt | None = Field(ge=0)
    experts: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=MAX_ROUTING_EXPERTS
    )
    layers: list[Annotated[str, Field(min_length=1, max_length=300)]] = Field(
        min_length=1, max_length=MAX_ROUTING_LAYERS
    )
    frequencies: list[list[Share]] = Field(description="[expert][layer]")
    selections: list[Annotated[StrictInt, Field(ge=0)]] = Field(description="per layer")
    overall: list[Share] = Field(description="per expert")

    @model_validator(mode="after")
    def _shapes(self) -> RoutingStatsReport:
        experts, layers = len(self.experts), len(self.layers)
        if len(self.frequencies) != experts or any(len(r) != layers for r in self.frequencies):
            raise ValueError(f"frequencies must be {experts} experts x {layers} layers")
        if len(self.selections) != layers:
            raise ValueError(f"selections must hold one count per layer ({layers})")
        if len(self.overall) != experts:
            raise ValueError(f"overall must hold one share per expert ({experts})")
        return self


class OutcomesReport(BaseModel):
    """Per example, in order: the chosen answer, whether it was right, its choices."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1  # OUTCOMES_FORMAT
    predictions: list[StrictInt] = Field(max_length=MAX_OUTCOME_EXAMPLES)
    correct: list[StrictBool] = Field(max_length=MAX_OUTCOME_EXAMPLES)
    choices: list[Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)]] | None = Field(
        default=None, max_length=MAX_OUTCOME_EXAMPLES
    )

    def to_outcomes(self) -> ExampleOutcomes:
        return ExampleOutcomes(
            predictions=tuple(self.predictions),
            correct=tuple(self.correct),
            choices=None if self.choices is None else tuple(self.choices),
        )


class ResultReport(_WorkerBody):
    """One task's score, as the local worker stores it (`evaluations.service.TaskScore`).
    The coordinator checks the task name (`protocol.tasks`) and that the outcomes fit the
    score (`evaluations.outcomes.check_outcomes`) before storing anything."""

    task: str = Field(min_length=1, max_length=200, examples=["hyperbaton"])
    accuracy: Share
    stderr: Share
    n: int = Field(ge=1, le=DB_INT_MAX, description="examples scored")
    evaluator_version: str = Field(pattern=r"^[\x21-\x7e]{1,64}$", examples=["0.1.0+abc"])
    seconds: float = Field(ge=0, le=1e9, allow_inf_nan=False)
    routing_stats: RoutingStatsReport | None = None
    precision: ComputePrecisionName | None = None
    outcomes: OutcomesReport | None = None


class StoredResult(BaseModel):
    api_version: ApiVersion = API_VERSION
    job: int
    task: str


class CompleteRequest(_WorkerBody):
    pass


class FailRequest(_WorkerBody):
    error: str = Field(
        min_length=1,
        max_length=MAX_PUBLIC_ERROR,
        description="what failed, public text (shown on the job's page, redacted again)",
    )
    final: bool = Field(
        default=False,
        description="no further attempt can succeed (a bad task name, a release curated "
        "out): the job fails now",
    )
    max_attempts: int = Field(
        default=DEFAULT_MAX_ATTEMPTS,
        ge=1,
        le=MAX_ATTEMPTS,
        description="otherwise the job fails once it has had this many attempts",
    )
