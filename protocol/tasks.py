"""Evaluation task names: the one rule the coordinator's API and the worker's loader share.

A task name is what a maintainer types into `POST /api/v1/evaluations` and what the worker
joins to its tasks directory (`<tasks dir>/<name>/task.json`), so it must never be able to
name a path of its own: ASCII lowercase letters, digits and `_` only (BIG-bench's own
spelling), optionally one `parent/subtask`. No `.`, no leading `/`, no NUL, no look-alike
Unicode (a fullwidth `ｐ` is not `p`): the rule is checked on the raw string, never on a
normalised one.
"""

import re
from pathlib import Path

TASK_FILE = "task.json"

# One part of a name; BIG-bench's task and subtask directories are all of this form.
TASK_PART = r"[a-z0-9_]{1,100}"
TASK_NAME_PATTERN = rf"{TASK_PART}(?:/{TASK_PART})?"
_TASK_NAME = re.compile(TASK_NAME_PATTERN)
TASK_NAME_EXPECTED = (
    "lowercase ASCII letters, digits and '_' (at most 100), or 'parent/subtask' of two such parts"
)


class TaskNameError(ValueError):
    """A task name that does not follow the rule (or, at the worker, names no task file)."""

    def __init__(self, task: str, message: str) -> None:
        super().__init__(message)
        self.task = task


def check_task_name(task: str) -> str:
    """`task` unchanged when it follows the rule; raises `TaskNameError` naming it otherwise."""
    # fullmatch on the raw string: `$` would accept a trailing newline.
    if not isinstance(task, str) or _TASK_NAME.fullmatch(task) is None:
        raise TaskNameError(str(task), f"not a task name: {task!r} (expected {TASK_NAME_EXPECTED})")
    return task


def is_subtask(task: str) -> bool:
    """Whether a (checked) name is `parent/subtask`."""
    return "/" in task


def find_task_file(tasks_dir: Path, task: str) -> Path | None:
    """`<tasks_dir>/<task>/task.json` when `task` follows the rule and the file, symlinks
    resolved, lies inside `tasks_dir`; else None. Raises `TaskNameError` for a bad name,
    before any path is built from it."""
    check_task_name(task)
    root = Path(tasks_dir).resolve()
    candidate = (root / task / TASK_FILE).resolve()
    if candidate.is_relative_to(root) and candidate.is_file():
        return candidate
    return None
