"""The schema is managed by Alembic: migrations build exactly what the ORM declares."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from coordinator import migrations
from coordinator.core.db import make_engine

TABLES = {
    "alembic_version",
    "tokens",
    "base_models",
    "experts",
    "expert_versions",
    "expert_files",
    "releases",
    "release_experts",
    "evaluation_jobs",
    "evaluation_results",
}


def test_upgrade_builds_every_table_on_an_empty_database(fresh_database_url):
    engine = make_engine(fresh_database_url)
    try:
        assert migrations.current_revision(engine) is None
        migrations.upgrade(engine)
        assert set(inspect(engine).get_table_names()) == TABLES
        assert migrations.current_revision(engine) == migrations.head_revision()
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_orm_models(fresh_database_url):
    engine = make_engine(fresh_database_url)
    try:
        migrations.upgrade(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, migrations.target_metadata()) == []
    finally:
        engine.dispose()


def test_upgrade_twice_is_a_no_op(fresh_database_url):
    engine = make_engine(fresh_database_url)
    try:
        migrations.upgrade(engine)
        migrations.upgrade(engine)
        assert migrations.current_revision(engine) == migrations.head_revision()
    finally:
        engine.dispose()


def test_app_start_migrates_an_empty_database(make_app, settings, fresh_database_url):
    app = make_app(settings.model_copy(update={"database_url": fresh_database_url}))
    assert migrations.current_revision(app.state.engine) == migrations.head_revision()
