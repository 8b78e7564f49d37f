"""Alembic environment: runs on the connection handed over by `coordinator.migrations`."""

from alembic import context

from coordinator.migrations import target_metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations through coordinator.migrations.upgrade() or "
        "`phatgoose coordinator migrate`, which pass the database connection"
    )

context.configure(
    connection=connection,
    target_metadata=target_metadata(),
    render_as_batch=True,  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
