"""Fixtures for the coordinator: a real database (SQLite, and PostgreSQL when
PHATGOOSE_TEST_POSTGRES_URL is set), a data directory, tokens and real expert packages."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, make_url, text

from coordinator.auth.models import Role
from coordinator.base_models.service import register_base_model
from coordinator.core.app import create_app
from coordinator.core.config import Settings
from protocol import BaseModelSpec
from tests.coordinator.helpers import TinyBase, bearer_headers, make_tiny_base
from tests.coordinator.release_helpers import WORKER_TASKS, save_base, write_task

POSTGRES_URL = os.environ.get("PHATGOOSE_TEST_POSTGRES_URL")
NO_POSTGRES = "PHATGOOSE_TEST_POSTGRES_URL is not set (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)"


@contextmanager
def temporary_postgres_database(server_url: str) -> Iterator[str]:
    """A new, uniquely named database on the server of `server_url`, dropped afterwards."""
    url = make_url(server_url)
    name = f"phatgoose_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """One database for the session's PostgreSQL runs; each test starts from empty tables."""
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    with temporary_postgres_database(POSTGRES_URL) as url:
        yield url


def _empty_tables(url: str) -> None:
    engine = create_engine(url)
    try:
        tables = [t for t in inspect(engine).get_table_names() if t != "alembic_version"]
        if tables:
            with engine.begin() as connection:
                names = ", ".join(f'"{t}"' for t in tables)
                connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every test using this runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'coordinator.sqlite'}"
    url = request.getfixturevalue("postgres_database")
    _empty_tables(url)
    return url


@pytest.fixture
def fresh_database_url(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> Iterator[str]:
    """An empty database of the same kind as `database_url`, never migrated."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'fresh.sqlite'}"
        return
    assert POSTGRES_URL
    with temporary_postgres_database(POSTGRES_URL) as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, log_level="WARNING")


@pytest.fixture
def make_app() -> Iterator[Callable[[Settings], FastAPI]]:
    """Builds apps and disposes their engines afterwards (PostgreSQL connections)."""
    apps: list[FastAPI] = []

    def make(settings: Settings) -> FastAPI:
        app = create_app(settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.state.engine.dispose()


@pytest.fixture
def app(
    make_app: Callable[[Settings], FastAPI], settings: Settings, tiny_base: TinyBase
) -> FastAPI:
    """A coordinator with the tiny llama registered as its base model."""
    application = make_app(settings)
    with application.state.sessionmaker() as session:
        register_base_model(session, tiny_base.spec)
    return application


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def tiny_base() -> TinyBase:
    return make_tiny_base()


@pytest.fixture
def base_spec(tiny_base: TinyBase) -> BaseModelSpec:
    return tiny_base.spec


@pytest.fixture
def alice(app: FastAPI) -> dict[str, str]:
    """Authorization header of contributor 'alice'."""
    return bearer_headers(app, "alice", Role.CONTRIBUTOR)


@pytest.fixture
def bob(app: FastAPI) -> dict[str, str]:
    return bearer_headers(app, "bob", Role.CONTRIBUTOR)


@pytest.fixture
def maintainer(app: FastAPI) -> dict[str, str]:
    return bearer_headers(app, "carol", Role.MAINTAINER)


@pytest.fixture
def package(tmp_path_factory: pytest.TempPathFactory, tiny_base: TinyBase) -> Callable[..., Path]:
    """`package(name, seed=0, rank=4)`: a real expert package directory."""

    def make(name: str = "alice/demo", seed: int = 0, rank: int = 4) -> Path:
        return tiny_base.write_package(tmp_path_factory.mktemp("package"), name, seed, rank)

    return make


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory, tiny_base: TinyBase) -> Path:
    """The tiny base saved as a model directory, what a worker loads (`tiny=<base_dir>`)."""
    return save_base(tiny_base, tmp_path_factory.mktemp("base"))


@pytest.fixture
def tasks_dir(tmp_path: Path) -> Path:
    """BIG-bench style task files of `WORKER_TASKS`, 10 short examples each."""
    for seed, task in enumerate(WORKER_TASKS):
        write_task(tmp_path / "tasks", task, examples=10, seed=seed)
    return tmp_path / "tasks"
