"""`phatgoose demo` in a tiny configuration: a tiny model directory and tiny BIG-bench-style
task files written here; the real coordinator, SuperLink, SuperNodes and `flwr run`."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from app.demo import DemoPlan, run_demo
from app.federation import free_port
from coordinator.core.app import open_database
from coordinator.core.config import Settings
from coordinator.experts.service import list_versions
from coordinator.leaderboard.service import leaderboard
from protocol.flower import TrainingRequest
from tests.client.helpers import save_tiny_base

# Flower's SuperLink and Ray listen on their default ports too: under `pytest -n`, the tests
# that start them run one at a time, on one worker (`--dist loadgroup`).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower")]

TINY_PLAN = DemoPlan(
    held_in=("tiny_colors", "tiny_numbers"),
    held_out=("tiny_animals",),
    n_eval=4,
    training=TrainingRequest(
        max_examples=16,
        lora_rank=2,
        lora_alpha=4.0,
        lora_steps=3,
        gate_steps=2,
        batch_size=4,
        max_length=48,
        learning_rate=0.01,
        gate_learning_rate=0.01,
        average_activation=False,
    ),
)


def write_task(tasks_dir: Path, name: str, words: list[str], count: int = 24) -> None:
    """A multiple-choice task in BIG-bench's task.json format."""
    rng = random.Random(name)
    examples = []
    for i in range(count):
        word = rng.choice(words)
        examples.append(
            {
                "input": f"Which word is {word}? ({i})",
                "target_scores": {w: int(w == word) for w in words},
            }
        )
    (tasks_dir / name).mkdir(parents=True)
    (tasks_dir / name / "task.json").write_text(json.dumps({"name": name, "examples": examples}))


def test_the_demo_catalogues_every_contributors_expert_then_reuses_them(tmp_path, capsys):
    base_dir = save_tiny_base(tmp_path / "tiny-base")
    tasks_dir = tmp_path / "tasks"
    write_task(tasks_dir, "tiny_colors", ["red", "green", "blue"])
    write_task(tasks_dir, "tiny_numbers", ["one", "two", "three"])
    write_task(tasks_dir, "tiny_animals", ["cat", "dog"])
    data_dir = tmp_path / "demo"
    kwargs = dict(data_dir=data_dir, base=str(base_dir), tasks_dir=tasks_dir, port=free_port())

    first = run_demo(TINY_PLAN, **kwargs)
    second = run_demo(TINY_PLAN, **kwargs)

    assert (first, second) == (0, 0)
    output = capsys.readouterr().err
    # The round's progress, per contributor, as lines (the output is not a terminal).
    assert re.search(r"\] tiny-colors: catalogued as demo-\d+/tiny-colors@1", output)
    assert re.search(r"\] tiny-numbers: catalogued as demo-\d+/tiny-numbers@1", output)
    # Each expert on its own task against the base, on both runs.
    assert output.count("each expert alone on its own task") == 2
    assert output.count("of 2 expert(s) beat the base model on their own task") == 2
    # Each node published under its own namespace, `demo-<node id>`.
    assert re.search(r"reusing demo-\d+/tiny-colors@1 from the catalog", output)
    assert re.search(r"reusing demo-\d+/tiny-numbers@1 from the catalog", output)
    engine, sessions = open_database(Settings(data_dir=data_dir / "coordinator"))
    with sessions() as session:
        board = leaderboard(session)
        versions = list_versions(session).items
        assert sorted((v.expert.name, v.number, v.channel) for v in versions) == [
            ("tiny-colors", 1, "flower"),
            ("tiny-numbers", 1, "flower"),
        ]
        assert all(re.fullmatch(r"demo-\d+", v.expert.namespace) for v in versions)
        # Each contributor sampled 16 of its task's 20 training examples (24 minus the 4
        # evaluation ones) and held 2 of them out for validation.
        assert [v.manifest["training"]["examples"] for v in versions] == [14, 14]
    engine.dispose()
    assert "every release was already evaluated on these tasks" in output
    assert [(row.method, sorted(row.scores)) for row in board.releases] == [
        (method, ["tiny_animals", "tiny_colors", "tiny_numbers"])
        for method in ("phatgoose", "merged", "base")
    ]
    assert all(cell.n == 4 for row in board.releases for cell in row.scores.values())
    assert all(set(row.group_means) == {"held_in", "held_out"} for row in board.releases)
    # The contributors' private data stayed in their own files.
    private = data_dir / "contributors" / "tiny-colors" / "train.jsonl"
    assert len(private.read_text().splitlines()) == 20
