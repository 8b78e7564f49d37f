"""Evaluation task names are never paths, and failed jobs never show the worker's paths or
host (issue 14, item 11): refused at the API, refused again by the worker for a job row
that did not come through the API, and redacted in what the API and pages show."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import pytest
from sqlalchemy import select

from coordinator.base_models.service import register_base_model
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.models import EvaluationJob, JobState
from coordinator.evaluations.public_errors import public_error, redact
from coordinator.releases.models import Release
from coordinator.worker import DatabaseBackend, Worker, WorkerOptions, default_worker_id
from protocol.tasks import TaskNameError, check_task_name
from tests.coordinator.release_helpers import create_release, write_task

HOSTILE_NAMES = [
    "../x",
    "/etc/passwd",
    "a/b",
    "..",
    ".",
    "a/../../x",
    "~/x",
    "pa\x00rity",
    "parity\n",
    "\uff50arity",  # fullwidth p: NFKC would make it "parity"
    "parit\u0443",  # Cyrillic u
    "Parity",
    "a/b/c",
    "a\\b",
    "%2e%2e",
]


@pytest.fixture
def tasks_dir(tmp_path) -> Path:
    write_task(tmp_path / "tasks", "parity", examples=10)
    write_task(tmp_path / "tasks", "family/child", examples=10)
    return tmp_path / "tasks"


@pytest.fixture
def secret_task(tmp_path) -> Path:
    """A valid task file outside the tasks directory: reading it would let the job succeed."""
    write_task(tmp_path / "outside", "secret", examples=10)
    return tmp_path / "outside" / "secret"


def _queue(client, maintainer, tasks):
    body = {"release": 1, "tasks": tasks, "examples_per_task": 4}
    return client.post("/api/v1/evaluations", headers=maintainer, json=body)


# --- the API ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_task_names_are_refused_at_the_api_with_422_naming_the_task(
    client, maintainer, name
):
    create_release(client, maintainer, method="base", base_model="tiny")
    response = _queue(client, maintainer, ["parity", name])
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert (detail["error"], detail["check"], detail["task"]) == (
        "invalid_task",
        "task_name",
        name,
    )
    assert detail["expected"] and detail["message"]
    with client.app.state.sessionmaker() as session:
        assert evaluations.list_jobs(session) == []


def test_with_a_tasks_dir_the_api_accepts_only_its_tasks(
    make_app, settings, tiny_base, maintainer_for, tasks_dir, secret_task
):
    from fastapi.testclient import TestClient

    (tasks_dir / "link").symlink_to(secret_task, target_is_directory=True)
    app = make_app(settings.model_copy(update={"tasks_dir": tasks_dir}))
    with app.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    maintainer = maintainer_for(app)
    with TestClient(app) as client:
        create_release(client, maintainer, method="base", base_model="tiny")
        assert _queue(client, maintainer, ["parity", "family/child"]).status_code == 201
        for name, message in [
            ("missing", "no task 'missing' in the workers' tasks directory"),
            ("link", "no task 'link'"),  # resolves outside the tasks directory
            ("family/missing", "no task 'family/missing'"),
            ("../outside/secret", "not a task name"),
        ]:
            response = _queue(client, maintainer, [name])
            assert response.status_code == 422, (name, response.text)
            assert message in response.json()["detail"]["message"]
            assert response.json()["detail"]["task"] == name


@pytest.fixture
def maintainer_for():
    from coordinator.auth.models import Role
    from tests.coordinator.helpers import bearer_headers

    return lambda app: bearer_headers(app, "carol", Role.MAINTAINER)


def test_without_a_tasks_dir_a_subtask_name_is_refused(client, maintainer):
    create_release(client, maintainer, method="base", base_model="tiny")
    response = _queue(client, maintainer, ["family/child"])
    assert response.status_code == 422
    assert "PHATGOOSE_TASKS_DIR" in response.json()["detail"]["expected"]


@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES if n != "a/b"])  # a/b: a subtask form
def test_the_task_name_rule_refuses_hostile_names(name):
    with pytest.raises(TaskNameError, match="not a task name"):
        check_task_name(name)


@pytest.mark.parametrize("name", ["parity", "logical_deduction/three_objects", "a1_2"])
def test_the_task_name_rule_accepts_bigbench_names(name):
    assert check_task_name(name) == name


# --- the worker ------------------------------------------------------------------------


def _insert_job(app, tasks: list[str]) -> int:
    """A job row that never went through the API (another tool, an old row, SQL)."""
    with app.state.sessionmaker() as session:
        release_id = session.scalar(select(Release.id).where(Release.number == 1))
        job = EvaluationJob(
            release_id=release_id,
            spec={"tasks": tasks, "examples_per_task": 4, "seed": 0},
            state=JobState.QUEUED,
        )
        session.add(job)
        session.commit()
        return job.id


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every task file the library is asked to load, recorded (and still loaded)."""
    import phatgoose.bigbench as bigbench

    calls: list[str] = []
    real = bigbench.load_bigbench_task

    def spy(name_or_path, **kwargs):
        calls.append(str(name_or_path))
        return real(name_or_path, **kwargs)

    monkeypatch.setattr(bigbench, "load_bigbench_task", spy)
    return calls


def _worker(app, base_dir, tasks_dir) -> Worker:
    options = WorkerOptions(
        base_models={"tiny": str(base_dir)}, tasks_dir=tasks_dir, poll_seconds=0.05
    )
    return Worker(DatabaseBackend(app.state.sessionmaker, app.state.blobs), options)


@pytest.mark.parametrize("kind", ["relative", "absolute", "etc", "nul", "lookalike", "dots"])
def test_the_worker_refuses_a_hostile_task_name_in_a_job_row_without_reading_a_file(
    app, client, maintainer, base_dir, tasks_dir, secret_task, loads, kind
):
    name = {
        "relative": "../outside/secret",
        "absolute": str(secret_task),
        "etc": "/etc/passwd",
        "nul": "pa\x00rity",
        "lookalike": "\uff50arity",
        "dots": "..",
    }[kind]
    create_release(client, maintainer, method="base", base_model="tiny")
    job_id = _insert_job(app, ["parity", name])
    assert _worker(app, base_dir, tasks_dir).run(once=True) == 1

    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert (body["state"], body["attempts"], body["results"]) == ("failed", 1, [])
    assert body["error"].startswith("InvalidTaskName: not a task name")
    assert loads == []  # refused before any task file, even the valid one, was read
    assert str(secret_task) not in body["error"] and str(tasks_dir) not in body["error"]


def test_the_worker_refuses_a_task_that_resolves_outside_its_tasks_dir(
    app, client, maintainer, base_dir, tasks_dir, secret_task, loads
):
    (tasks_dir / "link").symlink_to(secret_task, target_is_directory=True)
    create_release(client, maintainer, method="base", base_model="tiny")
    job_id = _insert_job(app, ["link"])
    _worker(app, base_dir, tasks_dir).run(once=True)

    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert body["state"] in {"queued", "failed"} and body["results"] == []
    assert body["error"].startswith("UnknownTask: no BIG-bench task 'link' in the tasks directory")
    assert loads == []


# --- what a failed job shows -----------------------------------------------------------


def _mentions_host(text: str) -> bool:
    names = {socket.gethostname(), socket.getfqdn()} - {"localhost"}
    return any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text, re.I) for n in names)


def test_a_failing_job_shows_no_path_or_host_in_the_api_or_on_the_release_page(
    app, client, maintainer, base_dir, tasks_dir, monkeypatch, caplog
):
    host = socket.gethostname()
    leak = (
        f"[Errno 13] Permission denied: '/home/worker/.cache/x' on {host} via http://{host}:5432/db"
    )

    def broken(self, directory, manifest, **kwargs):
        raise PermissionError(leak)

    monkeypatch.setattr(Worker, "_load", broken)
    create_release(client, maintainer, method="base", base_model="tiny")
    job_id = _queue(client, maintainer, ["parity"]).json()["id"]
    with caplog.at_level(logging.ERROR, logger="coordinator.worker"):
        _worker(app, base_dir, tasks_dir).run(once=True)

    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    page = client.get("/ui/releases/1").text
    for shown in (body["error"], body["worker_id"] or "", page):
        assert "/home/worker" not in shown and str(tasks_dir) not in shown
        assert not _mentions_host(shown)
    assert body["error"].startswith("PermissionError: ")
    assert "PermissionError: " in page
    assert "/home/worker/.cache/x" in caplog.text  # the operator still sees everything


def test_the_api_redacts_errors_stored_before_the_rule(app, client, maintainer):
    create_release(client, maintainer, method="base", base_model="tiny")
    job_id = _insert_job(app, ["parity"])
    host = socket.gethostname()
    with app.state.sessionmaker() as session:
        job = session.get(EvaluationJob, job_id)
        job.state, job.worker_id = JobState.FAILED, f"{host}:1234:abcdef"
        job.error = f"FileNotFoundError: /srv/tasks/x/task.json does not exist on {host} (10.1.2.3)"
        session.commit()
    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert body["error"] == (
        "FileNotFoundError: <path> does not exist on <host> (<address>)"
        if host != "localhost"
        else "FileNotFoundError: <path> does not exist on localhost (<address>)"
    )
    assert not _mentions_host(body["worker_id"])
    page = client.get("/ui/releases/1").text
    assert "/srv/tasks" not in page and "10.1.2.3" not in page
    assert "FileNotFoundError: &lt;path&gt; does not exist" in page


def test_default_worker_ids_name_no_host():
    assert not _mentions_host(default_worker_id())


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("no file /srv/data/x.json", "no file <path>"),
        ("see ~/models and ~bob/x", "see <path> and <path>"),
        ("'C:\\Users\\bob\\x' failed", "'<path>' failed"),
        ("postgresql+psycopg://u:p@db.internal:5432/x down", "<url> down"),
        ("task 'family/child' of 'a/b'", "task 'family/child' of 'a/b'"),
        ("connect to 192.168.0.7 failed", "connect to <address> failed"),
    ],
)
def test_redact_strips_paths_urls_and_addresses(text, shown):
    assert redact(text) == shown


def test_only_public_job_errors_keep_their_message():
    assert public_error(OSError("/root/secret")) == (
        "OSError: the worker failed on this job (the details are in the worker's log)"
    )


@pytest.mark.parametrize("override", [False, True])
def test_a_job_queued_before_its_release_was_withdrawn_fails_at_once_unless_allowed(
    app, client, maintainer, base_dir, tasks_dir, loads, override
):
    create_release(client, maintainer, method="base", base_model="tiny")
    body = {"release": 1, "tasks": ["parity"], "examples_per_task": 4}
    job_id = client.post(
        "/api/v1/evaluations", headers=maintainer, json={**body, "allow_withdrawn": override}
    ).json()["id"]
    withdrawn = client.post(
        "/api/v1/releases/1/withdraw", headers=maintainer, json={"reason": "poisoned"}
    )
    assert withdrawn.status_code == 200, withdrawn.text
    _worker(app, base_dir, tasks_dir).run(once=True)

    job = client.get(f"/api/v1/evaluations/{job_id}").json()
    if override:
        assert job["state"] == "done"
    else:
        assert (job["state"], job["attempts"], loads) == ("failed", 1, [])
        assert job["error"].startswith("CuratedOut: release 1 is withdrawn (poisoned)")
