"""Flower nodes publish as themselves (issue 14, item 6): each node under its own
namespace, with a contributor token of that namespace, recorded as the uploader; no node
writes into another node's namespace or versions over another node's expert."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message

from client.flower_message import package_to_content
from coordinator.auth import service as auth
from coordinator.auth.models import Role
from coordinator.base_models.service import register_base_model
from coordinator.core.app import open_database
from coordinator.core.config import Settings
from coordinator.experts.service import list_versions
from coordinator.flower_server import Rejected, coordinator_registrar, run_round
from phatgoose.models import base_model_spec
from protocol.flower import FlowerConfigError, RoundSettings, TrainingRequest
from tests.e2e.flower_helpers import serverapp_identity, train_message
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama


@pytest.fixture
def coordinator(tmp_path) -> Settings:
    settings = Settings(data_dir=tmp_path / "coordinator")
    engine, sessions = open_database(settings)
    with sessions() as session:
        register_base_model(session, base_model_spec(tiny_llama(), "tiny"))
    engine.dispose()
    return settings


def _package(tmp_path: Path, name: str, seed: int) -> dict[str, Path]:
    directory = random_expert(tiny_llama(), name=name, rank=2, seed=seed).save(
        tmp_path / f"{name.replace('/', '_')}-{seed}"
    )
    return {p.name: p for p in directory.iterdir()}


def _versions(settings: Settings) -> list[tuple[str, str, str]]:
    engine, sessions = open_database(settings)
    try:
        with sessions() as session:
            return [(v.ref, v.uploaded_by, v.channel) for v in list_versions(session).items]
    finally:
        engine.dispose()


def _round(settings: Settings, **changes: object) -> RoundSettings:
    return RoundSettings(coordinator_data_dir=str(settings.data_dir), **changes)


def test_two_nodes_naming_their_expert_alike_publish_in_their_own_namespaces(coordinator, tmp_path):
    with coordinator_registrar(_round(coordinator)) as register:
        first = register(101, _package(tmp_path, "navigate", seed=0))
        second = register(202, _package(tmp_path, "navigate", seed=1))
    assert (first, second) == ("flower-101/navigate@1", "flower-202/navigate@1")
    assert _versions(coordinator) == [
        ("flower-101/navigate@1", "flower-101", "flower"),
        ("flower-202/navigate@1", "flower-202", "flower"),
    ]


@pytest.mark.parametrize("target", ["flower-101/navigate", "alice/navigate", "flower/navigate"])
def test_a_node_cannot_publish_into_another_namespace(coordinator, tmp_path, target):
    with coordinator_registrar(_round(coordinator)) as register:
        register(101, _package(tmp_path, "navigate", seed=0))
        with pytest.raises(Rejected, match="may publish only under its own namespace"):
            register(202, _package(tmp_path, target, seed=1))
    assert _versions(coordinator) == [("flower-101/navigate@1", "flower-101", "flower")]


def test_a_namespace_owned_by_a_maintainer_token_is_refused(coordinator, tmp_path):
    engine, sessions = open_database(coordinator)
    with sessions() as session:
        auth.create_token(session, name="flower-7", role=Role.MAINTAINER)
    engine.dispose()
    with (
        coordinator_registrar(_round(coordinator)) as register,
        pytest.raises(Rejected, match="belongs to a maintainer token"),
    ):
        register(7, _package(tmp_path, "alice/navigate", seed=0))
    assert _versions(coordinator) == []


def test_a_worker_token_of_the_node_s_name_neither_blocks_nor_serves_it(coordinator, tmp_path):
    # A worker token's name is a label: it owns no namespace and never publishes.
    engine, sessions = open_database(coordinator)
    with sessions() as session:
        worker_id = auth.create_token(session, name="flower-9", role=Role.WORKER).token.id
    engine.dispose()
    with coordinator_registrar(_round(coordinator)) as register:
        assert register(9, _package(tmp_path, "navigate", seed=0)) == "flower-9/navigate@1"
    engine, sessions = open_database(coordinator)
    with sessions() as session:
        (version,) = list_versions(session).items
        assert version.uploader_token_id != worker_id
    engine.dispose()


def test_without_token_creation_only_nodes_with_an_operator_token_publish(coordinator, tmp_path):
    settings = _round(coordinator, create_node_tokens=False)
    with (
        coordinator_registrar(settings) as register,
        pytest.raises(Rejected, match="no contributor token named 'flower-8'"),
    ):
        register(8, _package(tmp_path, "navigate", seed=0))
    engine, sessions = open_database(coordinator)
    with sessions() as session:
        token_id = auth.create_token(session, name="flower-8", role=Role.CONTRIBUTOR).token.id
    engine.dispose()
    with coordinator_registrar(settings) as register:
        assert register(8, _package(tmp_path, "navigate", seed=0)) == "flower-8/navigate@1"
    engine, sessions = open_database(coordinator)
    with sessions() as session:
        (version,) = list_versions(session).items
        assert version.uploader_token_id == token_id
    engine.dispose()


@pytest.mark.parametrize("prefix", ["", "Flower", "a/b", "../x", "x" * 41])
def test_a_bad_namespace_prefix_is_refused_by_the_run_config(prefix):
    with pytest.raises(FlowerConfigError, match="'namespace'"):
        RoundSettings.from_config({"namespace": prefix})


class RepliesGrid:
    """A grid whose nodes answer with prepared replies: `(src node, content)` per reply, so a
    test can make a node answer twice or a node that was never asked answer."""

    def __init__(self, nodes: list[int], replies: list[tuple[int, object]]) -> None:
        self.nodes, self.replies = nodes, replies

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        list(messages)
        return [
            Message(content, reply_to=train_message({}, node, message_id=f"id{node}-{i}"))
            for i, (node, content) in enumerate(self.replies)
        ]


def test_the_round_registers_each_reply_under_its_sender_and_only_once(coordinator, tmp_path):
    one = package_to_content(
        random_expert(tiny_llama(), name="navigate", rank=2, seed=0).save(tmp_path / "one")
    )
    two = package_to_content(
        random_expert(tiny_llama(), name="navigate", rank=2, seed=1).save(tmp_path / "two")
    )
    again = package_to_content(
        random_expert(tiny_llama(), name="navigate", rank=2, seed=2).save(tmp_path / "again")
    )
    grid = RepliesGrid([1, 2], [(1, one), (2, two), (2, again), (3, again)])
    with serverapp_identity(), coordinator_registrar(_round(coordinator)) as register:
        report = run_round(grid, TrainingRequest(), register, node_wait_seconds=0)
    outcomes = [(o.node_id, o.status, o.expert or o.detail) for o in report.outcomes]
    assert outcomes == [
        (1, "registered", "flower-1/navigate@1"),
        (2, "registered", "flower-2/navigate@1"),
        (2, "rejected", "a second reply from this node in the round: ignored"),
        (3, "rejected", "a reply from a node that was not asked to train: ignored"),
    ]
    assert [ref for ref, _, _ in _versions(coordinator)] == [
        "flower-1/navigate@1",
        "flower-2/navigate@1",
    ]


def test_a_package_named_for_the_node_itself_lands_there(coordinator, tmp_path):
    with coordinator_registrar(_round(coordinator)) as register:
        ref = register(5, _package(tmp_path, "flower-5/walrus", seed=0))
    assert ref == "flower-5/walrus@1"
