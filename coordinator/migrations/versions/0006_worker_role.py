"""The worker role (issue 20): tokens that lease and report evaluation jobs over HTTP.

`tokens.role` may now be 'worker': a remote evaluation worker's token, which reads the
catalog, downloads package files and leases, heartbeats and reports evaluation jobs, and
can do nothing else (coordinator.core.deps). The check constraint on the column gains it.

SQLite cannot alter a constraint: batch mode rebuilds the table (copy, drop, rename). With
foreign keys on, dropping `tokens` runs an implicit DELETE whose ON DELETE SET NULL clears
`expert_versions.uploader_token_id` (who uploaded each version); the migration keeps those
references and writes them back once the new table, with the same ids, is in place.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WITH_WORKER = "role IN ('contributor', 'maintainer', 'worker')"
_WITHOUT_WORKER = "role IN ('contributor', 'maintainer')"


def _replace_role_check(condition: str) -> None:
    bind = op.get_bind()
    uploaders: list[dict[str, int]] = []
    if bind.dialect.name == "sqlite":
        uploaders = [
            {"version_id": row[0], "token_id": row[1]}
            for row in bind.execute(
                sa.text(
                    "SELECT id, uploader_token_id FROM expert_versions "
                    "WHERE uploader_token_id IS NOT NULL"
                )
            )
        ]
    with op.batch_alter_table("tokens") as batch:
        batch.drop_constraint(op.f("ck_tokens_role"), type_="check")
        batch.create_check_constraint(op.f("ck_tokens_role"), sa.text(condition))
    if uploaders:
        bind.execute(
            sa.text(
                "UPDATE expert_versions SET uploader_token_id = :token_id WHERE id = :version_id"
            ),
            uploaders,
        )


def upgrade() -> None:
    _replace_role_check(_WITH_WORKER)


def downgrade() -> None:
    # Worker tokens have no place in the older schema: revoke-and-forget is the operator's
    # call, so a database holding any refuses to go back rather than losing them silently.
    workers = op.get_bind().execute(sa.text("SELECT count(*) FROM tokens WHERE role = 'worker'"))
    count = workers.scalar() or 0
    if count:
        raise RuntimeError(
            f"{count} worker token(s) exist; delete them (DELETE FROM tokens WHERE role = "
            "'worker') before downgrading below 0006"
        )
    _replace_role_check(_WITHOUT_WORKER)
