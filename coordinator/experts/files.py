"""Package files in the blob store: whole, or in pieces (protocol.segments).

A safetensors file is stored as its segments (header, then one blob per tensor) with a
`FileSegment` row per segment, so versions that share tensors store them once; any other file
(and every file stored before migration 0007) is the blob of its own digest. Readers never
care which: `open_file` gives the file's bytes either way.

Garbage: a blob no catalog row needs (an upload that failed or was killed after writing its
blobs, before its commit) is removed by `collect_garbage` once it is older than the
stale-temp window, at start-up and by `phatgoose coordinator check`. `put_file` refreshes the
time of a blob it finds already stored, so that one an upload is about to reference is spared.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from coordinator.experts.models import ExpertFile, FileSegment
from coordinator.storage import BlobNotFound, BlobStore, StoredBlob
from protocol.segments import CutFile, cut_file

log = logging.getLogger(__name__)

_COPY_CHUNK = 1024 * 1024
_QUERY_BATCH = 500  # digests per IN (...) clause


@dataclass(frozen=True)
class StoredFile:
    """Where a file's bytes are: `pieces` in order (one piece, the file's own blob, when it
    is stored whole)."""

    sha256: str
    size: int
    pieces: tuple[StoredBlob, ...]

    @property
    def whole(self) -> bool:
        return len(self.pieces) == 1 and self.pieces[0].sha256 == self.sha256


def stored_files(session: Session, files: Iterable[tuple[str, int]]) -> dict[str, StoredFile]:
    """Each (digest, size) file's pieces, from the `file_segments` rows (whole when none)."""
    wanted = dict(files)
    pieces: dict[str, list[StoredBlob]] = {}
    for rows in _batches(sorted(wanted)):
        for row in session.scalars(
            select(FileSegment)
            .where(FileSegment.file_sha256.in_(rows))
            .order_by(FileSegment.file_sha256, FileSegment.position)
        ):
            pieces.setdefault(row.file_sha256, []).append(StoredBlob(row.segment_sha256, row.size))
    return {
        sha256: StoredFile(sha256, size, tuple(pieces.get(sha256) or [StoredBlob(sha256, size)]))
        for sha256, size in wanted.items()
    }


def stored_file(session: Session, file: ExpertFile) -> StoredFile:
    return stored_files(session, [(file.sha256, file.size)])[file.sha256]


def open_file(blobs: BlobStore, stored: StoredFile) -> BinaryIO:
    """The file's bytes: its blob, or its pieces' blobs one after the other. A missing
    piece raises `BlobNotFound` when the reader reaches it (the first one: at once)."""
    if stored.whole:
        return blobs.open(stored.sha256)
    return io.BufferedReader(_Concatenated(blobs, stored.pieces), _COPY_CHUNK)


def copy_file(blobs: BlobStore, stored: StoredFile, target: Path) -> None:
    """Write the file's bytes to `target` (a new file)."""
    with open_file(blobs, stored) as source, target.open("xb") as sink:
        shutil.copyfileobj(source, sink, _COPY_CHUNK)


def copy_version_files(
    session: Session, blobs: BlobStore, files: Iterable[ExpertFile], directory: Path
) -> Path:
    """Write an expert version's files (`version.files`) into `directory` under their
    filenames, replacing files of those names; returns `directory`."""
    files = list(files)
    stored = stored_files(session, ((f.sha256, f.size) for f in files))
    directory.mkdir(parents=True, exist_ok=True)
    for file in files:
        target = directory / file.filename
        target.unlink(missing_ok=True)
        copy_file(blobs, stored[file.sha256], target)
    return directory


def verify_files(
    blobs: BlobStore,
    files: Mapping[StoredFile, list[str]],
    advance: Callable[[], object] = lambda: None,
) -> tuple[int, list[str]]:
    """Read every file of `files` (where its bytes are -> the catalog files it is, for the
    message) back from `blobs` and hash it. Returns how many verified, and a line per file
    missing or corrupt."""
    verified, problems = 0, []
    for stored, names in files.items():
        where = ", ".join(names)
        digest = hashlib.sha256()
        try:
            with open_file(blobs, stored) as reader:
                while chunk := reader.read(_COPY_CHUNK):
                    digest.update(chunk)
        except BlobNotFound as error:
            problems.append(f"MISSING {stored.sha256} in {blobs.location}: {where} ({error})")
        else:
            if digest.hexdigest() == stored.sha256:
                verified += 1
            else:
                problems.append(
                    f"CORRUPT {stored.sha256} in {blobs.location}: reads back as sha256 "
                    f"{digest.hexdigest()}: {where}"
                )
        advance()
    return verified, problems


def missing_pieces(blobs: BlobStore, stored: StoredFile) -> list[str]:
    return [piece.sha256 for piece in stored.pieces if not blobs.exists(piece.sha256)]


def store_file(blobs: BlobStore, path: Path, sha256: str, scratch: Path) -> StoredFile:
    """Store the file at `path` (whose digest is `sha256`), in pieces where it cuts into
    more than one (protocol.segments). Pieces already stored are not written again.
    `scratch` is a folder for the pieces on their way into the store."""
    cut = cut_file(path)
    if cut.sha256 != sha256:
        raise ValueError(f"{path.name} changed while being stored: sha256 {cut.sha256}")
    if len(cut.segments) == 1:
        blobs.put_file(path, expected_sha256=sha256)
        return StoredFile(sha256, cut.size, (StoredBlob(sha256, cut.size),))
    _put_segments(blobs, path, cut, scratch)
    return StoredFile(sha256, cut.size, tuple(StoredBlob(s.sha256, s.size) for s in cut.segments))


def _put_segments(blobs: BlobStore, path: Path, cut: CutFile, scratch: Path) -> None:
    offset = 0
    with path.open("rb") as source:
        for segment in cut.segments:
            piece = scratch / f"piece-{segment.sha256}"
            source.seek(offset)
            offset += segment.size
            with piece.open("wb") as sink:
                _copy_exactly(source, sink, segment.size)
            try:
                blobs.put_file(piece, expected_sha256=segment.sha256)
            finally:
                piece.unlink(missing_ok=True)


def _copy_exactly(source: BinaryIO, sink: BinaryIO, size: int) -> None:
    while size:
        chunk = source.read(min(size, _COPY_CHUNK))
        if not chunk:
            raise ValueError("the file shrank while being stored")
        sink.write(chunk)
        size -= len(chunk)


def add_segment_rows(session: Session, stored: Iterable[StoredFile]) -> None:
    """Record the pieces of every file stored in pieces, inside the caller's transaction.
    Rows are keyed by file digest: a file already recorded (another version holds it, or
    a concurrent upload recorded it first) is left as it is."""
    rows = [
        {
            "file_sha256": file.sha256,
            "position": position,
            "segment_sha256": piece.sha256,
            "size": piece.size,
        }
        for file in stored
        if not file.whole
        for position, piece in enumerate(file.pieces)
    ]
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(FileSegment).values(rows).on_conflict_do_nothing())


def stored_segments(session: Session, digests: Iterable[str]) -> dict[str, StoredFile]:
    """Where the bytes of each of `digests` the catalog holds are: a piece's blob, or a
    catalog file (itself stored whole or in pieces). A delta upload may name these without
    sending their bytes; a digest missing from the answer must be sent."""
    wanted = sorted(set(digests))
    found: dict[str, StoredFile] = {}
    for batch in _batches(wanted):
        for sha256, size in session.execute(
            select(FileSegment.segment_sha256, FileSegment.size)
            .where(FileSegment.segment_sha256.in_(batch))
            .distinct()
        ):
            found[sha256] = StoredFile(sha256, size, (StoredBlob(sha256, size),))
        files = session.execute(
            select(ExpertFile.sha256, ExpertFile.size)
            .where(ExpertFile.sha256.in_([d for d in batch if d not in found]))
            .distinct()
        ).all()
        found.update(stored_files(session, [(sha256, size) for sha256, size in files]))
    return found


def needed_blobs(session: Session) -> set[str]:
    """Every blob the catalog reads: the pieces of files stored in pieces, and the blob of
    every file stored whole."""
    pieces = set(session.scalars(select(FileSegment.segment_sha256)))
    split = set(session.scalars(select(FileSegment.file_sha256).distinct()))
    whole = set(session.scalars(select(ExpertFile.sha256).distinct())) - split
    return pieces | whole


def collect_garbage(session: Session, blobs: BlobStore, older_than_seconds: float) -> list[str]:
    """Remove blobs no catalog row needs that were stored (or offered) at least this long
    ago; returns their digests. Younger ones may belong to an upload not yet committed."""
    needed = needed_blobs(session)
    session.commit()  # end the read transaction: listing a store may take a while
    cutoff = time.time() - older_than_seconds
    removed = []
    for sha256 in list(blobs.iter_blobs()):
        if sha256 in needed:
            continue
        stored_at = blobs.stored_at(sha256)
        if stored_at is None or stored_at > cutoff:
            continue
        blobs.remove(sha256)
        removed.append(sha256)
    if removed:
        log.info("removed %d blob(s) no catalog row needs", len(removed))
    return removed


def split_whole_files(
    session: Session, blobs: BlobStore, scratch: Path, advance: Callable[[], object] = lambda: None
) -> list[str]:
    """Store in pieces every catalog file stored whole that cuts into more than one (what
    was uploaded before migration 0007); returns their digests. Each file's pieces are
    stored and recorded, and its whole blob removed only once that has committed."""
    split = set(session.scalars(select(FileSegment.file_sha256).distinct()))
    files = session.execute(
        select(ExpertFile.sha256, ExpertFile.size)
        .where(ExpertFile.filename.like("%.safetensors"))
        .distinct()
        .order_by(ExpertFile.sha256)
    ).all()
    session.commit()
    done = []
    for sha256, size in files:
        if sha256 not in split:
            whole = StoredFile(sha256, size, (StoredBlob(sha256, size),))
            copy = scratch / f"{sha256}.safetensors"  # cut as what it is
            try:
                copy_file(blobs, whole, copy)
                stored = store_file(blobs, copy, sha256, scratch)
            finally:
                copy.unlink(missing_ok=True)
            if not stored.whole:
                add_segment_rows(session, [stored])
                session.commit()
                blobs.remove(sha256)
                done.append(sha256)
        advance()
    return done


def join_split_files(
    session: Session, blobs: BlobStore, scratch: Path, advance: Callable[[], object] = lambda: None
) -> list[str]:
    """Store whole again every file stored in pieces (before downgrading below migration
    0007); returns their digests. Pieces no other file needs become garbage, which the
    garbage collection removes once they are older than its window."""
    sizes = dict(session.execute(select(ExpertFile.sha256, ExpertFile.size).distinct()).all())
    split = sorted(set(session.scalars(select(FileSegment.file_sha256).distinct())))
    stored = stored_files(session, [(sha256, sizes[sha256]) for sha256 in split])
    session.commit()
    for sha256 in split:
        copy = scratch / f"whole-{sha256}"
        try:
            copy_file(blobs, stored[sha256], copy)
            blobs.put_file(copy, expected_sha256=sha256)
        finally:
            copy.unlink(missing_ok=True)
        session.execute(delete(FileSegment).where(FileSegment.file_sha256 == sha256))
        session.commit()
        advance()
    return split


class _Concatenated(io.RawIOBase):
    """Reads blobs one after another, each opened when the previous one ends."""

    def __init__(self, blobs: BlobStore, pieces: tuple[StoredBlob, ...]) -> None:
        self._blobs = blobs
        self._pieces: Iterator[StoredBlob] = iter(pieces)
        self._current: BinaryIO | None = None
        self._advance()

    def _advance(self) -> bool:
        if self._current is not None:
            self._current.close()
            self._current = None
        piece = next(self._pieces, None)
        if piece is None:
            return False
        self._current = self._blobs.open(piece.sha256)
        return True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while self._current is not None:
            read = self._current.readinto(buffer)  # type: ignore[attr-defined]
            if read:
                return int(read)
            if not self._advance():
                break
        return 0

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        super().close()


def _batches(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), _QUERY_BATCH):
        yield items[start : start + _QUERY_BATCH]
