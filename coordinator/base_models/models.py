from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from coordinator.core.db import Base, UTCDateTime, utcnow
from protocol import BaseModelSpec


class BaseModelRecord(Base):
    """A base model experts are trained on; `spec` is a `protocol.BaseModelSpec` as JSON."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    revision: Mapped[str | None] = mapped_column(String(200))
    fingerprint: Mapped[str] = mapped_column(String(71), unique=True)
    architecture: Mapped[str] = mapped_column(String(100))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def to_spec(self) -> BaseModelSpec:
        return BaseModelSpec.model_validate(self.spec)
