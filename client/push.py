"""Publishing an expert package to a coordinator over HTTP.

One multipart `POST /api/v1/experts` (field `files`, each part named after its package
file), authenticated with a bearer token. By default the push is a delta (protocol.segments):
it first asks which tensors the coordinator lacks (`POST /api/v1/blobs/missing`) and sends
only those, with a layout of the whole package; the coordinator rebuilds the package and
admits it like any other, with the same digest. Connection errors, 5xx and 429 are retried
with exponential backoff; a 4xx answer is the coordinator's verdict and is never retried: it
comes back as `PushRejected`, which says which file, check and tensor failed and what was
expected.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, cast

import httpx
from tqdm.auto import tqdm

from protocol import API_PREFIX, PACKAGE_FILES, REQUIRED_FILES
from protocol.segments import (
    LAYOUT_FIELD,
    LAYOUT_FILE,
    SEGMENT_FIELD,
    CutFile,
    FileLayout,
    MissingReply,
    PackageLayout,
    Segment,
    SegmentRef,
    cut_file,
)

log = logging.getLogger(__name__)

UPLOAD_PATH = f"{API_PREFIX}/experts"
MISSING_PATH = f"{API_PREFIX}/blobs/missing"
UPLOAD_FIELD = "files"
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Digests per `blobs/missing` question: well under the coordinator's 1 MiB request body.
_MISSING_BATCH = 5000


class PushError(Exception):
    """The package could not be published."""


class PushRejected(PushError):
    """The coordinator answered 4xx: the package (or the request) was refused."""

    def __init__(self, status_code: int, detail: dict[str, Any]) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(self.report())

    def report(self) -> str:
        """The rejection for people: what failed, where, and what was expected."""
        d = self.detail
        lines = [f"rejected ({self.status_code} {d.get('error', 'error')}): {d.get('message')}"]
        for key in ("check", "file", "tensor", "expected"):
            if d.get(key):
                lines.append(f"  {key}: {d[key]}")
        if existing := d.get("existing"):
            lines.append(f"  existing: {existing}")
        return "\n".join(lines)


class PushUnavailable(PushError):
    """Every attempt failed with a connection error, 5xx or 429."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff_seconds: float = 1.0  # doubled after every failed attempt
    max_backoff_seconds: float = 30.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_backoff_seconds)
            except ValueError:
                pass
        return min(self.backoff_seconds * 2 ** (attempt - 1), self.max_backoff_seconds)


def package_files(directory: str | Path) -> dict[str, Path]:
    """The package files in `directory` (required ones must be there)."""
    directory = Path(directory)
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise PushError(f"{directory} is not an expert package: missing {', '.join(missing)}")
    return {name: directory / name for name in PACKAGE_FILES if (directory / name).is_file()}


@dataclass(frozen=True)
class Transfer:
    """What a push sent: bytes of the package, bytes that went over the wire (file and
    segment bodies), and segments sent of those the package is cut into."""

    package_bytes: int
    sent_bytes: int
    segments_sent: int
    segments_total: int
    delta: bool

    def describe(self) -> str:
        share = self.sent_bytes / self.package_bytes if self.package_bytes else 0.0
        how = "delta" if self.delta else "whole package"
        return (
            f"sent {self.sent_bytes} of {self.package_bytes} bytes ({share:.1%}; {how}: "
            f"{self.segments_sent} of {self.segments_total} segments)"
        )


@dataclass
class _Plan:
    """One push: the files sent whole, the layout of the others and their segments to send."""

    whole: dict[str, Path]
    layout: PackageLayout | None = None
    segments: list[tuple[Path, int, Segment]] = field(default_factory=list)  # file, offset

    def transfer(self, cuts: dict[str, CutFile]) -> Transfer:
        whole = sum(path.stat().st_size for path in self.whole.values())
        sent_segments = sum(segment.size for _, _, segment in self.segments)
        whole_segments = sum(len(cuts[name].segments) for name in self.whole)
        return Transfer(
            package_bytes=sum(cut.size for cut in cuts.values()),
            sent_bytes=whole + sent_segments,
            segments_sent=whole_segments + len(self.segments),
            segments_total=sum(len(cut.segments) for cut in cuts.values()),
            delta=self.layout is not None,
        )


def push_package(
    directory: str | Path,
    coordinator: str,
    token: str,
    *,
    retry: RetryPolicy | None = None,
    timeout: float = 300.0,
    transport: httpx.BaseTransport | None = None,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    delta: bool = True,
) -> dict[str, Any]:
    """Upload the package in `directory`; returns the new version as the coordinator
    describes it (`ref`, `version`, `package_digest`, ...), with `transfer`: what this push
    sent (`Transfer`'s fields).

    With `delta` (the default) only the tensors the coordinator lacks are sent; a
    coordinator without delta uploads (no `blobs/missing` route: 404) gets the whole package."""
    retry = retry or RetryPolicy()
    files = package_files(directory)
    headers = {"Authorization": f"Bearer {token}"}
    base = coordinator.rstrip("/")
    cuts = {name: cut_file(path) for name, path in files.items()}
    with httpx.Client(transport=transport, timeout=timeout) as http:
        missing = _ask_missing(http, base, headers, cuts, retry, sleep) if delta else None
        plan = _plan(files, cuts, missing)
        reply = _send(
            lambda: _post_once(http, base + UPLOAD_PATH, headers, plan, progress),
            base + UPLOAD_PATH,
            retry,
            sleep,
        )
    body: dict[str, Any] = reply.json()
    body["transfer"] = asdict(plan.transfer(cuts))
    return body


def _ask_missing(
    http: httpx.Client,
    base: str,
    headers: dict[str, str],
    cuts: dict[str, CutFile],
    retry: RetryPolicy,
    sleep: Callable[[float], None],
) -> set[str] | None:
    """The digests (files and their segments) the coordinator lacks; None when it does not
    take delta uploads (404 from a coordinator that predates them)."""
    digests = list(
        dict.fromkeys(
            d for cut in cuts.values() for d in (cut.sha256, *(s.sha256 for s in cut.segments))
        )
    )
    missing: set[str] = set()
    url = base + MISSING_PATH
    for start in range(0, len(digests), _MISSING_BATCH):
        question = {"sha256": digests[start : start + _MISSING_BATCH]}
        try:
            reply = _send(
                partial(http.post, url, headers=headers, json=question), url, retry, sleep
            )
        except PushRejected as rejection:
            if rejection.status_code in (404, 405):
                log.info("%s does not take delta uploads; sending the whole package", base)
                return None
            raise
        missing.update(MissingReply.model_validate(reply.json()).missing)
    return missing


def _plan(files: dict[str, Path], cuts: dict[str, CutFile], missing: set[str] | None) -> _Plan:
    """Each file: referenced when the coordinator has it, sent whole when it has none of
    its segments, else described by its layout with only the missing segments sent."""
    if missing is None:
        return _Plan(whole=dict(files))
    plan = _Plan(whole={})
    described: dict[str, FileLayout] = {}
    for name, path in files.items():
        cut = cuts[name]
        if cut.sha256 not in missing:  # the coordinator holds the very file
            described[name] = FileLayout(
                sha256=cut.sha256,
                size=cut.size,
                segments=[SegmentRef(sha256=cut.sha256, size=cut.size)],
            )
            continue
        lacking = [s.sha256 in missing for s in cut.segments]
        if all(lacking):
            plan.whole[name] = path
            continue
        described[name] = FileLayout.of(cut)
        offset = 0
        sent: set[str] = set()
        for segment, lacks in zip(cut.segments, lacking, strict=True):
            if lacks and segment.sha256 not in sent:
                plan.segments.append((path, offset, segment))
                sent.add(segment.sha256)
            offset += segment.size
    plan.layout = PackageLayout(files=described) if described else None
    # Two files may share a segment: it is sent once.
    plan.segments = list({s.sha256: (p, o, s) for p, o, s in plan.segments}.values())
    return plan


def _send(
    request: Callable[[], httpx.Response],
    url: str,
    retry: RetryPolicy,
    sleep: Callable[[float], None],
) -> httpx.Response:
    """`request()` until it is answered below 400 (returned) or with a verdict (4xx:
    `PushRejected`); connection errors, 5xx and 429 are retried with backoff."""
    for attempt in range(1, retry.attempts + 1):
        try:
            response = request()
        except httpx.TransportError as error:
            problem, retry_after = f"{type(error).__name__}: {error}", None
        else:
            if response.status_code < 400:
                return response
            if response.status_code not in RETRYABLE_STATUS:
                raise PushRejected(response.status_code, _detail(response))
            problem = f"HTTP {response.status_code}"
            retry_after = response.headers.get("Retry-After")
        if attempt == retry.attempts:
            raise PushUnavailable(
                f"could not publish to {url} after {attempt} attempts; last: {problem}"
            )
        delay = retry.delay(attempt, retry_after)
        log.warning(
            "%s; retrying in %.1f s (attempt %d of %d)",
            problem,
            delay,
            attempt + 1,
            retry.attempts,
        )
        sleep(delay)
    raise AssertionError("unreachable")


def _post_once(
    http: httpx.Client,
    url: str,
    headers: dict[str, str],
    plan: _Plan,
    progress: bool,
) -> httpx.Response:
    total = sum(path.stat().st_size for path in plan.whole.values())
    total += sum(segment.size for _, _, segment in plan.segments)
    with ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(total=total, unit="B", unit_scale=True, desc="upload", disable=not progress)
        )
        parts: list[tuple[str, tuple[str, Any, str]]] = []
        for name, path in plan.whole.items():
            handle = stack.enter_context(path.open("rb"))
            counting = cast(IO[bytes], _Counting(handle, bar))  # httpx only reads it
            parts.append((UPLOAD_FIELD, (name, counting, "application/octet-stream")))
        if plan.layout is not None:
            layout = plan.layout.model_dump_json().encode()
            parts.append((LAYOUT_FIELD, (LAYOUT_FILE, layout, "application/json")))
        for path, offset, segment in plan.segments:
            handle = stack.enter_context(path.open("rb"))
            piece = cast(IO[bytes], _Counting(_Slice(handle, offset, segment.size), bar))
            parts.append((SEGMENT_FIELD, (segment.sha256, piece, "application/octet-stream")))
        return http.post(url, headers=headers, files=parts)


class _Slice(io.RawIOBase):
    """Bytes `[offset, offset + size)` of an open file, as a file of its own (no `fileno`:
    httpx then takes its length from `seek`, not from the whole file)."""

    def __init__(self, handle: IO[bytes], offset: int, size: int) -> None:
        self._handle, self._offset, self._size, self._position = handle, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = min(max(base + offset, 0), self._size)
        return self._position

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._position)
        if want <= 0:
            return 0
        self._handle.seek(self._offset + self._position)
        data = self._handle.read(want)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


class _Counting:
    """A read-only file that advances a progress bar as it is read."""

    def __init__(self, handle: Any, bar: tqdm) -> None:
        self._handle = handle
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        chunk = self._handle.read(size)
        self._bar.update(len(chunk))
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _detail(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"message": response.text[:2000] or response.reason_phrase}
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, dict):
        return detail
    return {"message": str(detail)}
