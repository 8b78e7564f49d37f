"""Publishing an expert package to a coordinator over HTTP.

One multipart `POST /api/v1/experts` (field `files`, each part named after its package
file), authenticated with a bearer token. Connection errors, 5xx and 429 are retried with
exponential backoff; a 4xx answer is the coordinator's verdict and is never retried: it comes
back as `PushRejected`, which says which file, check and tensor failed and what was expected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import httpx
from tqdm.auto import tqdm

from protocol import API_PREFIX, PACKAGE_FILES, REQUIRED_FILES

log = logging.getLogger(__name__)

UPLOAD_PATH = f"{API_PREFIX}/experts"
UPLOAD_FIELD = "files"
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


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
) -> dict[str, Any]:
    """Upload the package in `directory`; returns the new version as the coordinator
    describes it (`ref`, `version`, `package_digest`, ...)."""
    retry = retry or RetryPolicy()
    files = package_files(directory)
    url = coordinator.rstrip("/") + UPLOAD_PATH
    headers = {"Authorization": f"Bearer {token}"}
    total = sum(p.stat().st_size for p in files.values())
    with httpx.Client(transport=transport, timeout=timeout) as http:
        for attempt in range(1, retry.attempts + 1):
            try:
                response = _post_once(http, url, headers, files, total, progress)
            except httpx.TransportError as error:
                problem, retry_after = f"{type(error).__name__}: {error}", None
            else:
                if response.status_code < 400:
                    return response.json()
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
    files: dict[str, Path],
    total: int,
    progress: bool,
) -> httpx.Response:
    with ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(total=total, unit="B", unit_scale=True, desc="upload", disable=not progress)
        )
        parts = []
        for name, path in files.items():
            handle = stack.enter_context(path.open("rb"))
            counting = cast(IO[bytes], _Counting(handle, bar))  # httpx only reads it
            parts.append((UPLOAD_FIELD, (name, counting, "application/octet-stream")))
        return http.post(url, headers=headers, files=parts)


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
