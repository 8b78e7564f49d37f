"""The ClientApp's reply and the ServerApp's round, without a Flower runtime."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Error, Message

from client.flower_app import app as client_app
from client.flower_message import package_to_content
from coordinator.base_models.service import register_base_model
from coordinator.core.app import open_database
from coordinator.core.config import Settings
from coordinator.experts.service import list_versions
from coordinator.flower_server import (
    Rejected,
    coordinator_registrar,
    run_round,
    write_package_from_content,
)
from phatgoose.expert import Expert
from phatgoose.models import base_model_spec
from protocol.flower import RoundSettings, TrainingRequest
from tests.client.helpers import marker_hits, save_tiny_base, write_private_data
from tests.e2e.flower_helpers import node_context, record_bytes, serverapp_identity, train_message
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama

TINY_HYPER_PARAMETERS = {
    "lora-steps": 3,
    "gate-steps": 2,
    "batch-size": 4,
    "max-length": 48,
    "learning-rate": 0.01,
    "average-activation": True,
}


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def test_the_client_app_replies_with_a_package_and_never_the_training_text(tiny_base_dir, tmp_path):
    data = write_private_data(tmp_path / "private.jsonl")
    message = train_message({**TINY_HYPER_PARAMETERS, "base-model": str(tiny_base_dir)}, 11)
    context = node_context(11, {"data-path": str(data), "expert-name": "walrus"}, {})

    reply = client_app(message, context)

    assert not reply.has_error(), reply.error
    assert reply.metadata.reply_to_message_id == "m1"
    files = write_package_from_content(reply.content, tmp_path / "received")
    expert = Expert.load(tmp_path / "received")
    assert expert.name == "walrus"
    assert expert.manifest.training.steps == 3
    assert expert.manifest.training.gate_steps == 2
    assert sorted(files) == sorted(p.name for p in (tmp_path / "received").iterdir())
    assert marker_hits(data.read_bytes())
    assert marker_hits(record_bytes(reply.content)) == []
    assert marker_hits(record_bytes(message.content)) == []


def test_a_node_trains_a_private_expert_at_the_stricter_of_its_own_and_the_run_budgets(
    tiny_base_dir, tmp_path
):
    data = write_private_data(tmp_path / "private.jsonl")
    config = {**TINY_HYPER_PARAMETERS, "base-model": str(tiny_base_dir), "dp-epsilon": 8.0}
    message = train_message(config, 13)
    node = {"data-path": str(data), "expert-name": "owl", "dp-epsilon": "2"}

    reply = client_app(message, node_context(13, node, {}))

    assert not reply.has_error(), reply.error
    write_package_from_content(reply.content, tmp_path / "received")
    expert = Expert.load(tmp_path / "received")
    guarantee = expert.manifest.privacy
    assert guarantee is not None and guarantee.steps == 3 + 2
    assert 1.9 <= guarantee.epsilon <= 2.0  # the node's own budget, stricter than the run's
    assert not expert.manifest.has_average_activation  # asked for, but nothing privatises it
    assert marker_hits(record_bytes(reply.content)) == []


def test_a_node_without_data_fails_with_a_message_saying_how_to_start_it(tiny_base_dir):
    message = train_message({"base-model": str(tiny_base_dir)}, 12)
    context = node_context(12, {}, {})

    with pytest.raises(ValueError, match="start it with --node-config"):
        client_app(message, context)


class FakeGrid:
    """A grid whose nodes answer with prepared replies (or not at all)."""

    def __init__(self, answers: dict[int, object]) -> None:
        self.answers = answers
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.answers)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        for message in messages:
            self.sent.append(message)
            answer = self.answers[message.metadata.dst_node_id]
            if answer is None:
                continue  # times out
            # Message(content, reply_to=...) or Message(error, reply_to=...)
            replies.append(Message(answer, reply_to=_as_received(message)))
        return replies


def _as_received(message: Message) -> Message:
    return train_message(
        {}, message.metadata.dst_node_id, message_id=f"id{message.metadata.dst_node_id}"
    )


def test_the_round_registers_replies_and_reports_failures_rejections_and_timeouts(tmp_path):
    good = package_to_content(
        random_expert(tiny_llama(), name="good", rank=2, seed=0).save(tmp_path / "g")
    )
    bad = package_to_content(
        random_expert(tiny_llama(), name="bad", rank=2, seed=1).save(tmp_path / "b")
    )
    grid = FakeGrid({1: good, 2: Error(code=0, reason="data file missing"), 3: None, 4: bad})
    registered: list[str] = []

    def register(node, files):
        name = Expert.load(next(iter(files.values())).parent).name
        if name == "bad":
            raise Rejected("router.safetensors: gate is constant (check gate_std)")
        registered.append(name)
        return f"flower-{node}/{name}@1"

    with serverapp_identity():
        report = run_round(
            grid, TrainingRequest(lora_steps=5), register, node_wait_seconds=0, timeout_seconds=1
        )

    outcomes = {o.node_id: (o.status, o.expert or o.detail) for o in report.outcomes}
    assert outcomes == {
        1: ("registered", "flower-1/good@1"),
        2: ("failed", "data file missing"),
        3: ("timed out", "no reply within 1 s"),
        4: ("rejected", "router.safetensors: gate is constant (check gate_std)"),
    }
    assert registered == ["good"]
    assert all(m.content.config_records["config"]["lora-steps"] == 5 for m in grid.sent)
    assert "1 registered, 1 rejected, 1 failed, 1 timed out" in report.summary()


def test_replies_are_catalogued_through_the_coordinators_registration(tmp_path):
    model = tiny_llama()
    settings = Settings(data_dir=tmp_path / "coordinator")
    engine, sessions = open_database(settings)
    with sessions() as session:
        register_base_model(session, base_model_spec(model, "tiny"))
    engine.dispose()
    expert = random_expert(model, name="otter", rank=2, seed=0)
    package = expert.save(tmp_path / "otter")
    files = {p.name: p for p in package.iterdir()}

    round_settings = RoundSettings(coordinator_data_dir=str(settings.data_dir))
    with coordinator_registrar(round_settings) as register:
        ref = register(3, files)
        with pytest.raises(Rejected, match="identical content is already published"):
            register(4, files)

    assert ref == "flower-3/otter@1"
    engine, sessions = open_database(settings)
    with sessions() as session:
        versions = list_versions(session).items
        assert [(v.ref, v.channel, v.uploaded_by) for v in versions] == [
            ("flower-3/otter@1", "flower", "flower-3")
        ]
    engine.dispose()
