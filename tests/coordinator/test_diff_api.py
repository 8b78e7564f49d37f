"""`GET /api/v1/experts/{ns}/{name}/{version}/diff`: the diff of two stored versions is
`protocol.diff` on their stored files, by default against the previous version."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import pytest
from fastapi.testclient import TestClient

from coordinator.base_models.service import register_base_model
from coordinator.experts.diff import DIFF_CACHE
from coordinator.experts.files import needed_blobs, stored_files
from coordinator.storage import LocalBlobStore
from phatgoose.models import base_model_spec
from protocol.diff import diff_packages
from tests.coordinator.helpers import TinyBase, stored_bytes
from tests.coordinator.release_helpers import publish
from tests.tiny import tiny_llama

DIFF = "/api/v1/experts/alice/demo/{version}/diff"


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each test computes its diffs (digests repeat across tests of the same seeds)."""
    DIFF_CACHE.clear()
    yield
    DIFF_CACHE.clear()


@pytest.fixture
def versions(client, alice, tiny_base, tmp_path) -> tuple[Path, Path]:
    """alice/demo@1 (seed 0, rank 4) and @2 (seed 1, rank 8); their upload directories."""
    one, two = tmp_path / "v1", tmp_path / "v2"
    assert publish(client, alice, tiny_base, one, "alice/demo", seed=0)["version"] == 1
    assert publish(client, alice, tiny_base, two, "alice/demo", seed=1, rank=8)["version"] == 2
    return one, two


def as_stored(directory: Path, tiny_base: TinyBase, target: Path) -> Path:
    """The package as the coordinator stores it (canonical adapter config)."""
    target.mkdir()
    for name, data in stored_bytes(directory, tiny_base.spec).items():
        (target / name).write_bytes(data)
    return target


def test_the_api_diff_is_protocol_diff_on_the_stored_files(client, versions, tiny_base, tmp_path):
    one, two = versions

    response = client.get(DIFF.format(version=2), params={"against": "alice/demo@1"})

    assert response.status_code == 200, response.text
    body = response.json()
    expected = diff_packages(
        as_stored(one, tiny_base, tmp_path / "s1"), as_stored(two, tiny_base, tmp_path / "s2")
    )
    assert body["diff"] == expected.model_dump(mode="json")
    assert (body["a"]["ref"], body["b"]["ref"]) == ("alice/demo@1", "alice/demo@2")
    assert body["diff"]["a"]["package_digest"] == body["a"]["package_digest"]
    modules = body["diff"]["modules"]
    assert {(m["rank_a"], m["rank_b"]) for m in modules} == {(4, 8)}
    assert all(m["relative_change"] > 0 for m in modules)


def test_without_against_a_version_is_compared_with_the_previous_one(client, versions):
    default = client.get(DIFF.format(version=2))
    explicit = client.get(DIFF.format(version=2), params={"against": "alice/demo@1"})

    assert default.status_code == 200, default.text
    assert default.json()["a"]["version"] == 1
    assert default.json() == explicit.json()


def test_the_first_version_has_nothing_to_compare_with(client, versions):
    response = client.get(DIFF.format(version=1))

    assert response.status_code == 404
    assert "first version" in response.json()["detail"]["message"]


def test_a_version_against_itself_is_unchanged(client, versions):
    body = client.get(DIFF.format(version=2), params={"against": "alice/demo@2"}).json()

    summary = body["diff"]["summary"]
    assert summary["modules_changed"] == 0 and summary["max_relative_change"] == 0.0
    assert all(f["identical"] for f in body["diff"]["files"])


@pytest.mark.parametrize("against", ["alice/nothing@1", "alice/demo@9", "nobody/demo@1"])
def test_an_unknown_reference_is_404(client, versions, against):
    response = client.get(DIFF.format(version=2), params={"against": against})

    assert response.status_code == 404, response.text


@pytest.mark.parametrize("against", ["alice-demo", "alice/demo", "alice/demo@x", "alice/demo@0"])
def test_a_malformed_reference_is_422(client, versions, against):
    response = client.get(DIFF.format(version=2), params={"against": against})

    assert response.status_code == 422, response.text
    assert response.json()["detail"]["check"] == "ref"


def test_versions_on_different_base_models_are_refused(app, client, bob, versions, tmp_path):
    other = tiny_llama(seed=1)
    other.config.name_or_path = "tiny-other"  # what random_expert names the base after
    with app.state.sessionmaker() as session:
        register_base_model(session, base_model_spec(other, "tiny-other"))
    other_base = TinyBase(model=other, spec=base_model_spec(other, "tiny-other"))
    publish(client, bob, other_base, tmp_path / "bob", "bob/demo")

    response = client.get(DIFF.format(version=2), params={"against": "bob/demo@1"})

    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["check"] == "base_model"
    assert "'tiny'" in detail["message"] and "'tiny-other'" in detail["message"]


class _ObjectStore(LocalBlobStore):
    """A store without local paths, read only through `open`, like S3."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.opened: list[str] = []

    def local_path(self, sha256: str) -> Path | None:
        return None

    def open(self, sha256: str) -> BinaryIO:
        self.opened.append(sha256)
        return self.path(sha256).open("rb")


def test_a_store_without_local_files_is_read_through_open(app, client, versions, settings):
    local = client.get(DIFF.format(version=2))
    app.state.blobs = store = _ObjectStore(settings.blob_dir)
    DIFF_CACHE.clear()

    response = client.get(DIFF.format(version=2))

    assert response.status_code == 200, response.text
    assert response.json() == local.json()
    # Every blob of the four files of each version: JSON files whole, the safetensors
    # files' pieces (stored once: version 2 shares some of version 1's)
    with app.state.sessionmaker() as session:
        assert set(store.opened) == needed_blobs(session)
    assert not any(settings.upload_tmp_dir.iterdir())  # the temp copies are gone


def test_reads_follow_the_read_policy(make_app, settings, tiny_base, versions):
    private = make_app(settings.model_copy(update={"public_read": False}))

    with TestClient(private) as anonymous:
        assert anonymous.get(DIFF.format(version=2)).status_code == 401


def test_a_missing_blob_is_a_storage_error_naming_the_file(app, client, versions, settings):
    listed = client.get("/api/v1/experts/alice/demo/1").json()["files"]
    router = next(f for f in listed if f["filename"] == "router.safetensors")
    with app.state.sessionmaker() as session:
        stored = stored_files(session, [(router["sha256"], router["size"])])[router["sha256"]]
    LocalBlobStore(settings.blob_dir).path(stored.pieces[-1].sha256).unlink()  # a gate

    response = client.get(DIFF.format(version=2))

    assert response.status_code == 500
    detail = response.json()["detail"]
    assert detail["error"] == "storage" and detail["file"] == "router.safetensors"
    assert "alice/demo@1" in detail["message"]
