"""POST /api/v1/experts: streamed, validated, stored, numbered."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.numpy import load_file, save_file
from sqlalchemy import func, select

from coordinator.auth.models import Role
from coordinator.auth.service import create_token
from coordinator.base_models.service import register_base_model
from coordinator.experts.models import Channel, ExpertVersion
from coordinator.experts.service import register_expert_package
from protocol.validation import package_digest
from tests.coordinator.helpers import bearer_headers, package_parts, stored_bytes, upload


def _version_count(app: FastAPI) -> int:
    with app.state.sessionmaker() as session:
        return session.scalar(select(func.count()).select_from(ExpertVersion)) or 0


def _leftovers(app: FastAPI) -> list[Path]:
    return [p for p in app.state.settings.upload_tmp_dir.iterdir()]


def test_upload_publishes_version_one_with_digests(client, alice, package, base_spec):
    directory = package("alice/demo")
    response = upload(client, alice, directory)

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["namespace"], body["name"], body["version"]) == ("alice", "demo", 1)
    assert body["ref"] == "alice/demo@1"
    assert response.headers["location"] == "/api/v1/experts/alice/demo/1"
    stored = stored_bytes(directory, base_spec)  # the adapter config canonically rewritten
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in stored.items()}
    assert {f["filename"]: f["sha256"] for f in body["files"]} == hashes
    assert body["package_digest"] == package_digest(hashes)
    assert body["total_size"] == sum(len(data) for data in stored.values())
    assert body["provenance"]["uploaded_by"] == "alice"
    assert body["provenance"]["channel"] == "http"
    assert body["rank"] == 4
    assert body["yank"]["yanked"] is False


def test_upload_leaves_no_temp_files(app, client, alice, package):
    assert upload(client, alice, package()).status_code == 201
    assert _leftovers(app) == []


def test_new_upload_of_same_name_makes_next_version(client, alice, package):
    numbers = [upload(client, alice, package(seed=s)).json()["version"] for s in range(3)]
    assert numbers == [1, 2, 3]


def test_bare_slug_is_published_in_uploaders_namespace(client, bob, package):
    response = upload(client, bob, package("mathy"))
    assert response.status_code == 201
    assert response.json()["ref"] == "bob/mathy@1"


def test_contributor_cannot_publish_in_foreign_namespace(app, client, bob, package):
    response = upload(client, bob, package("alice/demo"))
    assert response.status_code == 403
    detail = response.json()["detail"]
    assert detail["check"] == "namespace"
    assert "'bob' may publish only under its own namespace, not 'alice'" in detail["message"]
    assert _version_count(app) == 0


def test_maintainer_may_publish_in_any_namespace(client, maintainer, package):
    response = upload(client, maintainer, package("alice/curated"))
    assert response.status_code == 201
    assert response.json()["ref"] == "alice/curated@1"
    assert response.json()["provenance"]["uploaded_by"] == "carol"


def test_identical_content_is_409_with_existing_version(app, client, alice, package):
    directory = package()
    first = upload(client, alice, directory)
    again = upload(client, alice, directory)

    assert again.status_code == 409
    detail = again.json()["detail"]
    assert detail["check"] == "duplicate"
    assert detail["existing"]["version"] == 1
    assert detail["existing"]["package_digest"] == first.json()["package_digest"]
    assert _version_count(app) == 1


def test_upload_without_token_is_401(app, client, package):
    response = upload(client, {}, package())
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert _version_count(app) == 0


def test_upload_with_wrong_token_is_401_invalid_token(client, package):
    response = upload(
        client, {"Authorization": "Bearer phg_0123456789abcdef_" + "x" * 43}, package()
    )
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_corrupt_gate_is_rejected_naming_tensor(app, client, alice, package):
    directory = package()
    router = load_file(directory / "router.safetensors")
    key = sorted(router)[0]
    router[key][0] = float("nan")
    save_file(router, directory / "router.safetensors")

    response = upload(client, alice, directory)

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail["file"] == "router.safetensors"
    assert detail["tensor"] == key
    assert "finite" in detail["message"] or "nan" in detail["message"].lower()
    assert _version_count(app) == 0


def test_missing_router_file_is_rejected(client, alice, package):
    directory = package()
    (directory / "router.safetensors").unlink()
    response = upload(client, alice, directory)
    assert response.status_code == 422
    assert response.json()["detail"]["file"] == "router.safetensors"


def test_unknown_base_model_is_rejected(client, alice, package):
    directory = package()
    manifest = json.loads((directory / "expert.json").read_text())
    manifest["base_model"] = {"name": "other-model", "fingerprint": "sha256:" + "0" * 64}
    (directory / "expert.json").write_text(json.dumps(manifest))

    response = upload(client, alice, directory)

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail["check"] == "base_model"
    assert "'other-model'" in detail["message"]
    assert "registered: 'tiny'" in detail["message"]


def test_unknown_file_name_is_rejected_while_streaming(app, client, alice, package):
    parts = [*package_parts(package()), ("files", ("notes.txt", b"hello"))]
    response = client.post("/api/v1/experts", headers=alice, files=parts)
    assert response.status_code == 422
    assert response.json()["detail"]["check"] == "file_names"
    assert "'notes.txt' is not a package file" in response.json()["detail"]["message"]
    assert _leftovers(app) == []


def _limited_app(make_app, settings, tiny_base, **limits):
    limited = settings.model_copy(
        update={"admission": settings.admission.model_copy(update=limits)}
    )
    application = make_app(limited)
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    return application


def _stored_blobs(app: FastAPI) -> list[Path]:
    return [p for p in app.state.settings.blob_dir.rglob("*") if p.is_file()]


def test_file_above_its_limit_is_413_and_nothing_is_stored(make_app, settings, tiny_base, package):
    directory = package()
    adapter_size = (directory / "adapter_model.safetensors").stat().st_size
    application = _limited_app(make_app, settings, tiny_base, max_adapter_bytes=adapter_size - 1)
    with TestClient(application) as client:
        headers = bearer_headers(application, "alice", Role.CONTRIBUTOR)
        response = upload(client, headers, directory)

    assert response.status_code == 413
    detail = response.json()["detail"]
    assert detail["file"] == "adapter_model.safetensors"
    assert detail["expected"] == f"at most {adapter_size - 1} bytes"
    assert _version_count(application) == 0
    assert _stored_blobs(application) == []
    assert _leftovers(application) == []


def test_upload_above_total_limit_is_413(make_app, settings, tiny_base, package):
    directory = package()
    total = sum(p.stat().st_size for p in directory.iterdir())
    application = _limited_app(make_app, settings, tiny_base, max_total_bytes=total - 1)
    with TestClient(application) as client:
        headers = bearer_headers(application, "alice", Role.CONTRIBUTOR)
        response = upload(client, headers, directory)

    assert response.status_code == 413
    assert response.json()["detail"]["expected"] == f"at most {total - 1} bytes in all"
    assert _version_count(application) == 0
    assert _leftovers(application) == []


def test_declared_length_above_limit_is_413_before_reading(make_app, settings, tiny_base):
    application = _limited_app(make_app, settings, tiny_base, max_total_bytes=1000)
    with TestClient(application) as client:
        headers = bearer_headers(application, "alice", Role.CONTRIBUTOR)
        response = client.post(
            "/api/v1/experts",
            headers={**headers, "Content-Type": "multipart/form-data; boundary=x"},
            content=b"x" * 100_000,
        )
    assert response.status_code == 413


def test_body_that_is_not_multipart_is_415(client, alice):
    response = client.post("/api/v1/experts", headers=alice, json={"name": "alice/demo"})
    assert response.status_code == 415
    assert response.json()["detail"]["check"] == "content_type"


def test_truncated_multipart_body_is_400(app, client, alice):
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="expert.json"'
        b'\r\n\r\n{"name": '
    )
    response = client.post(
        "/api/v1/experts",
        headers={**alice, "Content-Type": "multipart/form-data; boundary=xyz"},
        content=body,
    )
    assert response.status_code == 400
    assert response.json()["detail"]["check"] == "multipart"
    assert _leftovers(app) == []


def test_part_without_filename_is_400(client, alice, package):
    response = client.post(
        "/api/v1/experts",
        headers=alice,
        data={"comment": "hi"},
        files=package_parts(package()),
    )
    assert response.status_code == 400
    assert "part 'comment' has no filename" in response.json()["detail"]["message"]


def test_field_named_after_the_file_is_accepted(client, alice, package):
    directory = package()
    parts = [(p.name, (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
    response = client.post("/api/v1/experts", headers=alice, files=parts)
    assert response.status_code == 201


def test_flower_channel_is_recorded_by_the_shared_registration_function(app, client, package):
    """The Flower ServerApp calls the same function as the HTTP route."""
    with app.state.sessionmaker() as session:
        uploader = create_token(session, name="dora", role=Role.CONTRIBUTOR).token
        version = register_expert_package(
            session,
            app.state.blobs,
            app.state.settings,
            files={p.name: p for p in package("dora/fed").iterdir()},
            uploader=uploader,
            channel=Channel.FLOWER,
        )
    assert version.ref == "dora/fed@1"
    provenance = client.get("/api/v1/experts/dora/fed/1").json()["provenance"]
    assert (provenance["channel"], provenance["uploaded_by"]) == ("flower", "dora")
