"""The evaluation worker end to end: it scores a release on tiny task files, stores what
the library computes directly, survives a crash of another worker (SIGKILL mid-job) and
never shares a job with a concurrent worker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest

from coordinator.core.db import utcnow
from coordinator.evaluations import service as evaluations
from coordinator.worker import (
    DatabaseBackend,
    Worker,
    WorkerOptions,
    evaluator_version,
    routing_summary,
)
from phatgoose.bigbench import load_bigbench_task
from phatgoose.evaluation import evaluate_task
from phatgoose.expert import Expert
from phatgoose.models import load_base_model
from phatgoose.routing import build_routed_model, capture_routing, routing_state
from tests.coordinator.release_helpers import WORKER_TASKS, create_release, publish

TASKS = WORKER_TASKS  # the tasks of the `tasks_dir` fixture
EXAMPLES = 6


@pytest.fixture
def experts(client, alice, bob, tiny_base, tmp_path):
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0)
    publish(client, bob, tiny_base, tmp_path / "b", "bob/b", seed=1)
    return [Expert.load(tmp_path / "a"), Expert.load(tmp_path / "b")]


def _options(base_dir, tasks_dir, **kwargs) -> WorkerOptions:
    return WorkerOptions(
        base_models={"tiny": str(base_dir)},
        tasks_dir=tasks_dir,
        poll_seconds=0.05,
        **kwargs,
    )


def _worker(app, options) -> Worker:
    return Worker(DatabaseBackend(app.state.sessionmaker, app.state.blobs), options)


def _queue(client, maintainer, release=1, tasks=TASKS, **extra):
    body = {"release": release, "tasks": list(tasks), "examples_per_task": EXAMPLES, **extra}
    response = client.post("/api/v1/evaluations", headers=maintainer, json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _direct(base_dir, tasks_dir, experts, task, method="phatgoose", top_k=2, precision="auto"):
    """What the worker should store: the library's own evaluation of the same model."""
    model, tokenizer = load_base_model(str(base_dir))
    for expert, name in zip(experts, ("alice/a", "bob/b"), strict=True):
        expert.manifest = expert.manifest.model_copy(update={"name": name})
    build_routed_model(model, experts, method=method, top_k=top_k)
    split = load_bigbench_task(task, n_eval=EXAMPLES, seed=0, tasks_dir=tasks_dir)
    with capture_routing(model) as stats:
        result = evaluate_task(
            model, tokenizer, split.evaluation, task=task, progress=False, precision=precision
        )
    return result, routing_summary(stats, method)


def test_worker_stores_what_the_library_computes(
    app, client, maintainer, experts, base_dir, tasks_dir
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job_id = _queue(client, maintainer)
    assert _worker(app, _options(base_dir, tasks_dir)).run(once=True) == 1

    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert (body["state"], body["attempts"], body["error"]) == ("done", 1, None)
    assert [r["task"] for r in body["results"]] == list(TASKS)
    for stored, task in zip(body["results"], TASKS, strict=True):
        result, routing = _direct(base_dir, tasks_dir, experts, task)
        assert (stored["accuracy"], stored["stderr"], stored["n"]) == (
            result.accuracy,
            result.stderr,
            EXAMPLES,
        )
        assert stored["routing_stats"] == routing
        assert stored["evaluator_version"] == evaluator_version()
        assert stored["seconds"] > 0
        assert stored["precision"] == "float32"  # auto, pinned to float32 for the suite


def test_worker_stores_each_example_s_answer_and_whether_it_was_right(
    app, client, maintainer, experts, base_dir, tasks_dir
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job_id = _queue(client, maintainer)
    assert _worker(app, _options(base_dir, tasks_dir)).run(once=True) == 1
    for task in TASKS:
        result, _ = _direct(base_dir, tasks_dir, experts, task)
        split = load_bigbench_task(task, n_eval=EXAMPLES, seed=0, tasks_dir=tasks_dir)
        stored = client.get(f"/api/v1/evaluations/{job_id}/outcomes/{task}").json()
        assert stored["predictions"] == list(result.predictions)
        assert stored["correct"] == list(result.correct)
        assert stored["choices"] == [len(example.choices) for example in split.evaluation]
        assert sum(stored["correct"]) == round(result.accuracy * EXAMPLES)


@pytest.mark.parametrize(("method", "top_k"), [("phatgoose_example", 1), ("smear", None)])
def test_a_prompt_level_release_is_scored_and_shown_as_the_library_routes_it(
    app, client, maintainer, experts, base_dir, tasks_dir, method, top_k
):
    """Per-example PHATGOOSE and SMEAR-style merging, from the API to the release page."""
    body = create_release(
        client, maintainer, method=method, experts=["alice/a", "bob/b"], top_k=top_k
    )
    assert (body["method"], body["top_k"]) == (method, top_k)
    job_id = _queue(client, maintainer)
    assert _worker(app, _options(base_dir, tasks_dir)).run(once=True) == 1
    stored = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert stored["state"] == "done", stored["error"]
    for result, task in zip(stored["results"], TASKS, strict=True):
        direct, routing = _direct(base_dir, tasks_dir, experts, task, method, top_k or 1)
        assert (result["accuracy"], result["routing_stats"]) == (direct.accuracy, routing)
        assert routing is not None and sum(routing["selections"]) > 0
    html = client.get("/ui/releases/1").text
    sources = re.findall(r'<img class="heatmap" src="([^"]+)"', html)
    assert len(sources) == len(TASKS)
    assert all(client.get(source).status_code == 200 for source in sources)


def test_a_worker_scoring_in_bfloat16_says_so_in_every_result(
    app, client, maintainer, experts, base_dir, tasks_dir
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job_id = _queue(client, maintainer)
    options = _options(base_dir, tasks_dir, precision="bfloat16")
    assert _worker(app, options).run(once=True) == 1
    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert [r["precision"] for r in body["results"]] == ["bfloat16"] * len(TASKS)
    for stored, task in zip(body["results"], TASKS, strict=True):
        result, _ = _direct(base_dir, tasks_dir, experts, task, precision="bfloat16")
        assert (stored["accuracy"], result.precision) == (result.accuracy, "bfloat16")
    scores = client.get("/api/v1/releases/1").json()["scores"]["tasks"]
    assert {score["precision"] for score in scores.values()} == {"bfloat16"}


def test_routing_stats_are_experts_by_layers_frequencies(
    app, client, maintainer, experts, base_dir, tasks_dir
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job_id = _queue(client, maintainer, tasks=["parity"])
    _worker(app, _options(base_dir, tasks_dir)).run(once=True)
    stats = client.get(f"/api/v1/evaluations/{job_id}").json()["results"][0]["routing_stats"]
    assert (stats["format"], stats["method"], stats["top_k"]) == (1, "phatgoose", 2)
    assert stats["experts"] == ["alice/a", "bob/b"]
    assert stats["layers"] == ["model.layers.0", "model.layers.1"]
    assert len(stats["frequencies"]) == 2 and all(len(row) == 2 for row in stats["frequencies"])
    for layer in range(2):  # top-2 of 2 experts: every token picks both, half each
        assert [row[layer] for row in stats["frequencies"]] == [0.5, 0.5]
    assert stats["overall"] == [0.5, 0.5]
    assert stats["selections"][0] == stats["selections"][1] > 0


def test_a_base_release_has_no_routing_stats(app, client, maintainer, base_dir, tasks_dir):
    create_release(client, maintainer, method="base", base_model="tiny")
    job_id = _queue(client, maintainer, tasks=["sums"])
    _worker(app, _options(base_dir, tasks_dir)).run(once=True)
    (result,) = client.get(f"/api/v1/evaluations/{job_id}").json()["results"]
    model, tokenizer = load_base_model(str(base_dir))
    split = load_bigbench_task("sums", n_eval=EXAMPLES, seed=0, tasks_dir=tasks_dir)
    direct = evaluate_task(model, tokenizer, split.evaluation, task="sums", progress=False)
    assert (result["accuracy"], result["routing_stats"]) == (direct.accuracy, None)


class _ParamsSeen(Worker):
    """A worker that notes the method parameters each model it loads was routed with."""

    seen: list[dict[str, object]]

    def _load(self, directory, manifest, **kwargs):
        model, tokenizer = super()._load(directory, manifest, **kwargs)
        self.seen = [*getattr(self, "seen", []), dict(routing_state(model).params)]
        return model, tokenizer


def test_a_release_is_evaluated_with_its_method_params(
    app, client, maintainer, experts, base_dir, tasks_dir
):
    params = {"density": 0.5}
    create_release(client, maintainer, method="ties", experts=["alice/a", "bob/b"], params=params)
    job_id = _queue(client, maintainer, tasks=["sums"])
    worker = _ParamsSeen(
        DatabaseBackend(app.state.sessionmaker, app.state.blobs), _options(base_dir, tasks_dir)
    )
    assert worker.run(once=True) == 1
    assert worker.seen == [{"density": 0.5, "scale": 1.0}]
    (result,) = client.get(f"/api/v1/evaluations/{job_id}").json()["results"]
    model, tokenizer = load_base_model(str(base_dir))
    for expert, name in zip(experts, ("alice/a", "bob/b"), strict=True):
        expert.manifest = expert.manifest.model_copy(update={"name": name})
    build_routed_model(model, experts, method="ties", params=params)
    split = load_bigbench_task("sums", n_eval=EXAMPLES, seed=0, tasks_dir=tasks_dir)
    direct = evaluate_task(model, tokenizer, split.evaluation, task="sums", progress=False)
    assert (result["accuracy"], result["routing_stats"]) == (direct.accuracy, None)


def test_results_appear_on_the_leaderboard(app, client, maintainer, experts, base_dir, tasks_dir):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    _queue(client, maintainer, task_groups={"held_in": ["parity"], "held_out": ["sums"]})
    _worker(app, _options(base_dir, tasks_dir)).run(once=True)
    board = client.get("/leaderboard").json()
    (row,) = board["releases"]
    assert board["tasks"] == ["parity", "sums"]
    assert board["task_groups"] == {"parity": "held_in", "sums": "held_out"}
    parity, sums = row["scores"]["parity"]["accuracy"], row["scores"]["sums"]["accuracy"]
    assert row["mean_accuracy"] == pytest.approx((parity + sums) / 2)
    assert row["group_means"] == {"held_in": parity, "held_out": sums}
    release = client.get("/api/v1/releases/1").json()
    assert release["scores"]["tasks"]["parity"]["accuracy"] == parity
    assert release["scores"]["tasks"]["parity"]["routing_stats"]["experts"] == ["alice/a", "bob/b"]


def test_a_failing_job_fails_after_max_attempts(
    app, client, maintainer, experts, base_dir, tasks_dir
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job_id = _queue(client, maintainer, tasks=["parity", "missing_task"])
    ended = _worker(app, _options(base_dir, tasks_dir, max_attempts=2)).run(once=True)
    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert (ended, body["state"], body["attempts"]) == (1, "failed", 2)
    assert body["error"].startswith("UnknownTask: no BIG-bench task 'missing_task'")
    assert [r["task"] for r in body["results"]] == ["parity"]  # scored once, kept


def test_a_retried_job_resumes_after_the_stored_tasks(
    app, client, maintainer, experts, base_dir, tasks_dir
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job_id = _queue(client, maintainer)
    with app.state.sessionmaker() as session:
        evaluations.claim_job(session, "earlier", lease_seconds=60)
        score = evaluations.TaskScore("parity", 0.25, 0.1, EXAMPLES, "old", 1.0, None)
        evaluations.record_result(session, job_id, "earlier", score)
        evaluations.fail_attempt(session, job_id, "earlier", "interrupted")
    _worker(app, _options(base_dir, tasks_dir)).run(once=True)
    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert (body["state"], body["attempts"]) == ("done", 2)
    assert [(r["task"], r["evaluator_version"]) for r in body["results"]] == [
        ("parity", "old"),
        ("sums", evaluator_version()),
    ]


def test_a_worker_that_lost_its_lease_stores_nothing(
    app, client, maintainer, experts, base_dir, tasks_dir
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job_id = _queue(client, maintainer)
    slow = _worker(app, _options(base_dir, tasks_dir, worker_id="slow"))
    job = slow.claim()
    with app.state.sessionmaker() as session:  # its lease expires; another takes the job
        later = utcnow() + timedelta(hours=1)
        evaluations.claim_job(session, "thief", lease_seconds=60, now=later)
    assert slow.run_job(job) is False
    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert (body["state"], body["worker_id"], body["attempts"]) == ("running", "thief", 2)
    assert body["results"] == []


@pytest.mark.slow
def test_a_killed_worker_s_job_is_completed_once_by_another(
    app, client, maintainer, settings, experts, base_dir, tasks_dir
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job_id = _queue(client, maintainer)
    command = [
        sys.executable,
        "-c",
        "from coordinator.cli import app; app()",  # `phatgoose coordinator`, lighter import
        "worker",
        "--worker-id",
        "doomed",
        "--lease-seconds",
        "2",
        "--poll-seconds",
        "0.1",
        "--task-delay-seconds",
        "60",
        "--tasks-dir",
        str(tasks_dir),
        "--base-model",
        f"tiny={base_dir}",
        "--data-dir",
        str(settings.data_dir),
        "--database-url",
        settings.resolved_database_url,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PHATGOOSE_LOG_LEVEL": "WARNING"}
    doomed = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            with app.state.sessionmaker() as session:
                job = evaluations.get_job(session, job_id)
            if job.worker_id == "doomed" and job.heartbeat_at > job.started_at:
                break  # claimed and heartbeating: mid-job
            assert doomed.poll() is None, doomed.communicate()[0].decode()
            assert time.monotonic() < deadline, "the worker never claimed the job"
            time.sleep(0.1)
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
    assert (job.state, job.attempts) == ("running", 1)

    while True:  # the lease runs out (2 s after the last heartbeat)
        with app.state.sessionmaker() as session:
            if evaluations.get_job(session, job_id).lease_expires_at < utcnow():
                break
        time.sleep(0.1)
    rescuer = _worker(app, _options(base_dir, tasks_dir, worker_id="rescuer"))
    assert rescuer.run(once=True) == 1

    body = client.get(f"/api/v1/evaluations/{job_id}").json()
    assert (body["state"], body["attempts"], body["worker_id"]) == ("done", 2, "rescuer")
    assert sorted(r["task"] for r in body["results"]) == sorted(TASKS)


@pytest.mark.slow
def test_two_workers_never_run_the_same_job(app, client, maintainer, experts, base_dir, tasks_dir):
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    job_ids = [_queue(client, maintainer, tasks=["parity"]) for _ in range(4)]
    ended: dict[str, int] = {}

    def run(name: str) -> None:
        options = _options(base_dir, tasks_dir, worker_id=name, task_delay_seconds=0.2)
        ended[name] = _worker(app, options).run(once=True)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("w1", "w2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    jobs = [client.get(f"/api/v1/evaluations/{i}").json() for i in job_ids]
    assert [(j["state"], j["attempts"], len(j["results"])) for j in jobs] == [("done", 1, 1)] * 4
    assert ended["w1"] + ended["w2"] == 4
    assert {j["worker_id"] for j in jobs} == {"w1", "w2"}


def test_cli_worker_once_on_an_empty_queue_ends_no_job(settings, tasks_dir):
    from typer.testing import CliRunner

    from coordinator.cli import app as cli

    result = CliRunner().invoke(
        cli,
        [
            "worker",
            "--once",
            "--worker-id",
            "idle",
            "--tasks-dir",
            str(tasks_dir),
            "--data-dir",
            str(settings.data_dir),
            "--database-url",
            settings.resolved_database_url,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "worker idle" in result.output
    assert "0 job(s) ended" in result.output


def test_cli_worker_refuses_a_base_model_without_a_path(settings):
    from typer.testing import CliRunner

    from coordinator.cli import app as cli

    result = CliRunner().invoke(
        cli, ["worker", "--once", "--base-model", "tiny", "--data-dir", str(settings.data_dir)]
    )
    assert result.exit_code == 2
    assert "expected NAME=PATH, got 'tiny'" in result.output
