"""Delta uploads: rebuilding the whole package from the segments sent and those stored.

A delta upload (protocol.segments) names every file of the package by its layout: digest,
size and segments. Segments the catalog already holds are not sent. `assemble_package`
writes each file in full into the upload's temp folder, from the segments sent (each checked
against its name) and the stored ones, and checks that it hashes to the layout's digest.
What comes out is an ordinary package on disk, which then goes through
`register_expert_package` like any upload: the same admission checks, the same digest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.orm import Session

from coordinator.core.errors import BadRequest, PayloadTooLarge, Unprocessable
from coordinator.experts.files import StoredFile, open_file, stored_segments
from coordinator.experts.upload import ReceivedUpload
from coordinator.storage import BlobNotFound, BlobStore
from coordinator.storage.blobs import file_sha256
from protocol import PACKAGE_FILES
from protocol.limits import AdmissionLimits
from protocol.segments import LAYOUT_FILE, SEGMENT_FIELD, PackageLayout

_CHUNK = 1024 * 1024


def assemble_package(
    session: Session,
    blobs: BlobStore,
    received: ReceivedUpload,
    folder: Path,
    limits: AdmissionLimits,
) -> dict[str, Path]:
    """The package's files on disk, whole: those sent whole, and those the layout describes
    rebuilt in `folder`. A plain upload (no layout) is returned as it came."""
    if received.layout is None:
        if received.segments:
            raise BadRequest(
                f"{len(received.segments)} segment(s) were sent without a layout",
                check="layout",
                expected=f"{LAYOUT_FILE} in the field 'layout' with the segments",
            )
        return dict(received.files)
    layout = _read_layout(received.layout)
    _check_names(layout, received)
    _check_sizes(layout, received, limits)
    sent = _check_sent_segments(received, layout)
    wanted = {s.sha256 for f in layout.files.values() for s in f.segments} - set(sent)
    stored = stored_segments(session, wanted)
    session.commit()  # end the read transaction: rebuilding reads whole files
    files = dict(received.files)
    for filename, entry in sorted(layout.files.items()):
        sources: list[Path | StoredFile] = []
        for segment in entry.segments:
            source = sent.get(segment.sha256) or stored.get(segment.sha256)
            if source is None:
                raise Unprocessable(
                    f"segment {segment.sha256} of {filename} was neither sent nor is it "
                    "stored here",
                    file=filename,
                    check="segments",
                    expected=f"every segment the coordinator lacks in the field {SEGMENT_FIELD!r} "
                    "(POST /api/v1/blobs/missing says which)",
                )
            size = source.stat().st_size if isinstance(source, Path) else source.size
            if size != segment.size:
                raise Unprocessable(
                    f"segment {segment.sha256} of {filename} is {size} bytes; the layout "
                    f"says {segment.size}",
                    file=filename,
                    check="segments",
                    expected="each segment's size as stored",
                )
            sources.append(source)
        files[filename] = _write(blobs, filename, entry.sha256, sources, folder)
    return files


def _read_layout(path: Path) -> PackageLayout:
    try:
        return PackageLayout.model_validate_json(path.read_bytes())
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise Unprocessable(
            f"{LAYOUT_FILE} is not a package layout: {where}: {first['msg']}",
            file=LAYOUT_FILE,
            check="layout",
            expected='{"files": {name: {"sha256", "size", "segments": [{"sha256", "size"}]}}}',
        ) from None


def _check_names(layout: PackageLayout, received: ReceivedUpload) -> None:
    unknown = layout.unknown_files()
    if unknown:
        raise Unprocessable(
            f"{LAYOUT_FILE} names {', '.join(map(repr, unknown))}, not package files",
            file=LAYOUT_FILE,
            check="file_names",
            expected=f"only {', '.join(PACKAGE_FILES)}",
        )
    both = sorted(set(layout.files) & set(received.files))
    if both:
        raise Unprocessable(
            f"{both[0]!r} was sent whole and described in {LAYOUT_FILE}",
            file=both[0],
            check="file_names",
            expected="each package file once: whole, or by its layout",
        )


def _check_sizes(layout: PackageLayout, received: ReceivedUpload, limits: AdmissionLimits) -> None:
    """The admission size limits, on the files as they will be rebuilt, before any is."""
    total = sum(path.stat().st_size for path in received.files.values())
    for filename, entry in layout.files.items():
        limit = limits.max_file_bytes(filename)
        if entry.size > limit:
            raise PayloadTooLarge(
                f"{filename} is larger than {limit} bytes",
                file=filename,
                expected=f"at most {limit} bytes",
            )
        if sum(s.size for s in entry.segments) != entry.size:
            raise Unprocessable(
                f"the segments of {filename} add up to {sum(s.size for s in entry.segments)} "
                f"bytes; the layout says the file is {entry.size}",
                file=filename,
                check="layout",
                expected="segments whose sizes add up to the file's",
            )
        total += entry.size
    if total > limits.max_total_bytes:
        raise PayloadTooLarge(
            f"the package is larger than {limits.max_total_bytes} bytes",
            expected=f"at most {limits.max_total_bytes} bytes in all",
        )


def _check_sent_segments(received: ReceivedUpload, layout: PackageLayout) -> dict[str, Path]:
    """The segments sent, each hashed: its bytes must be what its name says, and the layout
    must use it."""
    used = {s.sha256 for f in layout.files.values() for s in f.segments}
    for sha256, path in received.segments.items():
        if sha256 not in used:
            raise Unprocessable(
                f"segment {sha256} was sent but {LAYOUT_FILE} does not use it",
                check="segments",
                expected="only segments of the package's files",
            )
        actual = file_sha256(path)
        if actual != sha256:
            raise Unprocessable(
                f"segment {sha256} hashes to {actual}",
                check="segments",
                expected="each segment named by the sha256 of its bytes",
            )
    return dict(received.segments)


def _write(
    blobs: BlobStore,
    filename: str,
    sha256: str,
    sources: list[Path | StoredFile],
    folder: Path,
) -> Path:
    target = folder / filename
    digest = hashlib.sha256()
    with target.open("xb") as sink:
        for source in sources:
            try:
                reader = source.open("rb") if isinstance(source, Path) else open_file(blobs, source)
            except BlobNotFound as error:
                raise Unprocessable(
                    f"a stored segment of {filename} is missing on the coordinator ({error})",
                    file=filename,
                    check="segments",
                    expected="send every segment whole (a plain upload)",
                ) from error
            with reader:
                while chunk := reader.read(_CHUNK):
                    digest.update(chunk)
                    sink.write(chunk)
    if digest.hexdigest() != sha256:
        raise Unprocessable(
            f"{filename} rebuilt from its segments hashes to {digest.hexdigest()}; "
            f"{LAYOUT_FILE} says {sha256}",
            file=filename,
            check="layout",
            expected="the digest of the file the segments make up",
        )
    return target
