"""Copying every blob from one store to another, and checking the copy by reading it back.

Used by `phatgoose coordinator copy-blobs` to move a catalog from the data directory into
object storage (or back) before pointing `PHATGOOSE_BLOB_URL` at the destination. Blobs
stream through: a local source is uploaded from its file; any other source is first
written to a staging file on disk, never held in memory. The verification reads each
catalog file back from the destination (whole, or its pieces one after the other:
`coordinator.experts.files.verify_files`) and hashes it, whatever the copy step reported, so
a blob that a previous run, another tool or the store itself got wrong is found.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.storage.blobs import BlobNotFound, BlobStore, LocalBlobStore
from coordinator.storage.urls import is_s3_url

_CHUNK = 1 << 20


@dataclass
class CopyReport:
    copied: int = 0
    already_there: int = 0
    verified: int = 0
    problems: list[str] = field(default_factory=list)  # one line per missing or corrupt blob


def open_destination(target: str) -> BlobStore:
    """`s3://bucket/prefix` (checked now), else a local folder used as a blob folder."""
    if is_s3_url(target):
        from coordinator.storage.s3 import S3BlobStore

        store = S3BlobStore.from_url(target)
        store.check()
        return store
    if "://" in target:
        raise ValueError(
            f"{target!r}: expected s3://bucket/prefix or a local folder, not another scheme"
        )
    return LocalBlobStore(Path(target))


def copy_blobs(
    source: BlobStore,
    destination: BlobStore,
    digests: Iterable[str],
    staging_dir: Path,
    advance: Callable[[], object] = lambda: None,
) -> CopyReport:
    """Copy each blob of `digests` that `destination` lacks; `advance` is called per blob
    (a progress bar). A source blob that is gone or does not hash to its name is listed
    in the report's problems, and the copy goes on."""
    report = CopyReport()
    for sha256 in digests:
        try:
            if destination.exists(sha256):
                report.already_there += 1
            else:
                copy_blob(source, destination, sha256, staging_dir)
                report.copied += 1
        except BlobNotFound:
            report.problems.append(f"MISSING {sha256} in the source {source.location}")
        except ValueError as error:
            report.problems.append(f"CORRUPT {sha256} in the source {source.location}: {error}")
        advance()
    return report


def copy_blob(source: BlobStore, destination: BlobStore, sha256: str, staging_dir: Path) -> None:
    """One blob, streamed; the destination checks that the bytes hash to `sha256`."""
    path = source.local_path(sha256)
    if path is not None:
        destination.put_file(path, expected_sha256=sha256)
        return
    with tempfile.NamedTemporaryFile(dir=staging_dir, prefix=".tmp-copy-") as staged:
        with source.open(sha256) as reader:
            shutil.copyfileobj(reader, staged, _CHUNK)
        staged.flush()
        destination.put_file(Path(staged.name), expected_sha256=sha256)
