from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from coordinator.core.db import Base, UTCDateTime, utcnow


class Role(StrEnum):
    CONTRIBUTOR = "contributor"
    MAINTAINER = "maintainer"
    # A remote evaluation worker's token (coordinator.evaluations.worker_routes): leases,
    # heartbeats and reports jobs, reads and downloads. Its name is a label, not a namespace.
    WORKER = "worker"


class Token(Base):
    """A bearer token. The secret is stored only as its sha256; `name` is the namespace the
    holder publishes under (a worker token's name is only a label: it owns no namespace).
    Several contributor tokens share a name only when the operator said they are one
    holder's (`create-token --same-owner`, e.g. while rotating)."""

    __tablename__ = "tokens"
    __table_args__ = (
        CheckConstraint("role IN ('contributor', 'maintainer', 'worker')", name="role"),
    )

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

    @property
    def is_worker(self) -> bool:
        return self.role == Role.WORKER

    def can_manage(self, namespace: str) -> bool:
        """Owners manage their own namespace; maintainers manage every namespace; a worker
        token manages none, whatever its name."""
        return self.is_maintainer or (self.role == Role.CONTRIBUTOR and self.name == namespace)
