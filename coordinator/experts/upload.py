"""Receiving an upload: the multipart body streamed to disk under the admission size limits.

Each part is one package file: the part's `filename` is the package file name, and its
field name is `files` (or the file name itself). A delta upload (protocol.segments) also
carries `layout.json` in the field `layout` and pieces of files in the field `segments`,
each named by its sha256. Bytes go straight to a file in a temp folder inside the data
directory; memory stays bounded by one network chunk. The upload is cut off with 413 as
soon as a file passes its limit or the body passes the total.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio
from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from coordinator.core.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType
from protocol import PACKAGE_FILES
from protocol.limits import AdmissionLimits
from protocol.segments import LAYOUT_FIELD, LAYOUT_FILE, SEGMENT_FIELD

UPLOAD_FIELD = "files"
TEMP_PREFIX = ".tmp-upload-"
# Part headers and boundaries on top of the files themselves.
_MULTIPART_OVERHEAD = 64 * 1024
# Segment parts one upload may carry: a package has a segment per tensor, and a tensor per
# adapted module and LoRA factor; this is far above any base model's count.
MAX_SEGMENT_PARTS = 100_000
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
SEGMENTS_FOLDER = "segments"


@dataclass
class ReceivedUpload:
    """What an upload's body held, on disk: package files sent whole by name; for a delta
    upload, its layout and the segments sent, by digest (not yet checked against it)."""

    files: dict[str, Path] = field(default_factory=dict)
    layout: Path | None = None
    segments: dict[str, Path] = field(default_factory=dict)


@contextlib.contextmanager
def upload_folder(parent: Path) -> Iterator[Path]:
    """A fresh temp folder under `parent`, removed afterwards whatever happens."""
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _PackageWriter:
    """python-multipart callbacks that write each part to `folder/<filename>`."""

    def __init__(self, folder: Path, limits: AdmissionLimits) -> None:
        self.folder = folder
        self.limits = limits
        self.received = ReceivedUpload()
        self.total = 0
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._current: BinaryIO | None = None
        self._current_name = ""
        self._current_size = 0
        self._current_limit = 0
        self.ended = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._field = self._value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        field = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not filename:
            raise BadRequest(
                f"every part must be a file; part {field!r} has no filename",
                check="multipart",
                expected=f"file parts named after package files: {', '.join(PACKAGE_FILES)}",
            )
        if field == SEGMENT_FIELD:
            path, limit = self._segment_part(filename)
        elif field == LAYOUT_FIELD:
            path, limit = self._layout_part(filename)
        else:
            path, limit = self._package_part(field, filename)
        self._current = path.open("xb")
        self._current_name = filename
        self._current_size = 0
        self._current_limit = limit

    def _package_part(self, field: str, filename: str) -> tuple[Path, int]:
        if field not in (UPLOAD_FIELD, filename):
            raise BadRequest(
                f"file {filename!r} was sent in field {field!r}",
                check="multipart",
                expected=f"field '{UPLOAD_FIELD}' (or the file name); '{LAYOUT_FIELD}' and "
                f"'{SEGMENT_FIELD}' for a delta upload",
            )
        if filename not in PACKAGE_FILES:
            raise Unprocessable(
                f"{filename!r} is not a package file",
                file=filename,
                check="file_names",
                expected=f"only {', '.join(PACKAGE_FILES)}",
            )
        if filename in self.received.files:
            raise _twice(filename, "each package file once")
        path = self.folder / filename
        self.received.files[filename] = path
        return path, self.limits.max_file_bytes(filename)

    def _layout_part(self, filename: str) -> tuple[Path, int]:
        if filename != LAYOUT_FILE:
            raise Unprocessable(
                f"the layout was sent as {filename!r}",
                file=filename,
                check="layout",
                expected=f"the file name {LAYOUT_FILE!r}",
            )
        if self.received.layout is not None:
            raise _twice(filename, "one layout")
        self.received.layout = self.folder / LAYOUT_FILE
        # A layout lists digests, a few per tensor: as large as the headers it describes.
        return self.received.layout, self.limits.max_header_bytes

    def _segment_part(self, filename: str) -> tuple[Path, int]:
        if not _SHA256_NAME.fullmatch(filename):
            raise Unprocessable(
                f"segment {filename[:80]!r} is not named by its digest",
                file=filename[:80],
                check="segments",
                expected="each segment's file name: its sha256, 64 lowercase hex digits",
            )
        if filename in self.received.segments:
            raise _twice(filename, "each segment once")
        if len(self.received.segments) >= MAX_SEGMENT_PARTS:
            raise Unprocessable(
                f"more than {MAX_SEGMENT_PARTS} segments",
                check="segments",
                expected=f"at most {MAX_SEGMENT_PARTS} segment parts in one upload",
            )
        folder = self.folder / SEGMENTS_FOLDER
        folder.mkdir(exist_ok=True)
        path = folder / filename
        self.received.segments[filename] = path
        return path, max(self.limits.max_file_bytes(name) for name in PACKAGE_FILES)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        size = end - start
        self._current_size += size
        self.total += size
        if self._current_size > self._current_limit:
            raise PayloadTooLarge(
                f"{self._current_name} is larger than {self._current_limit} bytes",
                file=self._current_name,
                expected=f"at most {self._current_limit} bytes",
            )
        if self.total > self.limits.max_total_bytes:
            raise _total_too_large(self.limits)
        self._current.write(data[start:end])

    def _part_end(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def _end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None


def _twice(filename: str, expected: str) -> Unprocessable:
    return Unprocessable(
        f"{filename!r} was sent twice", file=filename, check="file_names", expected=expected
    )


def _total_too_large(limits: AdmissionLimits) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the upload is larger than {limits.max_total_bytes} bytes",
        expected=f"at most {limits.max_total_bytes} bytes in all",
    )


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaType(
            "an expert upload is a multipart/form-data body",
            expected="Content-Type: multipart/form-data; boundary=...",
        )
    return boundary


async def receive_package(
    request: Request, folder: Path, limits: AdmissionLimits
) -> ReceivedUpload:
    """Stream the request's multipart body into `folder`; return what it held."""
    boundary = _boundary(request)
    body_limit = limits.max_total_bytes + _MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and int(declared) > body_limit
    ):
        raise _total_too_large(limits)

    writer = _PackageWriter(folder, limits)
    parser = MultipartParser(boundary, writer.callbacks())  # type: ignore[arg-type]
    body_bytes = 0
    try:
        async for chunk in _chunks(request):
            body_bytes += len(chunk)
            if body_bytes > body_limit:
                raise _total_too_large(limits)
            # Parsing and writing are blocking file I/O: off the event loop.
            await anyio.to_thread.run_sync(parser.write, chunk)
        parser.finalize()
    except MultipartParseError as error:
        raise BadRequest(f"malformed multipart body: {error}", check="multipart") from error
    except ClientDisconnect as error:
        raise BadRequest("the client disconnected during the upload", check="multipart") from error
    finally:
        writer.close()
    received = writer.received
    if not writer.ended or not (received.files or received.layout or received.segments):
        raise BadRequest(
            "the multipart body is truncated or holds no files",
            check="multipart",
            expected="a complete multipart/form-data body with the package files",
        )
    return received


async def _chunks(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk
