"""The task names of a new evaluation, checked before the job is queued.

The worker builds paths from these names, and the names end up on public pages, so every
name must follow `protocol.tasks` (the worker checks again); where the coordinator knows
the workers' tasks directory (`PHATGOOSE_TASKS_DIR`), each must also name a task there.
Without that list, only plain names are accepted: a `parent/subtask` name needs it.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.core.errors import Unprocessable
from coordinator.evaluations.schemas import EvaluationSpec
from protocol.tasks import (
    TASK_NAME_EXPECTED,
    TaskNameError,
    check_task_name,
    find_task_file,
    is_subtask,
)


class InvalidTask(Unprocessable):
    error = "invalid_task"
    check = "task_name"


def check_requested_tasks(request: EvaluationSpec, tasks_dir: Path | None) -> None:
    """Raises `InvalidTask` (422) naming the first task that is not a task name, or not a
    task of `tasks_dir` when it is known."""
    for task in request.tasks:
        try:
            check_task_name(task)
            found = find_task_file(tasks_dir, task) if tasks_dir is not None else None
        except TaskNameError as error:
            raise _invalid(task, str(error), TASK_NAME_EXPECTED) from None
        if tasks_dir is not None and found is None:
            raise _invalid(
                task,
                f"no task {task!r} in the workers' tasks directory",
                "a task that has a task.json in the tasks directory (PHATGOOSE_TASKS_DIR)",
            )
        if tasks_dir is None and is_subtask(task):
            raise _invalid(
                task,
                f"{task!r}: a parent/subtask name needs the coordinator to know the task list",
                "a plain task name, or set PHATGOOSE_TASKS_DIR to the workers' tasks directory",
            )


def _invalid(task: str, message: str, expected: str) -> InvalidTask:
    return InvalidTask(message, expected=expected, extra={"task": task})
