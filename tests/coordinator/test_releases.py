"""Releases: creation, numbering, every refusal, yanked versions, reads and the manifest."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from coordinator.auth.models import Role
from coordinator.auth.service import create_token
from coordinator.releases import service
from coordinator.releases.models import Release
from coordinator.releases.schemas import Method, ReleaseCreate
from protocol import (
    METHOD_SPECS,
    METHODS,
    RELEASE_FORMAT_VERSION,
    ROUTER_NUMERICS,
    ReleaseManifest,
    resolve_params,
)
from tests.coordinator.release_helpers import create_release, publish


@pytest.fixture
def experts(client, alice, bob, tiny_base, tmp_path):
    """alice/demo@1, alice/demo@2, bob/math@1: rank 4 over every default module."""
    publish(client, alice, tiny_base, tmp_path / "d1", "alice/demo", seed=0)
    publish(client, alice, tiny_base, tmp_path / "d2", "alice/demo", seed=1)
    publish(client, bob, tiny_base, tmp_path / "m1", "bob/math", seed=2)


def _refuse(client, headers, body, status=422):
    response = client.post("/api/v1/releases", headers=headers, json=body)
    assert response.status_code == status, response.text
    return response.json()["detail"]


def test_the_api_offers_exactly_the_routing_methods():
    assert set(Method.__args__) == set(METHODS)


def test_create_release_freezes_versions_digests_and_files(client, maintainer, experts):
    response = client.post(
        "/api/v1/releases",
        headers=maintainer,
        json={"method": "phatgoose", "experts": ["alice/demo@1", "bob/math"], "notes": "first"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["Location"] == "/api/v1/releases/1"
    assert (body["number"], body["method"], body["top_k"], body["notes"]) == (
        1,
        "phatgoose",
        2,
        "first",
    )
    assert [e["ref"] for e in body["experts"]] == ["alice/demo@1", "bob/math@1"]
    manifest = body["manifest"]
    assert manifest["base_model"]["name"] == "tiny"
    version = client.get("/api/v1/experts/alice/demo/1").json()
    first = manifest["experts"][0]
    assert first["package_digest"] == version["package_digest"]
    assert {f["filename"]: f["sha256"] for f in first["files"]} == {
        f["filename"]: f["sha256"] for f in version["files"]
    }
    assert first["files"][0]["url"].startswith("/api/v1/experts/alice/demo/1/files/")
    assert body["artifact_digest"].startswith("sha256:")
    assert body["created_by"] == "carol"


def test_bare_name_resolves_to_the_newest_version(client, maintainer, experts):
    body = create_release(client, maintainer, method="arrow", experts=["alice/demo"])
    assert [e["ref"] for e in body["experts"]] == ["alice/demo@2"]
    assert body["top_k"] == 1  # min(2, one expert)


def test_bare_name_skips_yanked_versions(client, maintainer, alice, experts):
    yank = client.post("/api/v1/experts/alice/demo/2/yank", headers=alice, json={"reason": "bad"})
    assert yank.status_code == 200
    body = create_release(client, maintainer, method="arrow", experts=["alice/demo"])
    assert [e["ref"] for e in body["experts"]] == ["alice/demo@1"]


def test_an_exact_yanked_version_is_refused(client, maintainer, alice, experts):
    client.post("/api/v1/experts/alice/demo/2/yank", headers=alice, json={"reason": "bad"})
    detail = _refuse(client, maintainer, {"method": "arrow", "experts": ["alice/demo@2"]})
    assert detail["check"] == "yanked"
    assert "alice/demo@2 is yanked (bad)" in detail["message"]


def test_an_exact_yanked_version_is_accepted_with_allow_yanked(client, maintainer, alice, experts):
    client.post("/api/v1/experts/alice/demo/2/yank", headers=alice, json={"reason": "bad"})
    body = create_release(
        client, maintainer, method="arrow", experts=["alice/demo@2"], allow_yanked=True
    )
    assert [e["ref"] for e in body["experts"]] == ["alice/demo@2"]


def test_a_name_whose_versions_are_all_yanked_is_refused(client, maintainer, bob, experts):
    client.post("/api/v1/experts/bob/math/1/yank", headers=bob, json={"reason": "leak"})
    detail = _refuse(client, maintainer, {"method": "arrow", "experts": ["bob/math"]})
    assert detail["check"] == "yanked"
    assert "every version of bob/math is yanked" in detail["message"]


def test_numbers_count_up_from_one(client, maintainer, experts):
    numbers = [
        create_release(client, maintainer, method="arrow", experts=["bob/math"])["number"]
        for _ in range(3)
    ]
    assert numbers == [1, 2, 3]


@pytest.mark.slow
def test_concurrent_creations_get_distinct_numbers_one_to_n(app, client, experts):
    with app.state.sessionmaker() as session:
        token = create_token(session, name="carol", role=Role.MAINTAINER).token
    request = ReleaseCreate(method="phatgoose", experts=["alice/demo@1", "bob/math@1"])

    def create(_: int) -> int:
        with app.state.sessionmaker() as session:
            return service.create_release(session, app.state.blobs, request, by=token).number

    with ThreadPoolExecutor(max_workers=6) as pool:
        numbers = sorted(pool.map(create, range(6)))
    assert numbers == [1, 2, 3, 4, 5, 6]
    listed = client.get("/api/v1/releases").json()
    assert [r["number"] for r in listed] == [1, 2, 3, 4, 5, 6]


def test_a_contributor_may_not_create_a_release(client, alice, experts):
    detail = _refuse(client, alice, {"method": "arrow", "experts": ["bob/math"]}, status=403)
    assert "maintainer" in detail["message"]


def test_creating_a_release_needs_a_token(client, experts):
    response = client.post("/api/v1/releases", json={"method": "arrow", "experts": ["bob/math"]})
    assert response.status_code == 401


def test_an_unknown_method_is_refused(client, maintainer, experts):
    response = client.post(
        "/api/v1/releases", headers=maintainer, json={"method": "magic", "experts": ["bob/math"]}
    )
    assert response.status_code == 422
    assert "phatgoose" in response.text


def test_base_takes_no_experts(client, maintainer, experts):
    detail = _refuse(client, maintainer, {"method": "base", "experts": ["bob/math"]})
    assert (detail["check"], detail["message"]) == (
        "experts",
        "method 'base' takes no experts, got 1",
    )


def test_base_without_experts_uses_the_base_model(client, maintainer, experts):
    body = create_release(client, maintainer, method="base", base_model="tiny")
    assert (body["experts"], body["top_k"], body["base_model"]) == ([], None, "tiny")


def test_single_needs_exactly_one_expert(client, maintainer, experts):
    detail = _refuse(
        client, maintainer, {"method": "single", "experts": ["bob/math", "alice/demo"]}
    )
    assert detail["check"] == "experts"
    assert "exactly one expert" in detail["message"]


def test_single_with_expert_names_the_one_used(client, maintainer, experts):
    body = create_release(
        client, maintainer, method="single", experts=["bob/math", "alice/demo"], expert="bob/math"
    )
    assert body["expert"] == "bob/math"
    assert body["manifest"]["expert"] == "bob/math"


def test_single_with_only_expert_is_that_expert(client, maintainer, experts):
    body = create_release(client, maintainer, method="single", expert="alice/demo@1")
    assert ([e["ref"] for e in body["experts"]], body["expert"]) == (
        ["alice/demo@1"],
        "alice/demo",
    )


def test_an_expert_may_appear_once(client, maintainer, experts):
    detail = _refuse(
        client, maintainer, {"method": "phatgoose", "experts": ["alice/demo@1", "alice/demo@2"]}
    )
    assert detail["check"] == "duplicate"
    assert "alice/demo" in detail["message"]


def test_an_unknown_expert_is_refused(client, maintainer, experts):
    detail = _refuse(client, maintainer, {"method": "arrow", "experts": ["alice/nothing"]})
    assert (detail["check"], detail["message"]) == (
        "unknown_expert",
        "no expert named alice/nothing",
    )
    detail = _refuse(client, maintainer, {"method": "arrow", "experts": ["alice/demo@9"]})
    assert detail["message"] == "alice/demo has no version 9"


def test_a_malformed_reference_is_refused(client, maintainer, experts):
    detail = _refuse(client, maintainer, {"method": "arrow", "experts": ["demo@x"]})
    assert detail["check"] == "expert_ref"


def test_merged_needs_identical_shapes(client, maintainer, alice, tiny_base, tmp_path):
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0, rank=4)
    publish(client, alice, tiny_base, tmp_path / "b", "alice/b", seed=1, rank=2)
    detail = _refuse(client, maintainer, {"method": "merged", "experts": ["alice/a", "alice/b"]})
    assert detail["check"] == "shapes"
    assert "alice/a@1 (r=4" in detail["message"] and "alice/b@1 (r=2" in detail["message"]


def test_merged_refuses_different_module_sets(client, maintainer, alice, tiny_base, tmp_path):
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0)
    publish(client, alice, tiny_base, tmp_path / "b", "alice/b", seed=1, target_modules=["q_proj"])
    detail = _refuse(client, maintainer, {"method": "merged", "experts": ["alice/a", "alice/b"]})
    assert detail["check"] == "shapes"


def test_merged_accepts_identical_shapes(client, maintainer, experts):
    body = create_release(client, maintainer, method="merged", experts=["alice/demo", "bob/math"])
    assert (body["method"], body["top_k"]) == ("merged", None)


def test_average_activation_needs_the_activations(
    client, maintainer, alice, tiny_base, tmp_path, experts
):
    publish(client, alice, tiny_base, tmp_path / "a", "alice/act", with_average_activation=True)
    detail = _refuse(
        client, maintainer, {"method": "average_activation", "experts": ["alice/act", "bob/math"]}
    )
    assert detail["check"] == "average_activation"
    assert "bob/math@1" in detail["message"] and "alice/act" not in detail["message"]
    body = create_release(client, maintainer, method="average_activation", experts=["alice/act"])
    assert body["method"] == "average_activation"


def test_retrieval_needs_embeddings(client, maintainer, experts):
    detail = _refuse(client, maintainer, {"method": "retrieval", "experts": ["bob/math"]})
    assert detail["check"] == "retrieval"
    assert "bob/math@1" in detail["message"]


@pytest.mark.parametrize(
    "method", [m for m in METHODS if any(v.manifest_flag for v in METHOD_SPECS[m].needs)]
)
def test_a_method_is_refused_over_a_version_without_the_vectors_its_spec_needs(
    client, maintainer, experts, method
):
    needed = next(v for v in METHOD_SPECS[method].needs if v.manifest_flag)
    detail = _refuse(client, maintainer, {"method": method, "experts": ["alice/demo", "bob/math"]})
    assert detail["check"] == needed.name
    assert detail["message"] == (
        f"method {method!r} needs {needed.description}, which alice/demo@2, bob/math@1 "
        "do(es) not ship"
    )


def test_top_k_above_the_number_of_experts_is_refused(client, maintainer, experts):
    detail = _refuse(
        client, maintainer, {"method": "phatgoose", "experts": ["bob/math"], "top_k": 2}
    )
    assert (detail["check"], detail["expected"]) == ("top_k", "1 <= top_k <= 1")


def test_top_k_is_refused_for_methods_without_it(client, maintainer, experts):
    detail = _refuse(client, maintainer, {"method": "merged", "experts": ["bob/math"], "top_k": 2})
    assert detail["check"] == "top_k"


def test_a_base_model_that_is_not_the_experts_is_refused(client, maintainer, experts):
    detail = _refuse(
        client, maintainer, {"method": "arrow", "experts": ["bob/math"], "base_model": "other"}
    )
    assert (detail["check"], detail["message"]) == (
        "base_model",
        "base model 'other' is not registered",
    )


def test_list_filters_by_method_and_base_model(client, maintainer, experts):
    create_release(client, maintainer, method="arrow", experts=["bob/math"])
    create_release(client, maintainer, method="base", base_model="tiny")
    assert [r["number"] for r in client.get("/api/v1/releases").json()] == [1, 2]
    assert [
        r["number"] for r in client.get("/api/v1/releases", params={"method": "base"}).json()
    ] == [2]
    assert client.get("/api/v1/releases", params={"base_model": "other"}).json() == []


def test_get_release_has_manifest_and_empty_scores(client, maintainer, experts):
    create_release(client, maintainer, method="arrow", experts=["bob/math"])
    body = client.get("/api/v1/releases/1").json()
    assert body["manifest"]["number"] == 1
    assert body["scores"] == {
        "tasks": {},
        "mean_accuracy": None,
        "group_means": {},
        "evaluations": [],
        "evaluations_total": 0,
    }


def test_manifest_endpoint_serves_the_artifact_manifest(client, maintainer, experts):
    created = create_release(
        client, maintainer, method="phatgoose", experts=["alice/demo", "bob/math"]
    )
    manifest = client.get("/api/v1/releases/1/manifest").json()
    assert manifest == created["manifest"]
    assert (manifest["format"], manifest["format_version"], manifest["top_k"]) == (
        "phatgoose-release",
        RELEASE_FORMAT_VERSION,
        2,
    )
    assert manifest["method_params"] == created["method_params"] == {}
    assert manifest["router_numerics"] == created["router_numerics"] == ROUTER_NUMERICS
    assert [e["path"] for e in manifest["experts"]] == [
        "experts/alice/demo/2",
        "experts/bob/math/1",
    ]
    assert service.manifest_digest(manifest) == created["artifact_digest"]


def test_the_stored_manifest_is_a_release_manifest_that_writes_back_identically(
    client, maintainer, experts
):
    created = create_release(
        client, maintainer, method="single", experts=["bob/math", "alice/demo"], expert="bob/math"
    )
    manifest = ReleaseManifest.model_validate(created["manifest"])
    assert (manifest.method, manifest.top_k, manifest.expert) == ("single", None, "bob/math")
    assert [(e.ref, e.rank) for e in manifest.experts] == [("bob/math@1", 4), ("alice/demo@2", 4)]
    assert manifest.model_dump(mode="json") == created["manifest"]


def test_a_missing_release_is_404(client):
    for path in ("/api/v1/releases/7", "/api/v1/releases/7/manifest"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json()["detail"]["message"] == "no release 7"


def test_a_release_stored_before_router_numerics_reads_as_numerics_1(
    app, client, maintainer, experts
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo", "bob/math"])
    with app.state.sessionmaker() as session:  # the row as format_version 1 wrote it
        release = session.scalars(select(Release)).one()
        written = ("router_numerics", "method_params")  # in formats 2 and 3
        old = {k: v for k, v in release.manifest.items() if k not in written}
        release.manifest = {**old, "format_version": 1}
        session.commit()
    assert client.get("/api/v1/releases/1").json()["router_numerics"] == 1
    manifest = client.get("/api/v1/releases/1/manifest").json()
    assert ReleaseManifest.model_validate(manifest).router_numerics == 1


# --- method parameters ---------------------------------------------------------------------


def _stored_params(app, number):
    with app.state.sessionmaker() as session:
        return service.get_release(session, number).method_params


def test_params_not_given_are_the_methods_defaults(app, client, maintainer, experts):
    body = create_release(client, maintainer, method="ties", experts=["alice/demo", "bob/math"])
    assert body["method_params"] == {"density": 0.2, "scale": 1.0} == resolve_params("ties")
    assert body["manifest"]["method_params"] == body["method_params"]
    assert _stored_params(app, body["number"]) == body["method_params"]


def test_given_params_are_stored_resolved_in_the_release_and_its_manifest(
    app, client, maintainer, experts
):
    body = create_release(
        client,
        maintainer,
        method="dare",
        experts=["alice/demo", "bob/math"],
        params={"drop_rate": 0.5, "seed": 7.0},
    )
    resolved = {"drop_rate": 0.5, "merge": "average", "scale": 1.0, "seed": 7}
    assert body["method_params"] == resolved
    assert type(body["manifest"]["method_params"]["seed"]) is int
    manifest = client.get(f"/api/v1/releases/{body['number']}/manifest").json()
    assert ReleaseManifest.model_validate(manifest).method_params == resolved
    assert _stored_params(app, body["number"]) == resolved
    listed = client.get("/api/v1/releases", params={"method": "dare"}).json()
    assert [r["method_params"] for r in listed] == [resolved]


def test_a_token_method_takes_params_beside_k(client, maintainer, experts):
    body = create_release(
        client,
        maintainer,
        method="spectr",
        experts=["alice/demo", "bob/math"],
        params={"weighting": "softmax"},
    )
    assert (body["top_k"], body["method_params"]) == (
        2,
        {"score": "input", "weighting": "softmax"},
    )


@pytest.mark.parametrize(
    ("params", "message", "expected"),
    [
        (
            {"density": 1.5},
            "method 'ties': parameter 'density' must be a number > 0 and <= 1, got 1.5",
            "density: a number > 0 and <= 1; scale: a number > 0",
        ),
        (
            {"density": "high"},
            "method 'ties': parameter 'density' must be a number > 0 and <= 1, got 'high'",
            "density: a number > 0 and <= 1; scale: a number > 0",
        ),
        (
            {"drop_rate": 0.5},
            "method 'ties' has no parameter(s) 'drop_rate'; its parameters: density, scale",
            "density: a number > 0 and <= 1; scale: a number > 0",
        ),
    ],
)
def test_a_bad_param_is_refused_naming_it_and_what_it_takes(
    client, maintainer, experts, params, message, expected
):
    detail = _refuse(
        client, maintainer, {"method": "ties", "experts": ["bob/math"], "params": params}
    )
    assert (detail["error"], detail["check"]) == ("release_rejected", "params")
    assert (detail["message"], detail["expected"]) == (message, expected)
    assert client.get("/api/v1/releases").json() == []  # nothing written


def test_params_for_a_method_without_any_are_refused(client, maintainer, experts):
    detail = _refuse(
        client,
        maintainer,
        {"method": "phatgoose", "experts": ["bob/math"], "params": {"density": 0.2}},
    )
    assert detail["check"] == "params"
    assert detail["message"] == (
        "method 'phatgoose' has no parameter(s) 'density'; its parameters: none"
    )
    assert detail["expected"] == "no params: method 'phatgoose' has none"


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_merge_experts_of_different_ranks_and_modules(
    client, maintainer, alice, tiny_base, tmp_path, method
):
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0, rank=4)
    publish(client, alice, tiny_base, tmp_path / "b", "alice/b", seed=1, rank=2)
    publish(client, alice, tiny_base, tmp_path / "c", "alice/c", seed=2, target_modules=["q_proj"])
    body = create_release(
        client, maintainer, method=method, experts=["alice/a", "alice/b", "alice/c"]
    )
    assert (body["method"], body["top_k"]) == (method, None)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_are_refused_what_merged_is_refused(client, maintainer, experts, method):
    detail = _refuse(client, maintainer, {"method": method, "experts": ["bob/math"], "top_k": 2})
    assert detail["check"] == "top_k"
    detail = _refuse(
        client, maintainer, {"method": method, "experts": ["bob/math"], "expert": "bob/math"}
    )
    assert detail["check"] == "expert"


def test_a_release_stored_before_method_params_reads_with_the_defaults(
    app, client, maintainer, experts
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo", "bob/math"])
    with app.state.sessionmaker() as session:  # the row as format_version 2 wrote it
        release = session.scalars(select(Release)).one()
        old = {k: v for k, v in release.manifest.items() if k != "method_params"}
        release.manifest = {**old, "format_version": 2}
        release.method_params = {}  # what migration 0004 gives such rows
        session.commit()
    assert client.get("/api/v1/releases/1").json()["method_params"] == {}
    manifest = client.get("/api/v1/releases/1/manifest").json()
    assert "method_params" not in manifest
    assert ReleaseManifest.model_validate(manifest).method_params == {}
