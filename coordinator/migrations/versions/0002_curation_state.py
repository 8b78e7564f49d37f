"""Curation state (issue 14): who yanked (role), maintainer blocks, release withdrawal.

- `expert_versions.yanked_by_role`: a maintainer's yank is lifted only by a maintainer.
  Existing yanks are backfilled: 'maintainer' when a maintainer token has the yanker's
  name, else 'contributor'.
- `blocks`: a maintainer's block on `namespace/name`, or on a whole namespace (name '').
- `releases.withdrawn_at`, `withdrawn_by`, `withdrawn_reason`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("expert_versions") as batch:
        batch.add_column(sa.Column("yanked_by_role", sa.String(length=16), nullable=True))
    op.execute(
        """
        UPDATE expert_versions SET yanked_by_role = CASE
            WHEN EXISTS (
                SELECT 1 FROM tokens
                WHERE tokens.name = expert_versions.yanked_by AND tokens.role = 'maintainer'
            ) THEN 'maintainer'
            ELSE 'contributor'
        END
        WHERE yanked_at IS NOT NULL
        """
    )

    op.create_table(
        "blocks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("blocked_by", sa.String(length=64), nullable=False),
        sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blocks")),
        sa.UniqueConstraint("namespace", "name", name=op.f("uq_blocks_namespace_name")),
    )

    with op.batch_alter_table("releases") as batch:
        batch.add_column(sa.Column("withdrawn_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("withdrawn_by", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("withdrawn_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("releases") as batch:
        batch.drop_column("withdrawn_reason")
        batch.drop_column("withdrawn_by")
        batch.drop_column("withdrawn_at")
    op.drop_table("blocks")
    with op.batch_alter_table("expert_versions") as batch:
        batch.drop_column("yanked_by_role")
