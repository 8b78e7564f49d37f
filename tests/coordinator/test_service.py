"""Service-level behaviour: OpenAPI docs, health, request ids in responses and logs."""

from __future__ import annotations

import logging

from coordinator.core.logging import RequestIdFilter


def test_openapi_docs_are_served(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/experts" in paths
    assert "/api/v1/experts/{namespace}/{name}/{version}/files/{filename}" in paths


def test_health_names_the_database(client, database_url):
    body = client.get("/api/v1/health").json()
    assert body["status"] == "ok"
    assert body["database"] == ("sqlite" if database_url.startswith("sqlite") else "postgresql")


def test_request_id_is_echoed(client):
    response = client.get("/api/v1/health", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


def test_request_id_is_generated_when_absent_or_unsafe(client):
    response = client.get("/api/v1/health", headers={"X-Request-ID": "bad id\n"})
    assert len(response.headers["x-request-id"]) == 32


def test_log_lines_carry_the_request_id(client):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("coordinator.http")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        client.get("/api/v1/health", headers={"X-Request-ID": "trace-7"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    [record] = [r for r in records if "/api/v1/health" in r.getMessage()]
    assert record.request_id == "trace-7"
    assert record.getMessage() == f"GET /api/v1/health -> 200 in {record.args[3]:.1f} ms"
