"""The zero-shot benchmark as several processes (`phatgoose bench zero-shot --jobs N`).

One process cannot keep a GPU busy with a 135M model: every step is a few thousand small
kernels launched from Python. So the run is split into jobs that share the catalog (the
expert cache) and the evaluation cache, at most `jobs` of them at a time:

1. training: one job per held-in expert, and one for the multitask LoRA;
2. scoring: one job per routed method, one per expert for the single-expert evaluations
   (oracle and best individual), one for the multitask LoRA;
3. assembly: this process reads every result from the caches (`cached_only`), writes the
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


def training_jobs(config: ZeroShotConfig) -> list[Job]:
    """Train and register every expert the methods need, each in its own process."""
    jobs = []
    if any(m not in ("base", "multitask") for m in config.methods):
        jobs += [
            Job(f"train-{task}", ("--train-only", "--held-in", task, "--methods", "phatgoose"))
            for task in config.held_in
        ]
    if "multitask" in config.methods:
        jobs.append(Job("train-multitask", ("--train-only", "--methods", "multitask")))
    return jobs


def scoring_jobs(config: ZeroShotConfig) -> list[Job]:
    """Score every method; the single experts are split by expert (a job scores one
    expert on every task, so its held-in list is that task and the rest are held out)."""
    jobs = [Job(f"score-{m}", ("--methods", m)) for m in ROUTED_METHODS if m in config.methods]
    if "oracle" in config.methods or "best_individual" in config.methods:
        every = [*config.held_in, *config.held_out]
        for task in config.held_in:
            others = ",".join(t for t in every if t != task)
            args: tuple[str, ...] = ("--held-in", task, "--methods", "best_individual")
            if others:
                args += ("--held-out", others)
            jobs.append(Job(f"score-single-{task}", args))
    if "multitask" in config.methods:
        jobs.append(Job("score-multitask", ("--methods", "multitask")))
    return jobs


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
    threads: int,
    cache_dir: Path,
    catalog_dir: Path,
    catalog_database_url: str | None,
) -> list[str]:
    """The options every job shares: the resolved settings (as a file), where the caches
    are, the device, CPU threads, and no publishing (the assembly publishes once)."""
    settings = workdir / "settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    options = [
        "--config", str(settings), "--device", device, "--threads", str(threads),
        "--cache-dir", str(cache_dir), "--catalog", str(catalog_dir), "--no-publish",
    ]  # fmt: skip
    if catalog_database_url:
        options += ["--catalog-database-url", catalog_database_url]
    return options


def new_workdir(cache_dir: Path) -> Path:
    """`<cache_dir>/parallel-runs/<UTC time>`: the jobs' settings, logs and partial results."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return cache_dir / "parallel-runs" / stamp
