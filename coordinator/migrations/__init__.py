"""Alembic migrations, configured in code: no `alembic.ini` is needed at runtime.

`upgrade(engine)` brings any database (empty or older) to the newest schema; the app
factory and `phatgoose coordinator migrate` call it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, text

from coordinator.core.db import Base

# Every module that defines ORM models; importing them fills `Base.metadata`.
MODEL_MODULES = (
    "coordinator.auth.models",
    "coordinator.base_models.models",
    "coordinator.experts.models",
    "coordinator.releases.models",
    "coordinator.evaluations.models",
    "coordinator.channels.models",
)

# Taken while migrating PostgreSQL, so several API processes starting at once migrate once.
_PG_MIGRATION_LOCK = 0x70686174676F6F  # "phatgoo"


def target_metadata() -> MetaData:
    for module in MODEL_MODULES:
        importlib.import_module(module)
    return Base.metadata


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind `engine` to `revision` (default: the newest)."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
            )
        command.upgrade(alembic_config(connection), revision)
