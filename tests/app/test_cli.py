"""The `phatgoose` command line mounts every package's commands, and `python -m app` is it."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from app.cli import app


def test_the_command_line_mounts_client_coordinator_bench_and_demo():
    assert sorted(group.name or "" for group in app.registered_groups) == [
        "bench",
        "client",
        "coordinator",
    ]
    assert [command.name for command in app.registered_commands] == ["demo"]


def test_the_demo_refuses_a_step_count_the_train_request_would_refuse():
    result = CliRunner().invoke(app, ["demo", "--steps", "-3"])

    assert result.exit_code == 2
    assert "'lora_steps' = -3" in result.output


def test_the_demo_refuses_a_task_in_two_groups_saying_which(tmp_path):
    result = CliRunner().invoke(
        app,
        ["demo", "--tasks", "navigate", "--later", "navigate", "--data-dir", str(tmp_path)],
    )

    assert result.exit_code == 2
    assert "'navigate' is in the plan's held_in and later tasks" in result.output
    assert not any(tmp_path.iterdir())  # refused before anything started


@pytest.mark.slow
def test_python_dash_m_app_is_the_same_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "app", "--help"], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    for command in ("client", "coordinator", "bench", "demo"):
        assert command in result.stdout
