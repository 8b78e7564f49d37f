"""Release channels (issue 19): named, moving pointers to releases that follow the catalog.

- `release_channels`: a channel's name (`namespace/name`), its recipe (method, k, resolved
  parameters, base model, and either a list of expert names or a filter: namespaces and a
  name glob), the benchmark spec its releases are evaluated on, `follow`, `paused`, the
  pinned release, the release it points at now and the number of its newest history entry.
- `channel_history`: each move of a channel, keyed by (channel, sequence): two workers
  advancing a channel at once cannot both write its next entry, nor the release built in
  the same transaction.

New tables only: nothing existing changes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "release_channels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=True),
        sa.Column("method_params", sa.JSON(), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("experts", sa.JSON(), nullable=True),
        sa.Column("namespaces", sa.JSON(), nullable=True),
        sa.Column("name_glob", sa.String(length=200), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=True),
        sa.Column("follow", sa.Boolean(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("paused_reason", sa.Text(), nullable=True),
        sa.Column("pinned_release_id", sa.Integer(), nullable=True),
        sa.Column("release_id", sa.Integer(), nullable=True),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("advance_error", sa.Text(), nullable=True),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.ForeignKeyConstraint(
            ["base_model_id"],
            ["base_models.id"],
            name=op.f("fk_release_channels_base_model_id_base_models"),
        ),
        sa.ForeignKeyConstraint(
            ["pinned_release_id"],
            ["releases.id"],
            name=op.f("fk_release_channels_pinned_release_id_releases"),
        ),
        sa.ForeignKeyConstraint(
            ["release_id"], ["releases.id"], name=op.f("fk_release_channels_release_id_releases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_release_channels")),
        sa.UniqueConstraint("namespace", "name", name=op.f("uq_release_channels_namespace_name")),
    )
    op.create_index(
        op.f("ix_release_channels_base_model_id"), "release_channels", ["base_model_id"]
    )

    op.create_table(
        "channel_history",
        sa.Column("channel_id", sa.Integer(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        _timestamp("created_at"),
        sa.CheckConstraint(
            "action IN ('advance', 'pin', 'unpin', 'rollback')",
            name=op.f("ck_channel_history_action"),
        ),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["release_channels.id"],
            name=op.f("fk_channel_history_channel_id_release_channels"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["evaluation_jobs.id"],
            name=op.f("fk_channel_history_job_id_evaluation_jobs"),
        ),
        sa.ForeignKeyConstraint(
            ["release_id"], ["releases.id"], name=op.f("fk_channel_history_release_id_releases")
        ),
        sa.PrimaryKeyConstraint("channel_id", "sequence", name=op.f("pk_channel_history")),
    )
    op.create_index(op.f("ix_channel_history_release_id"), "channel_history", ["release_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_channel_history_release_id"), table_name="channel_history")
    op.drop_table("channel_history")
    op.drop_index(op.f("ix_release_channels_base_model_id"), table_name="release_channels")
    op.drop_table("release_channels")
