"""Start-up checks: remove what interrupted writes left (temp files, unfinished multipart
uploads), report catalog rows whose blob is missing, and say which store was checked."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.core.config import Settings
from coordinator.experts.models import Expert, ExpertFile, ExpertVersion
from coordinator.storage import BlobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogFile:
    ref: str  # namespace/name@version
    filename: str
    sha256: str


@dataclass(frozen=True)
class MissingBlob(CatalogFile):
    """A catalog file whose blob the store does not have."""


@dataclass
class StartupReport:
    blob_store: str = ""  # the folder or s3:// URL checked
    # Temp file paths and, in object storage, aborted multipart uploads (key and upload id).
    removed_temp_files: list[str] = field(default_factory=list)
    missing_blobs: list[MissingBlob] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.missing_blobs


def remove_stale_uploads(upload_dir: Path, older_than_seconds: float) -> list[Path]:
    """Remove upload folders and files left behind by interrupted requests."""
    cutoff = time.time() - older_than_seconds
    removed: list[Path] = []
    if not upload_dir.is_dir():
        return removed
    for entry in upload_dir.iterdir():
        try:
            if entry.stat().st_mtime > cutoff:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            continue
    return removed


def catalog_files(session: Session) -> Iterator[CatalogFile]:
    """Every file row of the catalog, in catalog order."""
    rows = session.execute(
        select(
            Expert.namespace,
            Expert.name,
            ExpertVersion.number,
            ExpertFile.filename,
            ExpertFile.sha256,
        )
        .join(ExpertVersion, ExpertVersion.expert_id == Expert.id)
        .join(ExpertFile, ExpertFile.version_id == ExpertVersion.id)
        .order_by(Expert.namespace, Expert.name, ExpertVersion.number, ExpertFile.filename)
    )
    for namespace, name, number, filename, sha256 in rows:
        yield CatalogFile(f"{namespace}/{name}@{number}", filename, sha256)


def find_missing_blobs(session: Session, blobs: BlobStore) -> list[MissingBlob]:
    present: dict[str, bool] = {}
    missing = []
    for file in catalog_files(session):
        if file.sha256 not in present:
            present[file.sha256] = blobs.exists(file.sha256)
        if not present[file.sha256]:
            missing.append(MissingBlob(file.ref, file.filename, file.sha256))
    return missing


def run_startup_checks(session: Session, blobs: BlobStore, settings: Settings) -> StartupReport:
    removed = blobs.remove_stale_temp_files(settings.stale_temp_seconds)
    removed += [
        str(p) for p in remove_stale_uploads(settings.upload_tmp_dir, settings.stale_temp_seconds)
    ]
    report = StartupReport(
        blob_store=blobs.location,
        removed_temp_files=removed,
        missing_blobs=find_missing_blobs(session, blobs),
    )
    if report.removed_temp_files:
        log.info(
            "removed %d leftover temp file(s) or unfinished upload(s)",
            len(report.removed_temp_files),
        )
    for missing in report.missing_blobs:
        log.error(
            "catalog row without its blob: %s file %s (sha256 %s)",
            missing.ref,
            missing.filename,
            missing.sha256,
        )
    return report
