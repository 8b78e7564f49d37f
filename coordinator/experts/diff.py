"""Diffs of two catalog versions: what changed between two packages on one base model.

The numbers are `protocol.diff.diff_packages`, the same code `phatgoose client diff` runs on
local directories; this module finds the two versions (by default a version and the one
before it), reads their files from the blob store and keeps recent results. The API route
(`GET /experts/{ns}/{name}/{version}/diff`) and the page (`/ui/experts/.../diff`) share it.

Files are read where the store keeps them when it has local paths; otherwise (object
storage) each file is streamed into a temp folder under the coordinator's upload temp dir,
never held in memory. Both packages passed admission, so each is at most
`max_total_bytes` (1 GiB by default) on disk for the length of the request, and the diff
itself reads one module's tensors at a time (`protocol.diff`).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.core.config import Settings
from coordinator.core.errors import CoordinatorError, NotFound, StorageError
from coordinator.experts import service
from coordinator.experts.files import StoredFile, copy_file, stored_files
from coordinator.experts.models import ExpertVersion
from coordinator.experts.upload import upload_folder
from coordinator.storage import BlobNotFound, BlobStore
from protocol.diff import BaseModelMismatch, DiffError, PackageDiff, diff_packages

# `namespace/name@version`, as releases name experts; parts are path segments of the API.
_REF = re.compile(r"(?P<namespace>[^/@\s]+)/(?P<name>[^/@\s]+)@(?P<number>[^/@\s]+)")
MAX_REF_CHARS = 300
# Diffs are kept by the two package digests: versions never change, so neither do their
# diffs, and the page's plot asks for the diff its page has just computed.
_CACHED_DIFFS = 32


class InvalidRef(CoordinatorError):
    """`against` is not of the form namespace/name@version."""

    status_code = 422
    error = "invalid_request"
    check = "ref"


class DiffRefused(CoordinatorError):
    """The two versions cannot be compared (different base models, mismatched modules)."""

    status_code = 422
    error = "diff_refused"
    check = "diff"


@dataclass(frozen=True)
class VersionPair:
    """The reference version `a` (changes are relative to it) and the version `b`."""

    a: ExpertVersion
    b: ExpertVersion

    def stored(self, session: Session) -> tuple[StoredPackage, StoredPackage]:
        """What reading both versions' files needs, copied out of the session."""
        return StoredPackage.of(session, self.a), StoredPackage.of(session, self.b)


def parse_ref(text: str) -> tuple[str, str, int]:
    """`namespace/name@version` -> its parts; `InvalidRef` (422) otherwise."""
    match = _REF.fullmatch(text) if len(text) <= MAX_REF_CHARS else None
    number = service.parse_version_number(match["number"]) if match else None
    if match is None or number is None:
        shown = text if len(text) <= 80 else text[:80] + "..."
        raise InvalidRef(
            f"against={shown!r} is not a version reference",
            expected=f"namespace/name@N with N in ASCII digits, 1 to {service.MAX_VERSION_NUMBER}",
        )
    return match["namespace"], match["name"], number


def previous_version(session: Session, version: ExpertVersion) -> ExpertVersion | None:
    """The version of the same expert just before `version` (yanked or not), if any."""
    return session.scalar(
        select(ExpertVersion)
        .where(ExpertVersion.expert_id == version.expert_id, ExpertVersion.number < version.number)
        .order_by(ExpertVersion.number.desc())
        .limit(1)
    )


def resolve_pair(
    session: Session, namespace: str, name: str, number: int, against: str | None
) -> VersionPair:
    """`namespace/name@number` as `b`, and as `a` the version `against` names, by default the
    previous version of the same expert. Raises `NotFound` for an unknown version (or a
    first version without `against`), `InvalidRef` for a malformed `against`, `DiffRefused`
    for versions on different base models."""
    b = service.get_version(session, namespace, name, number)
    if against is None:
        a = previous_version(session, b)
        if a is None:
            raise NotFound(
                f"{b.ref} is the first version of {namespace}/{name}: there is no previous "
                "version to compare it with",
                expected="a version after the first, or against=namespace/name@version",
            )
    else:
        a = service.get_version(session, *parse_ref(against))
    if a.base_model_id != b.base_model_id:
        raise DiffRefused(
            f"{a.ref} is on base model '{a.base_model.name}' ({a.base_model.fingerprint}) but "
            f"{b.ref} is on '{b.base_model.name}' ({b.base_model.fingerprint}); a diff "
            "compares experts on the same base model",
            check="base_model",
            expected="two versions on the same base model",
        )
    return VersionPair(a=a, b=b)


@dataclass(frozen=True)
class StoredPackage:
    """What reading a version's files needs, copied out of the session (which can then end
    its read transaction before the long part)."""

    ref: str
    package_digest: str
    files: dict[str, StoredFile]  # filename -> where its bytes are

    @classmethod
    def of(cls, session: Session, version: ExpertVersion) -> StoredPackage:
        stored = stored_files(session, ((f.sha256, f.size) for f in version.files))
        return cls(
            ref=version.ref,
            package_digest=version.package_digest,
            files={f.filename: stored[f.sha256] for f in version.files},
        )


class _DiffCache:
    """The most recent diffs by (digest a, digest b); thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], PackageDiff] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> PackageDiff | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[str, str], diff: PackageDiff) -> None:
        with self._lock:
            self._items[key] = diff
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


DIFF_CACHE = _DiffCache(_CACHED_DIFFS)


def diff_stored(
    blobs: BlobStore, settings: Settings, a: StoredPackage, b: StoredPackage
) -> PackageDiff:
    """`protocol.diff.diff_packages` on the stored files of two versions (cached)."""
    key = (a.package_digest, b.package_digest)
    cached = DIFF_CACHE.get(key)
    if cached is not None:
        return cached
    with ExitStack() as stack:
        files_a = stack.enter_context(_package_on_disk(blobs, settings, a))
        files_b = stack.enter_context(_package_on_disk(blobs, settings, b))
        try:
            diff = diff_packages(files_a, files_b)
        except BaseModelMismatch as error:
            raise DiffRefused(
                f"{a.ref} and {b.ref}: {error}",
                check="base_model",
                expected="two versions on the same base model",
            ) from error
        except DiffError as error:
            raise DiffRefused(f"{a.ref} and {b.ref}: {error}") from error
    # The files were hashed on the way: the catalog's digest must be what the store holds.
    for stored, side in ((a, diff.a), (b, diff.b)):
        if side.package_digest != stored.package_digest:
            raise StorageError(
                f"the stored files of {stored.ref} hash to {side.package_digest}, not the "
                f"catalog's {stored.package_digest}",
                expected=stored.package_digest,
            )
    DIFF_CACHE.put(key, diff)
    return diff


@contextmanager
def _package_on_disk(
    blobs: BlobStore, settings: Settings, package: StoredPackage
) -> Iterator[dict[str, Path]]:
    """The package's files as paths: the store's own where it has local files, else
    streamed into a temp folder that is removed afterwards."""
    with ExitStack() as stack:
        folder: Path | None = None
        paths: dict[str, Path] = {}
        for filename, stored in package.files.items():
            try:
                local = blobs.local_path(stored.sha256) if stored.whole else None
                if local is not None:
                    paths[filename] = local
                    continue
                if folder is None:
                    folder = stack.enter_context(upload_folder(settings.upload_tmp_dir))
                target = folder / filename
                copy_file(blobs, stored, target)
                paths[filename] = target
            except BlobNotFound as error:
                raise StorageError(
                    f"the stored bytes of {package.ref} {filename} are missing on the coordinator",
                    file=filename,
                ) from error
        yield paths
