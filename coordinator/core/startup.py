"""Start-up checks: remove what interrupted writes left (temp files, unfinished multipart
uploads, blobs no catalog row needs), report catalog files whose blobs are missing, and say
which store was checked."""

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
from coordinator.experts.files import collect_garbage, missing_pieces, stored_files
from coordinator.experts.models import Expert, ExpertFile, ExpertVersion
from coordinator.storage import BlobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogFile:
    ref: str  # namespace/name@version
    filename: str
    sha256: str
    size: int


@dataclass(frozen=True)
class MissingBlob(CatalogFile):
    """A catalog file the store cannot give back: its blob, or (for a file stored in pieces)
    the blobs of `pieces`, are missing."""

    pieces: tuple[str, ...] = ()

    def describe(self) -> str:
        what = f"{self.ref} {self.filename} sha256 {self.sha256}"
        if self.pieces:
            what += f" (stored in pieces; missing {', '.join(self.pieces)})"
        return what


@dataclass
class StartupReport:
    blob_store: str = ""  # the folder or s3:// URL checked
    # Temp file paths and, in object storage, aborted multipart uploads (key and upload id).
    removed_temp_files: list[str] = field(default_factory=list)
    missing_blobs: list[MissingBlob] = field(default_factory=list)
    # Blobs no catalog row needs, older than the stale-temp window (coordinator.experts.files).
    removed_blobs: list[str] = field(default_factory=list)

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
            ExpertFile.size,
        )
        .join(ExpertVersion, ExpertVersion.expert_id == Expert.id)
        .join(ExpertFile, ExpertFile.version_id == ExpertVersion.id)
        .order_by(Expert.namespace, Expert.name, ExpertVersion.number, ExpertFile.filename)
    )
    for namespace, name, number, filename, sha256, size in rows:
        yield CatalogFile(f"{namespace}/{name}@{number}", filename, sha256, size)


def find_missing_blobs(session: Session, blobs: BlobStore) -> list[MissingBlob]:
    files = list(catalog_files(session))
    stored = stored_files(session, ((f.sha256, f.size) for f in files))
    lacking = {sha256: missing_pieces(blobs, where) for sha256, where in stored.items()}
    return [
        MissingBlob(
            f.ref,
            f.filename,
            f.sha256,
            f.size,
            () if stored[f.sha256].whole else tuple(lacking[f.sha256]),
        )
        for f in files
        if lacking[f.sha256]
    ]


def run_startup_checks(session: Session, blobs: BlobStore, settings: Settings) -> StartupReport:
    removed = blobs.remove_stale_temp_files(settings.stale_temp_seconds)
    removed += [
        str(p) for p in remove_stale_uploads(settings.upload_tmp_dir, settings.stale_temp_seconds)
    ]
    report = StartupReport(
        blob_store=blobs.location,
        removed_temp_files=removed,
        missing_blobs=find_missing_blobs(session, blobs),
        removed_blobs=collect_garbage(session, blobs, settings.stale_temp_seconds),
    )
    if report.removed_temp_files:
        log.info(
            "removed %d leftover temp file(s) or unfinished upload(s)",
            len(report.removed_temp_files),
        )
    for missing in report.missing_blobs:
        log.error("catalog file without its blobs: %s", missing.describe())
    return report
