"""Content-addressed blob storage: every file is stored once, named by its sha256."""

from __future__ import annotations

from typing import TYPE_CHECKING

from coordinator.storage.blobs import (
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    LocalBlobStore,
    StoredBlob,
)

if TYPE_CHECKING:
    from coordinator.core.config import Settings

__all__ = [
    "BlobNotFound",
    "BlobStore",
    "BlobStoreError",
    "LocalBlobStore",
    "StoredBlob",
    "open_blob_store",
]


def open_blob_store(settings: Settings) -> BlobStore:
    """The store the settings name: S3-compatible object storage for `blob_url`
    (s3://bucket/prefix), else the folder `<data_dir>/blobs`.

    An S3 store is checked here, so that a process with a wrong bucket, endpoint or
    credentials stops at start-up with the reason (`BlobStoreError`), not at its first
    upload. boto3 is imported only for S3.
    """
    if not settings.blob_url:
        return LocalBlobStore(settings.blob_dir)
    from coordinator.storage.s3 import S3BlobStore

    store = S3BlobStore.from_url(settings.blob_url)
    store.check()
    return store
