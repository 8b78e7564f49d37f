"""Helpers for release, evaluation, worker and leaderboard tests: experts published through
the API, releases and jobs created through it, tiny BIG-bench task files, a saved base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.coordinator.helpers import TinyBase, upload
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_tokenizer

# The tasks the `tasks_dir` fixture (tests/coordinator/conftest.py) writes.
WORKER_TASKS = ("parity", "sums")


def publish(
    client: TestClient,
    headers: dict[str, str],
    tiny_base: TinyBase,
    directory: Path,
    name: str,
    *,
    seed: int = 0,
    rank: int = 4,
    target_modules: list[str] | None = None,
    with_average_activation: bool = False,
) -> dict[str, Any]:
    """Upload a random expert over the tiny base; return the version's JSON."""
    expert = random_expert(
        tiny_base.model,
        name=name,
        rank=rank,
        seed=seed,
        target_modules=target_modules,
        with_average_activation=with_average_activation,
    )
    expert.save(directory)
    response = upload(client, headers, directory)
    assert response.status_code == 201, response.text
    return response.json()


def create_release(client: TestClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = client.post("/api/v1/releases", headers=headers, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def write_task(tasks_dir: Path, name: str, examples: int, *, seed: int = 0) -> Path:
    """A BIG-bench style multiple-choice task.json with `examples` short examples."""
    rows = []
    for i in range(examples):
        a, b = (i * 7 + seed) % 10, (i * 3 + seed) % 10
        correct = "yes" if (a + b) % 2 == 0 else "no"
        rows.append(
            {
                "input": f"is {a} + {b} even?",
                "target_scores": {"yes": int(correct == "yes"), "no": int(correct == "no")},
            }
        )
    directory = tasks_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "task.json").write_text(json.dumps({"name": name, "examples": rows}))
    return directory / "task.json"


def save_base(tiny_base: TinyBase, directory: Path) -> Path:
    """The tiny llama and its tokenizer as a model directory load_base_model reads."""
    model: Any = tiny_base.model  # a transformers model, typed as its nn.Module base
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
