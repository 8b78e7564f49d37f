"""`phatgoose demo`: the whole platform on one machine, with real data and the real model.

1. A coordinator starts on loopback (SQLite and blobs in `./.phatgoose/demo`), and the base
   model (SmolLM2-135M-Instruct by default) is registered with it, with the release channel
   `demo/latest` (created once): PHATGOOSE with the plan's k over every admitted demo expert
   of the base model, each release it builds evaluated on the demo's tasks.
2. Each contributor holds one real held-in BIG-bench task as private JSONL data
   (BENCHMARK.md: its training pool; the evaluation split stays with the coordinator).
3. A Flower federation runs on loopback: a real SuperLink, one SuperNode per contributor
   (its data path in its node config) and `flwr run` of this project's app. Every node
   trains LoRA and gates and replies with its expert package; the ServerApp validates and
   catalogues each reply. Each node's stage, step and losses are shown as it trains.
4. Experts already in the catalog (same base model, same training settings) are reused.
   Once every held-in expert is catalogued, each later run adds one contributor of the
   plan's `later` tasks (one more expert through the same federation path); a run with
   none left to add trains nothing.
5. Each expert alone is scored on its own task's evaluation split against the base model
   on the same examples (`app.own_task`): the paired gain with its 95% interval.
6. The channel advances (`coordinator.channels`): a catalog change builds its next release
   and queues that release's evaluation, once; nothing changed, nothing is built.
7. PHATGOOSE (the channel's release when it holds the same experts), merged and base
   releases over the catalogued experts are evaluated by the coordinator's evaluation
   worker on the held-in tasks' evaluation splits and on held-out tasks, and the
   leaderboard is printed (and served at /ui/leaderboard), with each release's paired
   difference against the base on the held-in and held-out means (the leaderboard's
   `vs_base`), marked only where its 95% interval excludes 0.
8. The channel's history is printed, and its release's diff to the previous one: the
   experts added, per-task accuracy differences with paired 95% intervals, the held-in and
   held-out mean differences and how routing shifted (the release page's diff,
   `coordinator.channels.diff`). So the second run shows what the added expert did.

At this size (three or four experts, 40 examples per task) the intervals are wide: the
demo shows the platform working, and whether recycling experts helps is answered by the
benchmark (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
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
    from coordinator.channels.diff import ChannelPoint
    from coordinator.channels.schemas import ChannelDiff, ChannelEntryInfo
    from coordinator.evaluations.schemas import EvaluationSpec
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
    # Contributors who join one per run once every held-in expert is catalogued, so that a
    # second run adds an expert and the channel builds its next release. religion_ambig is
    # a relative of race_ethnicity_ambig (in each, the right answer is the choice that says
    # the context does not tell): the first release can only reuse the race expert on it,
    # routing should move to its own expert when it joins, and its 300 training examples,
    # as short as its relative's, fit the same 48 steps and 96 tokens.
    later: tuple[str, ...] = ("bbq_lite_json/religion_ambig",)
    n_eval: int = 40  # evaluation examples per task (held back from the contributors)
    top_k: int = 2  # experts per token of the PHATGOOSE releases (the channel's k)
    training: TrainingRequest = DEMO_TRAINING

    def __post_init__(self) -> None:
        groups = {"held_in": self.held_in, "later": self.later, "held_out": self.held_out}
        seen: dict[str, str] = {}
        for group, tasks in groups.items():
            for task in tasks:
                if task in seen:
                    raise ValueError(
                        f"task {task!r} is in the plan's {seen[task]} and {group} tasks; "
                        "each task is in one group"
                    )
                seen[task] = group
        if self.top_k < 1:
            raise ValueError(f"the plan's top_k must be at least 1, got {self.top_k}")

    @property
    def contributor_tasks(self) -> tuple[str, ...]:
        """Every contributor's task: the held-in ones, then the later ones in joining order."""
        return (*self.held_in, *self.later)

    @property
    def evaluation_tasks(self) -> tuple[str, ...]:
        """The tasks every release is evaluated on: the contributors' (the later ones' from
        the first run on, so that the channel's releases share one spec and its diffs
        compare them on the same examples), then the held-out ones."""
        return (*self.contributor_tasks, *self.held_out)


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

    # No automatic leave-one-out evaluations (PHATGOOSE_AUTO_CREDIT_MAX_EXPERTS): N more
    # evaluations per channel release of N experts would double the demo's evaluation time
    # on 2 cores. In the demo, credit is on demand: `POST /api/v1/releases/N/credit` or
    # `phatgoose coordinator credit N` (docs/coordinator.md, "Credit").
    app = create_app(Settings(data_dir=data_dir, auto_credit_max_experts=0))
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
    """Each contributor task's training pool (the later ones' too) as one contributor's
    private JSONL file; the contributors in the plan's order."""
    from phatgoose.bigbench import load_bigbench_task

    contributors = []
    for task in plan.contributor_tasks:
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
    sessions: Any, blobs: Any, base: str, refs: Sequence[str], maintainer: Any, top_k: int
) -> dict[str, int]:
    """PHATGOOSE (k = `top_k`, capped at the experts there are), merged and base releases
    over `refs`, each reusing the newest identical one (the channel's, when it holds these
    experts): method -> release number."""
    from coordinator.releases import service as releases
    from coordinator.releases.schemas import ReleaseCreate

    numbers: dict[str, int] = {}
    with sessions() as session:
        for method in RELEASE_METHODS:
            experts = [] if method == "base" else sorted(refs)
            k = min(top_k, len(experts)) if method == "phatgoose" else None
            for release in releases.list_releases(session, base_model=base, method=method):
                same_k = k is None or release.top_k == k
                if same_k and sorted(e["ref"] for e in release.manifest["experts"]) == experts:
                    numbers[method] = release.number  # by number: the newest wins
            if method not in numbers:
                request = ReleaseCreate(
                    method=method,
                    experts=experts,
                    top_k=k,
                    base_model=base,
                    notes="phatgoose demo",
                )
                created = releases.create_release(session, blobs, request, by=maintainer)
                numbers[method] = created.number
    return numbers


def evaluation_spec(plan: DemoPlan) -> EvaluationSpec:
    """The benchmark of every demo release, the channel's included: the plan's evaluation
    tasks on `n_eval` held-back examples each, the contributors' tasks held in."""
    from coordinator.evaluations.schemas import EvaluationSpec, TaskGroups

    return EvaluationSpec(
        tasks=list(plan.evaluation_tasks),
        examples_per_task=plan.n_eval,
        seed=plan.training.seed,
        task_groups=TaskGroups(held_in=list(plan.contributor_tasks), held_out=list(plan.held_out)),
    )


def queue_evaluations(
    sessions: Any,
    plan: DemoPlan,
    numbers: Mapping[str, int],
    maintainer: Any,
    *,
    create: bool = True,
) -> int:
    """One evaluation job per release on the demo's spec (`evaluation_spec`), unless one
    with the same spec exists (a channel's release has one: queued with it), not failed,
    and when done, with per-example outcomes on every task (one stored before the
    coordinator kept them cannot be compared with the base, so the release is evaluated
    again); returns how many jobs are not done yet (new or unfinished)."""
    from coordinator.evaluations import service as evaluations
    from coordinator.evaluations.schemas import EvaluationCreate
    from coordinator.releases import service as releases

    pending = 0
    spec = evaluation_spec(plan).model_dump()
    with sessions() as session:
        for number in sorted(set(numbers.values())):
            request = EvaluationCreate.model_validate({**spec, "release": number})
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
    for task in plan.evaluation_tasks:
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
        for task in plan.contributor_tasks:
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
    channel_release: int | None = None,
) -> dict[str, int]:
    """Releases over the catalogued experts (and the channel's release), their evaluation
    (by the coordinator's own worker, in this process) and the leaderboard; returns
    method -> release number (`channel` -> the channel's release where it is none of them)."""
    from coordinator.leaderboard.service import leaderboard
    from coordinator.storage import open_blob_store
    from coordinator.worker import WorkerOptions, run_worker

    maintainer = demo_maintainer(sessions)
    blobs = open_blob_store(settings)
    numbers = build_releases(sessions, blobs, base, list(refs.values()), maintainer, plan.top_k)
    if channel_release is not None and channel_release not in numbers.values():
        numbers["channel"] = channel_release  # its experts are not the demo's: evaluated too
    labels = {n: f"#{n} {method}" for method, n in numbers.items() if method != "channel"}
    if channel_release is not None:
        labels[channel_release] = labels.get(channel_release, f"#{channel_release}")
        labels[channel_release] += f" (channel {DEMO_CHANNEL})"
    console.print("releases: " + ", ".join(labels.values()), highlight=False)
    pending = queue_evaluations(sessions, plan, numbers, maintainer)
    if pending:
        console.print(
            f"evaluating {pending} release(s) on {len(plan.evaluation_tasks)} tasks x "
            f"{plan.n_eval} examples (rank classification; tasks already scored are kept)"
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


# --------------------------------------------------------------- the release channel
DEMO_CHANNEL = "demo/latest"
# Every Flower node publishes under its own namespace, `demo-<node id>`.
DEMO_EXPERTS_GLOB = f"{DEMO_NAMESPACE}-*/*"
# Where `phatgoose coordinator serve` (its default port) shows the pages after the demo.
SERVE_URL = "http://127.0.0.1:8765"


def ensure_channel(sessions: Any, plan: DemoPlan, base: str, maintainer: Any) -> str:
    """The demo's release channel (`DEMO_CHANNEL`), created once: PHATGOOSE with the plan's
    k over every admitted demo expert of `base`, each release it builds evaluated on the
    demo's spec (`evaluation_spec`). One whose base model, k or spec are not this plan's
    (another --base, --quick, --tasks) is changed to them. Says what it did."""
    from coordinator.channels import service as channels
    from coordinator.channels.schemas import ChannelCreate, ChannelUpdate
    from coordinator.core.errors import NotFound
    from coordinator.evaluations.schemas import EvaluationSpec

    spec = evaluation_spec(plan)
    namespace, name = DEMO_CHANNEL.split("/")
    with sessions() as session:
        try:
            channel = channels.get_channel(session, namespace, name)
        except NotFound:
            request = ChannelCreate(
                name=DEMO_CHANNEL,
                method="phatgoose",
                top_k=plan.top_k,
                base_model=base,
                name_glob=DEMO_EXPERTS_GLOB,
                spec=spec,
                notes="phatgoose demo: every demo expert of the base model",
            )
            channels.create_channel(session, request, by=maintainer.name)
            return (
                f"release channel {DEMO_CHANNEL} created: phatgoose, k={plan.top_k}, over "
                f"every admitted expert {DEMO_EXPERTS_GLOB} of {base}; each of its releases "
                f"is evaluated on {len(spec.tasks)} tasks x {plan.n_eval} examples"
            )
        stored = None if channel.spec is None else EvaluationSpec.model_validate(channel.spec)
        where = f"at release #{channel.release.number}" if channel.release else "no release yet"
        if (channel.base_model.name, channel.top_k, stored) == (base, plan.top_k, spec):
            return f"release channel {DEMO_CHANNEL}: {channels.state(channel)}, {where}"
        update = ChannelUpdate(base_model=base, top_k=plan.top_k, spec=spec)
        channels.update_channel(session, channel, update, by=maintainer.name)
        return (
            f"release channel {DEMO_CHANNEL} ({where}) changed to this run's base model, k "
            "and tasks: its next release follows them"
        )


def advance_demo_channel(sessions: Any, settings: Any) -> int | None:
    """Advance the release channels as every worker does each poll
    (`channels.service.advance_channels`: a catalog change builds the next release and
    queues its evaluation, once), and say what the demo's channel did; the number of the
    release it points at now (None: none)."""
    from coordinator.channels import service as channels
    from coordinator.storage import open_blob_store

    with sessions() as session:
        report = channels.advance_channels(session, open_blob_store(settings), settings)
    with sessions() as session:
        channel = channels.get_channel(session, *DEMO_CHANNEL.split("/"))
        number = channel.release.number if channel.release is not None else None
        state = channels.state(channel)
    advanced = next((a for a in report.advanced if a.channel == DEMO_CHANNEL), None)
    if advanced is not None:
        text = (
            f"channel {DEMO_CHANNEL} advanced to release #{advanced.release} (history entry "
            f"{advanced.sequence}: {advanced.reason})"
        )
        if advanced.job_id is not None:
            text += f"; its evaluation is queued (job {advanced.job_id})"
    elif DEMO_CHANNEL in report.errors:
        text = f"channel {DEMO_CHANNEL} could not advance: {report.errors[DEMO_CHANNEL]}"
    elif DEMO_CHANNEL in report.held:
        text = f"channel {DEMO_CHANNEL} is {state}: not advanced"
    else:
        text = (
            f"channel {DEMO_CHANNEL} unchanged at release #{number}: the catalog selects the "
            "experts it holds"
        )
    console.print(text, markup=False, highlight=False)
    return number


def show_channel(sessions: Any) -> int | None:
    """Print the channel's history and its release's diff to the channel's previous release
    (as the release page shows it); the release it points at (None: none yet)."""
    from coordinator.channels import diff
    from coordinator.channels import service as channels
    from coordinator.channels.schemas import ChannelEntryInfo
    from coordinator.leaderboard.service import task_groups

    with sessions() as session:
        channel = channels.get_channel(session, *DEMO_CHANNEL.split("/"))
        if channel.release is None:
            console.print(f"channel {DEMO_CHANNEL} has no release yet", highlight=False)
            return None
        groups = task_groups(session)
        history = [
            ChannelEntryInfo.of(entry, number)
            for entry, number in reversed(channels.history_page(session, channel).items)
        ]
        points = diff.channel_means(session, channel, groups=groups)
        changes = diff.release_channel_diff(session, channel.release, groups=groups)
        number = channel.release.number
    console.print(render(channel_history_grid(history, points), console.width))
    if changes is None or changes.previous is None:
        console.print(
            f"release #{number} is the channel's first: its diff comes with the next one "
            "(a later run adds an expert)",
            markup=False,
            highlight=False,
        )
        return number
    for grid in channel_diff_grids(changes):
        console.print(render(grid, console.width))
    for note in channel_diff_notes(changes):
        console.print(note, markup=False, highlight=False)
    return number


def channel_history_grid(
    history: Sequence[ChannelEntryInfo], points: Sequence[ChannelPoint]
) -> Grid:
    """The channel's moves, oldest first, each release with the held-in and held-out means
    (± standard error) of its evaluation on the channel's spec."""
    by_release = {point.release: point for point in points}
    rows = tuple(
        (
            str(entry.sequence),
            f"#{entry.release}",
            entry.action,
            entry.reason,
            *(_mean_cell(by_release.get(entry.release), group) for group, _ in GROUPS),
        )
        for entry in history
    )
    return Grid(
        f"release channel {DEMO_CHANNEL}: history",
        ("entry", "release", "action", "reason", *(f"{label} mean" for _, label in GROUPS)),
        rows,
    )


def _mean_cell(point: ChannelPoint | None, group: str) -> str:
    if point is None or group not in point.means:
        return "not evaluated"
    return f"{point.means[group]:.3f} ± {point.stderrs[group]:.3f}"


def channel_diff_grids(diff: ChannelDiff) -> list[Grid]:
    """A channel's release against its previous release: the experts that changed, then
    (when both were evaluated on a shared spec) accuracy per task and per group with the
    paired difference and how routing shifted on each task, then each expert's routing
    share before and after."""
    new, old = f"#{diff.release}", f"#{diff.previous}"
    grids = [
        Grid(
            f"channel {diff.channel}: release {new} against {old}, its previous release",
            ("expert", "change", f"in {old}", f"in {new}"),
            tuple(
                (
                    change.name,
                    _change(change.before, change.after),
                    change.before or "-",
                    change.after or "-",
                )
                for change in diff.experts
            ),
        )
    ]
    comparison = diff.comparison
    if comparison is not None and comparison.comparable:
        shifts = {shift.task: shift.total_variation for shift in diff.task_routing}
        rows: list[tuple[str, ...]] = []
        for task in comparison.tasks:
            label = task.task + (" (held out)" if task.group == "held_out" else "")
            rows.append(
                (
                    label,
                    _fmt(task.b),
                    _fmt(task.a),
                    _difference_cell(task.difference, task.reason),
                    "-" if task.difference is None else _p_value(task.difference.p_value),
                    "-" if task.task not in shifts else f"{shifts[task.task]:.2f}",
                )
            )
        for group, label in (*GROUPS, ("all", "all tasks")):
            mean = comparison.means.get(group)
            if mean is not None:
                rows.append(
                    (
                        f"{label} mean",
                        _fmt(mean.b),
                        _fmt(mean.a),
                        _difference_cell(mean.difference, mean.reason),
                        "-" if mean.difference is None else _p_value(mean.difference.p_value),
                        "",
                    )
                )
        grids.append(
            Grid(
                f"{new} against {old} on the same examples (Δ = {new} - {old} with its paired "
                "95% interval, ▲/▼ where it excludes 0; routing shift: total variation between "
                "the two releases' routing over experts, 0 alike, 1 no expert in common)",
                ("task", old, new, "Δ [95% interval]", "McNemar p", "routing shift"),
                tuple(rows),
                strong=frozenset(range(len(comparison.tasks), len(rows))),
            )
        )
    if diff.routing:
        grids.append(
            Grid(
                "each expert's share of the routing decisions (averaged over the tasks)",
                ("expert", old, new, "change"),
                tuple(
                    (
                        shift.expert,
                        _fmt(shift.before, missing="-"),
                        _fmt(shift.after, missing="-"),
                        "-"
                        if shift.before is None or shift.after is None
                        else f"{shift.after - shift.before:+.3f}",
                    )
                    for shift in diff.routing
                ),
            )
        )
    return grids


def channel_diff_notes(diff: ChannelDiff) -> list[str]:
    """Why a part of the diff is missing."""
    comparison = diff.comparison
    notes = []
    if comparison is None or not comparison.comparable:
        reason = comparison.reason if comparison is not None else None
        notes.append(
            f"#{diff.release} and #{diff.previous} are not compared: {reason or 'no evaluation'}"
        )
    elif not diff.routing:
        notes.append("no routing statistics in the compared evaluations")
    return notes


def _change(before: str | None, after: str | None) -> str:
    if before is None:
        return "added"
    return "removed" if after is None else "another version"


def _difference_cell(difference: PairedNumbers | None, reason: str | None) -> str:
    return f"n/a ({reason})" if difference is None else paired_cell(difference)


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
    later: Annotated[
        str | None,
        typer.Option(
            "--later",
            help="Tasks of contributors who join one per run once the held-in experts are "
            "catalogued (comma-separated; '' for none). Default: "
            + ",".join(DEFAULT_PLAN.later)
            + " (unless --tasks or --held-out name it).",
            show_default=False,
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

    A second run reuses the catalogued experts, trains one more (the next --later task's
    contributor joins) and shows what it changed in the release channel demo/latest; a run
    with no one left to join trains nothing.
    """
    plan = QUICK_PLAN if quick else DEFAULT_PLAN
    held_in_tasks = _task_list(tasks) if tasks else plan.held_in
    held_out_tasks = _task_list(held_out) if held_out else plan.held_out
    if later is not None:
        later_tasks = _task_list(later)
    else:  # the default later tasks step aside for tasks named in another group
        later_tasks = tuple(t for t in plan.later if t not in (*held_in_tasks, *held_out_tasks))
    try:
        plan = replace(plan, held_in=held_in_tasks, held_out=held_out_tasks, later=later_tasks)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
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


def _task_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


@dataclass(frozen=True)
class Roster:
    """Who takes part in a run. `members`: the held-in contributors and the later ones who
    have joined (their experts are catalogued) or join now, in the plan's order; of them
    `to_train`; `joining`: the later contributor who joins in this run (None: none);
    `waiting`: the later ones still to join."""

    members: tuple[Contributor, ...]
    to_train: tuple[Contributor, ...]
    joining: Contributor | None
    waiting: tuple[Contributor, ...]


def roster(
    plan: DemoPlan,
    contributors: Sequence[Contributor],
    catalogued_names: Collection[str],
    *,
    retrain: bool = False,
) -> Roster:
    """This run's roster from the plan's contributors (`write_contributor_data`'s order)
    and the names of the experts in the catalog: the held-in contributors train until
    their experts are catalogued; then each run, the next later contributor joins (one
    expert more); `retrain` trains every member again and lets no one join."""
    first = list(contributors[: len(plan.held_in)])
    later = list(contributors[len(plan.held_in) :])
    joined = [c for c in later if c.name in catalogued_names]
    if retrain:
        to_train, joining = [*first, *joined], None
    else:
        to_train = [c for c in first if c.name not in catalogued_names]
        fresh = [c for c in later if c.name not in catalogued_names]
        joining = fresh[0] if fresh and not to_train else None
        if joining is not None:
            to_train = [joining]
    members = tuple(c for c in contributors if c in first or c in joined or c == joining)
    waiting = tuple(c for c in later if c not in joined and c != joining)
    return Roster(members, tuple(to_train), joining, waiting)


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

        maintainer = demo_maintainer(sessions)
        console.print(ensure_channel(sessions, plan, spec.name, maintainer), highlight=False)

        with console.status("preparing the contributors' private data (BIG-bench)"):
            contributors = write_contributor_data(plan, data_dir / "contributors", tasks_dir)
        catalog = catalogued(sessions, plan, spec.fingerprint)
        cast = roster(plan, contributors, catalog.keys(), retrain=retrain)
        console.print(
            f"{len(cast.members)} contributor(s), one task each: "
            + ", ".join(c.name for c in cast.members)
        )
        if cast.waiting:
            console.print(
                f"{len(cast.waiting)} later contributor(s), one joining per run once the "
                "others' experts are catalogued: " + ", ".join(c.name for c in cast.waiting)
            )
        for member in cast.members:
            if member not in cast.to_train:
                console.print(f"reusing {catalog[member.name]} from the catalog")
        if cast.joining is not None:
            console.print(
                f"a new contributor joins: {cast.joining.name} (one expert more; the release "
                f"channel {DEMO_CHANNEL} follows the catalog)"
            )
        if not cast.to_train:
            console.print(
                "nothing new to add: every contributor of the plan has its expert in the "
                "catalog, so nothing is trained (--later names more tasks, --retrain trains "
                "them again)"
            )
        todo = list(cast.to_train)
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
        refs = {c.name: refs[c.name] for c in cast.members if c.name in refs}
        console.print(render(experts_grid(sessions, refs), console.width))
        missing = [c.name for c in cast.members if c.name not in refs]
        if missing:
            console.print(
                f"[red]{len(missing)} expert(s) did not land: {', '.join(missing)}; logs in "
                f"{data_dir / 'federation'}[/red]"
            )
        channel_release = None
        if refs:
            with stage_timer(timings, "own-task evaluation"):
                score_own_tasks(
                    sessions, app.state.settings, plan, refs, model, tokenizer, tasks_dir
                )
            with stage_timer(timings, "release evaluation"):
                channel_release = advance_demo_channel(sessions, app.state.settings)
                evaluate_releases(
                    sessions, app.state.settings, plan, base, refs, tasks_dir, channel_release
                )
            channel_release = show_channel(sessions)
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    pages = f"{SERVE_URL}/ui/leaderboard"
    if channel_release is not None:
        pages += (
            f", {SERVE_URL}/ui/releases/{channel_release} (the channel's release and its diff)"
            f" and {SERVE_URL}/ui/channels/{DEMO_CHANNEL} (its history)"
        )
    console.print(
        f"done in {time.monotonic() - started:.0f} s ({spent}). The pages: run "
        f"`phatgoose coordinator serve --data-dir {coordinator_dir}` and open {pages}",
        highlight=False,
    )
    return 1 if missing else 0
