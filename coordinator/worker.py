"""The evaluation worker: `phatgoose coordinator worker`.

A loop that claims a queued evaluation job (`evaluations.service.claim_job`), keeps its
lease alive from a heartbeat thread, builds the release's routed model through the library
(`phatgoose.load_release` over a release directory of the coordinator's own blobs: the
method, k and hyper-parameters its manifest records), scores every task and stores each
task's result as soon as it is known. Several workers may run against one database; a
worker that dies loses its lease and another one resumes the job after the tasks already
stored.

Per task the worker stores accuracy, standard error, n, seconds, the evaluator version,
routing statistics: per layer, how often each expert was chosen (`routing_summary`, the
format is in docs/coordinator.md, "Routing statistics"), and the per-example outcomes
(`example_outcomes`: the chosen answer and whether it was right), from which releases are
compared pairwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

import phatgoose
from coordinator.core.config import Settings
from coordinator.core.errors import Conflict
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.models import EvaluationJob
from coordinator.evaluations.outcomes import MAX_OUTCOME_EXAMPLES, ExampleOutcomes
from coordinator.evaluations.public_errors import PublicJobError, public_error
from coordinator.releases.models import Release
from coordinator.releases.schemas import method_label
from coordinator.releases.service import export_release
from coordinator.storage import BlobStore, LocalBlobStore
from protocol.precision import Precision
from protocol.tasks import TaskNameError, check_task_name

if TYPE_CHECKING:
    from phatgoose.data import Example
    from phatgoose.evaluation import TaskResult

log = logging.getLogger(__name__)

# What "the same evaluation" means: a change to any of these changes the evaluator version.
EVALUATION_PROTOCOL: dict[str, Any] = {
    "data": "BIG-bench task.json, multiple-choice examples (target_scores, a choice > 0)",
    "prompt": "task_prefix + example_input_prefix + input + example_output_prefix",
    "split": "random.Random(seed).shuffle; the first examples_per_task examples",
    "scoring": "rank classification: mean log-probability per choice token",
    "join": "phatgoose.data.join_continuation (prompt/continuation token boundary)",
    "max_length": 512,
    "routing_stats": "capture_routing per task; per-layer expert frequencies",
}


# transformers' loading is not thread-safe (tied weights can be left on the meta device):
# workers sharing a process load their base models one at a time.
_LOAD_LOCK = threading.Lock()


def evaluator_version() -> str:
    """`<phatgoose version>+<12 hex of the protocol's hash>`."""
    canonical = json.dumps(EVALUATION_PROTOCOL, sort_keys=True)
    return f"{phatgoose.__version__}+{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def default_worker_id() -> str:
    """A name for the job rows, which are public: no host name (the log says which host)."""
    return f"worker-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class InvalidTaskName(PublicJobError):
    """A job names a task that is not a task name (`protocol.tasks`); it never will be one,
    so the job fails at once, before any path is built from it."""


class CuratedOut(PublicJobError):
    """The job's release was withdrawn, or one of its experts yanked, after the job was
    queued (without the matching override in its spec): the job fails at once."""


class UnknownTask(PublicJobError):
    """A job names a task the worker's tasks directory does not hold."""


@dataclass
class WorkerOptions:
    """How a worker runs. `base_models` maps a base model's registered name to what
    `phatgoose.models.load_base_model` should load for it (a path), where the name alone
    is not loadable."""

    worker_id: str = field(default_factory=default_worker_id)
    lease_seconds: float = 120.0
    poll_seconds: float = 5.0
    max_attempts: int = evaluations.DEFAULT_MAX_ATTEMPTS
    tasks_dir: Path | None = None
    base_models: dict[str, str] = field(default_factory=dict)
    batch_size: int = 16
    # Compute precision of scoring (phatgoose.precision; auto: bfloat16 where native).
    precision: Precision = "auto"
    # Test hook: sleep this long before each task (to kill a worker mid-job in tests).
    task_delay_seconds: float = 0.0


class Heartbeat:
    """Renews a job's lease every third of the lease until stopped; `lost` is set when
    the job is no longer leased to this worker."""

    def __init__(
        self, sessions: sessionmaker[Session], job_id: int, options: WorkerOptions
    ) -> None:
        self.sessions, self.job_id, self.options = sessions, job_id, options
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = max(self.options.lease_seconds / 3, 0.05)
        while not self._stop.wait(interval):
            try:
                with self.sessions() as session:
                    alive = evaluations.heartbeat(
                        session,
                        self.job_id,
                        self.options.worker_id,
                        lease_seconds=self.options.lease_seconds,
                    )
            except Exception:  # a database hiccup: try again at the next beat
                log.exception("heartbeat of evaluation %d failed", self.job_id)
                continue
            if not alive:
                log.error("evaluation %d: lease lost", self.job_id)
                self.lost.set()
                return


class Worker:
    """Claims and runs evaluation jobs; keeps loaded base models between jobs."""

    def __init__(
        self, sessions: sessionmaker[Session], blobs: BlobStore, options: WorkerOptions
    ) -> None:
        self.sessions, self.blobs, self.options = sessions, blobs, options
        self._bases: dict[str, tuple[Any, Any]] = {}

    def run(self, *, once: bool = False, stop: Callable[[], bool] = lambda: False) -> int:
        """Run jobs until `stop()` (or, with `once`, until none is claimable); return how
        many jobs this worker ended (done or failed)."""
        ended = 0
        log.info(
            "worker %s (host %s, pid %d) polling every %.1f s",
            self.options.worker_id,
            socket.gethostname(),
            os.getpid(),
            self.options.poll_seconds,
        )
        while not stop():
            job = self.claim()
            if job is None:
                if once:
                    break
                time.sleep(self.options.poll_seconds)
                continue
            if self.run_job(job):
                ended += 1
        return ended

    def claim(self) -> EvaluationJob | None:
        with self.sessions() as session:
            return evaluations.claim_job(
                session,
                self.options.worker_id,
                lease_seconds=self.options.lease_seconds,
                max_attempts=self.options.max_attempts,
            )

    def run_job(self, job: EvaluationJob) -> bool:
        """One attempt at `job`; True when it ended here (done, or failed for good)."""
        log.info("evaluation %d: attempt %d by %s", job.id, job.attempts, self.options.worker_id)
        with Heartbeat(self.sessions, job.id, self.options) as beat:
            try:
                self._evaluate(job, beat)
                with self.sessions() as session:
                    evaluations.complete_job(session, job.id, self.options.worker_id)
            except evaluations.LeaseLost as error:
                log.error("evaluation %d: stopped, %s", job.id, error)
                return False
            except Exception as error:
                # The whole story (paths, hosts) for the operator; the job row is public.
                log.error(
                    "evaluation %d: attempt %d failed: %s: %s\n%s",
                    job.id,
                    job.attempts,
                    type(error).__name__,
                    error,
                    traceback.format_exc(),
                )
                # A name that breaks the rule never becomes valid: no second attempt.
                final = isinstance(error, (InvalidTaskName, CuratedOut))
                attempts = job.attempts if final else None
                try:
                    with self.sessions() as session:
                        state = evaluations.fail_attempt(
                            session,
                            job.id,
                            self.options.worker_id,
                            public_error(error),
                            max_attempts=attempts or self.options.max_attempts,
                        )
                except evaluations.LeaseLost:
                    return False
                return state == evaluations.JobState.FAILED
        log.info("evaluation %d: done", job.id)
        return True

    def _evaluate(self, job: EvaluationJob, beat: Heartbeat) -> None:
        from phatgoose.bigbench import load_bigbench_task, resolve_task_name
        from phatgoose.evaluation import evaluate_task
        from phatgoose.routing import capture_routing, unroute_model

        spec = job.spec
        tasks = checked_task_names(spec)  # before any path, release or model is touched
        version = evaluator_version()
        with self.sessions() as session:
            release = session.get(Release, job.release_id)
            assert release is not None
            try:
                evaluations.check_curation(
                    session,
                    release,
                    allow_withdrawn=bool(spec.get("allow_withdrawn")),
                    allow_yanked=bool(spec.get("allow_yanked")),
                )
            except Conflict as error:
                raise CuratedOut(error.message) from None
            done = evaluations.done_tasks(session, job.id)
            todo = [t for t in tasks if t not in done]
            if done:
                log.info("evaluation %d: resuming; %d task(s) already scored", job.id, len(done))
            with tempfile.TemporaryDirectory(prefix="phatgoose-release-") as directory:
                export_release(session, self.blobs, release, Path(directory))
                manifest = release.manifest
                log.info(
                    "evaluation %d: release %d (%s), %d task(s) to score",
                    job.id,
                    release.number,
                    method_label(release.method, release.top_k, release.method_params or {}),
                    len(todo),
                )
                model, tokenizer = self._load(Path(directory), manifest)
        try:
            for task in todo:
                if self.options.task_delay_seconds:
                    time.sleep(self.options.task_delay_seconds)
                if beat.lost.is_set():
                    raise evaluations.LeaseLost(f"evaluation {job.id}: lease lost")
                try:
                    task_file = resolve_task_name(task, self.options.tasks_dir)
                except TaskNameError as error:
                    raise UnknownTask(str(error)) from None
                split = load_bigbench_task(
                    task_file,
                    n_eval=int(spec["examples_per_task"]),
                    seed=int(spec.get("seed", 0)),
                )
                with capture_routing(model) as stats:
                    result = evaluate_task(
                        model,
                        tokenizer,
                        split.evaluation,
                        task=task,
                        batch_size=self.options.batch_size,
                        max_length=EVALUATION_PROTOCOL["max_length"],
                        progress=False,
                        precision=self.options.precision,
                    )
                score = evaluations.TaskScore(
                    task=task,
                    accuracy=result.accuracy,
                    stderr=result.stderr,
                    n=result.n,
                    evaluator_version=version,
                    seconds=result.seconds,
                    routing_stats=routing_summary(stats, manifest["method"]),
                    precision=result.precision,
                    outcomes=example_outcomes(result, split.evaluation),
                )
                with self.sessions() as session:
                    evaluations.record_result(session, job.id, self.options.worker_id, score)
                log.info(
                    "evaluation %d: %s accuracy %.3f ± %.3f (n=%d, %.1f s, %s)",
                    job.id,
                    task,
                    result.accuracy,
                    result.stderr,
                    result.n,
                    result.seconds,
                    result.precision,
                )
        finally:
            unroute_model(model)

    def _load(self, directory: Path, manifest: dict[str, Any]) -> tuple[Any, Any]:
        """The routed model of a release directory, over a cached base model."""
        from phatgoose.models import load_base_model
        from phatgoose.release import load_release

        name = manifest["base_model"]["name"]
        if name not in self._bases:
            with _LOAD_LOCK:
                self._bases[name] = load_base_model(self.options.base_models.get(name, name))
        return load_release(directory, base_model=self._bases[name])


def checked_task_names(spec: dict[str, Any]) -> list[str]:
    """A job's task names, each following `protocol.tasks` (the API checked them too, but a
    row may come from elsewhere); raises `InvalidTaskName` naming the first that does not."""
    tasks = spec.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise InvalidTaskName(f"the job's spec has no list of tasks: {tasks!r}")
    for task in tasks:
        try:
            check_task_name(task)
        except TaskNameError as error:
            raise InvalidTaskName(str(error)) from None
    return list(tasks)


def example_outcomes(result: TaskResult, examples: Sequence[Example]) -> ExampleOutcomes | None:
    """A task's per-example outcomes as the coordinator stores them, with each example's
    number of choices; None (logged) past `MAX_OUTCOME_EXAMPLES`, which are not kept."""
    if result.n > MAX_OUTCOME_EXAMPLES:
        log.warning(
            "%s: %d examples, more than the %d whose outcomes are kept; stored without them "
            "(no paired comparisons on this task)",
            result.task,
            result.n,
            MAX_OUTCOME_EXAMPLES,
        )
        return None
    return ExampleOutcomes(
        predictions=result.predictions,
        correct=result.correct,
        choices=tuple(len(example.choices) for example in examples),
    )


def routing_summary(stats: Any, method: str) -> dict[str, Any] | None:
    """Compact routing statistics of one task (None when nothing was routed: base and the
    merges, merged, TIES and DARE).

    `frequencies[e][l]` is the share of layer l's selections that went to expert e (each
    column sums to 1); `selections[l]` counts them (tokens x top-k x modules in the layer);
    `overall[e]` is expert e's share over every layer.
    """
    labels, matrix = stats.per_layer()
    if not labels:
        return None
    counts = {path: c for path, c in stats.counts.items()}
    per_layer_totals = [0] * len(labels)
    overall = [0] * len(stats.expert_names)
    for path, c in counts.items():
        for index, label in enumerate(labels):
            if path == label or path.startswith(label + "."):
                per_layer_totals[index] += int(c.sum())
                break
        for expert, value in enumerate(c.tolist()):
            overall[expert] += value
    total = sum(overall) or 1
    return {
        "format": 1,
        "method": method,
        "top_k": stats.top_k,
        "experts": list(stats.expert_names),
        "layers": labels,
        "frequencies": [[round(v, 6) for v in row] for row in matrix.tolist()],
        "selections": per_layer_totals,
        "overall": [round(v / total, 6) for v in overall],
    }


def run_worker(
    settings: Settings,
    options: WorkerOptions,
    *,
    once: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Open the coordinator's database and blobs and run a worker; see `Worker.run`."""
    from coordinator.core.app import open_database

    engine, sessions = open_database(settings)
    try:
        worker = Worker(sessions, LocalBlobStore(settings.blob_dir), options)
        return worker.run(once=once, stop=stop)
    finally:
        engine.dispose()
