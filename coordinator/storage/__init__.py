"""Content-addressed blob storage: every file is stored once, named by its sha256."""

from coordinator.storage.blobs import BlobNotFound, BlobStore, LocalBlobStore, StoredBlob

__all__ = ["BlobNotFound", "BlobStore", "LocalBlobStore", "StoredBlob"]
