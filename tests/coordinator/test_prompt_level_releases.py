"""Releases of the prompt-level methods (per-example PHATGOOSE, SMEAR-style merging) go the
whole way: created through the API, evaluated by the worker exactly as the library scores
them, shown on the release page with their routing heatmaps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from coordinator.worker import Worker, WorkerOptions, routing_summary
from phatgoose.bigbench import load_bigbench_task
from phatgoose.evaluation import evaluate_task
from phatgoose.expert import Expert
from phatgoose.models import load_base_model
from phatgoose.routing import build_routed_model, capture_routing
from tests.coordinator.release_helpers import create_release, publish, save_base, write_task

TASKS = ("parity", "sums")
EXAMPLES = 6


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_base) -> Path:
    return save_base(tiny_base, tmp_path_factory.mktemp("base"))


@pytest.fixture
def tasks_dir(tmp_path) -> Path:
    for seed, task in enumerate(TASKS):
        write_task(tmp_path / "tasks", task, examples=10, seed=seed)
    return tmp_path / "tasks"


@pytest.fixture
def experts(client, alice, bob, tiny_base, tmp_path):
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0)
    publish(client, bob, tiny_base, tmp_path / "b", "bob/b", seed=1)
    return [Expert.load(tmp_path / "a"), Expert.load(tmp_path / "b")]


@pytest.mark.parametrize(("method", "top_k"), [("phatgoose_example", 1), ("smear", None)])
def test_a_prompt_level_release_is_scored_as_the_library_scores_it(
    app, client, maintainer, experts, base_dir, tasks_dir, method, top_k
):
    body = create_release(
        client, maintainer, method=method, experts=["alice/a", "bob/b"], top_k=top_k
    )
    assert (body["method"], body["top_k"]) == (method, top_k)
    response = client.post(
        "/api/v1/evaluations",
        headers=maintainer,
        json={"release": 1, "tasks": list(TASKS), "examples_per_task": EXAMPLES},
    )
    assert response.status_code == 201, response.text
    options = WorkerOptions(
        base_models={"tiny": str(base_dir)}, tasks_dir=tasks_dir, poll_seconds=0.05
    )
    assert Worker(app.state.sessionmaker, app.state.blobs, options).run(once=True) == 1

    stored = client.get(f"/api/v1/evaluations/{response.json()['id']}").json()
    assert stored["state"] == "done", stored["error"]
    for result, task in zip(stored["results"], TASKS, strict=True):
        model, tokenizer = load_base_model(str(base_dir))
        for expert, name in zip(experts, ("alice/a", "bob/b"), strict=True):
            expert.manifest = expert.manifest.model_copy(update={"name": name})
        build_routed_model(model, experts, method=method, top_k=top_k or 1)
        split = load_bigbench_task(task, n_eval=EXAMPLES, seed=0, tasks_dir=tasks_dir)
        with capture_routing(model) as stats:
            direct = evaluate_task(model, tokenizer, split.evaluation, task=task, progress=False)
        assert result["accuracy"] == direct.accuracy
        assert result["routing_stats"] == routing_summary(stats, method)
        # One decision per prompt and module, whatever the prompt's length.
        assert sum(result["routing_stats"]["selections"]) > 0

    html = client.get("/ui/releases/1").text
    assert method in html
    sources = re.findall(r'<img class="heatmap" src="([^"]+)"', html)
    assert len(sources) == len(TASKS)
    assert all(client.get(source).status_code == 200 for source in sources)
