"""API bodies of the expert catalog."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from coordinator.experts.models import Block, Expert, ExpertVersion
from protocol import API_PREFIX, API_VERSION, ApiVersion
from protocol.diff import PackageDiff
from protocol.privacy import PrivacyGuarantee


class FileInfo(BaseModel):
    filename: str
    sha256: str
    size: int
    url: str = Field(description="download path, relative to the coordinator")


class Provenance(BaseModel):
    uploaded_by: str = Field(description="the uploading token's name")
    channel: Literal["http", "flower"]
    uploaded_at: datetime


class YankState(BaseModel):
    yanked: bool
    yanked_at: datetime | None = None
    yanked_by: str | None = Field(default=None, description="the yanking token's name")
    yanked_by_role: Literal["contributor", "maintainer"] | None = Field(
        default=None, description="a maintainer's yank is lifted only by a maintainer"
    )
    reason: str | None = None


class BlockState(BaseModel):
    """A maintainer's block: no new versions, no new releases naming the expert."""

    scope: Literal["expert", "namespace"]
    namespace: str
    name: str | None = Field(description="null when the whole namespace is blocked")
    blocked_by: str = Field(description="the maintainer token's name")
    blocked_at: datetime
    reason: str

    @classmethod
    def of(cls, block: Block) -> BlockState:
        return cls(
            scope="expert" if block.name else "namespace",
            namespace=block.namespace,
            name=block.name or None,
            blocked_by=block.blocked_by,
            blocked_at=block.blocked_at,
            reason=block.reason,
        )


class ExpertVersionSummary(BaseModel):
    api_version: ApiVersion = API_VERSION
    namespace: str
    name: str
    version: int
    ref: str = Field(description="namespace/name@version", examples=["alice/hyperbaton@2"])
    base_model: str
    base_model_fingerprint: str
    package_digest: str
    total_size: int
    rank: int
    module_count: int
    description: str
    privacy: PrivacyGuarantee | None = Field(
        description="the DP guarantee its manifest states (docs/privacy.md); null: trained "
        "without differential privacy"
    )
    provenance: Provenance
    yank: YankState
    url: str

    @classmethod
    def of(cls, version: ExpertVersion) -> ExpertVersionSummary:
        return cls(**_summary_fields(version))


class ExpertVersionDetail(ExpertVersionSummary):
    manifest: dict[str, Any] = Field(description="expert.json as uploaded")
    files: list[FileInfo]

    @classmethod
    def of(cls, version: ExpertVersion) -> ExpertVersionDetail:
        url = version_url(version)
        return cls(
            **_summary_fields(version),
            manifest=version.manifest,
            files=[
                FileInfo(
                    filename=f.filename,
                    sha256=f.sha256,
                    size=f.size,
                    url=f"{url}/files/{f.filename}",
                )
                for f in version.files
            ],
        )


class ExpertDetail(BaseModel):
    api_version: ApiVersion = API_VERSION
    namespace: str
    name: str
    created_at: datetime
    block: BlockState | None = Field(description="the block in force, if any")
    versions: list[ExpertVersionSummary] = Field(
        description="one page of its versions, oldest first, yanked included"
    )
    total_versions: int
    limit: int
    offset: int

    @classmethod
    def of(
        cls, expert: Expert, versions: list[ExpertVersion], *, total: int, limit: int, offset: int
    ) -> ExpertDetail:
        block = expert.block
        return cls(
            namespace=expert.namespace,
            name=expert.name,
            created_at=expert.created_at,
            block=None if block is None else BlockState.of(block),
            versions=[ExpertVersionSummary.of(v) for v in versions],
            total_versions=total,
            limit=limit,
            offset=offset,
        )


class ExpertVersionPage(BaseModel):
    api_version: ApiVersion = API_VERSION
    items: list[ExpertVersionSummary]
    total: int = Field(description="matching versions in all pages")
    limit: int
    offset: int


class ExpertVersionDiff(BaseModel):
    """What changed from version `a` to version `b` (protocol.diff, docs/expert-package.md,
    "Diffing two versions")."""

    api_version: ApiVersion = API_VERSION
    a: ExpertVersionSummary = Field(
        description="the reference (`against`): relative changes are relative to its updates"
    )
    b: ExpertVersionSummary = Field(description="the version in the path")
    diff: PackageDiff


class YankRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, examples=["gate vectors are constant"])


class BlockRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, examples=["uploads adversarial experts"])


def version_url(version: ExpertVersion) -> str:
    return f"{API_PREFIX}/experts/{version.expert.namespace}/{version.expert.name}/{version.number}"


def _summary_fields(version: ExpertVersion) -> dict[str, Any]:
    return {
        "namespace": version.expert.namespace,
        "name": version.expert.name,
        "version": version.number,
        "ref": version.ref,
        "base_model": version.base_model.name,
        "base_model_fingerprint": version.base_model.fingerprint,
        "package_digest": version.package_digest,
        "total_size": version.total_size,
        "rank": version.rank,
        "module_count": version.module_count,
        "description": version.manifest.get("description", ""),
        "privacy": version.privacy,
        "provenance": Provenance(
            uploaded_by=version.uploaded_by,
            channel=version.channel,
            uploaded_at=version.created_at,
        ),
        "yank": YankState(
            yanked=version.yanked,
            yanked_at=version.yanked_at,
            yanked_by=version.yanked_by,
            yanked_by_role=version.yanked_by_role,
            reason=version.yank_reason,
        ),
        "url": version_url(version),
    }
