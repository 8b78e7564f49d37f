"""What the catalog holds, to compare before and after an attack: rows and blobs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import func, select

from coordinator.experts.models import Expert, ExpertFile, ExpertVersion
from coordinator.storage import BlobStore, LocalBlobStore
from coordinator.storage.blobs import TEMP_PREFIX


@dataclass(frozen=True)
class CatalogState:
    experts: int
    versions: int
    files: int
    blobs: frozenset[str]
    uploads_in_progress: int  # entries in the upload temp dir

    @property
    def rows(self) -> tuple[int, int, int]:
        return (self.experts, self.versions, self.files)


def blob_files(blob_dir: Path) -> frozenset[str]:
    """Every file under the blob root, temp files included (relative paths)."""
    if not blob_dir.is_dir():
        return frozenset()
    return frozenset(str(p.relative_to(blob_dir)) for p in blob_dir.rglob("*") if p.is_file())


def temp_blob_files(blob_dir: Path) -> list[Path]:
    return sorted(blob_dir.rglob(f"{TEMP_PREFIX}*")) if blob_dir.is_dir() else []


def unfinished_writes(blobs: BlobStore) -> list[str]:
    """What interrupted blob writes left in the store: temp files in a folder, unfinished
    multipart uploads in object storage."""
    if isinstance(blobs, LocalBlobStore):
        return [str(p) for p in temp_blob_files(blobs.root)]
    from coordinator.storage.s3 import S3BlobStore

    assert isinstance(blobs, S3BlobStore), blobs
    return [f"{u['Key']} (upload {u['UploadId']})" for u in blobs.multipart_uploads()]


def catalog_state(app: FastAPI) -> CatalogState:
    settings = app.state.settings
    with app.state.sessionmaker() as session:
        counts = [
            session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Expert, ExpertVersion, ExpertFile)
        ]
    tmp = settings.upload_tmp_dir
    return CatalogState(
        experts=counts[0],
        versions=counts[1],
        files=counts[2],
        blobs=blob_files(settings.blob_dir),
        uploads_in_progress=len(list(tmp.iterdir())) if tmp.is_dir() else 0,
    )
