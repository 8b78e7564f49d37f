from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from coordinator.base_models.models import BaseModelRecord
from coordinator.core.db import Base, UTCDateTime, utcnow
from protocol.privacy import PrivacyGuarantee


class Channel(StrEnum):
    """How a version reached the coordinator; both go through one registration function."""

    HTTP = "http"
    FLOWER = "flower"


class Expert(Base):
    """A name (`namespace/name`); its content lives in numbered versions."""

    __tablename__ = "experts"
    __table_args__ = (UniqueConstraint("namespace", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    versions: Mapped[list[ExpertVersion]] = relationship(
        back_populates="expert", order_by="ExpertVersion.number"
    )
    # Blocks on this expert or on its whole namespace (name ''); read-only, by name.
    blocks: Mapped[list[Block]] = relationship(
        primaryjoin="and_(foreign(Block.namespace) == Expert.namespace, "
        "or_(foreign(Block.name) == Expert.name, Block.name == ''))",
        viewonly=True,
        order_by="Block.name",  # the namespace's block ('') first
    )

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def block(self) -> Block | None:
        """The block in force (the namespace's, else the expert's), or None."""
        return self.blocks[0] if self.blocks else None


class ExpertVersion(Base):
    """One uploaded package. Immutable except for the yank: when, by whom (token name and
    role: a maintainer's yank is lifted only by a maintainer) and why."""

    __tablename__ = "expert_versions"
    __table_args__ = (
        UniqueConstraint("expert_id", "number"),
        CheckConstraint("channel IN ('http', 'flower')", name="channel"),
        CheckConstraint("number >= 1", name="number_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id", ondelete="RESTRICT"))
    number: Mapped[int]
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    package_digest: Mapped[str] = mapped_column(String(71), unique=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    rank: Mapped[int]
    module_count: Mapped[int]
    total_size: Mapped[int] = mapped_column(BigInteger)
    uploaded_by: Mapped[str] = mapped_column(String(64))
    uploader_token_id: Mapped[int | None] = mapped_column(
        ForeignKey("tokens.id", ondelete="SET NULL")
    )
    channel: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    yanked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    yanked_by: Mapped[str | None] = mapped_column(String(64), default=None)
    yanked_by_role: Mapped[str | None] = mapped_column(String(16), default=None)
    yank_reason: Mapped[str | None] = mapped_column(Text, default=None)

    expert: Mapped[Expert] = relationship(back_populates="versions", lazy="joined")
    base_model: Mapped[BaseModelRecord] = relationship(lazy="joined")
    files: Mapped[list[ExpertFile]] = relationship(
        back_populates="version", order_by="ExpertFile.filename", lazy="selectin"
    )

    @property
    def yanked(self) -> bool:
        return self.yanked_at is not None

    @property
    def ref(self) -> str:
        """`namespace/name@version`, how releases name an expert."""
        return f"{self.expert.full_name}@{self.number}"

    @property
    def privacy(self) -> PrivacyGuarantee | None:
        """The DP guarantee its manifest states; None: trained without DP."""
        return manifest_privacy(self.manifest)


def manifest_privacy(manifest: Mapping[str, Any]) -> PrivacyGuarantee | None:
    """The DP guarantee a stored manifest states (admission checked it); None when it states
    none, as manifests from before the field never do."""
    stated = manifest.get("privacy")
    return None if stated is None else PrivacyGuarantee.model_validate(stated)


class ExpertFile(Base):
    """One file of a version's package; the bytes are the blob named by `sha256`."""

    __tablename__ = "expert_files"
    __table_args__ = (UniqueConstraint("version_id", "filename"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("expert_versions.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(100))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)

    version: Mapped[ExpertVersion] = relationship(back_populates="files")


class FileSegment(Base):
    """One piece of a file stored in pieces (coordinator.experts.files): the file named by
    `file_sha256` is the concatenation, in `position` order, of the blobs `segment_sha256`.

    Safetensors files are stored so: their header, then each tensor's bytes, so that versions
    sharing a tensor store it once. A file without rows here is stored whole, as the blob of
    its own digest (JSON files, and what was stored before migration 0007). Rows are keyed by
    content, not by version: two versions holding the same file share its rows.
    """

    __tablename__ = "file_segments"

    file_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(primary_key=True)
    segment_sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)


class Block(Base):
    """A maintainer's block: no new versions of `namespace/name` (or of any name in
    `namespace` when `name` is ''), and no new releases naming them, until unblocked."""

    __tablename__ = "blocks"
    __table_args__ = (UniqueConstraint("namespace", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(Text)
    blocked_by: Mapped[str] = mapped_column(String(64))
    blocked_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @property
    def scope(self) -> str:
        return "expert" if self.name else "namespace"

    @property
    def target(self) -> str:
        return f"{self.namespace}/{self.name}" if self.name else f"namespace {self.namespace!r}"
