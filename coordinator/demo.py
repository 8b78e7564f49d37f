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
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

console = Console(stderr=True)

CONNECTION = "phatgoose-local"
DEMO_NAMESPACE = "demo"


# ------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class DemoPlan:
    """What the demo trains and evaluates; sized for 2 CPU cores (BENCHMARK.md: ~5 s per
    LoRA step at batch 8 x 128 tokens, so batch 4 x 96 tokens and a few dozen steps)."""

    held_in: tuple[str, ...] = ("sports_understanding", "navigate", "hyperbaton")
    # Three short held-out tasks: novel_concepts (long prompts, 32 examples) cost ~45 s
    # per release and pushed a fresh-machine run past 15 minutes.
    held_out: tuple[str, ...] = ("code_line_description", "known_unknowns", "strategyqa")
    n_eval: int = 40  # evaluation examples per task (held back from the contributors)
    max_examples: int = 200  # training examples a contributor uses (a seeded sample)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_steps: int = 30
    gate_steps: int = 6
    batch_size: int = 4
    max_length: int = 96
    learning_rate: float = 2e-3
    # The releases built here (PHATGOOSE, merged, base) do not need average activations.
    average_activation: bool = False
    seed: int = 0

    def hyper_parameters(self, base: str) -> dict[str, Any]:
        """The Flower run config's training keys (pyproject.toml, [tool.flwr.app.config])."""
        return {
            "base-model": base,
            "lora-rank": self.lora_rank,
            "lora-alpha": self.lora_alpha,
            "lora-steps": self.lora_steps,
            "gate-steps": self.gate_steps,
            "batch-size": self.batch_size,
            "max-length": self.max_length,
            "learning-rate": self.learning_rate,
            "gate-learning-rate": self.learning_rate,
            "max-examples": self.max_examples,
            "average-activation": self.average_activation,
            "seed": self.seed,
        }


DEFAULT_PLAN = DemoPlan()
QUICK_PLAN = replace(
    DEFAULT_PLAN,
    held_out=("known_unknowns", "strategyqa"),
    n_eval=16,
    max_examples=64,
    lora_steps=6,
    gate_steps=2,
)


@dataclass(frozen=True)
class Contributor:
    """One contributor: its expert's name and its private data (on its own machine)."""

    name: str
    data_path: Path


# -------------------------------------------------------------- the local federation
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def app_directory() -> Path:
    """The Flower app: this project's checkout (its pyproject.toml has [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "flwr" not in tomllib.loads(pyproject.read_text()).get(
        "tool", {}
    ):
        raise RuntimeError(
            f"{root} has no pyproject.toml with [tool.flwr.app]: the demo runs from a source "
            "checkout of the platform (pip install -e .)"
        )
    return root


APP_PACKAGES = ("protocol", "phatgoose", "client", "coordinator")


def stage_app(destination: Path) -> Path:
    """A copy of the Flower app's files (pyproject.toml and the packages' Python files).

    `flwr run` bundles the directory it is given; staging keeps it from walking the
    checkout's virtual environment and data (which the bundle would exclude anyway).
    """
    source = app_directory()
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    shutil.copy2(source / "pyproject.toml", destination / "pyproject.toml")
    for package in APP_PACKAGES:
        for path in (source / package).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            target = destination / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return destination


def _executable(name: str) -> str:
    """A console script of this environment (next to the running Python), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"`{name}` not found: install flwr (pip install 'flwr[simulation]')")
    return found


def flower_environment(**extra: str) -> dict[str, str]:
    """The environment for Flower's processes: this interpreter's scripts first on PATH.

    The SuperLink and SuperNodes start further Flower executables by name (the SuperLink
    runs `flower-superexec`), so they must resolve to this environment's console scripts
    even when it is not activated (`.venv/bin/phatgoose demo`, `make test`).
    """
    scripts = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{scripts}{os.pathsep}{path}" if path else scripts, **extra}


class LocalFederation:
    """A SuperLink and one SuperNode per contributor, as subprocesses on loopback.

    Insecure (no TLS) because nothing leaves 127.0.0.1; docs/federation.md shows the same
    commands with TLS and SuperNode authentication for real deployments. Every process gets
    its own FLWR_HOME under `workdir`, and its output goes to a log file there.
    """

    def __init__(self, workdir: Path, contributors: Sequence[Contributor]) -> None:
        self.workdir = workdir
        self.contributors = list(contributors)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_superlink()
            for contributor in self.contributors:
                self._start_supernode(contributor)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the SuperNodes, then the SuperLink (SIGTERM, then SIGKILL after 10 s)."""
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def _spawn(self, name: str, command: list[str], env: Mapping[str, str]) -> None:
        log_path = self.workdir / f"{name}.log"
        self.logs[name] = log_path
        with log_path.open("wb") as log:
            self.processes[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=flower_environment(**env)
            )

    def _home(self, name: str) -> dict[str, str]:
        home = self.workdir / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        return {"FLWR_HOME": str(home)}

    def _start_superlink(self) -> None:
        self._spawn(
            "superlink",
            [
                _executable("flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                # Offline: the app's dependencies are this environment's, never installed.
                "--disable-runtime-dependency-installation",
            ],
            self._home("superlink"),
        )
        deadline = time.monotonic() + 60
        while not _accepts(self.port):
            self._check_alive("superlink")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not start; see {self.logs['superlink']}")
            time.sleep(0.2)

    def _start_supernode(self, contributor: Contributor) -> None:
        node_config = (
            f'data-path="{contributor.data_path}" expert-name="{contributor.name}" '
            "show-progress=true"
        )
        # Nodes share this machine's cores: one thread each keeps them from fighting.
        threads = str(max(1, (os.cpu_count() or 1) // max(1, len(self.contributors))))
        self._spawn(
            f"supernode-{contributor.name}",
            [
                _executable("flower-supernode"),
                "--insecure",
                "--superlink",
                self.address,
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
            {**self._home(f"supernode-{contributor.name}"), "OMP_NUM_THREADS": threads},
        )

    def _check_alive(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is not None:
            tail = self.logs[name].read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")

    # ------------------------------------------------------------------------ runs
    def run(
        self, run_config: Mapping[str, Any], *, on_line: Any = None, timeout: float = 3600
    ) -> int:
        """`flwr run` of this project's app on the federation; returns its exit code.

        The run config overrides go through a TOML file; `on_line` sees every line of the
        run's streamed log.
        """
        cli_home = self.workdir / "homes" / "flwr-cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\ninsecure = true\n'
        )
        overrides = self.workdir / "run-config.toml"
        overrides.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in run_config.items()))
        command = [
            _executable("flwr"),
            "run",
            str(stage_app(self.workdir / "app")),
            CONNECTION,
            "--run-config",
            str(overrides),
            "--stream",
        ]
        env = flower_environment(FLWR_HOME=str(cli_home), PYTHONUNBUFFERED="1")
        log_path = self.workdir / "flwr-run.log"
        self.logs["run"] = log_path
        deadline = time.monotonic() + timeout
        with (
            log_path.open("w") as log,
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
            ) as process,
        ):
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                if on_line is not None:
                    on_line(line.rstrip("\n"))
                if time.monotonic() > deadline:
                    process.kill()
                    break
            return process.wait()

    def last_line(self, name: str) -> str:
        """The latest line (or progress-bar state) a process wrote to its log."""
        path = self.logs.get(name)
        if path is None or not path.exists():
            return ""
        with path.open("rb") as log:
            log.seek(max(0, path.stat().st_size - 4096))
            tail = log.read().decode("utf-8", "replace")
        lines = [part for line in tail.splitlines() for part in line.split("\r") if part.strip()]
        return lines[-1].strip() if lines else ""


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


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
        split = load_bigbench_task(task, n_eval=plan.n_eval, seed=plan.seed, tasks_dir=tasks_dir)
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
        for version in list_versions(session, namespace=DEMO_NAMESPACE, limit=500).items:
            manifest = version.manifest
            training = manifest.get("training", {})
            if (
                manifest.get("base_model", {}).get("fingerprint") == fingerprint
                and training.get("steps") == plan.lora_steps
                and training.get("gate_steps") == plan.gate_steps
                and manifest.get("lora", {}).get("r") == plan.lora_rank
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
    sessions: Any, base: str, refs: Sequence[str], maintainer: Any
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
                numbers[method] = releases.create_release(session, request, by=maintainer).number
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
                seed=plan.seed,
                task_groups=TaskGroups(held_in=list(plan.held_in), held_out=list(plan.held_out)),
            )
            wanted = request.model_dump(mode="json", exclude={"release"}, exclude_none=True)
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
    from coordinator.worker import WorkerOptions, run_worker

    maintainer = demo_maintainer(sessions)
    numbers = build_releases(sessions, base, list(refs.values()), maintainer)
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
        plan = replace(plan, lora_steps=steps, gate_steps=max(1, steps // 5))
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
            console.print(
                f"training {len(todo)} expert(s) by federation: {plan.lora_steps} LoRA steps + "
                f"{plan.gate_steps} gate steps each, batch {plan.batch_size} x "
                f"{plan.max_length} tokens"
            )
            run_config = {
                **plan.hyper_parameters(base),
                "coordinator-data-dir": str(coordinator_dir),
                "namespace": DEMO_NAMESPACE,
                "min-nodes": len(todo),
                "node-wait-seconds": 120.0,
                "round-timeout-seconds": 3600.0,
            }
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
