"""`phatgoose demo`: the whole platform on one machine, with real data and the real model.

1. A coordinator starts on loopback (SQLite and blobs in `./.phatgoose/demo`), and the base
   model (SmolLM2-135M-Instruct by default) is registered with it.
2. Each contributor holds one real held-in BIG-bench task as private JSONL data
   (BENCHMARK.md: its training pool; the evaluation split stays with the coordinator).
3. A Flower federation runs on loopback: a real SuperLink, one SuperNode per contributor
   (its data path in its node config) and `flwr run` of this project's app. Every node
   trains LoRA and gates and replies with its expert package; the ServerApp validates and
   catalogues each reply. Each node's stage, step and losses are shown as it trains.
4. Experts already in the catalog (same base model, same training settings) are reused: a
   second run trains nothing.
5. Each expert alone is scored on its own task's evaluation split against the base model
   on the same examples (`app.own_task`): the paired gain with its 95% interval.
6. PHATGOOSE, merged and base releases are built over the catalogued experts, evaluated by
   the coordinator's evaluation worker on the held-in tasks' evaluation splits and on
   held-out tasks, and the leaderboard is printed (and served at /ui/leaderboard), with
   each release's paired difference against the base on the held-in and held-out means
   (the leaderboard's `vs_base`), marked only where its 95% interval excludes 0.

At this size (three experts, 40 examples per task) the intervals are wide: the demo shows
the platform working, and whether recycling experts helps is answered by the benchmark
(docs/benchmarks.md).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer
from rich.console import Console
from rich.live import Live

from app.console import Grid, demo_console, render
from app.federation import Contributor, LocalFederation, TrainingProgress
from protocol.flower import FlowerConfigError, RoundSettings, TrainingRequest

if TYPE_CHECKING:
    from app.own_task import OwnTaskScore
    from coordinator.leaderboard.schemas import Leaderboard, LeaderboardRow

console = demo_console()

DEMO_NAMESPACE = "demo"


# ------------------------------------------------------------------------- the plan
# Sized for 2 CPU cores: batch 4 x 96 tokens (every held-in prompt below fits; their 90th
# percentiles are 55-83 tokens) and 48 steps, about 2-3 s per step per node in bfloat16
# with three nodes sharing the cores; the rest as the run config's defaults.
DEMO_TRAINING = TrainingRequest(
    max_examples=200,  # training examples a contributor uses (a seeded sample)
    lora_steps=48,
    gate_steps=8,
    max_length=96,
    learning_rate=2e-3,
    gate_learning_rate=2e-3,
    # The releases built here (PHATGOOSE, merged, base) do not need average activations.
    average_activation=False,
)


@dataclass(frozen=True)
class DemoPlan:
    """What the demo trains and evaluates. The base model is chosen when it runs
    (`run_demo(base=...)`); `training.seed` also seeds the held-back evaluation split."""

    # Short tasks that SmolLM2-135M gets mostly wrong and a few dozen LoRA steps teach
    # (measured at 40 steps on 40 held-back examples: base -> expert 0.00 -> 0.97, 0.12 ->
    # 0.82, 0.10 -> 0.47), so each expert beats the base on its own task and the routed
    # releases have gains to keep. sports_understanding, navigate and hyperbaton, the
    # earlier choice, gained nothing at 40 steps.
    held_in: tuple[str, ...] = (
        "bbq_lite_json/race_ethnicity_ambig",
        "intent_recognition",
        "multiemo/hotels_sentence_en",
    )
    # Two unseen relatives of held-in tasks (what routing can reuse zero-shot: another
    # bias category, another review domain) and one unrelated BIG-bench Lite task (what
    # it should not harm).
    held_out: tuple[str, ...] = (
        "bbq_lite_json/age_ambig",
        "multiemo/products_sentence_en",
        "strategyqa",
    )
    n_eval: int = 40  # evaluation examples per task (held back from the contributors)
    training: TrainingRequest = DEMO_TRAINING


DEFAULT_PLAN = DemoPlan()
QUICK_PLAN = replace(
    DEFAULT_PLAN,
    held_out=("bbq_lite_json/age_ambig", "strategyqa"),
    n_eval=16,
    training=DEMO_TRAINING.with_changes(max_examples=64, lora_steps=6, gate_steps=2),
)


# ------------------------------------------------------------------ the coordinator
@contextmanager
def running_coordinator(data_dir: Path, port: int) -> Iterator[tuple[Any, str]]:
    """The coordinator app served by uvicorn on 127.0.0.1:`port` in a thread."""
    import uvicorn

    from coordinator.core.app import create_app
    from coordinator.core.config import Settings

    app = create_app(Settings(data_dir=data_dir))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator could not listen on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.engine.dispose()


# ----------------------------------------------------------------------- the stages
def write_contributor_data(
    plan: DemoPlan, directory: Path, tasks_dir: Path | None
) -> list[Contributor]:
    """Each held-in task's training pool as one contributor's private JSONL file."""
    from phatgoose.bigbench import load_bigbench_task

    contributors = []
    for task in plan.held_in:
        split = load_bigbench_task(
            task, n_eval=plan.n_eval, seed=plan.training.seed, tasks_dir=tasks_dir
        )
        path = directory / _slug(task) / "train.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"input": ex.prompt, "choices": list(ex.choices), "answer": ex.answer})
            for ex in split.training
        ]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        contributors.append(Contributor(name=_slug(task), data_path=path.resolve()))
    return contributors


def catalogued(sessions: Any, plan: DemoPlan, fingerprint: str) -> dict[str, str]:
    """Demo experts already in the catalog with this base and these settings: name -> ref."""
    from coordinator.experts.service import list_versions

    found: dict[str, str] = {}
    with sessions() as session:
        # Every Flower node publishes under its own namespace, `demo-<node id>`.
        for version in list_versions(session, limit=500).items:
            if not version.expert.namespace.startswith(f"{DEMO_NAMESPACE}-"):
                continue
            manifest = version.manifest
            training = manifest.get("training", {})
            if (
                manifest.get("base_model", {}).get("fingerprint") == fingerprint
                and training.get("steps") == plan.training.lora_steps
                and training.get("gate_steps") == plan.training.gate_steps
                and manifest.get("lora", {}).get("r") == plan.training.lora_rank
            ):
                found[version.expert.name] = version.ref  # the newest version wins
    return found


def train_by_federation(
    workdir: Path,
    contributors: Sequence[Contributor],
    run_config: Mapping[str, Any],
    sessions: Any,
    plan: DemoPlan,
    fingerprint: str,
) -> int:
    """Run one Flower round over the contributors, showing each node's step and loss: a
    live table on a terminal, progress lines otherwise."""
    started = time.monotonic()
    round_lines: list[str] = []

    def on_line(line: str) -> None:
        if line.startswith(("Flower round", "  node", "asking")):
            round_lines.append(line)

    with LocalFederation(workdir, contributors) as federation:
        result: dict[str, int] = {}
        runner = threading.Thread(
            target=lambda: result.update(code=federation.run(run_config, on_line=on_line)),
            daemon=True,
        )
        runner.start()

        def statuses() -> list[NodeStatus]:
            landed = catalogued(sessions, plan, fingerprint)
            return [
                NodeStatus(c.name, federation.training_progress(c.name), landed.get(c.name))
                for c in contributors
            ]

        title = f"Flower round on {federation.address}"
        live = Live(console=console, refresh_per_second=2) if console.is_terminal else None
        lines = ProgressLines(console)
        with live or nullcontext():
            while True:
                seconds, now = time.monotonic() - started, statuses()
                if live is not None:
                    grid = progress_grid(f"{title} ({seconds:.0f} s)", now)
                    live.update(render(grid, console.width))
                else:
                    lines.update(now, seconds)
                if not runner.is_alive():
                    break
                runner.join(timeout=2.0)
    for line in round_lines:
        console.print(line, markup=False, highlight=False)
    return result.get("code", 1)


@dataclass(frozen=True)
class NodeStatus:
    """One contributor's node in the round: its training loop, or its catalogued expert."""

    contributor: str
    progress: TrainingProgress | None = None
    catalogued_as: str | None = None

    @property
    def stage(self) -> str:
        """starting, LoRA, gates, trained (its reply with the round) or catalogued."""
        if self.catalogued_as is not None:
            return "catalogued"
        p = self.progress
        if p is None:
            return "starting"
        return "trained" if p.stage == "gates" and p.step == p.steps else p.stage

    def describe(self) -> str:
        """One line: the stage, then the step and the losses while training."""
        if self.catalogued_as is not None:
            return f"catalogued as {self.catalogued_as}"
        if self.progress is None:
            return "starting (loading the base model and its data)"
        p = self.progress
        text = f"{p.stage} step {p.step}/{p.steps}"
        if p.loss is not None:
            text += f", loss {p.loss:.4f}"
        if p.validation_loss is not None:
            text += f", validation loss {p.validation_loss:.4f}"
        if self.stage == "trained":
            # The round registers the replies once every node has answered.
            text = f"trained ({text}); waiting for the round to register its expert"
        return text


def progress_grid(title: str, statuses: Sequence[NodeStatus]) -> Grid:
    """The federation's progress as a table: contributor, stage, step, losses."""
    rows = []
    for status in statuses:
        p = status.progress if status.catalogued_as is None else None
        rows.append(
            (
                status.contributor,
                status.stage,
                f"{p.step}/{p.steps}" if p is not None else "-",
                _fmt(p.loss if p is not None else None, missing="-"),
                _fmt(p.validation_loss if p is not None else None, missing="-"),
            )
        )
    return Grid(title, ("contributor", "stage", "step", "loss", "val loss"), tuple(rows))


class ProgressLines:
    """The round's progress where the output is not a terminal: a line per contributor when
    its stage changes, and while it trains, when its step has moved and `every` seconds
    have passed since its last line."""

    def __init__(self, console: Console, every: float = 30.0) -> None:
        self.console = console
        self.every = every
        # contributor -> (stage, step, when its last line was printed)
        self._printed: dict[str, tuple[str, int, float]] = {}

    def update(self, statuses: Sequence[NodeStatus], seconds: float) -> None:
        for status in statuses:
            step = status.progress.step if status.progress is not None else -1
            last = self._printed.get(status.contributor)
            if last is not None and last[0] == status.stage:
                moved = status.stage in TRAINING_STAGES and step != last[1]
                if not moved or seconds - last[2] < self.every:
                    continue
            self.console.print(
                f"[{seconds:5.0f} s] {status.contributor}: {status.describe()}",
                markup=False,
                highlight=False,
            )
            self._printed[status.contributor] = (status.stage, step, seconds)


TRAINING_STAGES = ("LoRA", "gates")


def experts_grid(sessions: Any, refs: Mapping[str, str]) -> Grid:
    """The catalogued experts with their training record."""
    from coordinator.experts.service import resolve_ref

    rows = []
    with sessions() as session:
        for ref in refs.values():
            version = resolve_ref(session, ref)
            t = version.manifest["training"]
            rows.append(
                (
                    ref,
                    str(t["examples"]),
                    str(t["steps"]),
                    _fmt(t.get("final_loss")),
                    str(t["gate_steps"]),
                    _fmt(t.get("final_gate_loss")),
                    str(t.get("precision") or "n/a"),
                    f"{version.total_size / 1e6:.1f}",
                    version.channel,
                )
            )
    columns = (
        "expert",
        "examples",
        "steps",
        "loss",
        "gate steps",
        "gate loss",
        "precision",
        "MB",
        "via",
    )
    return Grid("catalogued experts", columns, tuple(rows))


RELEASE_METHODS = ("phatgoose", "merged", "base")


def demo_maintainer(sessions: Any) -> Any:
    """The demo's maintainer token (created once; its secret is never needed)."""
    from coordinator.auth import service as auth
    from coordinator.auth.models import Role

    with sessions() as session:
        for token in auth.list_tokens(session):
            if token.name == "demo-maintainer" and token.revoked_at is None:
                return token
        return auth.create_token(session, name="demo-maintainer", role=Role.MAINTAINER).token


def build_releases(
    sessions: Any, blobs: Any, base: str, refs: Sequence[str], maintainer: Any
) -> dict[str, int]:
    """PHATGOOSE, merged and base releases over `refs` (reusing identical ones): method ->
    release number."""
    from coordinator.releases import service as releases
    from coordinator.releases.schemas import ReleaseCreate

    numbers: dict[str, int] = {}
    with sessions() as session:
        for method in RELEASE_METHODS:
            experts = [] if method == "base" else sorted(refs)
            for release in releases.list_releases(session, base_model=base, method=method):
                if sorted(e["ref"] for e in release.manifest["experts"]) == experts:
                    numbers[method] = release.number
            if method not in numbers:
                request = ReleaseCreate(
                    method=method,
                    experts=experts,
                    base_model=base,
                    notes="phatgoose demo",
                )
                created = releases.create_release(session, blobs, request, by=maintainer)
                numbers[method] = created.number
    return numbers


def queue_evaluations(
    sessions: Any,
    plan: DemoPlan,
    numbers: Mapping[str, int],
    maintainer: Any,
    *,
    create: bool = True,
) -> int:
    """One evaluation job per release on the held-in and held-out tasks, unless one with
    the same spec exists (not failed, and when done, with per-example outcomes on every
    task: one stored before the coordinator kept them cannot be compared with the base, so
    the release is evaluated again); returns how many jobs are not done yet (new or
    unfinished)."""
    from coordinator.evaluations import service as evaluations
    from coordinator.evaluations.schemas import EvaluationCreate, TaskGroups
    from coordinator.releases import service as releases

    pending = 0
    with sessions() as session:
        for number in numbers.values():
            request = EvaluationCreate(
                release=number,
                tasks=[*plan.held_in, *plan.held_out],
                examples_per_task=plan.n_eval,
                seed=plan.training.seed,
                task_groups=TaskGroups(held_in=list(plan.held_in), held_out=list(plan.held_out)),
            )
            wanted = evaluations.job_spec(request)
            release = releases.get_release(session, number)
            existing = [
                job
                for job in evaluations.list_jobs_of_release(session, release.id)
                if {k: job.spec.get(k) for k in wanted} == wanted
                and job.state != "failed"
                and (
                    job.state != "done"
                    or all(r.has_outcomes for r in evaluations.job_results(session, job.id))
                )
            ]
            if not existing and create:
                evaluations.create_job(session, request, by=maintainer)
            if not any(job.state == "done" for job in existing):
                pending += 1
    return pending


class PairedNumbers(Protocol):
    """What a paired difference shows: `phatgoose.paired.PairedDifference`, or the
    leaderboard's `PairedDelta` of one."""

    @property
    def delta(self) -> float: ...

    @property
    def low(self) -> float: ...

    @property
    def high(self) -> float: ...

    @property
    def significant(self) -> bool: ...


def paired_cell(difference: PairedNumbers, digits: int = 3) -> str:
    """`+0.125 [+0.050, +0.200] ▲`: the difference and its 95% interval, marked ▲ (above 0)
    or ▼ (below) only when the interval excludes 0."""
    d = digits
    text = f"{difference.delta:+.{d}f} [{difference.low:+.{d}f}, {difference.high:+.{d}f}]"
    if difference.significant:
        text += " ▲" if difference.low > 0 else " ▼"
    return text


# The leaderboard's task groups, as the demo prints them.
GROUPS = (("held_in", "held-in"), ("held_out", "held-out"))


def leaderboard_grid(board: Leaderboard, numbers: Mapping[str, int], plan: DemoPlan) -> Grid:
    """Tasks down, the releases of `numbers` across: accuracy ± standard error, the group
    means, then each release's paired difference of them against the base (`vs_base`)."""
    rows = demo_rows(board, numbers)
    lines: list[tuple[str, ...]] = []
    for task in [*plan.held_in, *plan.held_out]:
        label = task + (" (held out)" if task in plan.held_out else "")
        lines.append(
            (
                label,
                *(
                    f"{row.scores[task].accuracy:.2f} ± {row.scores[task].stderr:.2f}"
                    if task in row.scores
                    else "-"
                    for row in rows
                ),
            )
        )
    for group, label in GROUPS:
        lines.append((f"{label} mean", *(_fmt(row.group_means.get(group)) for row in rows)))
    for group, label in GROUPS:
        lines.append((f"{label} Δ vs base", *(_versus_base_cell(row, group) for row in rows)))
    return Grid(
        "leaderboard (accuracy ± standard error; Δ vs base: paired difference of the mean "
        "[95% interval], ▲/▼ where the interval excludes 0)",
        ("task", *(f"#{row.release} {row.method}" for row in rows)),
        tuple(lines),
        strong=frozenset(range(len(lines) - 2 * len(GROUPS), len(lines))),
    )


def demo_rows(board: Leaderboard, numbers: Mapping[str, int]) -> list[LeaderboardRow]:
    """The leaderboard's rows of the demo's releases, in the leaderboard's order."""
    wanted = set(numbers.values())
    return [row for row in board.releases if row.release in wanted]


def _is_reference(row: LeaderboardRow) -> bool:
    """Whether the row is the base evaluation the others are compared with."""
    return row.vs_base is not None and row.vs_base.base_release == row.release


def _versus_base_cell(row: LeaderboardRow, group: str) -> str:
    if _is_reference(row):
        return "reference"
    mean = row.vs_base.group_means.get(group) if row.vs_base is not None else None
    return "n/a" if mean is None or mean.difference is None else paired_cell(mean.difference)


def versus_base_notes(board: Leaderboard, numbers: Mapping[str, int], plan: DemoPlan) -> list[str]:
    """What the Δ vs base rows mean at the demo's size, and why a release has none."""
    notes = [
        f"Δ vs base: a release's mean minus the base model's on the same {plan.n_eval} "
        "examples per task, with the 95% paired bootstrap interval; an interval that "
        "includes 0 means this demo cannot tell the release from the base on those tasks. "
        "The benchmark (docs/benchmarks.md) is where the question is answered."
    ]
    for row in demo_rows(board, numbers):
        if _is_reference(row):
            continue
        vs_base = row.vs_base
        if vs_base is None or not vs_base.group_means:
            reason = vs_base.reason if vs_base is not None else None
            notes.append(f"#{row.release} {row.method}: no Δ vs base ({reason or 'not compared'})")
            continue
        for group, label in GROUPS:
            mean = vs_base.group_means.get(group)
            if mean is not None and mean.difference is None:
                notes.append(f"#{row.release} {row.method}, {label}: no Δ vs base ({mean.reason})")
    return notes


def score_own_tasks(
    sessions: Any,
    settings: Any,
    plan: DemoPlan,
    refs: Mapping[str, str],
    model: Any,
    tokenizer: Any,
    tasks_dir: Path | None,
) -> list[OwnTaskScore]:
    """Each catalogued expert alone on its own task's evaluation split, the base model on
    the same examples (`app.own_task`), scored as the evaluation worker scores (its batch
    size and maximum length); prints the table and returns the `OwnTaskScore`s."""
    from app.own_task import load_catalogued_expert, own_task_scores
    from coordinator.storage import open_blob_store
    from coordinator.worker import EVALUATION_PROTOCOL, WorkerOptions
    from phatgoose.bigbench import load_bigbench_task

    blobs = open_blob_store(settings)
    items = []
    with tempfile.TemporaryDirectory(prefix="phatgoose-demo-") as tmp, sessions() as session:
        for task in plan.held_in:
            ref = refs.get(_slug(task))
            if ref is None:
                continue
            expert = load_catalogued_expert(session, blobs, ref, Path(tmp) / _slug(task))
            split = load_bigbench_task(
                task, n_eval=plan.n_eval, seed=plan.training.seed, tasks_dir=tasks_dir
            )
            items.append((ref, expert, task, split.evaluation))
    with console.status(
        f"scoring {len(items)} expert(s) and the base model on their own tasks "
        f"({plan.n_eval} held-back examples each)"
    ):
        scores = own_task_scores(
            model,
            tokenizer,
            items,
            batch_size=WorkerOptions().batch_size,
            max_length=EVALUATION_PROTOCOL["max_length"],
        )
    console.print(render(own_task_grid(scores), console.width))
    console.print(own_task_verdict(scores), markup=False, highlight=False)
    return scores


def own_task_grid(scores: Sequence[OwnTaskScore]) -> Grid:
    """Expert and base accuracy on each expert's own task, and the paired gain."""
    rows = tuple(
        (
            s.task,
            str(s.n),
            f"{s.expert_accuracy:.2f}",
            f"{s.base_accuracy:.2f}",
            paired_cell(s.gain, digits=2),
            _p_value(s.gain.p_value),
            f"{s.gain.a_only} / {s.gain.b_only}",
        )
        for s in scores
    )
    return Grid(
        "each expert alone on its own task (held-back examples, paired with the base; "
        "▲/▼ where the 95% interval excludes 0)",
        (
            "task",
            "n",
            "expert alone",
            "base",
            "gain [95% interval]",
            "McNemar p",
            "right: expert only / base only",
        ),
        rows,
    )


def own_task_verdict(scores: Sequence[OwnTaskScore]) -> str:
    """How many experts beat the base on their own task, and how many clearly (their 95%
    paired interval lies above 0)."""
    beat = [s for s in scores if s.gain.delta > 0]
    clear = [s for s in beat if s.gain.significant]
    text = (
        f"{len(beat)} of {len(scores)} expert(s) beat the base model on their own task, "
        f"{len(clear)} with a 95% interval above 0"
    )
    behind = [s.task for s in scores if s.gain.delta <= 0]
    return text + (f"; not: {', '.join(behind)}" if behind else "")


def _p_value(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


@contextmanager
def stage_timer(timings: dict[str, float], name: str) -> Iterator[None]:
    """Adds the seconds the block took to `timings[name]`."""
    started = time.monotonic()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.monotonic() - started


def evaluate_releases(
    sessions: Any,
    settings: Any,
    plan: DemoPlan,
    base: str,
    refs: Mapping[str, str],
    tasks_dir: Path | None,
) -> dict[str, int]:
    """Releases over the catalogued experts, their evaluation (by the coordinator's own
    worker, in this process) and the leaderboard; returns method -> release number."""
    from coordinator.leaderboard.service import leaderboard
    from coordinator.storage import open_blob_store
    from coordinator.worker import WorkerOptions, run_worker

    maintainer = demo_maintainer(sessions)
    blobs = open_blob_store(settings)
    numbers = build_releases(sessions, blobs, base, list(refs.values()), maintainer)
    console.print("releases: " + ", ".join(f"#{n} {method}" for method, n in numbers.items()))
    pending = queue_evaluations(sessions, plan, numbers, maintainer)
    if pending:
        tasks = len(plan.held_in) + len(plan.held_out)
        console.print(
            f"evaluating {pending} release(s) on {tasks} tasks x {plan.n_eval} examples "
            "(rank classification; tasks already scored are kept)"
        )
        with console.status("the evaluation worker is scoring the releases"):
            run_worker(settings, WorkerOptions(tasks_dir=tasks_dir, poll_seconds=1.0), once=True)
        left = queue_evaluations(sessions, plan, numbers, maintainer, create=False)
        if left:
            console.print(
                f"[yellow]{left} evaluation(s) did not finish (failed, or still leased by a "
                "worker that stopped); re-run the demo or `phatgoose coordinator worker`[/yellow]"
            )
    else:
        console.print("every release was already evaluated on these tasks")
    with sessions() as session:
        board = leaderboard(session)
    console.print(render(leaderboard_grid(board, numbers, plan), console.width))
    for note in versus_base_notes(board, numbers, plan):
        console.print(note, markup=False, highlight=False)
    return numbers


def _fmt(value: float | None, *, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:.3f}"


def _slug(task: str) -> str:
    return task.replace("_", "-").replace("/", "-")


# ------------------------------------------------------------------------- command
def demo(
    quick: Annotated[
        bool, typer.Option("--quick", help="A few-minute smoke run: fewer steps and examples.")
    ] = False,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Where the demo keeps its coordinator and data.")
    ] = Path(".phatgoose/demo"),
    base: Annotated[
        str,
        typer.Option("--base", help="Base model: 'smollm2-135m' or a local model directory."),
    ] = "smollm2-135m",
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Held-in tasks, one contributor each (comma-separated).",
            show_default=False,
        ),
    ] = None,
    held_out: Annotated[
        str | None,
        typer.Option(
            "--held-out", help="Held-out evaluation tasks (comma-separated).", show_default=False
        ),
    ] = None,
    tasks_dir: Annotated[
        Path | None,
        typer.Option(
            "--tasks-dir",
            help="A directory of BIG-bench tasks (<task>/task.json); default: the cached "
            "bigbench==1.0.0 task files (fetched once).",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="LoRA steps per expert.", show_default=False)
    ] = None,
    port: Annotated[int, typer.Option("--port", help="Coordinator port (loopback).")] = 8765,
    retrain: Annotated[
        bool, typer.Option("--retrain", help="Train every expert again, even if catalogued.")
    ] = False,
) -> None:
    """Run the whole platform locally: coordinator, a Flower federation of contributors
    training on real BIG-bench tasks, validated experts in the catalog, then releases,
    evaluation and the leaderboard.

    A second run reuses the catalogued experts instead of training them again.
    """
    plan = QUICK_PLAN if quick else DEFAULT_PLAN
    if tasks:
        plan = replace(plan, held_in=tuple(t.strip() for t in tasks.split(",") if t.strip()))
    if held_out:
        plan = replace(plan, held_out=tuple(t.strip() for t in held_out.split(",") if t.strip()))
    if steps:
        try:
            training = plan.training.with_changes(lora_steps=steps, gate_steps=max(1, steps // 5))
        except FlowerConfigError as error:
            raise typer.BadParameter(str(error), param_hint="--steps") from None
        plan = replace(plan, training=training)
    code = run_demo(
        plan, data_dir=data_dir, base=base, tasks_dir=tasks_dir, port=port, retrain=retrain
    )
    raise typer.Exit(code)


def run_demo(
    plan: DemoPlan,
    *,
    data_dir: Path,
    base: str = "smollm2-135m",
    tasks_dir: Path | None = None,
    port: int = 8765,
    retrain: bool = False,
) -> int:
    """The demo's stages; returns the exit code (0: every expert catalogued)."""
    from coordinator.base_models.service import register_base_model
    from phatgoose.models import base_model_spec, load_base_model

    started = time.monotonic()
    timings: dict[str, float] = {}
    data_dir = data_dir.resolve()
    coordinator_dir = data_dir / "coordinator"
    console.rule("[bold]PHATGOOSE demo")
    with running_coordinator(coordinator_dir, port) as (app, url):
        console.print(f"coordinator: {url} (API docs at {url}/docs), data in {coordinator_dir}")
        sessions = app.state.sessionmaker

        with console.status(f"loading the base model {base}"):
            # Kept: it scores each expert on its own task after the round.
            model, tokenizer = load_base_model(base)
            spec = base_model_spec(model, base)
        with sessions() as session:
            register_base_model(session, spec)
        console.print(f"base model: {base} ({spec.fingerprint}), registered")

        with console.status("preparing the contributors' private data (BIG-bench)"):
            contributors = write_contributor_data(plan, data_dir / "contributors", tasks_dir)
        console.print(
            f"{len(contributors)} contributors, one held-in task each: "
            + ", ".join(c.name for c in contributors)
        )

        have = {} if retrain else catalogued(sessions, plan, spec.fingerprint)
        todo = [c for c in contributors if c.name not in have]
        for name, ref in have.items():
            if any(c.name == name for c in contributors):
                console.print(f"reusing {ref} from the catalog")
        if todo:
            request = plan.training.with_changes(base_model=base)
            console.print(
                f"training {len(todo)} expert(s) by federation: {request.lora_steps} LoRA "
                f"steps + {request.gate_steps} gate steps each, batch {request.batch_size} x "
                f"{request.max_length} tokens, precision {request.precision}"
            )
            round_settings = RoundSettings(
                coordinator_data_dir=str(coordinator_dir),
                namespace=DEMO_NAMESPACE,
                min_nodes=len(todo),
                node_wait_seconds=120.0,
                round_timeout_seconds=3600.0,
            )
            run_config = {**request.to_config(), **round_settings.to_config()}
            with stage_timer(timings, "federated training"):
                code = train_by_federation(
                    data_dir / "federation", todo, run_config, sessions, plan, spec.fingerprint
                )
            if code != 0:
                console.print(f"[red]flwr run exited with {code}; see {data_dir / 'federation'}")

        refs = catalogued(sessions, plan, spec.fingerprint)
        refs = {c.name: refs[c.name] for c in contributors if c.name in refs}
        console.print(render(experts_grid(sessions, refs), console.width))
        missing = [c.name for c in contributors if c.name not in refs]
        if missing:
            console.print(
                f"[red]{len(missing)} expert(s) did not land: {', '.join(missing)}; logs in "
                f"{data_dir / 'federation'}[/red]"
            )
        if refs:
            with stage_timer(timings, "own-task evaluation"):
                score_own_tasks(
                    sessions, app.state.settings, plan, refs, model, tokenizer, tasks_dir
                )
            with stage_timer(timings, "release evaluation"):
                evaluate_releases(sessions, app.state.settings, plan, base, refs, tasks_dir)
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    console.print(
        f"done in {time.monotonic() - started:.0f} s ({spent}). The leaderboard page: run "
        f"`phatgoose coordinator serve --data-dir {coordinator_dir}` and open "
        "http://127.0.0.1:8765/ui/leaderboard"
    )
    return 1 if missing else 0
