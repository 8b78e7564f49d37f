"""The compute precision of each evaluation result (issue 15).

`evaluation_results.precision`: "float32" or "bfloat16", what the worker's model computed
in (`phatgoose.precision`). Existing rows were all scored in float32, before bfloat16
existed, and are backfilled so.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("evaluation_results") as batch:
        batch.add_column(sa.Column("precision", sa.String(length=16), nullable=True))
    op.execute("UPDATE evaluation_results SET precision = 'float32'")


def downgrade() -> None:
    with op.batch_alter_table("evaluation_results") as batch:
        batch.drop_column("precision")
