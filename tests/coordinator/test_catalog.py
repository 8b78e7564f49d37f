"""Catalog reads, downloads, yank and unyank."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient

from coordinator.auth.models import Role
from tests.coordinator.helpers import bearer_headers, stored_bytes, upload


@pytest.fixture
def published(client, alice, bob, package):
    """alice/demo versions 1 and 2, bob/math version 1."""
    for seed in (0, 1):
        assert upload(client, alice, package("alice/demo", seed=seed)).status_code == 201
    assert upload(client, bob, package("bob/math", seed=2)).status_code == 201


def _refs(response):
    return [item["ref"] for item in response.json()["items"]]


def test_list_returns_every_active_version_with_total(client, published):
    response = client.get("/api/v1/experts")
    assert response.status_code == 200
    assert _refs(response) == ["alice/demo@1", "alice/demo@2", "bob/math@1"]
    assert response.json()["total"] == 3


def test_list_filters_by_namespace_and_name(client, published):
    assert _refs(client.get("/api/v1/experts", params={"namespace": "bob"})) == ["bob/math@1"]
    assert _refs(client.get("/api/v1/experts", params={"name": "demo"})) == [
        "alice/demo@1",
        "alice/demo@2",
    ]


def test_list_filters_by_uploader(client, maintainer, published, package):
    assert upload(client, maintainer, package("bob/curated", seed=5)).status_code == 201
    assert _refs(client.get("/api/v1/experts", params={"uploaded_by": "carol"})) == [
        "bob/curated@1"
    ]


def test_list_filters_by_base_model(client, published):
    assert client.get("/api/v1/experts", params={"base_model": "tiny"}).json()["total"] == 3
    assert client.get("/api/v1/experts", params={"base_model": "other"}).json()["total"] == 0


def test_list_pages_with_limit_and_offset(client, published):
    page = client.get("/api/v1/experts", params={"limit": 2, "offset": 1}).json()
    assert [item["ref"] for item in page["items"]] == ["alice/demo@2", "bob/math@1"]
    assert (page["total"], page["limit"], page["offset"]) == (3, 2, 1)


def test_list_rejects_a_limit_above_500(client):
    assert client.get("/api/v1/experts", params={"limit": 501}).status_code == 422


def test_expert_lists_all_versions(client, published):
    response = client.get("/api/v1/experts/alice/demo")
    assert response.status_code == 200
    assert [v["version"] for v in response.json()["versions"]] == [1, 2]


def test_unknown_expert_is_404(client):
    response = client.get("/api/v1/experts/alice/nothing")
    assert response.status_code == 404
    assert response.json()["detail"]["message"] == "no expert named alice/nothing"


def test_version_shows_manifest_provenance_and_files(client, published, package):
    response = client.get("/api/v1/experts/alice/demo/2")
    body = response.json()
    assert response.status_code == 200
    assert body["manifest"]["name"] == "alice/demo"
    assert body["manifest"]["base_model"]["name"] == "tiny"
    assert body["provenance"]["uploaded_by"] == "alice"
    assert body["provenance"]["channel"] == "http"
    assert sorted(f["filename"] for f in body["files"]) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "expert.json",
        "router.safetensors",
    ]


def test_unknown_version_is_404(client, published):
    response = client.get("/api/v1/experts/alice/demo/9")
    assert response.status_code == 404
    assert response.json()["detail"]["message"] == "alice/demo has no version 9"


def test_download_is_bit_exact(client, alice, package, base_spec):
    directory = package("alice/exact", seed=7)
    assert upload(client, alice, directory).status_code == 201
    for name, data in stored_bytes(directory, base_spec).items():
        response = client.get(f"/api/v1/experts/alice/exact/1/files/{name}")
        assert response.status_code == 200
        expected = hashlib.sha256(data).hexdigest()
        assert hashlib.sha256(response.content).hexdigest() == expected
        assert response.headers["x-content-sha256"] == expected


class _WithoutLocalFiles:
    """A blob store that can only be read through `open` (as object storage would be)."""

    def __init__(self, store):
        self._store = store

    def local_path(self, sha256):
        return None

    def open(self, sha256):
        return self._store.path(sha256).open("rb")

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_download_from_a_store_without_local_files_streams_the_same_bytes(
    app, client, alice, package, monkeypatch, base_spec
):
    directory = package("alice/streamed", seed=8)
    assert upload(client, alice, directory).status_code == 201
    monkeypatch.setattr(app.state, "blobs", _WithoutLocalFiles(app.state.blobs))
    for name, data in stored_bytes(directory, base_spec).items():
        response = client.get(f"/api/v1/experts/alice/streamed/1/files/{name}")
        assert response.status_code == 200
        assert response.content == data
        assert response.headers["content-disposition"] == f'attachment; filename="{name}"'


def test_download_of_a_non_package_file_is_404(client, published):
    response = client.get("/api/v1/experts/alice/demo/1/files/..%2F..%2Fcoordinator.sqlite")
    assert response.status_code == 404


def test_download_of_a_missing_blob_is_500_naming_the_file(app, client, published):
    version = client.get("/api/v1/experts/alice/demo/1").json()
    manifest = next(f for f in version["files"] if f["filename"] == "expert.json")
    app.state.blobs.path(manifest["sha256"]).unlink()

    response = client.get("/api/v1/experts/alice/demo/1/files/expert.json")

    assert response.status_code == 500
    assert response.json()["detail"]["message"] == (
        "the stored bytes of alice/demo@1 expert.json are missing on the coordinator"
    )


def test_owner_yanks_with_reason(client, alice, published):
    response = client.post(
        "/api/v1/experts/alice/demo/1/yank", headers=alice, json={"reason": "trained on test set"}
    )
    assert response.status_code == 200
    yank = response.json()["yank"]
    assert (yank["yanked"], yank["reason"], yank["yanked_by"]) == (
        True,
        "trained on test set",
        "alice",
    )


def test_yanked_version_leaves_default_listing_but_stays_downloadable(client, alice, published):
    client.post("/api/v1/experts/alice/demo/1/yank", headers=alice, json={"reason": "bad"})

    assert _refs(client.get("/api/v1/experts")) == ["alice/demo@2", "bob/math@1"]
    assert _refs(client.get("/api/v1/experts", params={"status": "yanked"})) == ["alice/demo@1"]
    assert client.get("/api/v1/experts", params={"status": "all"}).json()["total"] == 3
    download = client.get("/api/v1/experts/alice/demo/1/files/expert.json")
    assert download.status_code == 200
    assert client.get("/api/v1/experts/alice/demo/1").json()["yank"]["reason"] == "bad"


def test_yank_needs_a_reason(client, alice, published):
    response = client.post("/api/v1/experts/alice/demo/1/yank", headers=alice, json={"reason": ""})
    assert response.status_code == 422


def test_yank_twice_is_409(client, alice, published):
    client.post("/api/v1/experts/alice/demo/1/yank", headers=alice, json={"reason": "bad"})
    again = client.post("/api/v1/experts/alice/demo/1/yank", headers=alice, json={"reason": "x"})
    assert again.status_code == 409
    assert again.json()["detail"]["message"] == "alice/demo@1 is already yanked: bad"


def test_other_contributor_cannot_yank(client, bob, published):
    response = client.post("/api/v1/experts/alice/demo/1/yank", headers=bob, json={"reason": "x"})
    assert response.status_code == 403
    assert response.json()["detail"]["message"] == (
        "only 'alice' or a maintainer may change alice/demo@1"
    )


def test_yank_without_token_is_401(client, published):
    response = client.post("/api/v1/experts/alice/demo/1/yank", json={"reason": "x"})
    assert response.status_code == 401


def test_maintainer_yanks_and_unyanks_anyones_version(client, maintainer, published):
    yanked = client.post(
        "/api/v1/experts/bob/math/1/yank", headers=maintainer, json={"reason": "licence"}
    )
    assert yanked.json()["yank"]["yanked_by"] == "carol"
    restored = client.post("/api/v1/experts/bob/math/1/unyank", headers=maintainer)
    assert restored.status_code == 200
    assert restored.json()["yank"] == {
        "yanked": False,
        "yanked_at": None,
        "yanked_by": None,
        "yanked_by_role": None,
        "reason": None,
    }


def test_unyank_of_active_version_is_409(client, alice, published):
    response = client.post("/api/v1/experts/alice/demo/1/unyank", headers=alice)
    assert response.status_code == 409


def test_other_contributor_cannot_unyank(client, alice, bob, published):
    client.post("/api/v1/experts/alice/demo/1/yank", headers=alice, json={"reason": "bad"})
    assert client.post("/api/v1/experts/alice/demo/1/unyank", headers=bob).status_code == 403


def test_reads_need_a_token_when_catalog_is_private(make_app, settings):
    application = make_app(settings.model_copy(update={"public_read": False}))
    headers = bearer_headers(application, "dave", Role.CONTRIBUTOR)
    with TestClient(application) as client:
        assert client.get("/api/v1/experts").status_code == 401
        assert client.get("/api/v1/experts", headers=headers).status_code == 200


def test_public_read_still_rejects_a_wrong_token(client):
    response = client.get("/api/v1/experts", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
