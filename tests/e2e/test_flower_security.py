"""Flower nodes publish as themselves (issue 14, item 6): each node under its own
namespace, with a contributor token of that namespace, recorded as the uploader; no node
writes into another node's namespace or versions over another node's expert."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message
from safetensors import safe_open
from safetensors.numpy import save_file

from client.flower_message import package_to_content
from coordinator.auth import service as auth
from coordinator.auth.models import Role
from coordinator.base_models.service import register_base_model
from coordinator.core.app import open_database
from coordinator.core.config import Settings
from coordinator.experts.service import list_versions
from coordinator.flower_server import (
    Rejected,
    coordinator_registrar,
    run_round,
    train_messages,
    write_package_from_content,
)
from phatgoose.models import base_model_spec
from protocol import ADAPTER_WEIGHTS_FILE, ROUTER_FILE
from protocol.flower import (
    KNOWN_KEY,
    KNOWN_RECORD,
    FlowerConfigError,
    RoundSettings,
    TrainingRequest,
)
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


# ------------------------------------------------------------------ deltas over Flower


def _gates_retrained(source: Path, target: Path) -> Path:
    """A copy of the package with every gate moved: the adapter stays byte-identical."""
    shutil.copytree(source, target)
    with safe_open(str(target / ROUTER_FILE), "np") as file:
        metadata = file.metadata()
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    moved = {k: (v * 0.5 if k.endswith(".gate") else v) for k, v in tensors.items()}
    save_file(moved, str(target / ROUTER_FILE), metadata=metadata)
    return target


def test_a_nodes_new_version_leaves_out_the_tensors_the_coordinator_stores(coordinator, tmp_path):
    first = random_expert(tiny_llama(), name="navigate", rank=2, seed=0).save(tmp_path / "v1")
    second = _gates_retrained(first, tmp_path / "v2")
    with serverapp_identity(), coordinator_registrar(_round(coordinator)) as register:
        assert register.known_tensors(1) == []  # nothing of node 1 is stored yet
        round_one = RepliesGrid([1], [(1, package_to_content(first))])
        run_round(round_one, TrainingRequest(), register, node_wait_seconds=0)
        known = register.known_tensors(1)
        assert register.known_tensors(2) == []  # another node's namespace: nothing
        message = train_messages([1], TrainingRequest(), register.known_tensors)[0]
        assert message.content.config_records[KNOWN_RECORD][KNOWN_KEY] == known

        reply = package_to_content(second, known=frozenset(known))
        # Every LoRA tensor stayed home; every gate moved and travels.
        assert len(reply.array_records[ADAPTER_WEIGHTS_FILE]) == 0
        with safe_open(str(second / ROUTER_FILE), "np") as router:
            gates = [k for k in router.keys() if k.endswith(".gate")]  # noqa: SIM118
        assert sorted(reply.array_records[ROUTER_FILE]) == sorted(gates)
        report = run_round(
            RepliesGrid([1], [(1, reply)]),
            TrainingRequest(),
            register,
            node_wait_seconds=0,
            known=register.known_tensors,
            stored=register.stored_tensor,
        )
    assert [(o.status, o.expert) for o in report.outcomes] == [
        ("registered", "flower-1/navigate@2")
    ]
    # Rebuilt bit-exactly: the same files a whole reply would have carried.
    received = write_package_from_content(package_to_content(second), tmp_path / "whole")
    engine, sessions = open_database(coordinator)
    try:
        with sessions() as session:
            version = list_versions(session, namespace="flower-1", name="navigate").items[-1]
            digests = {f.filename: f.sha256 for f in version.files}
    finally:
        engine.dispose()
    for name in (ADAPTER_WEIGHTS_FILE, ROUTER_FILE):
        assert digests[name] == hashlib.sha256(received[name].read_bytes()).hexdigest()


def test_a_reply_naming_a_tensor_the_coordinator_lacks_is_rejected_saying_so(coordinator, tmp_path):
    package = random_expert(tiny_llama(), name="navigate", rank=2, seed=0).save(tmp_path / "p")
    with safe_open(str(package / ROUTER_FILE), "np") as router:
        gate = next(k for k in router.keys() if k.endswith(".gate"))  # noqa: SIM118
        digest = hashlib.sha256(router.get_tensor(gate).tobytes()).hexdigest()
    reply = package_to_content(package, known=frozenset([digest]))  # a lie: nothing stored
    with serverapp_identity(), coordinator_registrar(_round(coordinator)) as register:
        report = run_round(
            RepliesGrid([1], [(1, reply)]),
            TrainingRequest(),
            register,
            node_wait_seconds=0,
            stored=register.stored_tensor,
        )
    (outcome,) = report.outcomes
    assert outcome.status == "rejected"
    assert f"tensor {gate!r} is named by sha256 {digest}" in outcome.detail
    assert _versions(coordinator) == []
