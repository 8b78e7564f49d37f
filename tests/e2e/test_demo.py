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
from coordinator.channels.service import get_channel, history_page
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
    later=("tiny_shapes",),
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


def test_the_demo_catalogues_experts_then_a_later_one_joins_and_the_channel_follows(
    tmp_path, capsys
):
    base_dir = save_tiny_base(tmp_path / "tiny-base")
    tasks_dir = tmp_path / "tasks"
    write_task(tasks_dir, "tiny_colors", ["red", "green", "blue"])
    write_task(tasks_dir, "tiny_numbers", ["one", "two", "three"])
    write_task(tasks_dir, "tiny_shapes", ["circle", "square"])
    write_task(tasks_dir, "tiny_animals", ["cat", "dog"])
    data_dir = tmp_path / "demo"
    kwargs = dict(data_dir=data_dir, base=str(base_dir), tasks_dir=tasks_dir, port=free_port())

    def output() -> str:
        # One line: titles wrap, and a table too wide for the terminal is printed as blocks.
        return " ".join(capsys.readouterr().err.split())

    first = run_demo(TINY_PLAN, **kwargs)
    first_output = output()
    second = run_demo(TINY_PLAN, **kwargs)
    second_output = output()
    third = run_demo(TINY_PLAN, **kwargs)
    third_output = output()

    assert (first, second, third) == (0, 0, 0)
    # First run: the held-in contributors train (progress per contributor, as lines: the
    # output is not a terminal), the later one waits; the channel is created and builds
    # its first release.
    assert re.search(r"\] tiny-colors: catalogued as demo-\d+/tiny-colors@1", first_output)
    assert re.search(r"\] tiny-numbers: catalogued as demo-\d+/tiny-numbers@1", first_output)
    assert "1 later contributor(s), one joining per run" in first_output
    assert "release channel demo/latest created: phatgoose, k=2" in first_output
    assert "channel demo/latest advanced to release #1 (history entry 1" in first_output
    assert "release #1 is the channel's first" in first_output
    assert first_output.count("of 2 expert(s) beat the base model on their own task") == 1
    # Second run: the others are reused and the later contributor joins with one expert;
    # the channel advances and the diff to its first release is printed.
    assert re.search(r"reusing demo-\d+/tiny-colors@1 from the catalog", second_output)
    assert re.search(r"reusing demo-\d+/tiny-numbers@1 from the catalog", second_output)
    assert "a new contributor joins: tiny-shapes" in second_output
    assert re.search(r"\] tiny-shapes: catalogued as demo-\d+/tiny-shapes@1", second_output)
    assert "tiny-colors: catalogued" not in second_output
    assert "of 3 expert(s) beat the base model on their own task" in second_output
    advanced = re.search(r"channel demo/latest advanced to release #(\d+)", second_output)
    assert advanced is not None
    new = int(advanced.group(1))
    assert f"release #{new} against #1, its previous release" in second_output
    assert re.search(r"tiny-shapes (│ |change: )added", second_output)  # a table or blocks
    assert "held-in mean" in second_output and "routing shift" in second_output
    assert f"/ui/releases/{new} (the channel's release and its diff)" in second_output
    assert "/ui/channels/demo/latest" in second_output
    # Third run: no one left to join, nothing trained, the channel stays.
    assert "nothing new to add" in third_output
    assert "catalogued as" not in third_output
    assert f"channel demo/latest unchanged at release #{new}" in third_output
    assert "every release was already evaluated on these tasks" in third_output

    engine, sessions = open_database(Settings(data_dir=data_dir / "coordinator"))
    with sessions() as session:
        board = leaderboard(session)
        versions = list_versions(session).items
        assert sorted((v.expert.name, v.number, v.channel) for v in versions) == [
            ("tiny-colors", 1, "flower"),
            ("tiny-numbers", 1, "flower"),
            ("tiny-shapes", 1, "flower"),
        ]
        assert all(re.fullmatch(r"demo-\d+", v.expert.namespace) for v in versions)
        # Each contributor sampled 16 of its task's 20 training examples (24 minus the 4
        # evaluation ones) and held 2 of them out for validation.
        assert [v.manifest["training"]["examples"] for v in versions] == [14, 14, 14]
        channel = get_channel(session, "demo", "latest")
        assert channel.release is not None and channel.release.number == new
        assert sorted(e["name"] for e in channel.release.manifest["experts"]) == [
            "tiny-colors",
            "tiny-numbers",
            "tiny-shapes",
        ]
        history = [number for _, number in history_page(session, channel).items]
        assert sorted(history) == [1, new]
    engine.dispose()
    # Every release (the channel's two included) was scored on every task, the later one's
    # from the first run on, so that the channel's releases compare on the same examples.
    tasks = ["tiny_animals", "tiny_colors", "tiny_numbers", "tiny_shapes"]
    assert sorted(row.method for row in board.releases) == [
        "base",
        "merged",
        "merged",
        "phatgoose",
        "phatgoose",
    ]
    assert all(sorted(row.scores) == tasks for row in board.releases)
    assert all(cell.n == 4 for row in board.releases for cell in row.scores.values())
    assert all(set(row.group_means) == {"held_in", "held_out"} for row in board.releases)
    # The contributors' private data stayed in their own files.
    private = data_dir / "contributors" / "tiny-colors" / "train.jsonl"
    assert len(private.read_text().splitlines()) == 20
