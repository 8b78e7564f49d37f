"""`phatgoose demo`: the whole platform on one machine, with real data and the real model.

1. A coordinator starts on loopback (SQLite and blobs in `./.phatgoose/demo`), and the base
   model (SmolLM2-135M-Instruct by default) is registered with it.
2. Each contributor holds one real held-in BIG-bench task as private JSONL data
   (BENCHMARK.md: its training pool; the evaluation split stays with the coordinator).
3. A Flower federation runs on loopback: a real SuperLink, one SuperNode per contributor
   (its data path in its node config) and `flwr run` of this project's app. Every node
   trains LoRA and gates and replies with its expert package; the ServerApp validates and
   catalogues each reply.
4. Experts already in the catalog (same base model, same training settings) are reused: a
   second run trains nothing.
5. PHATGOOSE, merged and base releases are built over the catalogued experts, evaluated by
   the coordinator's evaluation worker on the held-in tasks' evaluation splits and on
   held-out tasks, and the leaderboard is printed (and served at /ui/leaderboard).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from app.federation import Contributor, LocalFederation
from protocol.flower import FlowerConfigError, RoundSettings, TrainingRequest

console = Console(stderr=True)

DEMO_NAMESPACE = "demo"


# ------------------------------------------------------------------------- the plan
# Sized for 2 CPU cores (BENCHMARK.md: ~5 s per LoRA step at batch 8 x 128 tokens, so batch
# 4 x 96 tokens and a few dozen steps); the rest as the run config's defaults.
DEMO_TRAINING = TrainingRequest(
    max_examples=200,  # training examples a contributor uses (a seeded sample)
    lora_steps=30,
    gate_steps=6,
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

    held_in: tuple[str, ...] = ("sports_understanding", "navigate", "hyperbaton")
    # Three short held-out tasks: novel_concepts (long prompts, 32 examples) cost ~45 s
    # per release and pushed a fresh-machine run past 15 minutes.
    held_out: tuple[str, ...] = ("code_line_description", "known_unknowns", "strategyqa")
    n_eval: int = 40  # evaluation examples per task (held back from the contributors)
    training: TrainingRequest = DEMO_TRAINING


DEFAULT_PLAN = DemoPlan()
QUICK_PLAN = replace(
    DEFAULT_PLAN,
    held_out=("known_unknowns", "strategyqa"),
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
    """Run one Flower round over the contributors, showing each node's progress live."""
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
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while runner.is_alive():
                live.update(
                    _progress_table(federation, contributors, sessions, plan, fingerprint, started)
                )
                runner.join(timeout=2.0)
            live.update(
                _progress_table(federation, contributors, sessions, plan, fingerprint, started)
            )
    for line in round_lines:
        console.print(line)
    return result.get("code", 1)


def _progress_table(
    federation: LocalFederation,
    contributors: Sequence[Contributor],
    sessions: Any,
    plan: DemoPlan,
    fingerprint: str,
    started: float,
) -> Table:
    landed = catalogued(sessions, plan, fingerprint)
    table = Table(
        title=f"Flower round on {federation.address} ({time.monotonic() - started:.0f} s)"
    )
    table.add_column("contributor")
    table.add_column("status")
    for contributor in contributors:
        if contributor.name in landed:
            status = f"[green]catalogued as {landed[contributor.name]}[/green]"
        else:
            status = federation.last_line(f"supernode-{contributor.name}")[:100] or "starting"
        table.add_row(contributor.name, status)
    return table


def experts_table(sessions: Any, refs: Mapping[str, str]) -> Table:
    from coordinator.experts.service import resolve_ref

    table = Table(title="catalogued experts")
    table.add_column("expert", no_wrap=True)
    for column in ("examples", "steps", "loss", "gate steps", "gate loss", "MB", "via"):
        table.add_column(column)
    with sessions() as session:
        for ref in refs.values():
            version = resolve_ref(session, ref)
            t = version.manifest["training"]
            table.add_row(
                ref,
                str(t["examples"]),
                str(t["steps"]),
                _fmt(t.get("final_loss")),
                str(t["gate_steps"]),
                _fmt(t.get("final_gate_loss")),
                f"{version.total_size / 1e6:.1f}",
                version.channel,
            )
    return table


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
    the same spec exists; returns how many jobs are not done yet (new or unfinished)."""
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
                if {k: job.spec.get(k) for k in wanted} == wanted and job.state != "failed"
            ]
            if not existing and create:
                evaluations.create_job(session, request, by=maintainer)
            if not any(job.state == "done" for job in existing):
                pending += 1
    return pending


def leaderboard_table(sessions: Any, numbers: Mapping[str, int], plan: DemoPlan) -> Table:
    """Tasks down, releases across: accuracy ± standard error, then the group means."""
    from coordinator.leaderboard.service import leaderboard

    with sessions() as session:
        board = leaderboard(session)
    rows = [row for row in board.releases if row.release in set(numbers.values())]
    table = Table(title="leaderboard (accuracy ± standard error)")
    table.add_column("task", no_wrap=True)
    for row in rows:
        table.add_column(f"#{row.release} {row.method}", no_wrap=True)
    for task in [*plan.held_in, *plan.held_out]:
        label = task + (" (held out)" if task in plan.held_out else "")
        table.add_row(
            label,
            *(
                f"{row.scores[task].accuracy:.2f} ± {row.scores[task].stderr:.2f}"
                if task in row.scores
                else "-"
                for row in rows
            ),
        )
    for group, label in (("held_in", "held-in mean"), ("held_out", "held-out mean")):
        table.add_row(f"[bold]{label}[/bold]", *(_fmt(row.group_means.get(group)) for row in rows))
    return table


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
    from coordinator.storage import LocalBlobStore
    from coordinator.worker import WorkerOptions, run_worker

    maintainer = demo_maintainer(sessions)
    blobs = LocalBlobStore(settings.blob_dir)
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
    console.print(leaderboard_table(sessions, numbers, plan))
    return numbers


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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
    data_dir = data_dir.resolve()
    coordinator_dir = data_dir / "coordinator"
    console.rule("[bold]PHATGOOSE demo")
    with running_coordinator(coordinator_dir, port) as (app, url):
        console.print(f"coordinator: {url} (API docs at {url}/docs), data in {coordinator_dir}")
        sessions = app.state.sessionmaker

        with console.status(f"loading the base model {base}"):
            model, _ = load_base_model(base)
            spec = base_model_spec(model, base)
            del model
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
                f"{request.max_length} tokens"
            )
            round_settings = RoundSettings(
                coordinator_data_dir=str(coordinator_dir),
                namespace=DEMO_NAMESPACE,
                min_nodes=len(todo),
                node_wait_seconds=120.0,
                round_timeout_seconds=3600.0,
            )
            run_config = {**request.to_config(), **round_settings.to_config()}
            code = train_by_federation(
                data_dir / "federation", todo, run_config, sessions, plan, spec.fingerprint
            )
            if code != 0:
                console.print(f"[red]flwr run exited with {code}; see {data_dir / 'federation'}")

        refs = catalogued(sessions, plan, spec.fingerprint)
        refs = {c.name: refs[c.name] for c in contributors if c.name in refs}
        console.print(experts_table(sessions, refs))
        missing = [c.name for c in contributors if c.name not in refs]
        if missing:
            console.print(
                f"[red]{len(missing)} expert(s) did not land: {', '.join(missing)}; logs in "
                f"{data_dir / 'federation'}[/red]"
            )
        if refs:
            evaluate_releases(sessions, app.state.settings, plan, base, refs, tasks_dir)
    console.print(
        f"done in {time.monotonic() - started:.0f} s. The leaderboard page: run "
        f"`phatgoose coordinator serve --data-dir {coordinator_dir}` and open "
        "http://127.0.0.1:8765/ui/leaderboard"
    )
    return 1 if missing else 0
