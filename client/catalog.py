"""Fetching a published version's package from a coordinator, for `phatgoose client diff`.

The conventions are `client.push`'s: the coordinator's base URL plus the API prefix, an
optional bearer token (reads are public unless the coordinator says otherwise), connection
errors, 5xx and 429 retried with backoff (`RetryPolicy`), any other 4xx reported with the
coordinator's message.

Nothing the coordinator sends is trusted further than it can be checked: only package file
names are fetched, each from the version's own download route on the same origin, streamed
into the target folder and hashed on the way; a file whose size or sha256 is not what the
version lists is an error naming it. Sizes are bounded by the admission limits.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from client.push import RETRYABLE_STATUS, RetryPolicy
from protocol import API_PREFIX, PACKAGE_FILES
from protocol.limits import DEFAULT_LIMITS, AdmissionLimits

log = logging.getLogger(__name__)

# `namespace/name@version`, as the catalog and releases name a version.
_REF = re.compile(r"(?P<namespace>[^/@\s]+)/(?P<name>[^/@\s]+)@(?P<version>[0-9]{1,10})")
_CHUNK = 1 << 20


class FetchError(Exception):
    """A version could not be fetched, or what arrived is not what the catalog lists."""


@dataclass(frozen=True)
class VersionRef:
    namespace: str
    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}@{self.version}"

    @property
    def api_path(self) -> str:
        return (
            f"{API_PREFIX}/experts/{quote(self.namespace, safe='')}/"
            f"{quote(self.name, safe='')}/{self.version}"
        )


def parse_ref(text: str) -> VersionRef | None:
    """`namespace/name@version` -> its parts; None for anything else."""
    match = _REF.fullmatch(text)
    if match is None or int(match["version"]) < 1:
        return None
    return VersionRef(match["namespace"], match["name"], int(match["version"]))


def fetch_version(
    ref: VersionRef,
    coordinator: str,
    target: Path,
    *,
    token: str | None = None,
    retry: RetryPolicy | None = None,
    limits: AdmissionLimits = DEFAULT_LIMITS,
    timeout: float = 300.0,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Download the package of `ref` into the folder `target`, each file verified against
    the sha256 and size the version lists; returns the version as the API describes it."""
    retry = retry or RetryPolicy()
    base = coordinator.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    target.mkdir(parents=True, exist_ok=True)
    with httpx.Client(transport=transport, timeout=timeout, headers=headers) as http:
        version = _with_retries(
            retry, sleep, f"{ref}", lambda: _json(http, base + ref.api_path, ref)
        )
        files = version.get("files")
        if not isinstance(files, list):
            raise FetchError(f"{base} describes {ref} without a list of files")
        for entry in files:
            name, sha256, size = _file_entry(ref, entry, limits)
            url = f"{base}{ref.api_path}/files/{quote(name, safe='')}"
            download = partial(_download, http, url, target / name, ref, sha256, size)
            _with_retries(retry, sleep, f"{ref} {name}", download)
    return version


def _file_entry(ref: VersionRef, entry: Any, limits: AdmissionLimits) -> tuple[str, str, int]:
    """(name, sha256, size) of one listed file, each checked before anything is fetched."""
    if not isinstance(entry, dict):
        raise FetchError(f"{ref}: a file entry is not an object")
    name, sha256, size = entry.get("filename"), entry.get("sha256"), entry.get("size")
    if name not in PACKAGE_FILES:
        raise FetchError(f"{ref} lists {name!r}, which is not a package file ({PACKAGE_FILES})")
    assert isinstance(name, str)
    if not isinstance(sha256, str) or re.fullmatch(r"[0-9a-f]{64}", sha256) is None:
        raise FetchError(f"{ref} lists {name} with sha256 {sha256!r}; expected 64 hex digits")
    if type(size) is not int or not 0 <= size <= limits.max_file_bytes(name):
        raise FetchError(
            f"{ref} lists {name} with size {size!r}; expected at most "
            f"{limits.max_file_bytes(name)} bytes"
        )
    return name, sha256, size


class _Retryable(Exception):
    def __init__(self, problem: str, retry_after: str | None = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after


def _with_retries(
    retry: RetryPolicy, sleep: Callable[[float], None], what: str, call: Callable[[], Any]
) -> Any:
    for attempt in range(1, retry.attempts + 1):
        try:
            return call()
        except _Retryable as problem:
            if attempt == retry.attempts:
                raise FetchError(
                    f"could not fetch {what} after {attempt} attempts; last: {problem}"
                ) from None
            delay = retry.delay(attempt, problem.retry_after)
            log.warning("%s: %s; retrying in %.1f s", what, problem, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def _check(response: httpx.Response, ref: VersionRef) -> None:
    if response.status_code < 400:
        return
    if response.status_code in RETRYABLE_STATUS:
        raise _Retryable(f"HTTP {response.status_code}", response.headers.get("Retry-After"))
    response.read()
    raise FetchError(f"{ref}: {response.status_code} {_message(response)}")


def _json(http: httpx.Client, url: str, ref: VersionRef) -> dict[str, Any]:
    try:
        response = http.get(url)
    except httpx.TransportError as error:
        raise _Retryable(f"{type(error).__name__}: {error}") from error
    _check(response, ref)
    try:
        body = response.json()
    except ValueError as error:
        raise FetchError(f"{url} did not answer JSON") from error
    if not isinstance(body, dict):
        raise FetchError(f"{url} did not answer a JSON object")
    return body


def _download(
    http: httpx.Client, url: str, path: Path, ref: VersionRef, sha256: str, size: int
) -> None:
    """Stream one file to `path`, hashing it; never more bytes than listed."""
    digest, written = hashlib.sha256(), 0
    try:
        with http.stream("GET", url) as response, path.open("wb") as sink:
            _check(response, ref)
            for chunk in response.iter_bytes(_CHUNK):
                written += len(chunk)
                if written > size:
                    raise FetchError(f"{ref} {path.name}: more than the {size} bytes listed")
                digest.update(chunk)
                sink.write(chunk)
    except httpx.TransportError as error:
        raise _Retryable(f"{type(error).__name__}: {error}") from error
    if written != size or digest.hexdigest() != sha256:
        path.unlink(missing_ok=True)
        raise FetchError(
            f"{ref} {path.name}: received {written} bytes with sha256 {digest.hexdigest()}; "
            f"expected {size} bytes with sha256 {sha256}"
        )


def _message(response: httpx.Response) -> str:
    """The coordinator's error message (its `{detail: {message}}` shape), else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, dict) and detail.get("message"):
        return str(detail["message"])
    return str(detail)[:500]
