"""The app factory: `create_app(settings)` wires settings, database, blobs and routers.

Routers are found through `ROUTERS`: each entry names a module with a `router`
(`fastapi.APIRouter`) and the prefix it is mounted under. Modules that do not exist (yet)
are skipped, so a domain is added by creating its `routes.py` and listing it here.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, make_url
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

import phatgoose
from coordinator import migrations
from coordinator.core.config import PRIVATE_FILE_MODE, Settings, warn_if_readable_by_others
from coordinator.core.db import make_engine, make_sessionmaker
from coordinator.core.edge import EdgeMiddleware
from coordinator.core.errors import (
    ERROR_RESPONSE,
    CoordinatorError,
    encodable,
    http_error,
    request_validation_error,
)
from coordinator.core.headers import SecurityHeadersMiddleware
from coordinator.core.logging import RequestIdMiddleware, configure_logging
from coordinator.core.params import Utf8QueryMiddleware
from coordinator.core.ratelimit import RateLimits, TokenBucketLimiter
from coordinator.core.startup import run_startup_checks
from coordinator.storage import open_blob_store
from protocol import API_PREFIX
from protocol.validation import PackageRejected

log = logging.getLogger(__name__)


# (module holding `router`, prefix)
ROUTERS: list[tuple[str, str]] = [
    ("coordinator.core.routes", API_PREFIX),
    ("coordinator.auth.routes", API_PREFIX),
    ("coordinator.base_models.routes", API_PREFIX),
    ("coordinator.experts.routes", API_PREFIX),
    ("coordinator.releases.routes", API_PREFIX),
    ("coordinator.evaluations.routes", API_PREFIX),
    ("coordinator.evaluations.worker_routes", API_PREFIX),
    ("coordinator.credit.routes", API_PREFIX),
    ("coordinator.channels.routes", API_PREFIX),
    ("coordinator.leaderboard.routes", ""),
    ("coordinator.web.routes", ""),
]


_ERROR_BODY = "`{detail: {error, check, file, tensor, expected, message}}`"
# Answers any route may give, documented on every route of the schema: a bad token is 401
# even on a public read, a contributor on a maintainer route 403, a missing object 404, a
# body over the request size limit 413, and a client over the rate limit 429.
COMMON_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"description": "no valid bearer token: " + _ERROR_BODY},
    403: {"description": "not allowed for this token: " + _ERROR_BODY},
    404: {"description": "not found: " + _ERROR_BODY},
    413: {"description": "request body over its size limit: " + _ERROR_BODY},
    422: {"description": "a parameter or body FastAPI cannot read: " + _ERROR_BODY},
    429: {"description": "over the rate limit (see Retry-After): " + _ERROR_BODY},
}
# The one route whose body is streamed under its own (admission) limits.
STREAMED_UPLOADS = {("POST", f"{API_PREFIX}/experts")}


def _is_missing(error: ModuleNotFoundError, module: str) -> bool:
    return error.name is not None and (module + ".").startswith(error.name + ".")


def available_routers(entries: Iterable[tuple[str, str]] = ROUTERS) -> list[tuple[APIRouter, str]]:
    routers = []
    for module_name, prefix in entries:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if not _is_missing(error, module_name):
                raise
            continue
        routers.append((module.router, prefix))
    return routers


def open_database(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    """The data directory, an engine and a session factory; migrated unless `auto_migrate`
    is off. Scripts and workers (the CLI, the Flower ServerApp) start here too."""
    settings.ensure_dirs()
    _create_private_sqlite_file(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    if settings.auto_migrate:
        migrations.upgrade(engine)
    return engine, make_sessionmaker(engine)


def _create_private_sqlite_file(url: str) -> None:
    """Create a new SQLite database file readable by its owner only (SQLite gives its
    -wal and -shm files the same mode); warn about an existing one others can read."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    except FileExistsError:
        warn_if_readable_by_others(path)
    except OSError:
        pass  # a folder that does not exist yet: SQLite reports it when it connects


def create_app(settings: Settings | None = None) -> FastAPI:
    """A ready coordinator: migrated database, checked storage, every available router.

    `app.state` holds `settings`, `engine`, `sessionmaker`, `blobs` and `startup_report`.
    """
    settings = settings or Settings()
    configure_logging(settings.log_level)
    engine, sessions = open_database(settings)
    try:
        blobs = open_blob_store(settings)  # an unusable S3 bucket stops start-up here
    except BaseException:
        engine.dispose()
        raise
    with sessions() as session:
        report = run_startup_checks(session, blobs, settings)

    app = FastAPI(
        title="PHATGOOSE coordinator",
        version=phatgoose.__version__,
        description="Catalog of privately trained LoRA experts, releases and evaluations.",
        # Any route that reads input may answer 400 when the database cannot hold a value of
        # it (`_data_error`), so every route documents it.
        responses={400: ERROR_RESPONSE},
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = sessions
    app.state.blobs = blobs
    app.state.startup_report = report

    # The edge (rate limits, tokens, body size) runs before routing, so before FastAPI
    # reads a body; inside the security headers and the request-id middleware, so that its
    # refusals carry both and are logged. (The middleware added last runs first.)
    app.add_middleware(
        EdgeMiddleware,
        sessions=sessions,
        max_body_bytes=settings.max_request_body_bytes,
        streamed_routes=STREAMED_UPLOADS,
        limits=_rate_limits(settings) if settings.rate_limit_enabled else None,
    )
    docs_paths = [p for p in (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if p]
    app.add_middleware(SecurityHeadersMiddleware, docs_paths=docs_paths)
    app.add_middleware(Utf8QueryMiddleware)  # before routing: Starlette decodes the query
    app.add_middleware(RequestIdMiddleware)
    app.add_exception_handler(CoordinatorError, _coordinator_error)
    app.add_exception_handler(PackageRejected, _package_rejected)
    app.add_exception_handler(DataError, _data_error)
    # FastAPI's 422 (a parameter out of range, a body of the wrong type) and Starlette's
    # 404/405 (no such route or method) in the same error shape as every other refusal.
    app.add_exception_handler(RequestValidationError, request_validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for router, prefix in available_routers():
        app.include_router(router, prefix=prefix, responses=COMMON_RESPONSES)
    log.info(
        "coordinator ready: database %s, data in %s, blobs in %s",
        engine.url.render_as_string(),
        settings.data_dir,
        blobs.location,
    )
    return app


def _rate_limits(settings: Settings) -> RateLimits:
    return RateLimits(
        per_address=TokenBucketLimiter(
            settings.rate_limit_address_per_minute,
            settings.rate_limit_address_burst,
            max_clients=settings.rate_limit_max_clients,
        ),
        per_client=TokenBucketLimiter(
            settings.rate_limit_per_minute,
            settings.rate_limit_burst,
            max_clients=settings.rate_limit_max_clients,
        ),
    )


async def _coordinator_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, CoordinatorError)
    return JSONResponse(
        {"detail": encodable(error.to_dict())},
        status_code=error.status_code,
        headers=getattr(error, "headers", None),
    )


async def _package_rejected(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, PackageRejected)
    return JSONResponse({"detail": encodable(error.to_dict())}, status_code=422)


async def _data_error(_request: Request, error: Exception) -> JSONResponse:
    """A value from the request that the database cannot hold (a NUL byte in a name on
    PostgreSQL, an integer past its range): the request's fault, not the server's."""
    log.info("request value refused by the database: %s", error)
    body = {
        "error": "bad_request",
        "check": "request",
        "file": None,
        "tensor": None,
        "expected": "names without NUL bytes, integers within 64 bits",
        "message": "the request holds a value the database cannot store or compare",
    }
    return JSONResponse({"detail": body}, status_code=400)
