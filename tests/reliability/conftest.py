"""Reliability and security tests reuse the coordinator fixtures: a real database (SQLite,
and PostgreSQL when PHATGOOSE_TEST_POSTGRES_URL is set), tokens and real expert packages."""

from tests.coordinator.conftest import (  # noqa: F401  (fixtures)
    alice,
    app,
    base_spec,
    bob,
    client,
    database_url,
    maintainer,
    make_app,
    package,
    postgres_database,
    settings,
    tiny_base,
)
