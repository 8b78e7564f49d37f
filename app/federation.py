"""A Flower federation on this machine: a SuperLink and one SuperNode per contributor, as
subprocesses on loopback, and `flwr run` of this project's Flower app on it.

The demo runs its round here, and the end-to-end tests start Flower with the same helpers.
The processes are the ones a real deployment runs (docs/federation.md shows them with TLS
and SuperNode authentication); only the addresses and the missing certificates differ.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONNECTION = "phatgoose-local"


@dataclass(frozen=True)
class Contributor:
    """One contributor: its expert's name and its private data (on its own machine)."""

    name: str
    data_path: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
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
            f"{root} has no pyproject.toml with [tool.flwr.app]: a Flower app runs from a "
            "source checkout of the platform (pip install -e .)"
        )
    return root


# The packages the Flower app bundle carries (as `[tool.flwr.app] fab-include` says): the
# ClientApp and the ServerApp need these, never `app` itself.
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


def flower_executable(name: str) -> str:
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
                flower_executable("flower-superlink"),
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
        while not port_accepts(self.port):
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
                flower_executable("flower-supernode"),
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
        self,
        run_config: Mapping[str, Any],
        *,
        on_line: Callable[[str], None] | None = None,
        timeout: float = 3600,
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
            flower_executable("flwr"),
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

    def training_progress(self, contributor: str) -> TrainingProgress | None:
        """Where a contributor's node is in its training loops (None before they start)."""
        return training_progress(self._tail(f"supernode-{contributor}", 16384))

    def _tail(self, name: str, size: int) -> str:
        path = self.logs.get(name)
        if path is None or not path.exists():
            return ""
        with path.open("rb") as log:
            log.seek(max(0, path.stat().st_size - size))
            return log.read().decode("utf-8", "replace")


# ------------------------------------------------------------------- node progress
@dataclass(frozen=True)
class TrainingProgress:
    """A node's training loop as its progress bar last showed it."""

    stage: str  # "LoRA" or "gates"
    step: int
    steps: int
    loss: float | None  # the last step's training loss
    validation_loss: float | None = None  # LoRA only, from its latest evaluation


# The pipeline's loops (phatgoose.training.optimise) draw tqdm bars named `LoRA <expert>`
# and `gates <expert>` with `loss=` (and for LoRA `val=`) in the postfix; a node writes
# them to its log, so the log is how its progress reaches the demo's process (the
# ClientApp runs in a process of its own under the SuperNode).
_BAR = re.compile(
    r"^(?P<stage>LoRA|gates) \S.*?:\s+\d+%\|[^|]*\|\s*(?P<step>\d+)/(?P<steps>\d+)"
    r"\s*\[(?P<info>[^\]]*)\]"
)
_POSTFIX = re.compile(r"\b(?P<key>loss|val)=(?P<value>[-+0-9.eE]+|nan|inf)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def training_progress(log_text: str) -> TrainingProgress | None:
    """The last LoRA or gate progress-bar state in a node's log text, if any."""
    for line in reversed(_log_lines(log_text)):
        match = _BAR.match(line)
        if match is None:
            continue
        values = {m["key"]: float(m["value"]) for m in _POSTFIX.finditer(match["info"])}
        return TrainingProgress(
            stage=match["stage"],
            step=int(match["step"]),
            steps=int(match["steps"]),
            loss=values.get("loss"),
            validation_loss=values.get("val"),
        )
    return None


def _log_lines(text: str) -> list[str]:
    """Non-blank lines of a log, progress-bar redraws (carriage returns) split apart."""
    parts = (part for line in text.splitlines() for part in line.split("\r"))
    return [clean for part in parts if (clean := _ANSI.sub("", part).strip())]


def port_accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port`."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string
