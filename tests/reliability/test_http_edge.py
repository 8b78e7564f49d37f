"""The HTTP edge (issue 14): authentication before any body byte, a cap on JSON bodies, rate
limits that forged or stolen token ids cannot dodge or drain, pages and images limited and
cached, plots that never parse user text as math, log lines that user text cannot forge,
security headers, and a private data directory."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import Message

import coordinator.auth.service as auth
import coordinator.core.deps as deps
import coordinator.core.edge as edge
from coordinator.auth.models import Role
from coordinator.auth.service import create_token, revoke_token
from coordinator.base_models.service import register_base_model
from coordinator.core.config import Settings
from coordinator.core.logging import escape_control, log_handler
from coordinator.web import plots
from coordinator.web.analysis import LayerRouting
from coordinator.web.queries import MethodMean
from tests.coordinator.helpers import TinyBase, bearer_headers, upload
from tests.coordinator.test_web import PHATGOOSE_STATS
from tests.coordinator.web_helpers import TaskOutcome, create_release, record_evaluation
from tests.reliability.catalog import catalog_state

MiB = 1 << 20


# --- a raw ASGI client: counts what the app reads ----------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    receive_calls: int
    bytes_read: int = 0
    messages: list[Message] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


def asgi_request(
    app: FastAPI,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    chunks: Iterator[bytes] | list[bytes] = (),
    client: str = "127.0.0.1",
    declare_length: bool = True,
) -> RawResponse:
    """Send one request straight into the ASGI app, its body in `chunks`; `receive_calls`
    counts how often the app asked for body bytes."""
    body_chunks = list(chunks)
    total = sum(len(c) for c in body_chunks)
    raw_headers = [(b"host", b"testserver")]
    raw_headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if declare_length and body_chunks:
        raw_headers.append((b"content-length", str(total).encode()))
    elif body_chunks:
        raw_headers.append((b"transfer-encoding", b"chunked"))
    pending = iter(body_chunks)
    result = RawResponse(status=0, headers={}, body=b"", receive_calls=0)

    async def receive() -> Message:
        result.receive_calls += 1
        chunk = next(pending, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        result.bytes_read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: Message) -> None:
        result.messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8"),
        "query_string": b"",
        "root_path": "",
        "headers": raw_headers,
        "client": (client, 1234),
        "server": ("testserver", 80),
        "app": app,
    }
    anyio.run(app, scope, receive, send)
    start = next(m for m in result.messages if m["type"] == "http.response.start")
    result.status = start["status"]
    result.headers = {k.decode(): v.decode("latin-1") for k, v in start["headers"]}
    result.body = b"".join(
        m.get("body", b"") for m in result.messages if m["type"] == "http.response.body"
    )
    return result


def forged_token(public_id: str | None = None) -> str:
    return f"phg_{public_id or secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def public_id_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ").split("_")[1]


# Every POST route that takes a JSON body, and the upload (multipart, its own limits).
JSON_WRITES = [
    "/api/v1/releases",
    "/api/v1/evaluations",
    "/api/v1/base-models",
    "/api/v1/experts/alice/demo/1/yank",
    "/api/v1/experts/alice/demo/1/unyank",
]
ALL_WRITES = [*JSON_WRITES, "/api/v1/experts"]


def _big_chunks(size: int, chunk: int = 64 * 1024) -> list[bytes]:
    return [b"x" * chunk] * (size // chunk)


# --- item 3: authentication before the body; a cap on JSON bodies -----------------------


def test_anonymous_write_with_a_large_body_is_401_before_a_body_byte_is_read(
    app: FastAPI,
) -> None:
    for path in ALL_WRITES:
        for headers in ({}, {"Authorization": f"Bearer {forged_token()}"}, {"Authorization": "x"}):
            response = asgi_request(
                app,
                "POST",
                path,
                headers={"content-type": "application/json", **headers},
                chunks=_big_chunks(32 * MiB),
            )
            assert response.status == 401, (path, headers, response.body)
            assert response.receive_calls == 0, (path, headers)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["detail"]["error"] == "unauthorized"
            # The unread body cannot be followed by another request on this connection.
            assert response.headers["connection"] == "close"
    # Methods without a route are refused as early: no body is read to answer them.
    for method in ("PUT", "PATCH", "DELETE"):
        response = asgi_request(
            app, method, "/api/v1/experts/alice/demo/1", chunks=_big_chunks(32 * MiB)
        )
        assert (response.status, response.receive_calls) == (401, 0), method


def test_a_revoked_or_wrong_secret_token_is_401_before_the_body_is_read(app: FastAPI) -> None:
    with app.state.sessionmaker() as session:
        issued = create_token(session, name="mallory", role=Role.MAINTAINER)
        revoked = create_token(session, name="eve", role=Role.MAINTAINER)
        revoke_token(session, revoked.token.public_id)
    wrong_secret = forged_token(issued.token.public_id)
    for token in (wrong_secret, revoked.secret_token):
        response = asgi_request(
            app,
            "POST",
            "/api/v1/releases",
            headers={"Authorization": f"Bearer {token}", "content-type": "application/json"},
            chunks=_big_chunks(4 * MiB),
        )
        assert (response.status, response.receive_calls) == (401, 0)
        assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_an_authenticated_oversized_json_body_is_413_from_its_content_length(
    app: FastAPI, client: TestClient, maintainer: dict[str, str]
) -> None:
    before = catalog_state(app)
    body = {"method": "base", "base_model": "tiny", "padding": "x" * (2 * MiB)}
    for path in JSON_WRITES:
        response = client.post(path, headers=maintainer, json=body)
        assert response.status_code == 413, (path, response.text)
        detail = response.json()["detail"]
        assert set(detail) >= {"error", "check", "file", "tensor", "expected", "message"}
        assert (detail["error"], detail["check"]) == ("too_large", "request_size")
        assert str(MiB) in detail["expected"]
    raw = asgi_request(
        app, "POST", "/api/v1/releases", headers=maintainer, chunks=_big_chunks(32 * MiB)
    )
    assert (raw.status, raw.receive_calls) == (413, 0)
    # A read with a body is capped too (no route reads it, but nothing should buffer it).
    read = asgi_request(app, "GET", "/api/v1/health", chunks=_big_chunks(4 * MiB))
    assert (read.status, read.receive_calls) == (413, 0)
    assert catalog_state(app) == before


def test_a_json_body_without_a_length_is_cut_off_at_the_cap(
    app: FastAPI, maintainer: dict[str, str]
) -> None:
    response = asgi_request(
        app,
        "POST",
        "/api/v1/releases",
        headers={**maintainer, "content-type": "application/json"},
        chunks=_big_chunks(32 * MiB),
        declare_length=False,
    )
    assert response.status == 413, response.body
    assert response.json()["detail"]["check"] == "request_size"
    # Reading stopped at the first chunk past the cap, not at the end of the body.
    assert response.bytes_read <= MiB + 64 * 1024


def test_a_body_longer_than_its_declared_length_is_cut_off_at_the_cap(
    app: FastAPI, maintainer: dict[str, str]
) -> None:
    raw_headers = {**maintainer, "content-type": "application/json", "content-length": "10"}
    response = asgi_request(
        app,
        "POST",
        "/api/v1/base-models",
        headers=raw_headers,
        chunks=_big_chunks(8 * MiB),
        declare_length=False,
    )
    assert response.status == 413
    assert response.bytes_read <= MiB + 64 * 1024


def test_a_json_body_under_the_cap_still_works(
    client: TestClient, maintainer: dict[str, str]
) -> None:
    response = client.post(
        "/api/v1/releases", headers=maintainer, json={"method": "base", "base_model": "tiny"}
    )
    assert response.status_code == 201, response.text


def test_a_write_asks_the_database_for_its_token_once(
    client: TestClient, maintainer: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge verifies the token; the route's dependency reuses it."""
    calls: list[str] = []

    def counted(session: Any, presented: str) -> Any:
        calls.append(presented)
        return auth.authenticate(session, presented)

    monkeypatch.setattr(edge, "authenticate", counted)
    monkeypatch.setattr(deps, "authenticate", counted)
    response = client.post(
        "/api/v1/releases", headers=maintainer, json={"method": "base", "base_model": "tiny"}
    )
    assert response.status_code == 201, response.text
    assert len(calls) == 1


def test_the_upload_keeps_its_own_limits_not_the_json_cap(
    make_app: Callable[[Settings], FastAPI],
    settings: Settings,
    tiny_base: TinyBase,
    package: Callable[..., Path],
) -> None:
    application = make_app(settings.model_copy(update={"max_request_body_bytes": 1024}))
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    alice = bearer_headers(application, "alice", Role.CONTRIBUTOR)
    directory = package("alice/big")
    assert sum(p.stat().st_size for p in directory.iterdir()) > 1024
    with TestClient(application) as client:
        assert upload(client, alice, directory).status_code == 201
        refused = client.post(
            "/api/v1/experts/alice/big/1/yank", headers=alice, json={"reason": "x" * 2000}
        )
        assert refused.status_code == 413


# --- item 5: rate limits keyed on verified tokens and addresses, pages included ---------


@pytest.fixture
def limited_app(
    make_app: Callable[[Settings], FastAPI], settings: Settings, tiny_base: TinyBase
) -> FastAPI:
    limited = settings.model_copy(
        update={
            "rate_limit_enabled": True,
            "rate_limit_burst": 5,
            "rate_limit_per_minute": 6,
            "rate_limit_address_burst": 50,
            "rate_limit_address_per_minute": 6,
        }
    )
    application = make_app(limited)
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    return application


def test_forged_token_ids_from_one_address_share_that_address_budget(
    limited_app: FastAPI,
) -> None:
    codes = [
        asgi_request(
            limited_app,
            "GET",
            "/api/v1/experts",
            headers={"Authorization": f"Bearer {forged_token()}"},
            client="10.0.0.7",
        ).status
        for _ in range(8)
    ]
    assert codes == [401] * 5 + [429] * 3


def test_a_victims_public_id_with_a_wrong_secret_does_not_drain_the_victims_budget(
    limited_app: FastAPI,
) -> None:
    victim = bearer_headers(limited_app, "victim", Role.CONTRIBUTOR)
    impostor = {"Authorization": f"Bearer {forged_token(public_id_of(victim))}"}
    for address in ("10.0.0.66", "10.0.0.67", "10.0.0.68"):
        for _ in range(6):
            asgi_request(limited_app, "GET", "/api/v1/auth/me", headers=impostor, client=address)
    codes = [
        asgi_request(
            limited_app, "GET", "/api/v1/auth/me", headers=victim, client="10.1.1.1"
        ).status
        for _ in range(6)
    ]
    assert codes == [200] * 5 + [429]


def test_the_address_budget_covers_every_token_and_path_from_that_address(
    make_app: Callable[[Settings], FastAPI], settings: Settings
) -> None:
    application = make_app(
        settings.model_copy(
            update={
                "rate_limit_enabled": True,
                "rate_limit_address_burst": 4,
                "rate_limit_address_per_minute": 6,
            }
        )
    )
    tokens = [bearer_headers(application, f"user{i}", Role.CONTRIBUTOR) for i in range(6)]
    codes = [
        asgi_request(application, "GET", path, headers=token, client="10.0.0.9").status
        for token, path in zip(
            tokens,
            ["/api/v1/auth/me", "/ui/experts", "/openapi.json", "/", "/api/v1/health", "/docs"],
            strict=True,
        )
    ]
    assert codes == [200] * 4 + [429] * 2
    # Another address is not affected.
    assert asgi_request(application, "GET", "/", client="10.0.0.10").status == 200


@pytest.mark.parametrize(
    "path",
    ["/", "/ui/leaderboard", "/ui/experts", "/leaderboard", "/ui/static/site.css"],
)
def test_pages_images_and_the_json_leaderboard_are_rate_limited(
    limited_app: FastAPI, path: str
) -> None:
    with TestClient(limited_app) as client:
        codes = [client.get(path).status_code for _ in range(7)]
    assert codes == [200] * 5 + [429] * 2
    assert client.get("/ui/leaderboard/methods.png").status_code == 429


def test_a_refused_address_is_429_with_retry_after_in_the_error_shape(
    limited_app: FastAPI,
) -> None:
    # The burst of 5 passes; then one token comes back every 10 s, so on a slow (loaded)
    # machine a request or two more may pass before the refusal.
    statuses = []
    for _ in range(12):
        response = asgi_request(limited_app, "GET", "/", client="10.0.0.3")
        statuses.append(response.status)
        if response.status == 429:
            break
    assert 429 not in statuses[:5]
    assert response.status == 429
    # The wait until the next token: 10 s after an emptied bucket, less once a slow machine
    # has refilled part of one.
    assert 1 <= int(response.headers["retry-after"]) <= 10
    detail = response.json()["detail"]
    assert (detail["error"], detail["check"]) == ("rate_limited", "rate_limit")


# --- item 5: PNG images are cached --------------------------------------------------------


@pytest.fixture
def count_renders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times matplotlib drew a figure (every plot goes through `plots._png`)."""
    plots.PNG_CACHE.clear()
    renders = [0]
    real = plots._png

    def counting(figure: Any) -> bytes:
        renders[0] += 1
        return real(figure)

    monkeypatch.setattr(plots, "_png", counting)
    return renders


def test_a_second_methods_plot_request_is_not_rendered_again(
    client: TestClient, count_renders: list[int]
) -> None:
    first = client.get("/ui/leaderboard/methods.png")
    assert first.status_code == 200 and first.content.startswith(b"\x89PNG")
    assert count_renders == [1]
    second = client.get("/ui/leaderboard/methods.png")
    assert second.content == first.content
    assert count_renders == [1]
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "public, no-cache"
    revalidated = client.get("/ui/leaderboard/methods.png", headers={"If-None-Match": etag})
    assert revalidated.status_code == 304 and revalidated.content == b""
    assert count_renders == [1]
    # Filters that find no results share the one empty image: made-up values cost no render.
    for made_up in ("x", "y", "$z$"):
        response = client.get("/ui/leaderboard/methods.png", params={"base_model": made_up})
        assert response.status_code == 200
    assert count_renders == [1]


def test_a_heatmap_is_rendered_once_and_sent_with_cache_headers(
    app: FastAPI,
    client: TestClient,
    maintainer: dict[str, str],
    count_renders: list[int],
) -> None:
    number = create_release(client, maintainer, method="base", base_model="tiny")
    record_evaluation(app, number, {"hyperbaton": TaskOutcome(0.5, routing_stats=PHATGOOSE_STATS)})
    html = client.get(f"/ui/releases/{number}").text
    source = re.search(r'<img class="heatmap" src="([^"]+)"', html)
    assert source is not None
    images = [client.get(source.group(1)) for _ in range(3)]
    assert [r.status_code for r in images] == [200] * 3
    assert count_renders == [1]
    assert images[0].headers["etag"] == images[2].headers["etag"]
    assert "max-age" in images[0].headers["cache-control"]
    revalidated = client.get(source.group(1), headers={"If-None-Match": images[0].headers["etag"]})
    assert revalidated.status_code == 304


def test_plots_of_a_private_catalog_are_not_for_shared_caches(
    make_app: Callable[[Settings], FastAPI], settings: Settings
) -> None:
    application = make_app(settings.model_copy(update={"public_read": False}))
    reader = bearer_headers(application, "alice", Role.CONTRIBUTOR)
    response = TestClient(application).get("/ui/leaderboard/methods.png", headers=reader)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "private, no-cache"


def test_the_png_cache_is_bounded_in_bytes() -> None:
    cache = plots.PngCache(max_bytes=1000)
    for i in range(50):
        cache.get_or_render(f"k{i}", lambda: b"x" * 100)
    assert cache.get("k0") is None and cache.get("k49") is not None
    assert sum(len(cache.get(f"k{i}") or b"") for i in range(50)) <= 1000


# --- item 10: user text is never parsed as mathtext; renders are serialised ------------

HOSTILE_TEXT = [
    r"$\frac{",
    "$$",
    "\\",
    "^",
    "a $ b",
    r"$x^{2$",
    r"\$\mathrm{$",
    "$_$",
    r"$\undefinedcommand$",
    "\x00\n\u2028",
]


def _hostile_routing(seed: int = 0) -> LayerRouting:
    experts = [f"alice/{t}" for t in HOSTILE_TEXT]
    layers = [f"model.layers.{i}{t}" for i, t in enumerate(HOSTILE_TEXT[:4])]
    frequencies = [
        [((e + layer + seed) % 5) / 10 for layer in range(len(layers))] for e in range(len(experts))
    ]
    return LayerRouting(experts=experts, layers=layers, frequencies=frequencies, top_k=2)


def _is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_names_with_mathtext_syntax_render_as_plain_text(text: str) -> None:
    assert _is_png(plots.routing_heatmap(_hostile_routing(), f"#1 on {text}\nexperts"))
    means = [MethodMean(method=text, label=f"#2 {text}", mean=0.5, stderr=0.1, tasks=3)]
    assert _is_png(plots.method_bars(means, f"Best release ({text})"))


def test_twelve_concurrent_renders_all_succeed() -> None:
    results: list[bytes | BaseException] = [b""] * 12
    barrier = threading.Barrier(12)

    def render(i: int) -> None:
        barrier.wait()
        try:
            text = HOSTILE_TEXT[i % len(HOSTILE_TEXT)]
            results[i] = plots.routing_heatmap(_hostile_routing(i), f"task {text}")
        except BaseException as error:  # collected, asserted below
            results[i] = error

    threads = [threading.Thread(target=render, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(isinstance(r, bytes) and _is_png(r) for r in results), results


# --- item 13: one log record, one line -------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[str]]]:
    """The coordinator's own handler on the root logger, writing to a buffer; INFO on."""
    buffer = io.StringIO()
    handler = log_handler(buffer)
    root = logging.getLogger()
    http = logging.getLogger("coordinator")
    old_level = http.level
    root.addHandler(handler)
    http.setLevel(logging.INFO)
    try:
        yield lambda: buffer.getvalue().splitlines()
    finally:
        root.removeHandler(handler)
        http.setLevel(old_level)


RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[")


def test_percent_encoded_newlines_in_a_path_leave_one_log_line(
    app: FastAPI, log_lines: Callable[[], list[str]]
) -> None:
    path = "/api/v1/experts/a\r\nFAKE 200\u2028x\x1b[31m/b"  # as /a%0d%0aFAKE%20200... decodes
    response = asgi_request(app, "GET", path)
    assert response.status == 404
    lines = log_lines()
    assert len(lines) == 1, lines
    assert RECORD_START.match(lines[0])
    assert "a\\r\\nFAKE 200\\u2028x\\x1b[31m/b -> 404" in lines[0]


def test_a_yank_reason_with_newlines_leaves_one_log_line(
    app: FastAPI,
    client: TestClient,
    alice: dict[str, str],
    package: Callable[..., Path],
    log_lines: Callable[[], list[str]],
) -> None:
    assert upload(client, alice, package("alice/demo")).status_code == 201
    before = len(log_lines())
    reason = "broken\n2024-01-01 00:00:00,000 INFO [-] coordinator: maintainer granted\rx"
    client.post("/api/v1/experts/alice/demo/1/yank", headers=alice, json={"reason": reason})
    lines = log_lines()[before:]
    assert all(RECORD_START.match(line) for line in lines), lines
    assert not any(line.startswith("2024-01-01") for line in lines)
    # The service's own line, whatever the route made of the reason.
    logging.getLogger("coordinator.experts.service").info("yanked %s: %s", "alice/demo@1", reason)
    last = log_lines()[-1]
    assert RECORD_START.match(last) and "broken\\n2024-01-01" in last and "granted\\rx" in last


def test_every_control_character_is_escaped_and_tracebacks_are_indented() -> None:
    assert escape_control("a\nb\rc\td\x00e\x7f\x85\u2028\u2029") == (
        "a\\nb\\rc\\td\\x00e\\x7f\\x85\\u2028\\u2029"
    )
    buffer = io.StringIO()
    logger = logging.getLogger("tests.http_edge.traceback")
    handler = log_handler(buffer)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("bad\n2024-01-01 00:00:00,000 INFO [-] forged")
        except ValueError:
            logger.exception("failed on %s", "x\ny")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = buffer.getvalue().splitlines()
    assert RECORD_START.match(lines[0]) and lines[0].endswith("failed on x\\ny")
    assert all(line.startswith("    ") for line in lines[1:]), lines


# --- item 16: security headers; a private data directory --------------------------------

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}


def test_every_response_carries_the_security_headers(
    app: FastAPI, client: TestClient, alice: dict[str, str]
) -> None:
    responses = [
        client.get("/"),
        client.get("/ui/experts"),
        client.get("/ui/releases/99"),  # 404 page
        client.get("/ui/static/site.css"),
        client.get("/ui/leaderboard/methods.png"),
        client.get("/api/v1/health"),
        client.get("/api/v1/experts/a/b"),  # 404
        client.post("/api/v1/releases", json={}),  # 401 from the edge
        client.post("/api/v1/releases", headers=alice, json={}),  # 403
        client.get("/openapi.json"),
    ]
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value, (response.url, name)
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy
        assert "default-src 'none'" in policy
        assert "'unsafe-inline'" not in policy, response.url
        assert "script-src 'self';" in policy


def test_an_unhandled_error_is_a_500_in_the_error_shape_with_the_headers(app: FastAPI) -> None:
    @app.get("/api/v1/test-broken")
    def broken() -> None:
        raise RuntimeError("/secret/path on host")

    response = TestClient(app, raise_server_exceptions=False).get("/api/v1/test-broken")
    assert response.status_code == 500
    assert response.json()["detail"]["error"] == "internal_error"
    assert "/secret/path" not in response.text
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value


def test_the_api_docs_get_a_policy_that_lets_them_load(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "https://cdn.jsdelivr.net" in policy and "frame-ancestors 'none'" in policy
    assert response.headers["x-frame-options"] == "DENY"


def test_pages_load_nothing_the_policy_forbids(client: TestClient) -> None:
    """The page policy allows only this origin's files: no inline script or style."""
    for path in ("/", "/ui/releases", "/ui/experts", "/ui/releases/99"):
        html = client.get(path).text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), path
        assert "<style" not in html and " style=" not in html, path
        assert not re.search(r"\son[a-z]+=", html), path
        for source in re.findall(r'(?:src|href)="([^"]+)"', html):
            if source.startswith(("/ui/static/", "/ui/leaderboard/methods.png")):
                continue
            assert not source.endswith((".js", ".css")), source


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_directory_and_what_it_holds_are_private(
    make_app: Callable[[Settings], FastAPI],
    tmp_path: Path,
    tiny_base: TinyBase,
    package: Callable[..., Path],
) -> None:
    data = tmp_path / "fresh" / "data"
    application = make_app(Settings(data_dir=data, log_level="WARNING"))
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    alice = bearer_headers(application, "alice", Role.CONTRIBUTOR)
    with TestClient(application) as client:
        assert upload(client, alice, package("alice/demo")).status_code == 201
    for directory in (data, data / "blobs", data / "tmp"):
        assert _mode(directory) == 0o700, directory
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.name == "coordinator.sqlite" for p in files)
    assert len([p for p in files if p.parent.parent.name == "blobs"]) >= 3
    for path in [*files, *(p for p in (data / "blobs").rglob("*") if p.is_dir())]:
        assert _mode(path) & 0o077 == 0, (path, oct(_mode(path)))


def test_a_data_directory_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "shared-data"
    data.mkdir()
    data.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="coordinator.core.config"):
        Settings(data_dir=data).ensure_dirs()
    assert any(
        "readable by group or others" in r.getMessage() and "0o755" in r.getMessage()
        for r in caplog.records
    )
    caplog.clear()
    private = tmp_path / "private-data"
    with caplog.at_level(logging.WARNING, logger="coordinator.core.config"):
        Settings(data_dir=private).ensure_dirs()
    assert not caplog.records
    assert _mode(private) == 0o700
