"""Access control: 401 without a valid token, 403 outside one's namespace or role, 429 over
the rate limit, and no request path that reaches outside the data directory."""

from __future__ import annotations

import importlib.util
import re
import string
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import Message

from coordinator.auth.models import Role
from coordinator.auth.service import create_token, revoke_token
from coordinator.base_models.service import register_base_model
from coordinator.core.config import Settings
from coordinator.core.ratelimit import TokenBucketLimiter, remote_address
from coordinator.storage import LocalBlobStore
from tests.coordinator.helpers import TinyBase, bearer_headers, upload
from tests.reliability.catalog import catalog_state

MAINTAINER_ONLY_PREFIXES = ("/api/v1/releases", "/api/v1/evaluations")
PENDING_ROUTES = (
    "the releases/evaluations routes are not in this checkout yet "
    "(coordinator/releases/routes.py, coordinator/evaluations/routes.py)"
)


def _wrong_tokens(app: FastAPI) -> list[str]:
    """A garbage value, a well-formed token with a wrong secret, and a revoked token."""
    with app.state.sessionmaker() as session:
        issued = create_token(session, name="mallory", role=Role.MAINTAINER)
        revoked = create_token(session, name="eve", role=Role.MAINTAINER)
        revoke_token(session, revoked.token.public_id)
    prefix, public_id, _secret = issued.secret_token.split("_", 2)
    return [
        "not-a-token",
        f"{prefix}_{public_id}_{'x' * 43}",
        revoked.secret_token,
        "phg_" + "0" * 16 + "_" + "y" * 43,
    ]


def _write_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route that changes something."""
    return [
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method.upper() in ("POST", "PUT", "PATCH", "DELETE")
    ]


def _fill(path: str) -> str:
    """A concrete URL for a route template: every parameter becomes '1'."""
    return re.sub(r"\{[^}]+\}", "1", path)


# --- 401 -----------------------------------------------------------------------------


def test_every_write_route_without_token_is_401(app: FastAPI, client: TestClient) -> None:
    routes = _write_routes(app)
    assert ("POST", "/api/v1/experts") in routes
    for method, path in routes:
        response = client.request(method, _fill(path), json={})
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["detail"]["error"] == "unauthorized"


def test_every_write_route_with_a_wrong_token_is_401(app: FastAPI, client: TestClient) -> None:
    for token in _wrong_tokens(app):
        for method, path in _write_routes(app):
            response = client.request(
                method, _fill(path), json={}, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 401, (token, method, path, response.text)
            assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_upload_with_wrong_token_stores_nothing(
    app: FastAPI, client: TestClient, package: Callable[..., Path]
) -> None:
    before = catalog_state(app)
    for token in _wrong_tokens(app):
        response = upload(client, {"Authorization": f"Bearer {token}"}, package())
        assert response.status_code == 401
    assert catalog_state(app) == before


def test_reads_need_a_token_when_public_read_is_off(
    make_app: Callable[[Settings], FastAPI], settings: Settings, tiny_base: TinyBase
) -> None:
    application = make_app(settings.model_copy(update={"public_read": False}))
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    reader = bearer_headers(application, "reader", Role.CONTRIBUTOR)
    with TestClient(application) as client:
        for path in ("/api/v1/experts", "/api/v1/base-models", "/api/v1/experts/a/b/1"):
            assert client.get(path).status_code == 401, path
            bad = {"Authorization": "Bearer phg_" + "0" * 16 + "_" + "y" * 43}
            assert client.get(path, headers=bad).status_code == 401, path
        assert client.get("/api/v1/experts", headers=reader).status_code == 200


def test_a_bad_token_on_a_public_read_is_still_401(client: TestClient) -> None:
    response = client.get("/api/v1/experts", headers={"Authorization": "Bearer nonsense"})
    assert response.status_code == 401


# --- 403 -----------------------------------------------------------------------------


def test_contributor_cannot_publish_overwrite_or_yank_another_namespace(
    app: FastAPI,
    client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    package: Callable[..., Path],
) -> None:
    published = upload(client, alice, package("alice/demo", seed=1))
    assert published.status_code == 201
    original = client.get("/api/v1/experts/alice/demo/1").json()
    before = catalog_state(app)

    # Publish into alice's namespace (a new version of her expert, or a new expert).
    for name in ("alice/demo", "alice/other"):
        response = upload(client, bob, package(name, seed=2))
        assert response.status_code == 403, response.text
        assert response.json()["detail"]["check"] == "namespace"
    # Yank or unyank her version.
    for action, body in (("yank", {"reason": "mine now"}), ("unyank", None)):
        response = client.post(f"/api/v1/experts/alice/demo/1/{action}", json=body, headers=bob)
        assert response.status_code == 403, (action, response.text)
    # Overwrite or delete it: versions are immutable, there is no such route.
    for method in ("PUT", "PATCH", "DELETE"):
        response = client.request(method, "/api/v1/experts/alice/demo/1", headers=bob)
        assert response.status_code == 405, (method, response.text)
    response = client.put(
        "/api/v1/experts/alice/demo/1/files/router.safetensors", content=b"x", headers=bob
    )
    assert response.status_code == 405

    assert catalog_state(app) == before
    assert client.get("/api/v1/experts/alice/demo/1").json() == original


def test_contributor_on_maintainer_routes_is_403(
    app: FastAPI, client: TestClient, alice: dict[str, str], base_spec: object
) -> None:
    response = client.get("/api/v1/admin/startup-report", headers=alice)
    assert response.status_code == 403
    response = client.post(
        "/api/v1/base-models",
        headers=alice,
        json=base_spec.model_dump(mode="json"),  # type: ignore[attr-defined]
    )
    assert response.status_code == 403


def _maintainer_only_routes(app: FastAPI) -> list[tuple[str, str]]:
    return [(m, p) for m, p in _write_routes(app) if p.startswith(MAINTAINER_ONLY_PREFIXES)]


@pytest.mark.skipif(
    importlib.util.find_spec("coordinator.releases.routes") is None
    and importlib.util.find_spec("coordinator.evaluations.routes") is None,
    reason=PENDING_ROUTES,
)
def test_only_maintainers_build_releases_and_evaluations(
    app: FastAPI, client: TestClient, alice: dict[str, str], maintainer: dict[str, str]
) -> None:
    routes = _maintainer_only_routes(app)
    if not routes:
        pytest.skip(PENDING_ROUTES)
    for method, path in routes:
        response = client.request(method, _fill(path), json={}, headers=alice)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["detail"]["error"] == "forbidden"
        # A maintainer gets past the permission check (to a validation or lookup answer).
        response = client.request(method, _fill(path), json={}, headers=maintainer)
        assert response.status_code not in (401, 403), (method, path, response.text)
        assert response.status_code < 500, (method, path, response.text)


# --- 429 -----------------------------------------------------------------------------


@pytest.fixture
def limited_app(
    make_app: Callable[[Settings], FastAPI], settings: Settings, tiny_base: TinyBase
) -> FastAPI:
    limited = settings.model_copy(
        update={"rate_limit_enabled": True, "rate_limit_burst": 5, "rate_limit_per_minute": 6}
    )
    application = make_app(limited)
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    return application


def test_rate_limit_answers_429_with_retry_after(limited_app: FastAPI) -> None:
    alice = bearer_headers(limited_app, "alice", Role.CONTRIBUTOR)
    bob = bearer_headers(limited_app, "bob", Role.CONTRIBUTOR)
    with TestClient(limited_app) as client:
        codes = [client.get("/api/v1/auth/me", headers=alice).status_code for _ in range(6)]
        assert codes == [200] * 5 + [429]
        refused = client.get("/api/v1/experts", headers=alice)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "10"  # 6 a minute: one token per 10 s
        assert refused.headers["x-request-id"]
        detail = refused.json()["detail"]
        assert (detail["error"], detail["check"]) == ("rate_limited", "rate_limit")
        assert "retry after 10 s" in detail["message"]
        # Another token has its own bucket; so do anonymous clients (by address).
        assert client.get("/api/v1/auth/me", headers=bob).status_code == 200
        assert client.get("/api/v1/experts").status_code == 200
        # Pages outside /api/ (docs, schema) count against the address's own, larger budget.
        assert client.get("/openapi.json").status_code == 200


def test_rate_limited_upload_is_refused_before_the_body_is_read(
    limited_app: FastAPI, package: Callable[..., Path]
) -> None:
    alice = bearer_headers(limited_app, "alice", Role.CONTRIBUTOR)
    with TestClient(limited_app) as client:
        for _ in range(5):
            client.get("/api/v1/health", headers=alice)
        before = catalog_state(limited_app)
        response = upload(client, alice, package("alice/late"))
        assert response.status_code == 429
        assert catalog_state(limited_app) == before


def test_anonymous_clients_are_limited_by_address(limited_app: FastAPI) -> None:
    with TestClient(limited_app) as client:
        codes = [client.get("/api/v1/health").status_code for _ in range(7)]
    assert codes == [200] * 5 + [429, 429]


def test_rate_limit_is_off_by_default_and_set_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().rate_limit_enabled is False
    monkeypatch.setenv("PHATGOOSE_RATE_LIMIT_ENABLED", "true")
    monkeypatch.setenv("PHATGOOSE_RATE_LIMIT_PER_MINUTE", "30")
    monkeypatch.setenv("PHATGOOSE_RATE_LIMIT_BURST", "3")
    configured = Settings()
    assert configured.rate_limit_enabled is True
    assert (configured.rate_limit_per_minute, configured.rate_limit_burst) == (30, 3)


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = TokenBucketLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert [limiter.take("a").allowed for _ in range(3)] == [True, True, False]
    assert limiter.take("a").retry_after == pytest.approx(1.0)
    now[0] = 0.5
    assert not limiter.take("a").allowed
    now[0] = 1.0
    assert limiter.take("a").allowed
    now[0] = 100.0  # refills up to the burst, not beyond
    assert [limiter.take("a").allowed for _ in range(3)] == [True, True, False]


def test_token_bucket_keeps_a_bounded_number_of_clients() -> None:
    limiter = TokenBucketLimiter(per_minute=60, burst=1, max_clients=100)
    for i in range(10_000):
        limiter.take(f"forged-{i}")
    assert len(limiter) == 100


def test_the_address_key_ignores_tokens_and_forwarded_headers() -> None:
    # A token's public id selects a bucket only once the token is verified (test_http_edge).
    token = b"Bearer phg_0123456789abcdef_" + b"s" * 43
    for header in (token, b"Bearer nonsense", b"Basic Zm9vOmJhcg=="):
        scope = {
            "headers": [(b"authorization", header), (b"x-forwarded-for", b"10.9.9.9")],
            "client": ("10.0.0.1", 5),
        }
        assert remote_address(scope) == "10.0.0.1"
    assert remote_address({"headers": [], "client": None}) == "unknown"


# --- paths ---------------------------------------------------------------------------

HOSTILE_NAMES = [
    "..",
    "../../etc/passwd",
    "..%2F..%2Fcoordinator.sqlite",
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "blobs",
    "..\\..\\windows",
    "a\x00b",
    "x" * 5000,
    "ü/../../ä",
    ".tmp-upload-x",
    "%00",
    "~root",
]


def _paths_for(name: str) -> list[str]:
    encoded = quote(name, safe="%")
    return [
        f"/api/v1/experts/alice/demo/1/files/{encoded}",
        f"/api/v1/experts/{encoded}/demo/1/files/router.safetensors",
        f"/api/v1/experts/alice/{encoded}/1/files/router.safetensors",
        f"/api/v1/experts/{encoded}/{encoded}",
        f"/api/v1/experts/alice/demo/{encoded}",
        f"/api/v1/base-models/{encoded}",
    ]


def raw_get(app: FastAPI, raw_path: str) -> tuple[int, bytes]:
    """GET exactly `raw_path` through the ASGI app, as `curl --path-as-is` would send it
    (an HTTP client library would normalise the dot segments away first)."""
    messages: list[Message] = []
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def exchange() -> None:
        answered = anyio.Event()

        async def receive() -> Message:
            # The request once; then, as a server does, nothing until the client leaves
            # (a streamed response listens for that while it sends).
            if requests:
                return requests.pop()
            await answered.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered.set()

        await app(scope, receive, send)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode("latin-1", "replace"),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "app": app,
    }
    anyio.run(exchange)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, body


def test_path_traversal_in_names_is_4xx(
    app: FastAPI, client: TestClient, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    assert upload(client, alice, package("alice/demo")).status_code == 201
    secret = b"must never be served"
    (app.state.settings.data_dir / "secret.txt").write_bytes(secret)
    assert raw_get(app, "/api/v1/experts/alice/demo/1/files/router.safetensors")[0] == 200
    for name in HOSTILE_NAMES:
        for path in _paths_for(name):
            status, body = raw_get(app, path)
            assert 400 <= status < 500, (path, status)
            assert secret not in body
            assert b"SQLite format" not in body


def test_hostile_file_names_in_an_upload_are_refused(
    app: FastAPI, client: TestClient, alice: dict[str, str], package: Callable[..., Path]
) -> None:
    directory = package("alice/demo")
    before = catalog_state(app)
    outside = app.state.settings.data_dir.parent
    for name in ("../expert.json", "/tmp/expert.json", "../../escape.json", "sub/expert.json"):
        parts = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
        parts[0] = ("files", (name, b"{}"))
        response = client.post("/api/v1/experts", headers=alice, files=parts)
        assert response.status_code == 422, (name, response.text)
        assert response.json()["detail"]["check"] == "file_names"
    assert catalog_state(app) == before
    assert not (outside / "escape.json").exists()
    assert not Path("/tmp/expert.json").exists() or Path("/tmp/expert.json").stat().st_size != 2


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=string.printable + "\x00./\\ü", max_size=80))
def test_blob_store_resolves_only_inside_its_root(name: str) -> None:
    store = LocalBlobStore.__new__(LocalBlobStore)  # no directory needed to resolve a path
    store.root = Path("/srv/phatgoose/blobs")
    try:
        path = store.path(name)
    except ValueError:
        return
    assert re.fullmatch(r"[0-9a-f]{64}", name)
    assert path.resolve().is_relative_to(store.root)
    assert path.parent.parent == store.root
