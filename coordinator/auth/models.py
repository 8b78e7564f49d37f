from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from coordinator.core.db import Base, UTCDateTime, utcnow


class Role(StrEnum):
    CONTRIBUTOR = "contributor"
    MAINTAINER = "maintainer"


class Token(Base):
    """A bearer token. The secret is stored only as its sha256; `name` is the namespace the
    holder publishes under. Several tokens share a name only when the operator said they are
    one holder's (`create-token --same-owner`, e.g. while rotating)."""

    __tablename__ = "tokens"
    __table_args__ = (CheckConstraint("role IN ('contributor', 'maintainer')", name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    @property
    def is_maintainer(self) -> bool:
        return self.role == Role.MAINTAINER

    def can_manage(self, namespace: str) -> bool:
        """Owners manage their own namespace; maintainers manage every namespace."""
        return self.is_maintainer or self.name == namespace
