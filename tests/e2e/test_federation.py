"""A real Flower deployment on loopback: a SuperLink, three SuperNodes (one with a bad data
path) and `flwr run` of this project's app; the experts land in the coordinator's catalog."""

from __future__ import annotations

import pytest

from app.federation import Contributor, LocalFederation
from coordinator.base_models.service import register_base_model
from coordinator.core.app import open_database
from coordinator.core.config import Settings
from coordinator.experts.service import list_versions
from phatgoose.models import base_model_spec, load_base_model
from tests.client.helpers import save_tiny_base, write_private_data

# Flower's SuperLink and Ray listen on their default ports too: under `pytest -n`, the tests
# that start them run one at a time, on one worker (`--dist loadgroup`).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower")]


def test_two_supernodes_land_experts_and_a_failing_one_does_not_stop_the_round(tmp_path):
    base_dir = save_tiny_base(tmp_path / "tiny-base")
    settings = Settings(data_dir=tmp_path / "coordinator")
    engine, sessions = open_database(settings)
    with sessions() as session:
        register_base_model(
            session, base_model_spec(load_base_model(str(base_dir))[0], str(base_dir))
        )
    contributors = [
        Contributor("alice", write_private_data(tmp_path / "alice.jsonl", tag="a")),
        Contributor("bob", write_private_data(tmp_path / "bob.jsonl", tag="b")),
        Contributor("carol", tmp_path / "no-such-file.jsonl"),
    ]
    run_config = {
        "base-model": str(base_dir),
        "lora-steps": 3,
        "gate-steps": 2,
        "batch-size": 4,
        "max-length": 48,
        "learning-rate": 0.01,
        "coordinator-data-dir": str(settings.data_dir),
        "namespace": "flower",
        "min-nodes": 3,
        "node-wait-seconds": 60.0,
        "round-timeout-seconds": 300.0,
    }
    lines: list[str] = []

    with LocalFederation(tmp_path / "federation", contributors) as federation:
        code = federation.run(run_config, on_line=lines.append, timeout=400)

    output = "\n".join(lines)
    assert code == 0, output
    assert "2 registered, 0 rejected, 1 failed, 0 timed out" in output
    with sessions() as session:
        versions = list_versions(session).items
        # Each node publishes under its own namespace, `flower-<node id>`, as itself.
        assert sorted((v.expert.name, v.number, v.channel) for v in versions) == [
            ("alice", 1, "flower"),
            ("bob", 1, "flower"),
        ]
        namespaces = {v.expert.namespace for v in versions}
        assert len(namespaces) == 2 and all(n.startswith("flower-") for n in namespaces)
        assert all(v.uploaded_by == v.expert.namespace for v in versions)
        assert all(v.manifest["training"]["steps"] == 3 for v in versions)
        assert all(v.manifest["training"]["gate_steps"] == 2 for v in versions)
    engine.dispose()
