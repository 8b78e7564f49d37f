"""The evaluation worker: `phatgoose coordinator worker`.

A loop that claims a queued evaluation job (`evaluations.service.claim_job`), keeps its
lease alive from a heartbeat thread, builds the release's routed model through the library
(`phatgoose.load_release` over a release directory: the method, k and hyper-parameters its
manifest records; a leave-one-out job's `leave_out` expert left out, for credit:
`coordinator.credit`), scores every task and stores each task's result as soon as it is known.
Several workers may run at once; a worker that dies loses its lease and another one resumes
the job after the tasks already stored.

The loop talks to a `JobBackend`: `DatabaseBackend` on the coordinator's own database and
blobs (`run_worker`), or `coordinator.worker_http.HttpBackend` on a coordinator's job API
from anywhere, with only its URL and a worker token (`run_remote_worker`). Both lease
through the same service functions, so a job is scored the same way by either. Each poll,
before it claims, the loop has the backend advance the release channels that follow the
catalog (`coordinator.channels`: a catalog change builds one release and queues its
evaluation, however many workers poll at once).

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

import phatgoose
from coordinator.core.config import Settings
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.models import JobState
from coordinator.evaluations.outcomes import MAX_OUTCOME_EXAMPLES, ExampleOutcomes
from coordinator.evaluations.public_errors import PublicJobError, public_error
from coordinator.releases.schemas import method_label
from coordinator.releases.service import export_release
from coordinator.storage import BlobStore, open_blob_store
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


class InvalidLeaveOut(PublicJobError):
    """A leave-one-out job names an expert its release does not have (the API refuses
    such a job; a row may come from elsewhere): the job fails at once."""


class UnknownTask(PublicJobError):
    """A job names a task the worker's tasks directory does not hold."""


class WorkerStopped(RuntimeError):
    """The worker cannot go on (the coordinator refused its token, ...): the message says
    what to fix. Raised out of `Worker.run`, never stored as a job's error."""


class CoordinatorUnavailable(RuntimeError):
    """The coordinator did not answer, or answered 5xx or 429, after every retry: the job's
    lease runs out and another attempt resumes it."""


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


@dataclass(frozen=True)
class Job:
    """A job leased to this worker, as every backend hands it to the loop."""

    id: int
    release: int  # the release number
    attempts: int  # this attempt's number
    spec: dict[str, Any]


@dataclass(frozen=True)
class PreparedRelease:
    """A leased job's release, ready to load: a directory `phatgoose.load_release` reads
    (`release.json` and each expert's files under its path), its manifest, and the tasks an
    earlier attempt already scored."""

    directory: Path
    manifest: dict[str, Any]
    done: frozenset[str]


class JobBackend(Protocol):
    """Where a worker's jobs come from and where its results go.

    Every write (`record_result`, `complete`, `fail`) raises `evaluations.LeaseLost` once
    the job is no longer leased to `worker_id`; `WorkerStopped` means the worker cannot go
    on at all.
    """

    def claim(self, worker_id: str, *, lease_seconds: float, max_attempts: int) -> Job | None:
        """Lease the oldest claimable job to `worker_id`; None when there is none."""
        ...

    def heartbeat(self, job_id: int, worker_id: str, *, lease_seconds: float) -> bool:
        """Extend the lease; False when the job is no longer leased to `worker_id`."""
        ...

    def prepare(self, job: Job) -> AbstractContextManager[PreparedRelease]:
        """The job's release directory, done tasks and manifest, for the `with` block.
        Raises `CuratedOut` before writing anything when the release was withdrawn, or an
        expert of it yanked, since the job was queued (without the override in its spec)."""
        ...

    def record_result(self, job_id: int, worker_id: str, score: evaluations.TaskScore) -> None: ...

    def complete(self, job_id: int, worker_id: str) -> None: ...

    def fail(
        self, job_id: int, worker_id: str, error: str, *, final: bool, max_attempts: int
    ) -> JobState:
        """End the attempt with a public `error`: requeued, or failed when `final` or when
        the job has had `max_attempts` attempts; returns the job's state."""
        ...

    def advance_channels(self) -> None:
        """Advance the release channels that follow the catalog (`coordinator.channels`),
        once per poll; idempotent, whatever other workers do at the same time."""
        ...


class DatabaseBackend:
    """Jobs from the coordinator's own database, releases exported from its blob store: a
    worker on the coordinator's machine, or one that shares its database and blobs. With
    `settings` (`run_worker` passes the coordinator's) it also advances release channels."""

    def __init__(
        self, sessions: sessionmaker[Session], blobs: BlobStore, settings: Settings | None = None
    ) -> None:
        self.sessions, self.blobs, self.settings = sessions, blobs, settings

    def advance_channels(self) -> None:
        if self.settings is None:
            return
        from coordinator.channels.service import advance_channels

        with self.sessions() as session:
            advance_channels(session, self.blobs, self.settings)

    def claim(self, worker_id: str, *, lease_seconds: float, max_attempts: int) -> Job | None:
        with self.sessions() as session:
            job = evaluations.claim_job(
                session, worker_id, lease_seconds=lease_seconds, max_attempts=max_attempts
            )
            if job is None:
                return None
            number = evaluations.release_number(session, job)
            return Job(id=job.id, release=number, attempts=job.attempts, spec=job.spec)

    def heartbeat(self, job_id: int, worker_id: str, *, lease_seconds: float) -> bool:
        with self.sessions() as session:
            return evaluations.heartbeat(session, job_id, worker_id, lease_seconds=lease_seconds)

    @contextmanager
    def prepare(self, job: Job) -> Iterator[PreparedRelease]:
        with tempfile.TemporaryDirectory(prefix="phatgoose-release-") as directory:
            with self.sessions() as session:
                row = evaluations.get_job(session, job.id)
                release = evaluations.job_release(session, row)
                verdict = evaluations.curation_error(session, row, release)
                if verdict is not None:
                    raise CuratedOut(verdict)
                done = evaluations.done_tasks(session, job.id)
                export_release(session, self.blobs, release, Path(directory))
                manifest = release.manifest
            yield PreparedRelease(Path(directory), manifest, frozenset(done))

    def record_result(self, job_id: int, worker_id: str, score: evaluations.TaskScore) -> None:
        with self.sessions() as session:
            evaluations.record_result(session, job_id, worker_id, score)

    def complete(self, job_id: int, worker_id: str) -> None:
        with self.sessions() as session:
            evaluations.complete_job(session, job_id, worker_id)

    def fail(
        self, job_id: int, worker_id: str, error: str, *, final: bool, max_attempts: int
    ) -> JobState:
        with self.sessions() as session:
            return evaluations.fail_attempt(
                session, job_id, worker_id, error, max_attempts=max_attempts, final=final
            )


class Heartbeat:
    """Renews a job's lease every third of the lease until stopped; `lost` is set when
    the job is no longer leased to this worker."""

    def __init__(self, backend: JobBackend, job_id: int, options: WorkerOptions) -> None:
        self.backend, self.job_id, self.options = backend, job_id, options
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
                alive = self.backend.heartbeat(
                    self.job_id, self.options.worker_id, lease_seconds=self.options.lease_seconds
                )
            except Exception:  # a database or network hiccup: try again at the next beat
                log.exception("heartbeat of evaluation %d failed", self.job_id)
                continue
            if not alive:
                log.error("evaluation %d: lease lost", self.job_id)
                self.lost.set()
                return


class Worker:
    """Claims and runs evaluation jobs from a `JobBackend` (the coordinator's own database
    and blobs, `DatabaseBackend`, or a remote coordinator's job API, `HttpBackend`); keeps
    loaded base models between jobs."""

    def __init__(self, backend: JobBackend, options: WorkerOptions) -> None:
        self.backend, self.options = backend, options
        self._bases: dict[str, tuple[Any, Any]] = {}

    def run(self, *, once: bool = False, stop: Callable[[], bool] = lambda: False) -> int:
        """Run jobs until `stop()` (or, with `once`, until none is claimable); return how
        many jobs this worker ended (done or failed). A coordinator out of reach is waited
        for (with `once`, it ends the run: `CoordinatorUnavailable`)."""
        ended = 0
        log.info(
            "worker %s (host %s, pid %d) polling every %.1f s",
            self.options.worker_id,
            socket.gethostname(),
            os.getpid(),
            self.options.poll_seconds,
        )
        while not stop():
            self.advance_channels()
            try:
                job = self.claim()
            except CoordinatorUnavailable as error:
                if once:
                    raise
                log.warning("%s; asking again in %.1f s", error, self.options.poll_seconds)
                time.sleep(self.options.poll_seconds)
                continue
            if job is None:
                if once:
                    break
                time.sleep(self.options.poll_seconds)
                continue
            if self.run_job(job):
                ended += 1
        return ended

    def advance_channels(self) -> None:
        """Let the backend advance the release channels; a failure is logged, and the next
        poll tries again (a refused token stops the worker, as everywhere)."""
        try:
            self.backend.advance_channels()
        except WorkerStopped:
            raise
        except (CoordinatorUnavailable, PublicJobError) as error:  # out of reach, refused
            log.warning("advancing the release channels failed (%s); the next poll retries", error)
        except Exception:
            log.exception("advancing the release channels failed; the next poll tries again")

    def claim(self) -> Job | None:
        return self.backend.claim(
            self.options.worker_id,
            lease_seconds=self.options.lease_seconds,
            max_attempts=self.options.max_attempts,
        )

    def run_job(self, job: Job) -> bool:
        """One attempt at `job`; True when it ended here (done, or failed for good)."""
        log.info("evaluation %d: attempt %d by %s", job.id, job.attempts, self.options.worker_id)
        with Heartbeat(self.backend, job.id, self.options) as beat:
            try:
                self._evaluate(job, beat)
                self.backend.complete(job.id, self.options.worker_id)
            except evaluations.LeaseLost as error:
                log.error("evaluation %d: stopped, %s", job.id, error)
                return False
            except WorkerStopped:
                raise  # not the job's fault: the job's lease runs out, another worker resumes
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
                final = isinstance(error, (InvalidTaskName, CuratedOut, InvalidLeaveOut))
                try:
                    state = self.backend.fail(
                        job.id,
                        self.options.worker_id,
                        public_error(error),
                        final=final,
                        max_attempts=self.options.max_attempts,
                    )
                except (evaluations.LeaseLost, CoordinatorUnavailable) as lost:
                    log.error("evaluation %d: the failure is not recorded: %s", job.id, lost)
                    return False
                return state == JobState.FAILED
        log.info("evaluation %d: done", job.id)
        return True

    def _evaluate(self, job: Job, beat: Heartbeat) -> None:
        from phatgoose.bigbench import load_bigbench_task, resolve_task_name
        from phatgoose.evaluation import evaluate_task
        from phatgoose.routing import capture_routing, unroute_model

        spec = job.spec
        tasks = checked_task_names(spec)  # before any path, release or model is touched
        version = evaluator_version()
        with self.backend.prepare(job) as release:
            todo = [t for t in tasks if t not in release.done]
            if release.done:
                log.info(
                    "evaluation %d: resuming; %d task(s) already scored", job.id, len(release.done)
                )
            manifest = release.manifest
            log.info(
                "evaluation %d: release %d (%s), %d task(s) to score",
                job.id,
                job.release,
                method_label(
                    manifest["method"], manifest.get("top_k"), manifest.get("method_params") or {}
                ),
                len(todo),
            )
            model, tokenizer = self._load(
                release.directory, manifest, exclude=left_out(spec, manifest)
            )
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
                self.backend.record_result(job.id, self.options.worker_id, score)
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

    def _load(
        self, directory: Path, manifest: dict[str, Any], *, exclude: Sequence[str] = ()
    ) -> tuple[Any, Any]:
        """The routed model of a release directory, over a cached base model, without the
        experts `exclude` names (a leave-one-out job's `leave_out`)."""
        from phatgoose.models import load_base_model
        from phatgoose.release import load_release

        name = manifest["base_model"]["name"]
        if name not in self._bases:
            with _LOAD_LOCK:
                self._bases[name] = load_base_model(self.options.base_models.get(name, name))
        return load_release(directory, base_model=self._bases[name], exclude=exclude)


def left_out(spec: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The experts a job leaves out: its spec's `leave_out` (a leave-one-out job, for the
    credit of that expert; docs/coordinator.md, "Credit"), or none. A value that is not one
    of the manifest's expert refs never will be: `InvalidLeaveOut`, the job fails at once."""
    ref = spec.get("leave_out")
    if ref is None:
        return []
    refs = [entry.get("ref") for entry in manifest.get("experts") or []]
    if not isinstance(ref, str) or ref not in refs:
        raise InvalidLeaveOut(
            f"the job leaves out {ref!r}, which is not one of the release's experts: "
            f"{', '.join(map(str, refs)) or 'none'}"
        )
    return [ref]


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
        worker = Worker(DatabaseBackend(sessions, open_blob_store(settings), settings), options)
        return worker.run(once=once, stop=stop)
    finally:
        engine.dispose()


def run_remote_worker(
    url: str,
    token: str,
    cache_dir: Path,
    options: WorkerOptions,
    *,
    once: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Run a worker on a coordinator's job API: `url` is the coordinator's base URL
    (`https://coordinator.example`), `token` a worker (or maintainer) token; release files
    are downloaded into a verified cache under `cache_dir`. The token is checked first
    (`WorkerStopped` says what is wrong with it); see `Worker.run` for the rest."""
    from coordinator.worker_http import HttpBackend, check_remote_options, connect

    check_remote_options(options)
    with connect(url, token) as client:
        backend = HttpBackend(client, cache_dir)
        identity = backend.check_token()
        log.info("worker token %r (%s) on %s", identity["name"], identity["role"], url)
        return Worker(backend, options).run(once=once, stop=stop)
