from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, CheckConstraint, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from coordinator.base_models.models import BaseModelRecord
from coordinator.core.db import Base, UTCDateTime, utcnow
from coordinator.releases.models import Release


class ChannelAction(StrEnum):
    """Why a channel points at a release from an entry of its history on."""

    ADVANCE = "advance"  # the catalog changed (or the recipe): the channel built or reused one
    PIN = "pin"  # a maintainer pinned it there
    UNPIN = "unpin"  # a maintainer lifted the pin (the release stays until the next advance)
    ROLLBACK = "rollback"  # a maintainer sent it back to its previous release (and pinned it)


class ReleaseChannel(Base):
    """A named, moving pointer to a release (`community/latest`) and the recipe of the
    releases it builds: a method, its k and parameters over a base model's experts, either
    `experts` (names, each at its newest usable version) or, when that is null, every
    admitted expert of the base that `namespaces` and `name_glob` let through.

    `release_id` is where it points now, `sequence` the number of its newest history entry
    (0: none yet). A channel advances only while `follow`, not `paused` and not pinned
    (`pinned_release_id`); each move is a row of `channel_history`, numbered 1, 2, 3, ...
    """

    __tablename__ = "release_channels"
    __table_args__ = (UniqueConstraint("namespace", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32))
    top_k: Mapped[int | None]
    # Every parameter of the method, resolved (protocol.resolve_params), as releases hold them.
    method_params: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    experts: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    namespaces: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    name_glob: Mapped[str | None] = mapped_column(String(200), default=None)
    # The benchmark each new release is evaluated on (the body of `POST /evaluations`
    # without the release); null: none is queued.
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    follow: Mapped[bool] = mapped_column(default=True)
    paused: Mapped[bool] = mapped_column(default=False)
    paused_reason: Mapped[str | None] = mapped_column(Text, default=None)
    pinned_release_id: Mapped[int | None] = mapped_column(ForeignKey("releases.id"), default=None)
    release_id: Mapped[int | None] = mapped_column(ForeignKey("releases.id"), default=None)
    sequence: Mapped[int] = mapped_column(default=0)
    # Why the last attempt to advance built nothing although it should have (null: none).
    advance_error: Mapped[str | None] = mapped_column(Text, default=None)
    notes: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    # Loaded by their own queries (never joined: a row lock takes no outer join).
    base_model: Mapped[BaseModelRecord] = relationship(lazy="selectin")
    release: Mapped[Release | None] = relationship(foreign_keys=[release_id], lazy="selectin")
    pinned_release: Mapped[Release | None] = relationship(
        foreign_keys=[pinned_release_id], lazy="selectin"
    )

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def actor(self) -> str:
        """Who its releases and evaluations are recorded as created by."""
        return f"channel:{self.full_name}"


class ChannelEntry(Base):
    """One move of a channel: from `created_at` on it pointed at `release_id`, for `reason`.
    (channel, sequence) is the primary key: of two workers advancing the channel at once,
    only one can write its next entry, and the release built with it."""

    __tablename__ = "channel_history"
    __table_args__ = (
        CheckConstraint("action IN ('advance', 'pin', 'unpin', 'rollback')", name="action"),
    )

    channel_id: Mapped[int] = mapped_column(
        ForeignKey("release_channels.id", ondelete="CASCADE"), primary_key=True
    )
    sequence: Mapped[int] = mapped_column(primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    # The evaluation queued with the release (on the channel's spec), if any.
    job_id: Mapped[int | None] = mapped_column(ForeignKey("evaluation_jobs.id"), default=None)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
