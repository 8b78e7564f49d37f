"""Receiving an upload: the multipart body streamed to disk under the admission size limits.

Each part is one package file: the part's `filename` is the package file name, and its
field name is `files` (or the file name itself). Bytes go straight to a file in a temp
folder inside the data directory; memory stays bounded by one network chunk. The upload
is cut off with 413 as soon as a file passes its limit or the body passes the total.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
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

UPLOAD_FIELD = "files"
TEMP_PREFIX = ".tmp-upload-"
# Part headers and boundaries on top of the files themselves.
_MULTIPART_OVERHEAD = 64 * 1024


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
        self.files: dict[str, Path] = {}
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
        if field not in (UPLOAD_FIELD, filename):
            raise BadRequest(
                f"file {filename!r} was sent in field {field!r}",
                check="multipart",
                expected=f"field '{UPLOAD_FIELD}' (or the file name)",
            )
        if filename not in PACKAGE_FILES:
            raise Unprocessable(
                f"{filename!r} is not a package file",
                file=filename,
                check="file_names",
                expected=f"only {', '.join(PACKAGE_FILES)}",
            )
        if filename in self.files:
            raise Unprocessable(
                f"{filename!r} was sent twice",
                file=filename,
                check="file_names",
                expected="each package file once",
            )
        path = self.folder / filename
        self.files[filename] = path
        self._current = path.open("xb")
        self._current_name = filename
        self._current_size = 0
        self._current_limit = self.limits.max_file_bytes(filename)

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
) -> dict[str, Path]:
    """Stream the request's multipart body into `folder`; return file name -> path."""
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
    received = 0
    try:
        async for chunk in _chunks(request):
            received += len(chunk)
            if received > body_limit:
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
    if not writer.ended or not writer.files:
        raise BadRequest(
            "the multipart body is truncated or holds no files",
            check="multipart",
            expected="a complete multipart/form-data body with the package files",
        )
    return writer.files


async def _chunks(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk
