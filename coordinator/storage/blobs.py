"""The blob store: bytes named by their sha256, written atomically, never rewritten.

`LocalBlobStore` keeps `root/ab/cdef...` (the first two hex digits as a fan-out folder).
A blob appears under its final name only once complete and on disk: it is written to a
temp file in the same folder, fsynced, renamed, and the folder is fsynced. `BlobStore` is
the interface the services use; `coordinator.storage.s3.S3BlobStore` keeps the same
contract in S3-compatible object storage, and `coordinator.storage.open_blob_store` picks
one from the settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
TEMP_PREFIX = ".tmp-"
_COPY_CHUNK = 1024 * 1024


class BlobNotFound(FileNotFoundError):
    pass


class BlobStoreError(RuntimeError):
    """The store cannot be used: unreachable, refused, or not there (never a missing blob,
    which is `BlobNotFound`). The message names the store and what was expected."""


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int


class BlobStore(Protocol):
    @property
    def location(self) -> str:
        """Where the blobs are, for people: a folder, or an s3:// URL."""
        ...

    def put_file(self, source: Path, expected_sha256: str | None = None) -> StoredBlob:
        """Store a copy of `source`; raise ValueError if its sha256 is not `expected_sha256`."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def open(self, sha256: str) -> BinaryIO: ...

    def local_path(self, sha256: str) -> Path | None:
        """A path to read the blob from directly, where the store has one."""
        ...

    def remove_stale_temp_files(self, older_than_seconds: float) -> list[str]:
        """Remove what interrupted writes left behind, started at least this long ago: temp
        files of a folder, unfinished multipart uploads of an object store. Returns what
        was removed, for people (paths, or keys with their upload ids)."""
        ...

    def iter_blobs(self) -> Iterator[str]:
        """The digest of every stored blob."""
        ...

    def stored_at(self, sha256: str) -> float | None:
        """When the blob was last written, or last offered again to `put_file` (which
        refreshes the time), in seconds since the epoch; None when it is not there. The
        garbage collection spares blobs offered recently: an upload about to reference one."""
        ...

    def remove(self, sha256: str) -> None:
        """Delete the blob (gone already is fine): for the garbage collection only."""
        ...


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while chunk := reader.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)

    @property
    def location(self) -> str:
        return str(self.root.resolve())

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:]

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def local_path(self, sha256: str) -> Path | None:
        path = self.path(sha256)
        if not path.is_file():
            raise BlobNotFound(f"blob {sha256} is missing from {self.root}")
        return path

    def open(self, sha256: str) -> BinaryIO:
        path = self.local_path(sha256)
        assert path is not None
        return path.open("rb")

    def put_file(self, source: Path, expected_sha256: str | None = None) -> StoredBlob:
        """Copy `source` in, hashing as it goes; a blob already present is not rewritten."""
        if expected_sha256 is not None and self.exists(expected_sha256):
            existing = self.path(expected_sha256)
            try:
                os.utime(existing)  # offered again: not garbage (`stored_at`)
                return StoredBlob(expected_sha256, existing.stat().st_size)
            except FileNotFoundError:
                pass  # collected meanwhile: store it again
        # The temp file lives in the blob's own folder when its name is known in advance
        # (always, for validated uploads), else in a staging folder on the same file system.
        folder = self.path(expected_sha256).parent if expected_sha256 else self.root / "incoming"
        folder.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        temp = _temp_path(folder)
        try:
            with source.open("rb") as reader, _create_private(temp) as writer:
                while chunk := reader.read(_COPY_CHUNK):
                    digest.update(chunk)
                    writer.write(chunk)
                    size += len(chunk)
                writer.flush()
                os.fsync(writer.fileno())
            sha256 = digest.hexdigest()
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise ValueError(
                    f"{source.name} changed while being stored: sha256 {sha256}, "
                    f"expected {expected_sha256}"
                )
            final = self.path(sha256)
            final.parent.mkdir(mode=_PRIVATE_DIR, exist_ok=True)
            os.replace(temp, final)  # atomic: same file system
            _fsync_dir(final.parent)
            if folder != final.parent:
                _fsync_dir(folder)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return StoredBlob(sha256, size)

    def remove_stale_temp_files(self, older_than_seconds: float) -> list[str]:
        cutoff = time.time() - older_than_seconds
        removed = []
        for path in self._temp_files():
            try:
                if path.stat().st_mtime <= cutoff:
                    path.unlink()
                    removed.append(str(path))
            except FileNotFoundError:
                continue  # another process finished or removed it
        return removed

    def iter_blobs(self) -> Iterator[str]:
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and len(folder.name) == 2:
                for file in sorted(folder.iterdir()):
                    if not file.name.startswith(TEMP_PREFIX):
                        yield folder.name + file.name

    def stored_at(self, sha256: str) -> float | None:
        try:
            return self.path(sha256).stat().st_mtime
        except FileNotFoundError:
            return None

    def remove(self, sha256: str) -> None:
        path = self.path(sha256)
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def _temp_files(self) -> Iterator[Path]:
        yield from self.root.rglob(f"{TEMP_PREFIX}*")


# Blobs are readable by the coordinator's user only (docs/security.md).
_PRIVATE_DIR, _PRIVATE_FILE = 0o700, 0o600


def _create_private(path: Path) -> BinaryIO:
    """A new file (never an existing one) that only its owner may read."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE), "wb")


def _temp_path(directory: Path) -> Path:
    return directory / f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(8).hex()}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
