"""Initial schema: tokens, base models, the expert catalog, releases and evaluations.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _pk(table: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}"))


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        _timestamp("created_at"),
        _timestamp("revoked_at", nullable=True),
        sa.CheckConstraint("role IN ('contributor', 'maintainer')", name=op.f("ck_tokens_role")),
        _pk("tokens"),
        sa.UniqueConstraint("public_id", name=op.f("uq_tokens_public_id")),
    )
    op.create_index(op.f("ix_tokens_name"), "tokens", ["name"])

    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("revision", sa.String(length=200), nullable=True),
        sa.Column("fingerprint", sa.String(length=71), nullable=False),
        sa.Column("architecture", sa.String(length=100), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        _pk("base_models"),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_base_models_fingerprint")),
        sa.UniqueConstraint("name", name=op.f("uq_base_models_name")),
    )

    op.create_table(
        "experts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        _timestamp("created_at"),
        _pk("experts"),
        sa.UniqueConstraint("namespace", "name", name=op.f("uq_experts_namespace_name")),
    )

    op.create_table(
        "expert_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("package_digest", sa.String(length=71), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("module_count", sa.Integer(), nullable=False),
        sa.Column("total_size", sa.BigInteger(), nullable=False),
        sa.Column("uploaded_by", sa.String(length=64), nullable=False),
        sa.Column("uploader_token_id", sa.Integer(), nullable=True),
        sa.Column("channel", sa.String(length=16), nullable=False),
        _timestamp("created_at"),
        _timestamp("yanked_at", nullable=True),
        sa.Column("yanked_by", sa.String(length=64), nullable=True),
        sa.Column("yank_reason", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "channel IN ('http', 'flower')", name=op.f("ck_expert_versions_channel")
        ),
        sa.CheckConstraint("number >= 1", name=op.f("ck_expert_versions_number_positive")),
        sa.ForeignKeyConstraint(
            ["base_model_id"],
            ["base_models.id"],
            name=op.f("fk_expert_versions_base_model_id_base_models"),
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name=op.f("fk_expert_versions_expert_id_experts"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["uploader_token_id"],
            ["tokens.id"],
            name=op.f("fk_expert_versions_uploader_token_id_tokens"),
            ondelete="SET NULL",
        ),
        _pk("expert_versions"),
        sa.UniqueConstraint(
            "expert_id", "number", name=op.f("uq_expert_versions_expert_id_number")
        ),
        sa.UniqueConstraint("package_digest", name=op.f("uq_expert_versions_package_digest")),
    )
    op.create_index(op.f("ix_expert_versions_base_model_id"), "expert_versions", ["base_model_id"])

    op.create_table(
        "expert_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("filename", sa.String(length=100), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["expert_versions.id"],
            name=op.f("fk_expert_files_version_id_expert_versions"),
            ondelete="CASCADE",
        ),
        _pk("expert_files"),
        sa.UniqueConstraint(
            "version_id", "filename", name=op.f("uq_expert_files_version_id_filename")
        ),
    )
    op.create_index(op.f("ix_expert_files_sha256"), "expert_files", ["sha256"])

    op.create_table(
        "releases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=True),
        sa.Column("base_model_id", sa.Integer(), nullable=False),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("artifact_digest", sa.String(length=71), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["base_model_id"],
            ["base_models.id"],
            name=op.f("fk_releases_base_model_id_base_models"),
        ),
        _pk("releases"),
        sa.UniqueConstraint("number", name=op.f("uq_releases_number")),
    )
    op.create_index(op.f("ix_releases_base_model_id"), "releases", ["base_model_id"])

    op.create_table(
        "release_experts",
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("expert_version_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["expert_version_id"],
            ["expert_versions.id"],
            name=op.f("fk_release_experts_expert_version_id_expert_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["release_id"],
            ["releases.id"],
            name=op.f("fk_release_experts_release_id_releases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("release_id", "position", name=op.f("pk_release_experts")),
        sa.UniqueConstraint(
            "release_id",
            "expert_version_id",
            name=op.f("uq_release_experts_release_id_expert_version_id"),
        ),
    )
    op.create_index(
        op.f("ix_release_experts_expert_version_id"), "release_experts", ["expert_version_id"]
    )

    op.create_table(
        "evaluation_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=200), nullable=True),
        _timestamp("lease_expires_at", nullable=True),
        _timestamp("heartbeat_at", nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _timestamp("created_at"),
        _timestamp("started_at", nullable=True),
        _timestamp("finished_at", nullable=True),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'done', 'failed')",
            name=op.f("ck_evaluation_jobs_state"),
        ),
        sa.ForeignKeyConstraint(
            ["release_id"], ["releases.id"], name=op.f("fk_evaluation_jobs_release_id_releases")
        ),
        _pk("evaluation_jobs"),
    )
    op.create_index(op.f("ix_evaluation_jobs_release_id"), "evaluation_jobs", ["release_id"])
    op.create_index(op.f("ix_evaluation_jobs_state"), "evaluation_jobs", ["state"])

    op.create_table(
        "evaluation_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=200), nullable=False),
        sa.Column("accuracy", sa.Double(), nullable=False),
        sa.Column("stderr", sa.Double(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("evaluator_version", sa.String(length=64), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=True),
        sa.Column("routing_stats", sa.JSON(), nullable=True),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["evaluation_jobs.id"],
            name=op.f("fk_evaluation_results_job_id_evaluation_jobs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["release_id"], ["releases.id"], name=op.f("fk_evaluation_results_release_id_releases")
        ),
        _pk("evaluation_results"),
        sa.UniqueConstraint("job_id", "task", name=op.f("uq_evaluation_results_job_id_task")),
    )
    op.create_index(op.f("ix_evaluation_results_release_id"), "evaluation_results", ["release_id"])


def downgrade() -> None:
    for table in (
        "evaluation_results",
        "evaluation_jobs",
        "release_experts",
        "releases",
        "expert_files",
        "expert_versions",
        "experts",
        "base_models",
        "tokens",
    ):
        op.drop_table(table)
