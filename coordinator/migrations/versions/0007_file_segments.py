"""Files stored in pieces (issue 19): a safetensors file as its header and one blob per tensor.

`file_segments` lists, per file digest, the blobs whose concatenation is the file
(coordinator.storage.segments). Existing files stay stored whole and read as before; `phatgoose
coordinator split-blobs` re-stores them in pieces, verifying each before its whole blob goes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "file_segments",
        sa.Column("file_sha256", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("segment_sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("file_sha256", "position", name=op.f("pk_file_segments")),
    )
    op.create_index(op.f("ix_file_segments_segment_sha256"), "file_segments", ["segment_sha256"])


def downgrade() -> None:
    # The older schema reads only whole files: a file stored in pieces would be lost.
    stored = op.get_bind().execute(sa.text("SELECT count(DISTINCT file_sha256) FROM file_segments"))
    count = stored.scalar() or 0
    if count:
        raise RuntimeError(
            f"{count} file(s) are stored in pieces; run `phatgoose coordinator split-blobs "
            "--join` before downgrading below 0007"
        )
    op.drop_index(op.f("ix_file_segments_segment_sha256"), table_name="file_segments")
    op.drop_table("file_segments")
