"""Property: whatever anyone sends to any route (hostile path and query values, hostile JSON
bodies, as an anonymous client, a contributor, a maintainer or with a forged token), the
answer is never a 5xx; a 4xx carries the error shape (or, on a page, the HTML 404 page); and
a refused request changes nothing: no row of any table, no blob, no upload temp file.

Routes come from walking `app.routes` (`route_fuzzing.route_specs`): a new route is fuzzed
as soon as it exists, and `test_every_route_has_a_fuzz_strategy` fails while one of its
parameters or its body has no strategy. `PHATGOOSE_FUZZ_EXAMPLES` sets the cases per database
(CI: 300 on SQLite, 150 on PostgreSQL); `benchmarks/fuzz_long.py --suite routes` runs
thousands, and `PHATGOOSE_ROUTE_FUZZ_REPORT` collects the tally.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from sqlalchemy import MetaData, select

from coordinator.auth.models import Role
from tests.coordinator.helpers import TinyBase, bearer_headers, upload
from tests.coordinator.web_helpers import TaskOutcome, create_release, record_evaluation
from tests.reliability.catalog import catalog_state
from tests.reliability.route_fuzzing import (
    MULTIPART_ROUTES,
    RawResponse,
    RequestCase,
    RouteSpec,
    UnknownParameter,
    request_cases,
    route_specs,
    send_raw,
)

EXAMPLES = int(os.environ.get("PHATGOOSE_FUZZ_EXAMPLES", "0")) or None
REPORT = os.environ.get("PHATGOOSE_ROUTE_FUZZ_REPORT")


def valid_bodies(tiny_base: TinyBase) -> dict[str, dict[str, Any]]:
    """A valid body per JSON body model, in the fuzz world (mutations start from these)."""
    reason = {"reason": "fuzzing"}
    return {
        "BaseModelSpec": tiny_base.spec.model_dump(mode="json"),
        "ReleaseCreate": {"method": "merged", "experts": ["alice/demo@1"], "notes": "fuzz"},
        "EvaluationCreate": {"release": 1, "tasks": ["navigate"], "examples_per_task": 10},
        "CreditCreate": {"tasks": ["navigate"], "examples_per_task": 10},
        "YankRequest": reason,
        "BlockRequest": reason,
        "WithdrawRequest": reason,
        # Before a delta upload: which digests the catalog lacks (protocol.segments).
        "MissingRequest": {"sha256": ["a" * 64, "0" * 64]},
        # Release channels (coordinator.channels).
        "ChannelCreate": {
            "name": "alice/latest",
            "method": "phatgoose",
            "spec": {"tasks": ["navigate"], "examples_per_task": 10},
        },
        "ChannelUpdate": {"top_k": 1, "notes": "fuzz"},
        "PinRequest": {"release": 1, "reason": "fuzzing"},
        "RollbackRequest": reason,
        "PauseRequest": reason,
        # The job API of remote workers (coordinator.evaluations.worker_routes).
        "LeaseRequest": {"worker_id": "w1", "lease_seconds": 60, "max_attempts": 3},
        "HeartbeatRequest": {"worker_id": "w1", "lease_seconds": 60},
        "ResultReport": {
            "worker_id": "w1",
            "task": "navigate",
            "accuracy": 0.5,
            "stderr": 0.2,
            "n": 4,
            "evaluator_version": "fuzz+0",
            "seconds": 0.5,
            "routing_stats": None,
            "precision": "float32",
            "outcomes": {"predictions": [0, 1, 1, 0], "correct": [True, False, True, False]},
        },
        "CompleteRequest": {"worker_id": "w1"},
        "FailRequest": {"worker_id": "w1", "error": "fuzz", "final": False},
    }


def test_every_route_has_a_fuzz_strategy(app: FastAPI, tiny_base: TinyBase) -> None:
    """New routes are fuzzed by default; this fails when one cannot be (a parameter type
    or a JSON body the strategies do not know)."""
    try:
        routes = route_specs(app)
    except UnknownParameter as error:
        pytest.fail(f"{error}: teach tests/reliability/route_fuzzing.py:_param about it")
    bodies = valid_bodies(tiny_base)
    missing = [r.label for r in routes if r.body_model is not None and r.body_model not in bodies]
    assert not missing, f"add a valid body for these routes' models to valid_bodies: {missing}"
    labels = {r.label for r in routes}
    assert {f"{m} {p}" for m, p in MULTIPART_ROUTES} <= labels
    assert "GET /ui/releases/{number}" in labels and "POST /api/v1/evaluations" in labels
    assert len(routes) >= 30


def world_state(app: FastAPI, tables: MetaData) -> str:
    """A digest of every row of every table, the blobs and the upload temp folder."""
    digest = hashlib.sha256()
    with app.state.engine.connect() as connection:
        for table in tables.sorted_tables:
            rows = connection.execute(select(table)).all()
            digest.update(f"{table.name}:{sorted(repr(tuple(r)) for r in rows)}".encode())
    files = catalog_state(app)
    digest.update(repr((sorted(files.blobs), files.uploads_in_progress)).encode())
    return digest.hexdigest()


def check_answer(case: RequestCase, response: RawResponse) -> None:
    """Never a 5xx; a 4xx says what went wrong in the error shape (or is the HTML page)."""
    where = f"{case.describe()} -> {response.status} {response.body[:300]!r}"
    assert response.raised is None and response.status < 500, where
    if response.status < 400:
        return
    if response.headers.get("content-type", "").startswith("text/html"):
        assert response.status == 404 and case.route.path.startswith("/ui"), where
        return
    detail = response.json()["detail"]
    assert isinstance(detail, dict), where
    assert isinstance(detail.get("message"), str) and detail["message"].strip(), where
    assert detail.get("error") and detail.get("check"), where
    assert {"file", "tensor", "expected"} <= set(detail), where


def write_tally(
    tally: Counter[tuple[str, int]], database_url: str, changes: int, done: bool
) -> None:
    if not REPORT:
        return
    path = Path(REPORT)
    entries = json.loads(path.read_text()) if path.exists() else []
    database = database_url.split(":", 1)[0].split("+")[0]
    entries = [e for e in entries if e["database"] != database]
    by_label: dict[str, dict[str, int]] = {}
    for (label, status), n in sorted(tally.items()):
        by_label.setdefault(label, {})[str(status)] = n
    entries.append(
        {
            "database": database,
            "cases": sum(tally.values()),
            "server_errors": sum(n for (_, s), n in tally.items() if s >= 500),
            "catalog_changes_on_refusal": changes,
            "done": done,
            "by_label": by_label,
        }
    )
    path.write_text(json.dumps(entries, indent=1))


@pytest.fixture
def world(
    app: FastAPI, tiny_base: TinyBase, package: Callable[..., Path]
) -> Iterator[tuple[FastAPI, dict[str, bytes]]]:
    """An expert, a release, an evaluation with a result, a release channel, four
    identities."""
    alice = bearer_headers(app, "alice", Role.CONTRIBUTOR)
    carol = bearer_headers(app, "carol", Role.MAINTAINER)
    gpu = bearer_headers(app, "gpu", Role.WORKER)
    with TestClient(app) as client:
        assert upload(client, alice, package("alice/demo")).status_code == 201
        create_release(client, carol, method="merged", experts=["alice/demo@1"], notes="")
        # A release channel the path values reach (alice/demo), at no release yet.
        channel = {"name": "alice/demo", "method": "phatgoose"}
        assert client.post("/api/v1/channels", headers=carol, json=channel).status_code == 201
    record_evaluation(app, 1, {"navigate": TaskOutcome(0.5)})
    tokens = {
        "contributor": alice["Authorization"].encode(),
        "maintainer": carol["Authorization"].encode(),
        "worker": gpu["Authorization"].encode(),
    }
    yield app, tokens


def _examples(database_url: str) -> int:
    if EXAMPLES:
        return EXAMPLES
    return 300 if database_url.startswith("sqlite") else 150


def test_hostile_requests_to_every_route_are_4xx_and_change_nothing(
    world: tuple[FastAPI, dict[str, bytes]], tiny_base: TinyBase, database_url: str
) -> None:
    app, tokens = world
    routes: list[RouteSpec] = route_specs(app)
    tables = MetaData()
    tables.reflect(app.state.engine)
    tally: Counter[tuple[str, int]] = Counter()
    changes = 0
    state = {"before": world_state(app, tables)}

    @settings(
        max_examples=_examples(database_url),
        deadline=None,
        database=None,
        phases=[Phase.generate],  # a failure is reported with its request; no shrinking
        suppress_health_check=list(HealthCheck),
    )
    @given(case=request_cases(routes, tokens, valid_bodies(tiny_base)))
    def check(case: RequestCase) -> None:
        nonlocal changes
        response = send_raw(app, case)
        tally[(case.label, response.status)] += 1
        if sum(tally.values()) % 500 == 0:  # progress, for long runs
            write_tally(tally, database_url, changes, done=False)
        check_answer(case, response)
        after = world_state(app, tables)
        if response.status >= 400 and after != state["before"]:
            changes += 1
            pytest.fail(f"{case.describe()} -> {response.status} changed the catalog")
        state["before"] = after  # a write that succeeded is the new baseline

    try:
        check()
    finally:
        write_tally(tally, database_url, changes, done=True)
    statuses = Counter(status for (_, status), n in tally.items() for _ in range(n))
    assert statuses[200] > 0 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 0


@pytest.mark.parametrize(
    "path", ["/", "/ui/releases", "/ui/experts", "/ui/releases/1", "/api/v1/experts//", "/x/"]
)
def test_a_query_string_that_is_not_utf8_is_400_everywhere(
    world: tuple[FastAPI, dict[str, bytes]], path: str
) -> None:
    """Found by this fuzz: Starlette decodes the query string as UTF-8 whenever it builds
    `request.url` (the pages' links, the router's trailing-slash redirect), so raw bytes such
    as `?method=\\xff` (an HTTP server passes them through) were a 500 on every page and on
    any path ending in a slash."""
    app, _tokens = world
    route = RouteSpec("GET", path, (), (), None)
    case = RequestCase("utf8", route, "anonymous", "GET", path, b"method=x\xff", (), b"")
    response = send_raw(app, case)
    assert response.status == 400, response.body[:300]
    assert response.json()["detail"]["check"] == "query_string"
