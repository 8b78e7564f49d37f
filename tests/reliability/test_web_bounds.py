"""Integers in page and list URLs are bounded (issue 14, item 7), and every list that can
grow without bound is paginated.

Before the fix, `/ui/releases/<n>`, `?offset=` on the pages, `/ui/results/<id>/routing.png`
and `GET /api/v1/evaluations?release=` passed any integer to the database: past 64 bits
SQLite's driver raised OverflowError, past 32 bits PostgreSQL a DataError: a 500.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from coordinator.core.params import DB_INT_MAX
from coordinator.releases.models import Release
from coordinator.web import queries
from tests.coordinator.helpers import TinyBase, upload
from tests.coordinator.web_helpers import TaskOutcome, create_release, record_evaluation

HOSTILE_INTEGERS = [str(2**63), str(2**64), "-1", str(10**30), "١", "²", str(DB_INT_MAX + 1)]

INTEGER_URLS = [
    "/ui/releases/{n}",
    "/ui/releases?offset={n}",
    "/ui/results/{n}/routing.png",
    "/ui/experts?offset={n}",
    "/ui/experts/alice/demo?offset={n}",
    "/?offset={n}",
    "/ui/leaderboard?offset={n}",
    "/leaderboard?offset={n}",
    "/api/v1/evaluations?release={n}",
    "/api/v1/evaluations?offset={n}",
    "/api/v1/evaluations/{n}",
    "/api/v1/base-models?offset={n}",
]


def _assert_project_error(response, where: str) -> None:
    """A 4xx whose body is the project's error shape (or, for a page, an HTML page)."""
    assert 400 <= response.status_code < 500, (where, response.status_code, response.text[:300])
    if response.headers.get("content-type", "").startswith("text/html"):
        return
    detail = response.json()["detail"]
    assert isinstance(detail, dict), (where, detail)
    assert detail["error"] and detail["check"] and detail["message"].strip(), (where, detail)
    assert set(detail) >= {"error", "check", "file", "tensor", "expected", "message"}, where


@pytest.fixture
def world(
    app: FastAPI, alice: dict[str, str], maintainer: dict[str, str], package: Callable[..., Path]
) -> FastAPI:
    """One expert, one release with one evaluation: the queries have rows to look at."""
    with TestClient(app) as client:
        assert upload(client, alice, package("alice/demo")).status_code == 201
        number = create_release(
            client, maintainer, method="merged", experts=["alice/demo@1"], notes=""
        )
    record_evaluation(app, number, {"navigate": TaskOutcome(0.5)})
    return app


@pytest.mark.parametrize("value", HOSTILE_INTEGERS)
def test_huge_negative_and_non_ascii_integers_in_urls_are_4xx(world: FastAPI, value: str) -> None:
    with TestClient(world, raise_server_exceptions=False) as client:
        for template in INTEGER_URLS:
            url = template.format(n=value)
            _assert_project_error(client.get(url), url)


def test_an_out_of_range_integer_names_the_parameter_and_its_range(world: FastAPI) -> None:
    with TestClient(world, raise_server_exceptions=False) as client:
        response = client.get(f"/api/v1/evaluations?release={2**64}")
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail["error"] == "invalid_request" and detail["check"] == "request"
    assert "release" in detail["message"] and "query" in detail["message"]
    assert str(DB_INT_MAX) in detail["expected"]


def test_integers_within_bounds_still_work(world: FastAPI) -> None:
    with TestClient(world) as client:
        assert client.get("/ui/releases/1").status_code == 200
        assert client.get(f"/ui/releases/{DB_INT_MAX}").status_code == 404
        assert client.get(f"/ui/releases?offset={DB_INT_MAX}").status_code == 200
        assert [j["release"] for j in client.get("/api/v1/evaluations?release=1").json()] == [1]
        assert client.get(f"/api/v1/evaluations?release={DB_INT_MAX}").json() == []


# --- pagination --------------------------------------------------------------------------


def test_evaluations_list_is_paginated(world: FastAPI) -> None:
    for _ in range(3):
        record_evaluation(world, 1, {"navigate": TaskOutcome(0.5)})
    with TestClient(world, raise_server_exceptions=False) as client:
        everything = client.get("/api/v1/evaluations")
        assert everything.headers["x-total-count"] == "4"
        ids = [j["id"] for j in everything.json()]
        assert len(ids) == 4
        page = client.get("/api/v1/evaluations?limit=2&offset=1")
        assert [j["id"] for j in page.json()] == ids[1:3]
        assert page.headers["x-total-count"] == "4"
        assert client.get("/api/v1/evaluations?limit=0").status_code == 422
        assert client.get("/api/v1/evaluations?limit=100000").status_code == 422


def test_base_model_list_is_paginated(
    app: FastAPI, maintainer: dict[str, str], tiny_base: TinyBase
) -> None:
    with TestClient(app, raise_server_exceptions=False) as client:
        for i in range(3):
            spec = tiny_base.spec.model_copy(
                update={"name": f"other-{i}", "fingerprint": "sha256:" + f"{i}" * 64}
            )
            response = client.post(
                "/api/v1/base-models", json=spec.model_dump(mode="json"), headers=maintainer
            )
            assert response.status_code == 201, response.text
        names = [m["name"] for m in client.get("/api/v1/base-models").json()]
        assert len(names) == 4
        page = client.get("/api/v1/base-models?limit=2&offset=2")
        assert [m["name"] for m in page.json()] == names[2:]
        assert page.headers["x-total-count"] == "4"
        assert client.get("/api/v1/base-models?limit=100000").status_code == 422


def test_expert_page_pages_its_versions(
    app: FastAPI, alice: dict[str, str], tiny_base: TinyBase, tmp_path: Path
) -> None:
    with TestClient(app) as client:
        for seed in range(3):
            directory = tiny_base.write_package(tmp_path / f"p{seed}", "alice/demo", seed=seed)
            assert upload(client, alice, directory).status_code == 201
        html = client.get("/ui/experts/alice/demo?limit=2").text
        assert 'id="v3"' in html and 'id="v2"' in html and 'id="v1"' not in html
        assert "3 versions" in html
        html = client.get("/ui/experts/alice/demo?limit=2&offset=2").text
        assert 'id="v1"' in html and 'id="v3"' not in html
        assert client.get("/ui/experts/alice/demo?limit=100000").status_code == 422


def test_release_page_reads_only_its_newest_jobs(world: FastAPI) -> None:
    for _ in range(3):
        record_evaluation(world, 1, {"navigate": TaskOutcome(0.5)})
    with world.state.sessionmaker() as session:
        release = session.scalar(select(Release).where(Release.number == 1))
        assert release is not None
        jobs = queries.release_jobs(session, release, limit=2)
    assert jobs.total == 4
    assert [j.id for j in jobs.items] == [4, 3]
    with TestClient(world) as client:
        assert "Evaluation jobs (4)" in client.get("/ui/releases/1").text


@pytest.mark.parametrize("value", [2**31, 2**63, 2**64, 10**30])
def test_an_evaluation_of_a_release_number_past_the_bound_is_422(
    world: FastAPI, maintainer: dict[str, str], value: int
) -> None:
    """Found by test_fuzz_routes.py: `POST /api/v1/evaluations` with `release` past 64 bits
    was a 500 (SQLite's OverflowError)."""
    body = {"release": value, "tasks": ["navigate"], "examples_per_task": 10}
    with TestClient(world, raise_server_exceptions=False) as client:
        response = client.post("/api/v1/evaluations", json=body, headers=maintainer)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["message"].startswith("the body['release']")
