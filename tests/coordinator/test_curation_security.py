"""Curation holds against the curated (issue 14): who yanked decides who may lift a yank,
maintainers block experts and namespaces, releases carry their withdrawal and yanked
experts, version references are ASCII, contributors have quotas, lists are paginated and
a namespace has one explicit owner."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from coordinator.auth.models import Role
from coordinator.auth.service import NamespaceTaken, create_token
from coordinator.base_models.service import register_base_model
from coordinator.cli import app as cli
from coordinator.core.app import open_database
from coordinator.experts import service as experts
from tests.coordinator.helpers import bearer_headers, upload
from tests.coordinator.release_helpers import create_release, publish

API = "/api/v1"


@pytest.fixture
def catalog(client, alice, bob, tiny_base, tmp_path):
    """alice/demo@1, alice/demo@2, bob/math@1."""
    publish(client, alice, tiny_base, tmp_path / "d1", "alice/demo", seed=0)
    publish(client, alice, tiny_base, tmp_path / "d2", "alice/demo", seed=1)
    publish(client, bob, tiny_base, tmp_path / "m1", "bob/math", seed=2)


def _yank(client, headers, ref="alice/demo/1", reason="bad gates"):
    return client.post(f"{API}/experts/{ref}/yank", headers=headers, json={"reason": reason})


def _unyank(client, headers, ref="alice/demo/1"):
    return client.post(f"{API}/experts/{ref}/unyank", headers=headers)


# --- item 2: yanks and blocks ---------------------------------------------------------


def test_owner_cannot_lift_a_maintainers_yank(client, alice, maintainer, catalog):
    assert _yank(client, maintainer).status_code == 200
    yank = client.get(f"{API}/experts/alice/demo/1").json()["yank"]
    assert (yank["yanked"], yank["yanked_by"], yank["yanked_by_role"]) == (
        True,
        "carol",
        "maintainer",
    )

    refused = _unyank(client, alice)
    assert refused.status_code == 403
    detail = refused.json()["detail"]
    assert detail["check"] == "yank"
    assert "maintainer 'carol'" in detail["message"]
    assert client.get(f"{API}/experts/alice/demo/1").json()["yank"]["yanked"] is True

    assert _unyank(client, maintainer).status_code == 200
    assert client.get(f"{API}/experts/alice/demo/1").json()["yank"]["yanked"] is False


def test_owner_lifts_its_own_yank_and_the_role_is_recorded(client, alice, catalog):
    body = _yank(client, alice).json()
    assert (body["yank"]["yanked_by"], body["yank"]["yanked_by_role"]) == ("alice", "contributor")
    assert _unyank(client, alice).status_code == 200


def test_a_maintainer_takes_over_a_contributors_yank(client, alice, maintainer, catalog):
    assert _yank(client, alice, reason="oops").status_code == 200
    taken = _yank(client, maintainer, reason="routes every token to itself")
    assert taken.status_code == 200
    assert taken.json()["yank"]["yanked_by_role"] == "maintainer"
    assert taken.json()["yank"]["reason"] == "routes every token to itself"
    assert _unyank(client, alice).status_code == 403
    # The same role twice is still a conflict.
    assert _yank(client, maintainer).status_code == 409


def test_a_blocked_expert_refuses_new_versions_until_unblocked(
    client, alice, bob, maintainer, catalog, tiny_base, tmp_path
):
    blocked = client.post(
        f"{API}/experts/alice/demo/block", headers=maintainer, json={"reason": "adversarial"}
    )
    assert blocked.status_code == 200, blocked.text
    block = client.get(f"{API}/experts/alice/demo").json()["block"]
    assert (block["scope"], block["blocked_by"], block["reason"]) == (
        "expert",
        "carol",
        "adversarial",
    )

    tiny_base.write_package(tmp_path / "d3", "alice/demo", seed=5)
    refused = upload(client, alice, tmp_path / "d3")
    assert refused.status_code == 403
    assert refused.json()["detail"]["check"] == "blocked"
    assert "adversarial" in refused.json()["detail"]["message"]
    # A bare name publishes into the uploader's namespace: blocked the same way.
    tiny_base.write_package(tmp_path / "d4", "demo", seed=6)
    assert upload(client, alice, tmp_path / "d4").status_code == 403
    # Other experts of the namespace are not affected.
    publish(client, alice, tiny_base, tmp_path / "o1", "alice/other", seed=7)

    # Only maintainers block and unblock; the owner cannot lift it.
    for path in ("block", "unblock"):
        response = client.post(
            f"{API}/experts/alice/demo/{path}", headers=alice, json={"reason": "x"}
        )
        assert response.status_code == 403, path
    assert (
        client.post(f"{API}/experts/alice/demo/block", headers=maintainer, json={"reason": "again"})
    ).status_code == 409
    assert client.post(f"{API}/experts/alice/demo/unblock", headers=maintainer).status_code == 200
    assert client.get(f"{API}/experts/alice/demo").json()["block"] is None
    assert upload(client, alice, tmp_path / "d3").status_code == 201
    assert client.post(f"{API}/experts/alice/demo/unblock", headers=maintainer).status_code == 409


def test_a_namespace_block_refuses_every_name_in_it(
    client, alice, maintainer, catalog, tiny_base, tmp_path
):
    response = client.post(
        f"{API}/namespaces/alice/block", headers=maintainer, json={"reason": "spam"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "namespace"
    tiny_base.write_package(tmp_path / "n1", "alice/brand-new", seed=8)
    refused = upload(client, alice, tmp_path / "n1")
    assert refused.status_code == 403
    assert refused.json()["detail"]["check"] == "blocked"
    assert client.get(f"{API}/experts/alice/demo").json()["block"]["scope"] == "namespace"
    assert client.post(f"{API}/namespaces/alice/unblock", headers=alice).status_code == 403
    assert client.post(f"{API}/namespaces/alice/unblock", headers=maintainer).status_code == 200
    assert upload(client, alice, tmp_path / "n1").status_code == 201


def test_a_blocked_owner_cannot_lift_its_own_yank(client, alice, maintainer, catalog):
    assert _yank(client, alice).status_code == 200
    client.post(f"{API}/experts/alice/demo/block", headers=maintainer, json={"reason": "bad"})
    refused = _unyank(client, alice)
    assert refused.status_code == 403
    assert refused.json()["detail"]["check"] == "blocked"


def test_a_release_refuses_a_blocked_expert(client, maintainer, catalog):
    client.post(f"{API}/experts/bob/math/block", headers=maintainer, json={"reason": "bad"})
    response = client.post(
        f"{API}/releases",
        headers=maintainer,
        json={"method": "phatgoose", "experts": ["alice/demo@1", "bob/math@1"]},
    )
    assert response.status_code == 422
    assert response.json()["detail"]["check"] == "blocked"
    assert "bob/math" in response.json()["detail"]["message"]


def test_the_expert_page_shows_who_yanked_and_the_block(client, alice, maintainer, catalog):
    _yank(client, maintainer, reason="constant gates")
    client.post(f"{API}/experts/alice/demo/block", headers=maintainer, json={"reason": "spam"})
    page = client.get("/ui/experts/alice/demo").text
    assert "by carol (maintainer)" in page
    assert "Blocked" in page and "spam" in page


# --- item 12: releases carry yanks and withdrawal --------------------------------------


def test_the_release_api_carries_yanked_experts_and_withdrawal(client, maintainer, catalog):
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo@1", "bob/math@1"])
    detail = client.get(f"{API}/releases/1").json()
    assert (detail["withdrawn"], detail["withdrawn_reason"], detail["yanked_experts"]) == (
        False,
        None,
        [],
    )
    manifest_before = client.get(f"{API}/releases/1/manifest").json()

    _yank(client, maintainer, ref="bob/math/1")
    assert client.get(f"{API}/releases/1").json()["yanked_experts"] == ["bob/math@1"]
    assert client.get(f"{API}/releases").json()[0]["yanked_experts"] == ["bob/math@1"]
    # The manifest is the frozen artifact: no curation state in it.
    assert client.get(f"{API}/releases/1/manifest").json() == manifest_before


def test_a_maintainer_withdraws_and_restores_a_release(client, alice, maintainer, catalog):
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo@1", "bob/math@1"])
    url = f"{API}/releases/1"
    assert client.post(f"{url}/withdraw", headers=alice, json={"reason": "x"}).status_code == 403
    withdrawn = client.post(f"{url}/withdraw", headers=maintainer, json={"reason": "poisoned"})
    assert withdrawn.status_code == 200, withdrawn.text
    assert (withdrawn.json()["withdrawn"], withdrawn.json()["withdrawn_reason"]) == (
        True,
        "poisoned",
    )
    assert client.get(f"{API}/releases").json()[0]["withdrawn"] is True
    again = client.post(f"{url}/withdraw", headers=maintainer, json={"reason": "x"})
    assert again.status_code == 409
    assert client.post(f"{url}/restore", headers=alice).status_code == 403
    restored = client.post(f"{url}/restore", headers=maintainer)
    assert restored.status_code == 200
    assert (restored.json()["withdrawn"], restored.json()["withdrawn_reason"]) == (False, None)
    assert client.post(f"{url}/restore", headers=maintainer).status_code == 409


def test_a_withdrawn_release_ranks_only_when_asked_for(client, maintainer, catalog):
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo@1", "bob/math@1"])
    create_release(client, maintainer, method="merged", experts=["alice/demo@1", "bob/math@1"])
    client.post(f"{API}/releases/1/withdraw", headers=maintainer, json={"reason": "poisoned"})
    board = client.get("/leaderboard").json()["releases"]
    assert [(row["release"], row["withdrawn"]) for row in board] == [(2, False)]
    board = client.get("/leaderboard", params={"include_withdrawn": True}).json()["releases"]
    assert [(row["release"], row["withdrawn"]) for row in board] == [(1, True), (2, False)]


def _evaluate(client, headers, **extra):
    body = {"release": 1, "tasks": ["t"], "examples_per_task": 2, **extra}
    return client.post(f"{API}/evaluations", headers=headers, json=body)


def test_evaluations_of_a_release_with_a_yanked_expert_need_the_override(
    client, maintainer, catalog
):
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo@1", "bob/math@1"])
    _yank(client, maintainer, ref="bob/math/1")
    refused = _evaluate(client, maintainer)
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert detail["check"] == "yanked"
    assert "bob/math@1" in detail["message"]
    assert _evaluate(client, maintainer, allow_yanked=True).status_code == 201


def test_evaluations_of_a_withdrawn_release_need_the_override(client, maintainer, catalog):
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo@1", "bob/math@1"])
    client.post(f"{API}/releases/1/withdraw", headers=maintainer, json={"reason": "poisoned"})
    refused = _evaluate(client, maintainer)
    assert refused.status_code == 409
    assert refused.json()["detail"]["check"] == "withdrawn"
    assert "poisoned" in refused.json()["detail"]["message"]
    assert _evaluate(client, maintainer, allow_withdrawn=True).status_code == 201


def test_release_pages_show_withdrawal_and_yanked_experts(client, maintainer, catalog):
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo@1", "bob/math@1"])
    _yank(client, maintainer, ref="bob/math/1")
    client.post(f"{API}/releases/1/withdraw", headers=maintainer, json={"reason": "poisoned"})
    page = client.get("/ui/releases/1").text
    assert "Withdrawn" in page and "poisoned" in page
    assert "bob/math@1" in page
    listing = client.get("/ui/releases").text
    assert "withdrawn" in listing and "1 yanked" in listing


def test_cli_withdraws_and_restores_a_release(app, settings, client, maintainer, catalog):
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo@1"])
    args = ["--data-dir", str(settings.data_dir), "--database-url", settings.database_url]
    runner = CliRunner()
    result = runner.invoke(cli, ["withdraw-release", "1", "--reason", "poisoned", *args])
    assert result.exit_code == 0, result.output
    assert client.get(f"{API}/releases/1").json()["withdrawn_reason"] == "poisoned"
    result = runner.invoke(cli, ["restore-release", "1", *args])
    assert result.exit_code == 0, result.output
    assert client.get(f"{API}/releases/1").json()["withdrawn"] is False
    result = runner.invoke(cli, ["restore-release", "1", *args])
    assert result.exit_code == 1
    assert "not withdrawn" in result.output


# --- item 15: version numbers are ASCII digits -----------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        "alice/demo@²",  # isdigit() but int() fails: was a 500
        "alice/demo@١",  # Arabic-Indic one: was read as version 1
        "alice/demo@１",  # fullwidth one
        "alice/demo@1\n",
        "alice/demo@ 1",
        "alice/demo@+1",
        "alice/demo@",
        "alice/demo@1@1",
        "alice/demo@99999999999999999999999",
    ],
)
def test_a_release_reference_takes_only_ascii_version_numbers(client, maintainer, catalog, ref):
    response = client.post(
        f"{API}/releases", headers=maintainer, json={"method": "phatgoose", "experts": [ref]}
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["check"] == "expert_ref"


@pytest.mark.parametrize("number", ["١", "²", "１", "+1", " 1", "1_0"])
def test_resolve_ref_takes_only_ascii_version_numbers(app, client, catalog, number):
    with app.state.sessionmaker() as session, pytest.raises(experts.NotFound):
        experts.resolve_ref(session, f"alice/demo@{number}")


@pytest.mark.parametrize("number", ["١", "²", "+1", "1_0"])
def test_version_paths_take_only_ascii_numbers(client, catalog, number):
    response = client.get(f"{API}/experts/alice/demo/{number}")
    assert response.status_code in (404, 422), response.text
    assert response.status_code != 200


# --- item 16: quotas, pagination, namespace owners, private reads -----------------------


def _quota_app(make_app, settings, tiny_base, **limits):
    application = make_app(settings.model_copy(update=limits))
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    return application


def test_versions_per_expert_are_capped(make_app, settings, tiny_base, tmp_path):
    application = _quota_app(make_app, settings, tiny_base, max_versions_per_expert=1)
    alice = bearer_headers(application, "alice", Role.CONTRIBUTOR)
    carol = bearer_headers(application, "carol", Role.MAINTAINER)
    with TestClient(application) as client:
        publish(client, alice, tiny_base, tmp_path / "a", "alice/demo", seed=0)
        tiny_base.write_package(tmp_path / "b", "alice/demo", seed=1)
        refused = upload(client, alice, tmp_path / "b")
        assert refused.status_code == 403
        detail = refused.json()["detail"]
        assert (detail["error"], detail["check"]) == ("quota_exceeded", "max_versions_per_expert")
        assert detail["expected"] == "at most 1 version(s) of alice/demo"
        # Maintainers are exempt (curation, imports).
        assert upload(client, carol, tmp_path / "b").status_code == 201


def test_a_duplicate_past_a_quota_is_answered_as_a_duplicate(
    make_app, settings, tiny_base, tmp_path
):
    # It stores nothing, so the quota does not apply: 409 naming the existing version.
    directory = tiny_base.write_package(tmp_path / "a", "alice/demo", seed=0)
    size = sum(p.stat().st_size for p in directory.iterdir())
    application = _quota_app(
        make_app, settings, tiny_base, max_versions_per_expert=1, max_namespace_bytes=size + 1
    )
    alice = bearer_headers(application, "alice", Role.CONTRIBUTOR)
    with TestClient(application) as client:
        assert upload(client, alice, directory).status_code == 201
        again = upload(client, alice, directory)
        assert again.status_code == 409, again.text
        detail = again.json()["detail"]
        assert detail["check"] == "duplicate"
        assert detail["existing"]["version"] == 1


def test_experts_per_namespace_are_capped(make_app, settings, tiny_base, tmp_path):
    application = _quota_app(make_app, settings, tiny_base, max_experts_per_namespace=1)
    alice = bearer_headers(application, "alice", Role.CONTRIBUTOR)
    with TestClient(application) as client:
        publish(client, alice, tiny_base, tmp_path / "a", "alice/demo", seed=0)
        publish(client, alice, tiny_base, tmp_path / "b", "alice/demo", seed=1)  # same expert
        tiny_base.write_package(tmp_path / "c", "alice/other", seed=2)
        refused = upload(client, alice, tmp_path / "c")
        assert refused.status_code == 403
        assert refused.json()["detail"]["check"] == "max_experts_per_namespace"


def test_bytes_per_namespace_are_capped(make_app, settings, tiny_base, tmp_path):
    directory = tiny_base.write_package(tmp_path / "a", "alice/demo", seed=0)
    size = sum(p.stat().st_size for p in directory.iterdir())
    application = _quota_app(make_app, settings, tiny_base, max_namespace_bytes=size + size // 2)
    alice = bearer_headers(application, "alice", Role.CONTRIBUTOR)
    with TestClient(application) as client:
        assert upload(client, alice, directory).status_code == 201
        tiny_base.write_package(tmp_path / "b", "alice/demo", seed=1)
        refused = upload(client, alice, tmp_path / "b")
        assert refused.status_code == 403
        assert refused.json()["detail"]["check"] == "max_namespace_bytes"


def test_an_experts_versions_are_paginated(client, catalog):
    body = client.get(f"{API}/experts/alice/demo", params={"limit": 1, "offset": 1}).json()
    assert [v["version"] for v in body["versions"]] == [2]
    assert (body["total_versions"], body["limit"], body["offset"]) == (2, 1, 1)
    assert client.get(f"{API}/experts/alice/demo", params={"limit": 0}).status_code == 422
    assert client.get(f"{API}/experts/alice/demo", params={"limit": 10**6}).status_code == 422


def test_the_release_list_is_paginated(client, maintainer, catalog):
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo@1"])
    create_release(client, maintainer, method="phatgoose", experts=["bob/math@1"])
    page = client.get(f"{API}/releases", params={"limit": 1, "offset": 1})
    assert [r["number"] for r in page.json()] == [2]
    assert page.headers["x-total-count"] == "2"
    assert client.get(f"{API}/releases", params={"limit": 0}).status_code == 422
    assert client.get(f"{API}/releases", params={"offset": -1}).status_code == 422
    assert client.get(f"{API}/releases", params={"limit": 10**6}).status_code == 422


def test_a_second_contributor_token_for_an_owned_name_needs_same_owner(app):
    with app.state.sessionmaker() as session:
        first = create_token(session, name="alice", role=Role.CONTRIBUTOR)
        with pytest.raises(NamespaceTaken, match="--same-owner"):
            create_token(session, name="alice", role=Role.CONTRIBUTOR)
        # A maintainer's name is a namespace too.
        create_token(session, name="carol", role=Role.MAINTAINER)
        with pytest.raises(NamespaceTaken):
            create_token(session, name="carol", role=Role.CONTRIBUTOR)
        # The operator says it is the same holder (e.g. rotating a token).
        second = create_token(session, name="alice", role=Role.CONTRIBUTOR, same_owner=True)
        assert second.token.name == first.token.name == "alice"


def test_a_contributor_token_for_a_namespace_with_experts_needs_same_owner(
    app, client, maintainer, tiny_base, tmp_path
):
    # A maintainer published into 'dora' before dora had a token: the experts are not
    # the first contributor token's to take.
    publish(client, maintainer, tiny_base, tmp_path / "d", "dora/demo", seed=0)
    with app.state.sessionmaker() as session:
        with pytest.raises(NamespaceTaken, match="has experts"):
            create_token(session, name="dora", role=Role.CONTRIBUTOR)
        assert create_token(session, name="dora", role=Role.CONTRIBUTOR, same_owner=True)


def test_cli_create_token_refuses_an_owned_name_without_same_owner(settings):
    args = ["--data-dir", str(settings.data_dir), "--database-url", settings.database_url]
    runner = CliRunner()
    first = runner.invoke(cli, ["create-token", "--name", "alice", "--role", "contributor", *args])
    assert first.exit_code == 0, first.output
    second = runner.invoke(cli, ["create-token", "--name", "alice", "--role", "contributor", *args])
    assert second.exit_code != 0
    assert "--same-owner" in second.output
    third = runner.invoke(
        cli,
        ["create-token", "--name", "alice", "--role", "contributor", "--same-owner", *args],
    )
    assert third.exit_code == 0, third.output
    engine, _sessions = open_database(settings)
    engine.dispose()


def test_a_contributor_token_reads_every_namespace_when_public_read_is_off(
    make_app, settings, tiny_base, tmp_path
):
    """The documented rule: a private catalog is private from the network, not between its
    contributors (releases and the leaderboard combine every namespace)."""
    application = make_app(settings.model_copy(update={"public_read": False}))
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    alice = bearer_headers(application, "alice", Role.CONTRIBUTOR)
    bob = bearer_headers(application, "bob", Role.CONTRIBUTOR)
    with TestClient(application) as client:
        publish(client, alice, tiny_base, tmp_path / "a", "alice/demo", seed=0)
        assert client.get(f"{API}/experts/alice/demo/1").status_code == 401
        assert client.get(f"{API}/experts/alice/demo/1", headers=bob).status_code == 200
        files = client.get(f"{API}/experts/alice/demo/1/files/expert.json", headers=bob)
        assert files.status_code == 200


@pytest.mark.parametrize("number", ["١", "²", "+1"])
def test_cli_release_numbers_are_ascii(app, settings, client, maintainer, catalog, number):
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo@1"])
    args = ["--data-dir", str(settings.data_dir), "--database-url", settings.database_url]
    result = CliRunner().invoke(cli, ["withdraw-release", number, "--reason", "x", *args])
    assert result.exit_code == 2, result.output  # a usage error, release 1 untouched
    assert client.get(f"{API}/releases/1").json()["withdrawn"] is False


def test_a_release_body_lists_only_its_newest_jobs(client, maintainer, catalog, monkeypatch):
    from coordinator.releases import routes

    monkeypatch.setattr(routes, "JOBS_LISTED", 2)
    create_release(client, maintainer, method="phatgoose", experts=["alice/demo@1"])
    ids = [_evaluate(client, maintainer).json()["id"] for _ in range(3)]
    scores = client.get(f"{API}/releases/1").json()["scores"]
    assert [job["id"] for job in scores["evaluations"]] == ids[1:]
    assert scores["evaluations_total"] == 3
