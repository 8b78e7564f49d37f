"""Base models: registered specs are what uploads are validated against."""

from __future__ import annotations

import pytest

from coordinator.base_models.service import BaseModelConflict, register_base_model


def test_registered_base_model_is_listed(client, base_spec):
    response = client.get("/api/v1/base-models")
    assert response.status_code == 200
    [entry] = response.json()
    assert (entry["name"], entry["fingerprint"]) == ("tiny", base_spec.fingerprint)
    assert entry["linear_modules"] == len(base_spec.linear_modules)


def test_base_model_spec_round_trips(client, base_spec):
    response = client.get("/api/v1/base-models/tiny")
    assert response.status_code == 200
    assert response.json() == base_spec.model_dump(mode="json")


def test_unknown_base_model_is_404(client):
    assert client.get("/api/v1/base-models/nope").status_code == 404


def test_registering_the_same_spec_again_returns_the_same_row(app, base_spec):
    with app.state.sessionmaker() as session:
        first = register_base_model(session, base_spec)
        again = register_base_model(session, base_spec)
    assert first.id == again.id


def test_same_name_with_other_weights_is_a_conflict(app, base_spec):
    other = base_spec.model_copy(update={"fingerprint": "sha256:" + "1" * 64})
    with app.state.sessionmaker() as session, pytest.raises(BaseModelConflict, match="name"):
        register_base_model(session, other)


def test_maintainer_registers_a_spec_over_http(client, maintainer, base_spec):
    spec = base_spec.model_copy(update={"name": "tiny-2", "fingerprint": "sha256:" + "2" * 64})
    response = client.post(
        "/api/v1/base-models", headers=maintainer, json=spec.model_dump(mode="json")
    )
    assert response.status_code == 201
    assert response.headers["location"] == "/api/v1/base-models/tiny-2"
    assert client.get("/api/v1/base-models/tiny-2").json()["fingerprint"] == spec.fingerprint


def test_conflicting_spec_over_http_is_409(client, maintainer, base_spec):
    spec = base_spec.model_copy(update={"fingerprint": "sha256:" + "3" * 64})
    response = client.post(
        "/api/v1/base-models", headers=maintainer, json=spec.model_dump(mode="json")
    )
    assert response.status_code == 409


@pytest.mark.parametrize(
    ("field", "value"),
    [("architecture", "llama\x00"), ("name", "tiny\nforged"), ("in_features", 2**63)],
)
def test_a_spec_the_database_could_not_hold_is_422_naming_the_field(
    client, maintainer, base_spec, field, value
):
    body = base_spec.model_dump(mode="json")
    if field == "in_features":
        body["linear_modules"][0]["in_features"] = value
    else:
        body[field] = value
    response = client.post("/api/v1/base-models", headers=maintainer, json=body)
    assert response.status_code == 422
    assert field in str(response.json()["detail"])
