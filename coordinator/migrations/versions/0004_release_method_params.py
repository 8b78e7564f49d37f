"""The hyper-parameters of each release's method (release manifest format_version 3).

`releases.method_params`: every parameter of the method, resolved (`protocol.resolve_params`:
TIES's density, DARE's drop rate and seed, SpectR's score). Releases made before methods
had parameters get `{}`: none of their methods takes any.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One ALTER TABLE ... ADD COLUMN, NOT NULL with a server default that fills existing
    # rows: on SQLite, a batch operation would recreate the table, which the foreign keys
    # into it (release experts, evaluation jobs) forbid.
    op.add_column(
        "releases",
        sa.Column("method_params", sa.JSON(), nullable=False, server_default=sa.text("'{}'")),
    )


def downgrade() -> None:
    op.drop_column("releases", "method_params")  # SQLite >= 3.35 drops it in place
