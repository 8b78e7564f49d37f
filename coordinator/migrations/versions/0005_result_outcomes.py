"""Per-example outcomes of each evaluation result (issue 17).

`evaluation_results.outcomes`: JSON, per example in order, the chosen answer's index and
whether it was right (`coordinator.evaluations.outcomes`), from which two results on the
same examples are compared pairwise. Results stored before have none: the column is NULL
for them, and their comparisons say so.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column needs no table rebuild on SQLite (no batch operation): existing rows
    # read NULL, "no per-example outcomes".
    op.add_column("evaluation_results", sa.Column("outcomes", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("evaluation_results", "outcomes")  # SQLite >= 3.35 drops it in place
