"""The zero-shot benchmark as several processes (`phatgoose bench zero-shot --jobs N`).

One process cannot keep a GPU busy with a 135M model: every step is a few thousand small
kernels launched from Python. So the run is split into jobs that share the catalog (the
expert cache) and the evaluation cache, in phases, at most `jobs` processes at a time:

1. experts: the held-in experts spread over at most `jobs` processes, several per process
   when there are more experts than jobs (each process loads the model once);
2. multitask: the multitask LoRA alone, with the device to itself (its batches are the
   largest; beside the experts it crawled, see docs/benchmarks.md);
3. scoring: the methods packed into at most `jobs` processes (routed methods and multitask
   together; the single experts split by expert, a process scoring its share with every
   task in its own role, held-in or held-out, so on the examples a one-process run scores);
4. assembly: this process reads every result from the caches (`cached_only`), writes the
   result file and publishes it, exactly as a one-process run would.

Each job is `python -m benchmarks zero-shot` (`phatgoose bench zero-shot`) with the resolved
settings in a JSON file and its own log. A failed training job stops the run after its
phase; a failed scoring job leaves the others' results, which the assembly reports (the rest
as not run) before the command exits with an error naming the logs to read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from benchmarks.zero_shot import ROUTED_METHODS, ZeroShotConfig


class JobsFailed(RuntimeError):
    """Some jobs of a phase exited with an error; the rest ran to their end."""

    def __init__(self, message: str, failed: dict[str, Path], seconds: dict[str, float]) -> None:
        super().__init__(message)
        self.failed = failed  # label -> log
        self.seconds = seconds  # every job's seconds, failed ones too


@dataclass(frozen=True)
class Job:
    """One child run: a label (its log's name) and its own command-line options."""

    label: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Phase:
    """Jobs that run together; the next phase starts when all of them have ended.
    `fatal`: a failure here stops the run (nothing after it could work)."""

    desc: str
    jobs: list[Job]
    fatal: bool


def plan(config: ZeroShotConfig, jobs: int, *, train_only: bool = False) -> list[Phase]:
    """The phases of a run in `jobs` processes (the module's docstring), empty ones left out."""
    phases = [
        Phase("experts", expert_jobs(config, jobs), fatal=True),
        Phase("multitask", multitask_jobs(config), fatal=True),
    ]
    if not train_only:
        phases.append(Phase("scoring", scoring_jobs(config, jobs), fatal=False))
    return [phase for phase in phases if phase.jobs]


def expert_jobs(config: ZeroShotConfig, jobs: int) -> list[Job]:
    """Train and register every held-in expert the methods need, in at most `jobs`
    processes, the experts dealt out in turn (a process trains them one after another)."""
    if all(m in ("base", "multitask") for m in config.methods):
        return []
    return [
        Job(_label("train", group), ("--train-only", "--held-in", ",".join(group),
                                     "--methods", "phatgoose"))
        for group in _deal(config.held_in, jobs)
    ]  # fmt: skip


def multitask_jobs(config: ZeroShotConfig) -> list[Job]:
    """The multitask LoRA (and its gates), one process."""
    if "multitask" not in config.methods:
        return []
    return [Job("train-multitask", ("--train-only", "--methods", "multitask"))]


def scoring_jobs(config: ZeroShotConfig, jobs: int) -> list[Job]:
    """Score every method in at most `jobs` processes (one more when both kinds below
    exist and `jobs` is 1). Each unit costs about one scoring pass over every task: a
    routed method, multitask, or one single expert (a job that scores experts is told
    which with `--single-experts`; its tasks keep their roles, so every task is scored on
    the examples the assembly looks up)."""
    methods = [m for m in (*ROUTED_METHODS, "multitask") if m in config.methods]
    singles = (
        list(config.held_in)
        if "oracle" in config.methods or "best_individual" in config.methods
        else []
    )
    units = len(methods) + len(singles)
    if not units:
        return []
    # Both kinds share the processes in proportion to their units.
    method_jobs = max(1, round(jobs * len(methods) / units)) if methods else 0
    single_jobs = max(1, jobs - method_jobs) if singles else 0
    result = [
        Job(_label("score", group), ("--methods", ",".join(group)))
        for group in _deal(methods, method_jobs)
    ]
    for group in _deal(singles, single_jobs):
        args = ("--methods", "best_individual", "--single-experts", ",".join(group))
        result.append(Job(_label("score-single", group), args))
    return result


def _deal(items: Sequence[str], hands: int) -> list[list[str]]:
    """`items` dealt in turn into at most `hands` non-empty groups, order kept within each."""
    hands = max(1, min(hands, len(items)))
    return [list(items[i::hands]) for i in range(hands) if items[i::hands]]


def _label(prefix: str, group: Sequence[str]) -> str:
    """A job's label and log name: its members joined by '+' (the first and a count when
    that is long), slashes made file-safe."""
    label = f"{prefix}-{'+'.join(group)}"
    if len(label) > 100:
        label = f"{prefix}-{group[0]}+{len(group) - 1}-more"
    return label.replace("/", "_")


def run_jobs(
    jobs: Sequence[Job],
    common: Sequence[str],
    *,
    workdir: Path,
    parallel: int,
    desc: str,
    progress: bool = True,
) -> dict[str, float]:
    """Run `jobs` (at most `parallel` at a time); the seconds each took. Raises
    `JobsFailed`, naming every failed job and its log, once all of them have ended."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pending = list(jobs)
    running: dict[str, tuple[subprocess.Popen[bytes], float, IO[bytes]]] = {}
    seconds: dict[str, float] = {}
    failed: dict[str, Path] = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=not progress)
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            log = open(logs / f"{job.label}.log", "wb")  # noqa: SIM115 (closed below)
            command = [sys.executable, "-m", "benchmarks", "zero-shot", *common]
            command += [*job.args, "--output", str(workdir / f"{job.label}.json")]
            log.write((" ".join(command) + "\n\n").encode())
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            running[job.label] = (process, time.perf_counter(), log)
        time.sleep(0.5)
        for label, (process, started, job_log) in list(running.items()):
            if process.poll() is None:
                continue
            job_log.close()
            del running[label]
            seconds[label] = round(time.perf_counter() - started, 1)
            if process.returncode != 0:
                failed[label] = logs / f"{label}.log"
            bar.update(1)
            bar.set_postfix_str(f"{label} done" if label not in failed else f"{label} FAILED")
    bar.close()
    if failed:
        listed = "; ".join(f"{label} (log: {path})" for label, path in failed.items())
        raise JobsFailed(
            f"{len(failed)} of {len(jobs)} {desc} jobs failed: {listed}", failed, seconds
        )
    return seconds


def child_options(
    config: ZeroShotConfig,
    workdir: Path,
    *,
    device: str,
    cache_dir: Path,
    catalog_dir: Path,
    catalog_database_url: str | None,
) -> list[str]:
    """The options every job shares: the resolved settings (as a file), where the caches
    are, the device, and no publishing (the assembly publishes once). CPU threads are set
    per phase (`threads_per_job`)."""
    settings = workdir / "settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    options = [
        "--config", str(settings), "--device", device,
        "--cache-dir", str(cache_dir), "--catalog", str(catalog_dir), "--no-publish",
    ]  # fmt: skip
    if catalog_database_url:
        options += ["--catalog-database-url", catalog_database_url]
    return options


def threads_per_job(phase: Phase, jobs: int, cpus: int) -> int:
    """The CPU cores shared evenly by the phase's processes that run at once."""
    return max(1, cpus // max(1, min(jobs, len(phase.jobs))))


def new_workdir(cache_dir: Path) -> Path:
    """`<cache_dir>/parallel-runs/<UTC time>`: the jobs' settings, logs and partial results."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return cache_dir / "parallel-runs" / stamp
