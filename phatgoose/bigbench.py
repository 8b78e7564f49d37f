"""BIG-bench multiple-choice tasks: fetching the task files once, and turning a task into
prompts, choices and a deterministic evaluation/training split (../shared/BENCHMARK.md).

The task files come from the `bigbench==1.0.0` source distribution on PyPI. Only the
`task.json` files are kept (a few hundred MB of sdist become a cache of task files).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm.auto import tqdm

from phatgoose.data import Example
from phatgoose.models import cache_root
from protocol.tasks import TaskNameError, check_task_name, find_task_file

log = logging.getLogger(__name__)

# Both downloads are pinned by hash, like every package of the lock (docs/dependencies.md):
# the task files are the benchmark's data, and the pip that fetches them runs code.
BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
LEGACY_PIP = "pip==25.3"
LEGACY_PIP_SHA256 = "9655943313a94722b7774661c21049070f6bbb0a1516bf02f7c8d5d9201514cd"
TASKS_MEMBER_DIR = ("bigbench", "benchmark_tasks")
TASK_FILE = "task.json"
_COMPLETE_MARKER = ".complete.json"

DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "

HELD_IN_TASKS = (
    "hyperbaton",
    "movie_dialog_same_or_different",
    "epistemic_reasoning",
    "social_iqa",
    "timedial",
    "reasoning_about_colored_objects",
    "question_selection",
    "navigate",
    "sports_understanding",
    "temporal_sequences",
    "logical_fallacy_detection",
    "presuppositions_as_nli",
)
HELD_OUT_TASKS = (
    "code_line_description",
    "emoji_movie",
    "hindu_knowledge",
    "known_unknowns",
    "novel_concepts",
    "misconceptions_russian",
    "strategyqa",
    "vitaminc_fact_verification",
    "winowhy",
    "play_dialog_same_or_different",
    "logic_grid_puzzle",
    "formal_fallacies_syllogisms_negation",
    "language_identification",
)


def default_tasks_dir() -> Path:
    return cache_root() / "bigbench-1.0.0"


def fetch_bigbench(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The directory holding `<task>/task.json` (and `<task>/<subtask>/task.json`).

    On first use, pip downloads the `bigbench==1.0.0` sdist (~358 MB; needs the `wheel`
    package), the task files are extracted into a temporary sibling of the cache, which is
    then renamed into place, and the sdist is deleted.
    """
    target = Path(cache_dir) if cache_dir is not None else default_tasks_dir()
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".bigbench-", dir=target.parent) as work:
        work_dir = Path(work)
        sdist = _download_sdist(work_dir / "download", progress=progress)
        staging = work_dir / "tasks"
        count = _extract_task_files(sdist, staging, progress=progress)
        sdist.unlink()
        if count == 0:
            raise RuntimeError(f"{sdist.name} holds no {'/'.join(TASKS_MEMBER_DIR)}/*/task.json")
        (staging / _COMPLETE_MARKER).write_text(
            json.dumps({"source": BIGBENCH_REQUIREMENT, "task_files": count})
        )
        if target.exists():  # an interrupted or foreign directory: ours replaces it
            shutil.rmtree(target)
        staging.rename(target)
    log.info(
        "cached %d BIG-bench task files in %s (%.0f s)", count, target, time.perf_counter() - start
    )
    return target


def _download_sdist(dest: Path, *, progress: bool) -> Path:
    python_path = _pip_for_sdist_download(dest.parent / "pip", progress=progress)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-build-isolation",
        "--require-hashes",
        "-r",
        str(_hashed(dest.parent / "bigbench.txt", BIGBENCH_REQUIREMENT, BIGBENCH_SDIST_SHA256)),
        "-d",
        str(dest),
        *_quiet_flags(progress),
    ]
    log.info("downloading the %s sdist: %s", BIGBENCH_REQUIREMENT, " ".join(command))
    env = {**os.environ, "PYTHONPATH": python_path} if python_path else None
    result = subprocess.run(command, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip download of {BIGBENCH_REQUIREMENT} failed (exit {result.returncode}): it "
            "needs a reachable package index and the `wheel` package (pip install wheel), and "
            f"refuses a file whose sha256 is not {BIGBENCH_SDIST_SHA256} (pip's message above)"
        )
    archives = sorted(dest.glob("bigbench-*.tar.gz"))
    if len(archives) != 1:
        raise RuntimeError(f"expected one bigbench-*.tar.gz in {dest}, found {archives}")
    return archives[0]


def _pip_for_sdist_download(target: Path, *, progress: bool) -> str | None:
    """A PYTHONPATH holding a pip that can download the bigbench sdist, or None for ours.

    pip 26 refuses PyPI distributions whose metadata declares a direct URL dependency, and
    bigbench 1.0.0 declares one (bleurt), even with `--no-deps`. An older pip, installed
    into a scratch folder for this one download, still fetches it.
    """
    major = int(importlib.metadata.version("pip").split(".")[0])
    if major < 26:
        return None
    log.info(
        "pip %d cannot download %s; installing %s into %s for it",
        major,
        BIGBENCH_REQUIREMENT,
        LEGACY_PIP,
        target,
    )
    requirements = _hashed(target.parent / "legacy-pip.txt", LEGACY_PIP, LEGACY_PIP_SHA256)
    command = [
        sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes",
        "--target", str(target), "-r", str(requirements),
    ]  # fmt: skip
    result = subprocess.run([*command, *_quiet_flags(progress)], check=False)
    if result.returncode != 0:
        raise RuntimeError(f"could not install {LEGACY_PIP} to download {BIGBENCH_REQUIREMENT}")
    return str(target)


def _hashed(path: Path, requirement: str, sha256: str) -> Path:
    """A one-line requirements file pinning `requirement` to the file with this sha256 (pip
    checks a `--hash` only in a requirements file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    return path


def _quiet_flags(progress: bool) -> list[str]:
    return [] if progress else ["--progress-bar", "off", "-q"]


def _extract_task_files(sdist: Path, dest: Path, *, progress: bool) -> int:
    """Copy every `bigbench/benchmark_tasks/**/task.json` member into `dest`, keeping the
    path below `benchmark_tasks`. Members are written by hand, never with `extractall`,
    and any path that could escape `dest` is rejected."""
    dest.mkdir(parents=True)
    count = 0
    log.info("extracting task files from %s", sdist.name)
    with tarfile.open(sdist, "r:gz") as archive:
        for member in tqdm(archive, desc="scanning sdist", unit=" files", disable=not progress):
            relative = _task_member_path(member.name)
            if relative is None or not member.isfile():
                continue
            out = dest.joinpath(*relative.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            if source is None:
                continue
            with source, out.open("wb") as sink:
                shutil.copyfileobj(source, sink)
            count += 1
    return count


def _task_member_path(name: str) -> PurePosixPath | None:
    """The member's path below `bigbench/benchmark_tasks/` if it is a task file, else None."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise RuntimeError(f"unsafe path in the bigbench sdist: {name!r}")
    parts = path.parts
    for i in range(len(parts) - 1):
        if parts[i : i + 2] == TASKS_MEMBER_DIR:
            below = parts[i + 2 :]
            if len(below) >= 2 and below[-1] == TASK_FILE:
                return PurePosixPath(*below)
            return None
    return None


@dataclass(frozen=True)
class TaskSplit:
    """A BIG-bench task as examples: a seeded evaluation split and the training pool."""

    name: str
    evaluation: list[Example]
    training: list[Example]
    task_prefix: str = ""
    input_prefix: str = DEFAULT_INPUT_PREFIX
    output_prefix: str = DEFAULT_OUTPUT_PREFIX
    dropped: int = field(default=0)  # examples without a positively scored choice, etc.


def load_bigbench_task(
    name_or_path: str | Path,
    *,
    n_eval: int,
    seed: int = 0,
    tasks_dir: Path | None = None,
) -> TaskSplit:
    """Load a multiple-choice BIG-bench task and split it deterministically.

    `name_or_path` is a task name (`"hyperbaton"`, or `"parent/subtask"`) looked up in
    `tasks_dir` (default: the fetched cache), or a path to a `task.json` or its directory.
    Prompt = task_prefix + example_input_prefix + input + example_output_prefix; choices
    are the keys of `target_scores`; the answer is the highest-scored choice (score > 0).
    After `random.Random(seed).shuffle`, the first `n_eval` examples are the evaluation
    split and the rest the training pool.
    """
    if n_eval < 0:
        raise ValueError(f"n_eval must be >= 0, got {n_eval}")
    task_file, name = _resolve_task_file(name_or_path, tasks_dir)
    try:
        task = json.loads(task_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{task_file}: not valid JSON ({err})") from err
    if not isinstance(task, dict):
        raise ValueError(f"{task_file}: expected a JSON object, got {type(task).__name__}")

    task_prefix = _string_field(task, "task_prefix", "", task_file)
    input_prefix = _string_field(task, "example_input_prefix", DEFAULT_INPUT_PREFIX, task_file)
    output_prefix = _string_field(task, "example_output_prefix", DEFAULT_OUTPUT_PREFIX, task_file)
    raw_examples = task.get("examples", [])
    if not isinstance(raw_examples, list):
        raise ValueError(f"{task_file}: 'examples' must be a list")

    examples: list[Example] = []
    for index, raw in enumerate(raw_examples):
        example = _multiple_choice_example(raw, index, task_file, task_prefix, input_prefix)
        if example is not None:
            examples.append(
                Example(prompt=example[0] + output_prefix, choices=example[1], answer=example[2])
            )
    if not examples:
        subtasks = sorted(p.parent.name for p in task_file.parent.glob(f"*/{TASK_FILE}"))
        hint = f"; it has subtasks: {', '.join(subtasks)}" if subtasks else ""
        raise ValueError(
            f"{task_file}: no multiple-choice examples (with target_scores and a choice "
            f"scored > 0) among {len(raw_examples)} examples{hint}"
        )
    dropped = len(raw_examples) - len(examples)
    if dropped:
        log.info("%s: dropped %d examples that are not multiple choice", name, dropped)
    if n_eval > len(examples):
        log.warning("%s: n_eval=%d but only %d examples", name, n_eval, len(examples))

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    return TaskSplit(
        name=name,
        evaluation=shuffled[:n_eval],
        training=shuffled[n_eval:],
        task_prefix=task_prefix,
        input_prefix=input_prefix,
        output_prefix=output_prefix,
        dropped=dropped,
    )


def _resolve_task_file(name_or_path: str | Path, tasks_dir: Path | None) -> tuple[Path, str]:
    path = Path(name_or_path)
    if path.is_file():
        return path, path.parent.name
    if (path / TASK_FILE).is_file():
        return path / TASK_FILE, path.name
    name = str(name_or_path).strip("/")
    root = Path(tasks_dir) if tasks_dir is not None else fetch_bigbench()
    candidate = root / name / TASK_FILE
    if candidate.is_file():
        return candidate, name
    known = available_tasks(root)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    suggestion = f"; did you mean: {', '.join(close)}?" if close else ""
    raise FileNotFoundError(
        f"no BIG-bench task {name!r}: {candidate} does not exist "
        f"({len(known)} tasks in {root}){suggestion}"
    )


def resolve_task_name(task: str, tasks_dir: Path | None = None) -> Path:
    """The `task.json` of a task *name* (never a path) inside `tasks_dir`.

    For names that come from other people (evaluation jobs): the name must follow
    `protocol.tasks.check_task_name` before any path is built, and the file, symlinks
    resolved, must lie inside the tasks directory. Raises `TaskNameError`, whose message
    names the task but no path of this machine.
    """
    check_task_name(task)
    root = Path(tasks_dir) if tasks_dir is not None else fetch_bigbench()
    found = find_task_file(root, task)
    if found is not None:
        return found
    known = available_tasks(root)
    close = difflib.get_close_matches(task, known, n=5, cutoff=0.6)
    suggestion = f"; did you mean: {', '.join(close)}?" if close else ""
    raise TaskNameError(
        task, f"no BIG-bench task {task!r} in the tasks directory ({len(known)} tasks){suggestion}"
    )


def available_tasks(tasks_dir: Path | None = None) -> list[str]:
    """Names of every task (and `parent/subtask`) with a task.json under `tasks_dir`."""
    root = Path(tasks_dir) if tasks_dir is not None else fetch_bigbench()
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob(TASK_FILE))


def _string_field(task: dict[str, Any], key: str, default: str, task_file: Path) -> str:
    value = task.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{task_file}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _multiple_choice_example(
    raw: object, index: int, task_file: Path, task_prefix: str, input_prefix: str
) -> tuple[str, tuple[str, ...], int] | None:
    """(prompt without output prefix, choices, answer), or None for a non-MC example."""
    if not isinstance(raw, dict):
        raise ValueError(f"{task_file}: examples[{index}] must be an object")
    scores = raw.get("target_scores")
    if scores is None:
        return None
    if not isinstance(scores, dict) or not all(
        isinstance(s, int | float) and not isinstance(s, bool) for s in scores.values()
    ):
        raise ValueError(
            f"{task_file}: examples[{index}].target_scores must map choices to numbers"
        )
    if len(scores) < 2 or max(scores.values()) <= 0:
        return None
    text = raw.get("input")
    if not isinstance(text, str):
        raise ValueError(f"{task_file}: examples[{index}].input must be a string")
    choices = tuple(scores)
    best = max(scores.values())
    answer = next(i for i, c in enumerate(choices) if scores[c] == best)
    return task_prefix + input_prefix + text, choices, answer


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False for a string no file system takes as a name (a long
    comma-separated task list is longer than a file name may be)."""
    try:
        return path.is_file()
    except OSError:
        return False


def load_task_list(path_or_csv: str | Path) -> list[str]:
    """Task names from a file (one per line, `#` starts a comment) or a comma-separated
    string. Order is kept; repeats are dropped."""
    path = Path(path_or_csv)
    is_file = _is_file(path)
    if not is_file and path.suffix in {".txt", ".lst", ".list"}:
        raise FileNotFoundError(f"task list file {path} does not exist")
    if is_file:
        lines = path.read_text(encoding="utf-8").splitlines()
        names = [line.split("#", 1)[0].strip() for line in lines]
        source = str(path)
    else:
        names = [part.strip() for part in str(path_or_csv).split(",")]
        source = repr(str(path_or_csv))
    tasks = list(dict.fromkeys(n for n in names if n))
    if not tasks:
        raise ValueError(f"no task names in {source} (expected a file or 'task_a,task_b')")
    return tasks
