"""Tokens: stored hashed, checked in constant time, roles enforced."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import select

from coordinator.auth.models import Role, Token
from coordinator.auth.service import (
    InvalidTokenName,
    authenticate,
    create_token,
    revoke_token,
)


def test_token_secret_is_stored_only_as_its_sha256(app):
    with app.state.sessionmaker() as session:
        issued = create_token(session, name="alice", role=Role.CONTRIBUTOR)
        row = session.scalar(select(Token).where(Token.id == issued.token.id))
    secret = issued.secret_token.split("_", 2)[2]
    assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in (row.public_id, row.name, row.secret_sha256)


def test_token_authenticates_as_its_name_and_role(app):
    with app.state.sessionmaker() as session:
        issued = create_token(session, name="carol", role=Role.MAINTAINER)
        token = authenticate(session, issued.secret_token)
    assert (token.name, token.role) == ("carol", "maintainer")


def test_token_with_a_changed_secret_does_not_authenticate(app):
    with app.state.sessionmaker() as session:
        issued = create_token(session, name="alice", role=Role.CONTRIBUTOR)
        forged = issued.secret_token[:-1] + ("A" if issued.secret_token[-1] != "A" else "B")
        assert authenticate(session, forged) is None


def test_revoked_token_does_not_authenticate(app):
    with app.state.sessionmaker() as session:
        issued = create_token(session, name="alice", role=Role.CONTRIBUTOR)
        revoke_token(session, issued.token.public_id)
        assert authenticate(session, issued.secret_token) is None


@pytest.mark.parametrize("name", ["Alice", "a/b", "", "-x", "x" * 64])
def test_token_name_must_be_a_namespace(app, name):
    with app.state.sessionmaker() as session, pytest.raises(InvalidTokenName):
        create_token(session, name=name, role=Role.CONTRIBUTOR)


def test_me_returns_name_and_role(client, alice):
    response = client.get("/api/v1/auth/me", headers=alice)
    assert response.status_code == 200
    assert (response.json()["name"], response.json()["role"]) == ("alice", "contributor")


def test_missing_token_is_401_with_bearer_challenge(client):
    response = client.get("/api/v1/auth/me")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="phatgoose"'
    assert response.json()["detail"]["error"] == "unauthorized"


def test_malformed_token_is_401_invalid_token(client):
    response = client.get("/api/v1/auth/me", headers={"Authorization": "Bearer not-a-token"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == (
        'Bearer realm="phatgoose", error="invalid_token"'
    )


def test_contributor_on_a_maintainer_route_is_403(client, alice, base_spec):
    response = client.post(
        "/api/v1/base-models", headers=alice, json=base_spec.model_dump(mode="json")
    )
    assert response.status_code == 403
    assert response.json()["detail"]["message"] == (
        "this needs a maintainer token; 'alice' is a contributor"
    )


def test_maintainer_reads_the_startup_report(app, client, maintainer):
    response = client.get("/api/v1/admin/startup-report", headers=maintainer)
    assert response.status_code == 200
    assert response.json() == {
        "healthy": True,
        "blob_store": str(app.state.settings.blob_dir.resolve()),
        "removed_temp_files": [],
        "missing_blobs": [],
        "removed_blobs": [],
    }
