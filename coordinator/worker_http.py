"""A remote evaluation worker's backend: a coordinator's job API over HTTP, with a verified
cache of the release files it downloads.

`HttpBackend` leases, heartbeats, reports and ends jobs through the routes of
`coordinator.evaluations.worker_routes`, and builds each job's release directory from the
files the release manifest lists, downloaded through the catalog's own download route
(`GET /api/v1/experts/{ns}/{name}/{version}/files/{filename}`, the file's `url`).

Nothing the coordinator sends is trusted further than it can be checked:
- the manifest must hash to the release's artifact digest and follow the release format
  (`protocol.parse_release_manifest`: each expert's `path` is exactly
  `experts/<namespace>/<name>/<version>`, each filename a package file), and every path is
  checked again to stay inside the release directory, before any file is written;
- each file is streamed into a temp file, hashed while written, and moved into the cache
  (`<cache>/blobs/ab/cdef...`, named by its sha256) only when its size and sha256 are the
  manifest's; a mismatch is an error naming the file and leaves nothing cached. A cached
  file is hashed again before use (a damaged one is dropped and fetched again), so a file
  already cached is never downloaded twice;
- the release directory is built from the cache with hard links (copies across file
  systems): `phatgoose.load_release` checks every file again and refuses symbolic links.

Transient failures (no connection, 5xx, 429 with its Retry-After) are retried with
exponential backoff a bounded number of times (`RetryPolicy`), then end in
`CoordinatorUnavailable`; a refused token (401, 403) stops the worker (`WorkerStopped`);
a 409 `lease_lost` becomes `evaluations.LeaseLost`, as on the database.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import httpx
from pydantic import ValidationError

import phatgoose
from coordinator.core.db import utcnow
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.models import JobState
from coordinator.evaluations.public_errors import PublicJobError
from coordinator.evaluations.schemas import (
    MAX_ATTEMPTS,
    MAX_LEASE_SECONDS,
    MIN_LEASE_SECONDS,
    WORKER_ID_PATTERN,
    LeasedJob,
)
from coordinator.releases.service import manifest_digest
from coordinator.worker import (
    CoordinatorUnavailable,
    CuratedOut,
    Job,
    PreparedRelease,
    WorkerOptions,
    WorkerStopped,
)
from phatgoose.release import UnverifiedFile, write_verified
from protocol import API_PREFIX
from protocol.limits import DEFAULT_LIMITS
from protocol.release import (
    RELEASE_FILE,
    InvalidReleaseManifest,
    ReleaseFile,
    ReleaseManifest,
    parse_release_manifest,
)
from protocol.validation import file_sha256

log = logging.getLogger(__name__)

T = TypeVar("T")

# A connection that takes 10 s to open is down; a read may stall a minute (a large file).
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
PRIVATE_DIR_MODE = 0o700
# Temp files and job directories older than this are a killed worker's (BlobCache).
LEFTOVER_SECONDS = 3600.0
_JOBS = f"{API_PREFIX}/evaluations"


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: `attempts` tries in all, waiting
    `backoff_seconds * 2**n` between them (or the server's Retry-After), at most
    `max_wait_seconds` each."""

    attempts: int = 5
    backoff_seconds: float = 1.0
    max_wait_seconds: float = 60.0

    def wait(self, failures: int, retry_after: float | None) -> float:
        """Seconds to wait after the `failures`-th failed try."""
        wait = self.backoff_seconds * 2 ** (failures - 1) if retry_after is None else retry_after
        return max(0.0, min(wait, self.max_wait_seconds))


class WorkerSetupError(ValueError):
    """The remote worker's URL, token or options cannot work (checked before any request)."""


class CoordinatorRefused(PublicJobError):
    """The coordinator refused a request for a reason no retry cures (a 4xx other than 401,
    403, 409 lease_lost and 429), or answered what the job API does not allow."""


class UnusableRelease(PublicJobError):
    """The release the coordinator sent cannot be used: its manifest does not match the
    release's artifact digest, breaks the release format, or names a path that would leave
    the release directory. Nothing was written."""


class CorruptDownload(PublicJobError):
    """A downloaded file is not the one the manifest lists (size or sha256): not cached."""


class _Transient(Exception):
    """A failure that a retry may cure (5xx, 429)."""

    def __init__(self, problem: str, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.problem, self.retry_after = problem, retry_after


# --- connecting ------------------------------------------------------------------------


def connect(
    url: str,
    token: str,
    *,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """An HTTP client for the coordinator at `url` (its base URL) that sends `token`.

    Every request the backend makes is a path on this base URL (the manifest's file URLs
    are server paths, `protocol.release.FILE_URL_PATTERN`), and redirects are not followed:
    the token goes to this origin only.
    """
    try:
        base = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise WorkerSetupError(f"{url!r} is not a URL ({error})") from None
    if base.scheme not in ("http", "https") or not base.host or base.query or base.fragment:
        raise WorkerSetupError(
            f"{url!r}: expected the coordinator's base URL, http(s)://host[:port][/prefix]"
        )
    if base.userinfo:
        raise WorkerSetupError(f"{url!r}: no user or password in the URL; the token authenticates")
    token = token.strip()
    if not token or any(character.isspace() for character in token):
        raise WorkerSetupError(
            "the worker token is empty or holds spaces (one line: phg_<id>_<secret>)"
        )
    if base.scheme == "http" and not _is_loopback(base.host):
        log.warning(
            "the worker token goes to %s in clear text (http): use https beyond loopback",
            base.host,
        )
    return httpx.Client(
        base_url=base,
        headers={
            "Authorization": f"Bearer {token}",
            "User-Agent": f"phatgoose-worker/{phatgoose.__version__}",
        },
        timeout=timeout,
        follow_redirects=False,
        transport=transport,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_remote_options(options: WorkerOptions) -> None:
    """Refuse options the job API would refuse at the first lease, with a clearer message."""
    if not re.fullmatch(WORKER_ID_PATTERN, options.worker_id):
        raise WorkerSetupError(
            f"worker id {options.worker_id!r}: a remote worker's id is 1 to 100 of "
            "A-Z a-z 0-9 . _ : - starting with a letter or digit"
        )
    if not MIN_LEASE_SECONDS <= options.lease_seconds <= MAX_LEASE_SECONDS:
        raise WorkerSetupError(
            f"lease of {options.lease_seconds:g} s: a remote worker's lease is "
            f"{MIN_LEASE_SECONDS:g} to {MAX_LEASE_SECONDS:g} s"
        )
    if not 1 <= options.max_attempts <= MAX_ATTEMPTS:
        raise WorkerSetupError(f"max attempts {options.max_attempts}: 1 to {MAX_ATTEMPTS}")


# --- the verified cache ----------------------------------------------------------------


class BlobCache:
    """Release files by sha256 under `root/blobs/ab/cdef...`, each verified before it is
    stored and again before it is used. Temp files live in `root/tmp` (same file system,
    so a verified file is renamed into place atomically); job directories in
    `root/releases`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for directory in (root, self.blobs, self.tmp, self.releases):
            directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        self.remove_leftovers(LEFTOVER_SECONDS)

    def remove_leftovers(self, older_than_seconds: float) -> list[Path]:
        """Remove temp files and job directories a killed worker left behind. A job's
        directory lives only while its model loads, and a download's temp file while it
        streams, so anything older than `older_than_seconds` belongs to no live worker
        sharing this cache."""
        cutoff = time.time() - older_than_seconds
        removed = []
        for folder in (self.tmp, self.releases):
            for entry in folder.iterdir():
                try:
                    if entry.lstat().st_mtime > cutoff:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                except FileNotFoundError:
                    continue  # another worker removed it first
                removed.append(entry)
        if removed:
            log.info("removed %d leftover(s) of earlier workers from %s", len(removed), self.root)
        return removed

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    def path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):  # the manifest schema checked it too
            raise ValueError(f"{sha256!r} is not a sha256 hex digest")
        return self.blobs / sha256[:2] / sha256[2:]

    def lookup(self, file: ReleaseFile) -> Path | None:
        """The cached file, if present and still its sha256; a damaged one is removed."""
        path = self.path(file.sha256)
        if path.is_symlink() or not path.is_file():
            return None
        if path.stat().st_size == file.size and file_sha256(path) == file.sha256:
            return path
        log.warning("cached %s is not its sha256 any more: removed, fetching it again", path)
        path.unlink(missing_ok=True)
        return None

    def store(self, file: ReleaseFile, chunks: Iterable[bytes], what: str) -> Path:
        """Write `chunks` to the cache as `file`, if they are exactly its bytes
        (`phatgoose.release.write_verified`, temp files in `tmp`)."""
        target = self.path(file.sha256)
        target.parent.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        try:
            write_verified(chunks, target, file, temp_dir=self.tmp)
        except UnverifiedFile as error:
            raise CorruptDownload(f"{what}: {error}") from None
        return target


def _inside(root: Path, relative: str, what: str) -> Path:
    """`root / relative`, refused unless `relative` is a plain relative POSIX path whose
    every part is a name, and the result resolves inside `root`. The manifest's schema
    already allows only `experts/<ns>/<name>/<version>/<package file>`: this holds even if
    that rule were loosened."""
    pure = PurePosixPath(relative)
    parts = relative.split("/")
    if (
        pure.is_absolute()
        or "\\" in relative
        or "\x00" in relative
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise UnusableRelease(f"{what}: path {relative!r} would leave the release directory")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnusableRelease(f"{what}: path {relative!r} leads outside the release directory")
    return path


def _place(blob: Path, target: Path) -> None:
    """`blob` at `target`: a hard link (no copy), else a copy (another file system)."""
    try:
        os.link(blob, target)
    except OSError:
        shutil.copyfile(blob, target)


# --- the backend -----------------------------------------------------------------------


class HttpBackend:
    """A `JobBackend` on a coordinator's job API. `client` carries the base URL and the
    token (`connect`); `cache_dir` holds the verified file cache and the jobs' release
    directories. `sleep` waits between retries (tests pass a recorder)."""

    def __init__(
        self,
        client: httpx.Client,
        cache_dir: Path,
        *,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.cache = BlobCache(cache_dir)
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        # What each lease reply said, until the job's release is prepared.
        self._leases: dict[int, LeasedJob] = {}

    # -- the token ----------------------------------------------------------------------

    def check_token(self) -> dict[str, Any]:
        """Who the token is (`GET /auth/me`); `WorkerStopped` unless it is a worker's or a
        maintainer's, so a bad token stops the worker before it leases anything."""
        path = f"{API_PREFIX}/auth/me"
        response = self._retrying(f"GET {path}", lambda: self._checked(self.client.get(path)))
        try:
            identity = response.json()
            name, role = identity["name"], identity["role"]
        except (ValueError, KeyError, TypeError):
            raise WorkerStopped(
                f"GET {path}: HTTP {response.status_code}, not a coordinator's answer: is "
                f"{self.client.base_url} a phatgoose coordinator?"
            ) from None
        if response.status_code != 200:
            raise WorkerStopped(f"GET {path}: HTTP {response.status_code}: {_message(response)}")
        if role not in ("worker", "maintainer"):
            raise WorkerStopped(
                f"the token {name!r} is a {role} token; a worker needs a worker token "
                "(phatgoose coordinator create-token --name LABEL --role worker) or a "
                "maintainer's"
            )
        return {"name": name, "role": role}

    # -- leases -------------------------------------------------------------------------

    def claim(self, worker_id: str, *, lease_seconds: float, max_attempts: int) -> Job | None:
        body = {
            "worker_id": worker_id,
            "lease_seconds": lease_seconds,
            "max_attempts": max_attempts,
        }
        response = self._post(f"{_JOBS}/lease", body)
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise self._refused(response, "lease")
        try:
            lease = LeasedJob.model_validate(response.json())
        except (ValueError, ValidationError) as error:
            raise CoordinatorRefused(f"lease: the answer is not a leased job ({error})") from None
        self._leases[lease.id] = lease
        log.info(
            "evaluation %d: leased as %s until %s",
            lease.id,
            lease.worker_id,
            lease.lease_expires_at.isoformat(timespec="seconds"),
        )
        return Job(id=lease.id, release=lease.release, attempts=lease.attempts, spec=lease.spec)

    def heartbeat(self, job_id: int, worker_id: str, *, lease_seconds: float) -> bool:
        # One try: the heartbeat thread tries again at its next beat, well within the lease.
        body = {"worker_id": worker_id, "lease_seconds": lease_seconds}
        response = self._post(f"{_JOBS}/{job_id}/heartbeat", body, attempts=1)
        if response.status_code == 200:
            return True
        if _error(response) == "lease_lost":
            return False
        raise self._refused(response, "heartbeat")

    # -- the release --------------------------------------------------------------------

    @contextmanager
    def prepare(self, job: Job) -> Iterator[PreparedRelease]:
        lease = self._leases.pop(job.id, None)
        if lease is None:
            raise RuntimeError(f"evaluation {job.id} was not leased through this backend")
        if lease.curation_error is not None:
            raise CuratedOut(lease.curation_error)
        manifest = _checked_manifest(lease)
        with tempfile.TemporaryDirectory(
            prefix=f"release-{lease.release}-", dir=self.cache.releases
        ) as directory:
            root = Path(directory)
            # Every path is checked before the first file is fetched or written.
            placed = [
                (entry.ref, file, _inside(root, f"{entry.path}/{file.filename}", entry.ref))
                for entry in manifest.experts
                for file in entry.files
            ]
            for ref, file, target in placed:
                blob = self._cached(file, f"{ref} {file.filename}")
                target.parent.mkdir(parents=True, exist_ok=True)
                _place(blob, target)
            # The manifest as served (export_release writes the stored JSON the same way):
            # its canonical digest was checked against the release's artifact digest.
            (root / RELEASE_FILE).write_text(json.dumps(lease.manifest, indent=2) + "\n")
            yield PreparedRelease(root, lease.manifest, frozenset(lease.done_tasks))

    def _cached(self, file: ReleaseFile, what: str) -> Path:
        cached = self.cache.lookup(file)
        if cached is not None:
            return cached

        def download() -> Path:
            with self.client.stream("GET", file.url) as response:
                if response.status_code != 200:
                    response.read()
                    self._checked(response)
                    raise CoordinatorRefused(
                        f"{what}: GET {file.url}: HTTP {response.status_code}: {_message(response)}"
                    )
                return self.cache.store(file, response.iter_bytes(), what)

        path = self._retrying(f"{what}: GET {file.url}", download)
        log.info("downloaded %s (%s, %d bytes)", what, file.sha256[:12], file.size)
        return path

    # -- results and the end of an attempt ----------------------------------------------

    def record_result(self, job_id: int, worker_id: str, score: evaluations.TaskScore) -> None:
        body = {
            "worker_id": worker_id,
            "task": score.task,
            "accuracy": score.accuracy,
            "stderr": score.stderr,
            "n": score.n,
            "evaluator_version": score.evaluator_version,
            "seconds": score.seconds,
            "routing_stats": score.routing_stats,
            "precision": score.precision,
            "outcomes": None if score.outcomes is None else score.outcomes.to_json(),
        }
        response = self._post(f"{_JOBS}/{job_id}/results", body)
        if response.status_code == 201:
            return
        if _error(response) == "result_exists":
            # Only the lease holder writes, and an attempt skips the tasks stored before it:
            # this is our own earlier try, whose answer was lost on the way back.
            log.info("evaluation %d: %s was stored by an earlier try", job_id, score.task)
            return
        raise self._refused(response, f"result of {score.task}")

    def complete(self, job_id: int, worker_id: str) -> None:
        response = self._post(f"{_JOBS}/{job_id}/complete", {"worker_id": worker_id})
        if response.status_code != 200:
            raise self._refused(response, "complete")

    def fail(
        self, job_id: int, worker_id: str, error: str, *, final: bool, max_attempts: int
    ) -> JobState:
        body = {
            "worker_id": worker_id,
            "error": error,
            "final": final,
            "max_attempts": max_attempts,
        }
        response = self._post(f"{_JOBS}/{job_id}/fail", body)
        if response.status_code != 200:
            raise self._refused(response, "fail")
        try:
            return JobState(response.json()["state"])
        except (ValueError, KeyError, TypeError):
            raise CoordinatorRefused("fail: the answer holds no job state") from None

    # -- release channels ---------------------------------------------------------------

    def advance_channels(self) -> None:
        # One try: the next poll asks again. The coordinator advances with its own settings.
        path = f"{API_PREFIX}/channels/advance"
        response = self._post(path, {}, attempts=1)
        if response.status_code != 200:
            raise CoordinatorRefused(
                f"POST {path}: HTTP {response.status_code}: {_message(response)}"
            )

    # -- requests -----------------------------------------------------------------------

    def _post(
        self, path: str, body: dict[str, Any], *, attempts: int | None = None
    ) -> httpx.Response:
        return self._retrying(
            f"POST {path}", lambda: self._checked(self.client.post(path, json=body)), attempts
        )

    def _checked(self, response: httpx.Response) -> httpx.Response:
        """`response`, unless it is a refused token (`WorkerStopped`) or a failure a retry
        may cure (`_Transient`: 429, 5xx)."""
        status = response.status_code
        what = f"{response.request.method} {response.request.url.path}"
        if status == 401:
            raise WorkerStopped(
                f"{what}: the coordinator refused the worker token (HTTP 401: "
                f"{_message(response)}); check the token file or PHATGOOSE_WORKER_TOKEN, and "
                "that the token is not revoked"
            )
        if status == 403:
            raise WorkerStopped(
                f"{what}: the coordinator refused this token (HTTP 403: {_message(response)}); "
                "a worker needs a worker or maintainer token"
            )
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}: {_message(response)}", _retry_after(response))
        return response

    def _retrying(self, what: str, call: Callable[[], T], attempts: int | None = None) -> T:
        tries = attempts or self.retry.attempts
        problem = "no try"
        for failures in range(1, tries + 1):
            try:
                return call()
            except httpx.TransportError as error:
                problem, retry_after = f"{type(error).__name__}: {error}", None
            except _Transient as transient:
                problem, retry_after = transient.problem, transient.retry_after
            if failures < tries:
                wait = self.retry.wait(failures, retry_after)
                log.warning(
                    "%s: %s; retrying in %.1f s (%d/%d)", what, problem, wait, failures, tries
                )
                self.sleep(wait)
        raise CoordinatorUnavailable(f"{what}: {problem} (after {tries} tries)")

    def _refused(self, response: httpx.Response, what: str) -> Exception:
        """The exception for an answer the caller did not expect."""
        if _error(response) == "lease_lost":
            return evaluations.LeaseLost(f"{what}: {_message(response)}")
        return CoordinatorRefused(
            f"{what}: HTTP {response.status_code} {_error(response) or ''}: {_message(response)}"
        )


def _checked_manifest(lease: LeasedJob) -> ReleaseManifest:
    """The lease's manifest, if it is the release's (its artifact digest) and follows the
    release format (the paths and filenames rule included); `UnusableRelease` otherwise."""
    found = manifest_digest(lease.manifest)
    if found != lease.artifact_digest:
        raise UnusableRelease(
            f"release {lease.release}: its manifest hashes to {found}, the coordinator says "
            f"{lease.artifact_digest}"
        )
    try:
        manifest = parse_release_manifest(lease.manifest)
    except InvalidReleaseManifest as error:
        raise UnusableRelease(
            f"release {lease.release}: its manifest is refused: {error}"
        ) from None
    if manifest.number != lease.release:
        raise UnusableRelease(
            f"the lease is for release {lease.release}, its manifest is release {manifest.number}"
        )
    for entry in manifest.experts:
        for file in entry.files:
            limit = DEFAULT_LIMITS.max_file_bytes(file.filename)
            if file.size > limit:
                raise UnusableRelease(
                    f"{entry.ref}: {file.filename} is listed as {file.size} bytes, over the "
                    f"{limit} bytes a package file may have"
                )
    return manifest


def _detail(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    detail = body.get("detail") if isinstance(body, dict) else None
    return detail if isinstance(detail, dict) else {}


def _error(response: httpx.Response) -> str | None:
    error = _detail(response).get("error")
    return error if isinstance(error, str) else None


def _message(response: httpx.Response) -> str:
    message = _detail(response).get("message")
    if isinstance(message, str):
        return message[:500]
    return response.text[:200] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (a number, or an HTTP date), else None."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - utcnow()).total_seconds())
