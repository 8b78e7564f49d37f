from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from coordinator.core.db import Base, UTCDateTime, utcnow


class Release(Base):
    """A method, its k and hyper-parameters over a list of expert versions; `manifest`
    describes the artifact whose sha256 is `artifact_digest`."""

    __tablename__ = "releases"

    id: Mapped[int] = mapped_column(primary_key=True)
    number: Mapped[int] = mapped_column(unique=True)
    method: Mapped[str] = mapped_column(String(32))
    top_k: Mapped[int | None]
    # Every parameter of the method, resolved (protocol.resolve_params), as the manifest
    # records them; {} for releases made before methods had parameters (migration 0004).
    method_params: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=dict, server_default=text("'{}'")
    )
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    notes: Mapped[str] = mapped_column(Text, default="")
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    artifact_digest: Mapped[str | None] = mapped_column(String(71))
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Curation after the fact: the artifact stays frozen; a withdrawal only marks it.
    withdrawn_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    withdrawn_by: Mapped[str | None] = mapped_column(String(64), default=None)
    withdrawn_reason: Mapped[str | None] = mapped_column(Text, default=None)

    experts: Mapped[list[ReleaseExpert]] = relationship(
        order_by="ReleaseExpert.position", cascade="all, delete-orphan"
    )


class ReleaseExpert(Base):
    """The expert version at `position` (0-based) in a release's expert list."""

    __tablename__ = "release_experts"
    __table_args__ = (UniqueConstraint("release_id", "expert_version_id"),)

    release_id: Mapped[int] = mapped_column(
        ForeignKey("releases.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(primary_key=True)
    expert_version_id: Mapped[int] = mapped_column(ForeignKey("expert_versions.id"), index=True)
