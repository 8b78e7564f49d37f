"""The expert catalog: registering packages, looking versions up, yanking.

`register_expert_package` is the one way a package enters the catalog, for the HTTP upload
(whole or delta) and the Flower reply alike: validate (protocol) -> store blobs
(content-addressed, atomic; safetensors files one blob per tensor) -> commit the rows.
Nothing is visible until the commit; a blob written for an upload that then fails is
unreferenced, and the garbage collection removes it (coordinator.experts.files).
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NoReturn

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator.auth.models import Role, Token
from coordinator.base_models import service as base_models
from coordinator.base_models.models import BaseModelRecord
from coordinator.core.config import Settings
from coordinator.core.db import begin_write, utcnow
from coordinator.core.errors import Conflict, Forbidden, NotFound, Unprocessable
from coordinator.core.params import DB_INT_MAX
from coordinator.experts.files import StoredFile, add_segment_rows, store_file
from coordinator.experts.models import Block, Channel, Expert, ExpertFile, ExpertVersion
from coordinator.experts.upload import upload_folder
from coordinator.storage import BlobStore
from protocol import MANIFEST_FILE
from protocol.validation import ValidatedPackage, stored_files, validate_package

log = logging.getLogger(__name__)

# Concurrent uploads of one name race for the next version number; the loser retries.
_MAX_ATTEMPTS = 20

# Version numbers are 32-bit integers in the database. Only ASCII digits: str.isdigit() and
# int() also take '²' (then fail: a 500) and '١' (read as 1), spaces, '+' and '_'.
MAX_VERSION_NUMBER = DB_INT_MAX
_VERSION_NUMBER = re.compile(r"[0-9]{1,10}")


def parse_version_number(text: str) -> int | None:
    """`text` as a version number (1 to 2**31 - 1, ASCII digits only), else None."""
    if _VERSION_NUMBER.fullmatch(text) is None:
        return None
    number = int(text)
    return number if 1 <= number <= MAX_VERSION_NUMBER else None


class QuotaExceeded(Forbidden):
    """A contributor's upload would pass one of the per-namespace limits."""

    error = "quota_exceeded"
    check = "quota"


class Blocked(Forbidden):
    """A maintainer blocked the expert or its namespace."""

    check = "blocked"


class DuplicatePackage(Conflict):
    """The same content (package digest) is already in the catalog."""

    check = "duplicate"

    def __init__(self, existing: ExpertVersion) -> None:
        super().__init__(
            f"identical content is already published as {existing.ref}",
            expected="a package not already in the catalog",
            extra={
                "existing": {
                    "namespace": existing.expert.namespace,
                    "name": existing.expert.name,
                    "version": existing.number,
                    "package_digest": existing.package_digest,
                }
            },
        )
        self.existing = existing


class Status(StrEnum):
    ACTIVE = "active"
    YANKED = "yanked"
    ALL = "all"


def split_name(manifest_name: str, default_namespace: str) -> tuple[str, str]:
    """`ns/slug` -> (ns, slug); a bare `slug` is published in `default_namespace`."""
    if "/" in manifest_name:
        namespace, slug = manifest_name.split("/", 1)
        return namespace, slug
    return default_namespace, manifest_name


def register_expert_package(
    session: Session,
    blobs: BlobStore,
    settings: Settings,
    *,
    files: Mapping[str, Path],
    uploader: Token,
    channel: Channel = Channel.HTTP,
) -> ExpertVersion:
    """Validate, store and catalog one expert package; return its new version.

    `files` maps package file names to their bytes on disk (e.g. a temp folder). Raises
    `PackageRejected` (invalid package), `Unprocessable` (unknown base model), `Forbidden`
    (a contributor publishing outside their namespace) or `DuplicatePackage`.
    """
    _check_namespace_early(files, uploader)
    base = _base_model_for(session, files)
    # Contributors: the validator rejects a foreign namespace too (defence in depth).
    validated = validate_package(
        files,
        base.to_spec(),
        settings.admission,
        namespace=None if uploader.is_maintainer else uploader.name,
    )
    namespace, name = split_name(validated.manifest.name, uploader.name)
    if not uploader.can_manage(namespace):
        raise _foreign_namespace(uploader, namespace)
    _check_not_blocked(session, namespace, name)
    # A duplicate stores nothing, so it is answered as one (409) even past a quota.
    existing = get_version_by_digest(session, validated.digest)
    if existing is not None:
        session.rollback()
        raise DuplicatePackage(existing)
    _check_quotas(session, settings, namespace, name, validated.total_bytes, uploader)
    session.commit()  # end the read transaction of the lookups above

    # The adapter config is stored in its canonical rewrite (protocol.validation.stored_files);
    # safetensors files in pieces, one blob per tensor (coordinator.experts.files).
    with (
        stored_files(validated, files) as stored,
        upload_folder(settings.upload_tmp_dir) as scratch,
    ):
        pieces = [
            store_file(blobs, path, validated.file_sha256[filename], scratch)
            for filename, path in stored.items()
        ]

    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            version = _insert_version(
                session, settings, validated, base, namespace, name, uploader, channel, pieces
            )
        except IntegrityError:
            session.rollback()
            existing = get_version_by_digest(session, validated.digest)
            session.commit()
            if existing is not None:
                raise DuplicatePackage(existing) from None
            log.info(
                "version number of %s/%s taken concurrently; retry %d", namespace, name, attempt
            )
            time.sleep(random.uniform(0, 0.01 * attempt))
            continue
        log.info(
            "registered %s (%s, %d bytes, via %s, by %s)",
            version.ref,
            version.package_digest,
            version.total_size,
            channel,
            uploader.name,
        )
        return version
    raise Conflict(f"could not assign a version number to {namespace}/{name}; try again")


def _insert_version(
    session: Session,
    settings: Settings,
    validated: ValidatedPackage,
    base: BaseModelRecord,
    namespace: str,
    name: str,
    uploader: Token,
    channel: Channel,
    pieces: list[StoredFile],
) -> ExpertVersion:
    begin_write(session)
    if session.get_bind().dialect.name == "postgresql":
        # Serialise a namespace's uploads so that two cannot both pass its quotas (SQLite's
        # BEGIN IMMEDIATE already serialises every writer).
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:namespace))"), {"namespace": namespace}
        )
    # Again under the write lock: a block or quota may have changed since validation.
    _check_not_blocked(session, namespace, name)
    _check_quotas(session, settings, namespace, name, validated.total_bytes, uploader)
    expert = session.scalar(
        select(Expert).where(Expert.namespace == namespace, Expert.name == name)
    )
    if expert is None:
        expert = Expert(namespace=namespace, name=name)
        session.add(expert)
        session.flush()
    latest = session.scalar(
        select(func.max(ExpertVersion.number)).where(ExpertVersion.expert_id == expert.id)
    )
    version = ExpertVersion(
        expert=expert,
        number=(latest or 0) + 1,
        base_model=base,
        package_digest=validated.digest,
        manifest=validated.manifest.model_dump(mode="json"),
        rank=validated.rank,
        module_count=len(validated.module_paths),
        total_size=validated.total_bytes,
        uploaded_by=uploader.name,
        uploader_token_id=uploader.id,
        channel=Channel(channel).value,
        files=[
            ExpertFile(filename=filename, sha256=sha256, size=validated.file_bytes[filename])
            for filename, sha256 in sorted(validated.file_sha256.items())
        ],
    )
    session.add(version)
    add_segment_rows(session, pieces)
    session.commit()
    return version


def _check_not_blocked(session: Session, namespace: str, name: str) -> None:
    block = find_block(session, namespace, name)
    if block is not None:
        session.rollback()
        raise Blocked(
            f"{block.target} is blocked by maintainer {block.blocked_by!r} since "
            f"{block.blocked_at:%Y-%m-%d}: {block.reason}; no new versions are accepted",
            file=MANIFEST_FILE,
            expected="an expert and namespace that are not blocked",
        )


def _check_quotas(
    session: Session, settings: Settings, namespace: str, name: str, size: int, uploader: Token
) -> None:
    """Per-namespace limits on contributors (maintainers are trusted and exempt). Yanked
    versions count: their bytes stay stored."""
    if uploader.is_maintainer:
        return
    expert_id = session.scalar(
        select(Expert.id).where(Expert.namespace == namespace, Expert.name == name)
    )
    if expert_id is None:
        experts = session.scalar(
            select(func.count()).select_from(Expert).where(Expert.namespace == namespace)
        )
        if (experts or 0) >= settings.max_experts_per_namespace:
            _refuse_quota(
                session,
                f"namespace {namespace!r} already has {experts} experts",
                "max_experts_per_namespace",
                f"at most {settings.max_experts_per_namespace} expert(s) in {namespace!r}",
            )
    else:
        versions = session.scalar(
            select(func.count())
            .select_from(ExpertVersion)
            .where(ExpertVersion.expert_id == expert_id)
        )
        if (versions or 0) >= settings.max_versions_per_expert:
            _refuse_quota(
                session,
                f"{namespace}/{name} already has {versions} versions",
                "max_versions_per_expert",
                f"at most {settings.max_versions_per_expert} version(s) of {namespace}/{name}",
            )
    used = session.scalar(
        select(func.coalesce(func.sum(ExpertVersion.total_size), 0))
        .join(Expert, Expert.id == ExpertVersion.expert_id)
        .where(Expert.namespace == namespace)
    )
    used = int(used or 0)
    if used + size > settings.max_namespace_bytes:
        _refuse_quota(
            session,
            f"namespace {namespace!r} stores {used} bytes; this package ({size} bytes) would "
            f"pass its quota",
            "max_namespace_bytes",
            f"at most {settings.max_namespace_bytes} bytes in {namespace!r}",
        )


def _refuse_quota(session: Session, message: str, check: str, expected: str) -> NoReturn:
    session.rollback()
    raise QuotaExceeded(
        f"{message} (PHATGOOSE_{check.upper()}); ask a maintainer",
        check=check,
        expected=expected,
    )


def _peek_manifest(files: Mapping[str, Path]) -> dict[str, object]:
    """The manifest as loose JSON, to route the upload before validation; {} if unreadable
    (the validator then explains what is wrong with it)."""
    path = files.get(MANIFEST_FILE)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):  # e.g. nesting deeper than the parser goes
        return {}
    return data if isinstance(data, dict) else {}


def _check_namespace_early(files: Mapping[str, Path], uploader: Token) -> None:
    name = _peek_manifest(files).get("name")
    if isinstance(name, str) and "/" in name:
        namespace = name.split("/", 1)[0]
        if not uploader.can_manage(namespace):
            raise _foreign_namespace(uploader, namespace)


def _foreign_namespace(uploader: Token, namespace: str) -> Forbidden:
    return Forbidden(
        f"{uploader.name!r} may publish only under its own namespace, not {namespace!r}",
        file=MANIFEST_FILE,
        check="namespace",
        expected=f"'{uploader.name}/<name>' or a bare name",
    )


def _base_model_for(session: Session, files: Mapping[str, Path]) -> BaseModelRecord:
    """The registered base model the manifest names (by fingerprint, else by name)."""
    identity = _peek_manifest(files).get("base_model")
    identity = identity if isinstance(identity, dict) else {}
    fingerprint, name = identity.get("fingerprint"), identity.get("name")
    found = (
        base_models.get_by_fingerprint(session, fingerprint)
        if isinstance(fingerprint, str)
        else None
    ) or (base_models.get_by_name(session, name) if isinstance(name, str) else None)
    if found is not None:
        return found
    registered = base_models.list_base_models(session)
    if registered and not identity:
        return registered[0]  # the manifest is broken; validation will say how
    names = ", ".join(f"'{b.name}'" for b in registered) or "none"
    raise Unprocessable(
        f"the expert was trained on base model {name!r} ({fingerprint}), which this "
        f"coordinator has not registered (registered: {names})",
        file=MANIFEST_FILE,
        check="base_model",
        expected=f"one of the registered base models: {names}",
    )


# --- catalog ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionPage:
    items: list[ExpertVersion]
    total: int


def list_versions(
    session: Session,
    *,
    namespace: str | None = None,
    name: str | None = None,
    base_model: str | None = None,
    uploaded_by: str | None = None,
    status: Status = Status.ACTIVE,
    limit: int = 50,
    offset: int = 0,
) -> VersionPage:
    """Versions matching every given filter, ordered by namespace, name and version."""
    query = select(ExpertVersion).join(ExpertVersion.expert)
    if namespace is not None:
        query = query.where(Expert.namespace == namespace)
    if name is not None:
        query = query.where(Expert.name == name)
    if base_model is not None:
        query = query.join(ExpertVersion.base_model).where(BaseModelRecord.name == base_model)
    if uploaded_by is not None:
        query = query.where(ExpertVersion.uploaded_by == uploaded_by)
    if status == Status.ACTIVE:
        query = query.where(ExpertVersion.yanked_at.is_(None))
    elif status == Status.YANKED:
        query = query.where(ExpertVersion.yanked_at.is_not(None))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    items = session.scalars(
        query.order_by(Expert.namespace, Expert.name, ExpertVersion.number)
        .limit(limit)
        .offset(offset)
    ).all()
    return VersionPage(items=list(items), total=total)


def get_expert(session: Session, namespace: str, name: str) -> Expert:
    expert = session.scalar(
        select(Expert).where(Expert.namespace == namespace, Expert.name == name)
    )
    if expert is None:
        raise NotFound(f"no expert named {namespace}/{name}")
    return expert


def expert_versions(session: Session, expert: Expert, *, limit: int, offset: int) -> VersionPage:
    """One page of an expert's versions, oldest first."""
    query = select(ExpertVersion).where(ExpertVersion.expert_id == expert.id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    items = session.scalars(query.order_by(ExpertVersion.number).limit(limit).offset(offset))
    return VersionPage(items=list(items), total=total)


def get_version(session: Session, namespace: str, name: str, number: int) -> ExpertVersion:
    version = session.scalar(
        select(ExpertVersion)
        .join(ExpertVersion.expert)
        .where(Expert.namespace == namespace, Expert.name == name, ExpertVersion.number == number)
    )
    if version is None:
        get_expert(session, namespace, name)  # says which of the two is missing
        raise NotFound(f"{namespace}/{name} has no version {number}")
    return version


def resolve_ref(session: Session, ref: str) -> ExpertVersion:
    """`namespace/name@version` -> that version (how releases name their experts)."""
    full_name, _, text_number = ref.rpartition("@")
    namespace, _, name = full_name.partition("/")
    number = parse_version_number(text_number)
    if not namespace or not name or number is None:
        raise NotFound(
            f"{ref!r} is not of the form namespace/name@version",
            expected=f"namespace/name@N with N in ASCII digits, 1 to {MAX_VERSION_NUMBER}",
        )
    return get_version(session, namespace, name, number)


def get_version_by_digest(session: Session, digest: str) -> ExpertVersion | None:
    return session.scalar(select(ExpertVersion).where(ExpertVersion.package_digest == digest))


def get_file(version: ExpertVersion, filename: str) -> ExpertFile:
    for file in version.files:
        if file.filename == filename:
            return file
    names = ", ".join(f.filename for f in version.files)
    raise NotFound(f"{version.ref} has no file {filename!r} (files: {names})")


def yank_version(
    session: Session, version: ExpertVersion, *, by: Token, reason: str
) -> ExpertVersion:
    """Hide a version from default listings and new releases; it stays downloadable.

    Records who yanked (token name and role) and when. A maintainer may take over a
    contributor's yank, so that the contributor can no longer lift it."""
    _check_manager(version, by)
    _lock_for_update(session, version)
    if version.yanked_at is not None and not (
        by.is_maintainer and _yank_role(version) != Role.MAINTAINER
    ):
        session.rollback()
        raise Conflict(
            f"{version.ref} is already yanked: {version.yank_reason}",
            extra={"yanked_by": version.yanked_by, "yanked_by_role": _yank_role(version).value},
        )
    version.yanked_at = utcnow()
    version.yanked_by = by.name
    version.yanked_by_role = Role(by.role).value
    version.yank_reason = reason
    session.commit()
    log.info("yanked %s by %s (%s): %s", version.ref, by.name, by.role, reason)
    return version


def unyank_version(session: Session, version: ExpertVersion, *, by: Token) -> ExpertVersion:
    """Lift a yank: the owner lifts its own yank; only a maintainer lifts a maintainer's
    yank, or any yank of a blocked expert."""
    _check_manager(version, by)
    _lock_for_update(session, version)
    if version.yanked_at is None:
        session.rollback()
        raise Conflict(f"{version.ref} is not yanked")
    if not by.is_maintainer:
        if _yank_role(version) == Role.MAINTAINER:
            session.rollback()
            raise Forbidden(
                f"{version.ref} was yanked by maintainer {version.yanked_by!r} "
                f"({version.yank_reason}); only a maintainer may lift it",
                check="yank",
                expected="a maintainer token",
            )
        block = find_block(session, version.expert.namespace, version.expert.name)
        if block is not None:
            session.rollback()
            raise Blocked(
                f"{block.target} is blocked by maintainer {block.blocked_by!r} "
                f"({block.reason}); only a maintainer may lift yanks of its versions",
                expected="a maintainer token",
            )
    version.yanked_at = None
    version.yanked_by = None
    version.yanked_by_role = None
    version.yank_reason = None
    session.commit()
    log.info("unyanked %s by %s (%s)", version.ref, by.name, by.role)
    return version


def _yank_role(version: ExpertVersion) -> Role:
    # A yank without a recorded role is treated as a maintainer's: the safe reading.
    return Role(version.yanked_by_role or Role.MAINTAINER)


# --- blocks ----------------------------------------------------------------------------


def find_block(session: Session, namespace: str, name: str | None = None) -> Block | None:
    """The block in force on `namespace/name` (the namespace's first), or None."""
    names = [""] if name is None else ["", name]
    return session.scalar(
        select(Block)
        .where(Block.namespace == namespace, Block.name.in_(names))
        .order_by(Block.name)
        .limit(1)
    )


def block(session: Session, namespace: str, name: str | None, *, by: Token, reason: str) -> Block:
    """Block `namespace/name` (or every name in `namespace` when `name` is None):
    maintainers only. Uploads and new releases naming it are refused until unblocked."""
    _check_maintainer(by, "block")
    begin_write(session)
    key = name or ""
    existing = session.scalar(select(Block).where(Block.namespace == namespace, Block.name == key))
    if existing is not None:
        session.rollback()
        raise Conflict(
            f"{existing.target} is already blocked by {existing.blocked_by}: {existing.reason}"
        )
    blocked = Block(namespace=namespace, name=key, reason=reason, blocked_by=by.name)
    session.add(blocked)
    try:
        session.commit()
    except IntegrityError:  # blocked concurrently
        session.rollback()
        raise Conflict(f"{blocked.target} is already blocked") from None
    log.info("blocked %s by %s: %s", blocked.target, by.name, reason)
    return blocked


def unblock(session: Session, namespace: str, name: str | None, *, by: Token) -> None:
    _check_maintainer(by, "unblock")
    begin_write(session)
    existing = session.scalar(
        select(Block).where(Block.namespace == namespace, Block.name == (name or ""))
    )
    if existing is None:
        session.rollback()
        target = f"{namespace}/{name}" if name else f"namespace {namespace!r}"
        raise Conflict(f"{target} is not blocked")
    session.delete(existing)
    session.commit()
    log.info("unblocked %s by %s", existing.target, by.name)


def _check_maintainer(token: Token, action: str) -> None:
    if not token.is_maintainer:
        raise Forbidden(
            f"only a maintainer may {action}; {token.name!r} is a {token.role}",
            expected="a maintainer token",
        )


def _lock_for_update(session: Session, version: ExpertVersion) -> None:
    """Begin a write transaction holding the version's row, then reread it."""
    begin_write(session)
    session.execute(
        select(ExpertVersion.id).where(ExpertVersion.id == version.id).with_for_update()
    )
    session.refresh(version)


def _check_manager(version: ExpertVersion, token: Token) -> None:
    if not token.can_manage(version.expert.namespace):
        raise Forbidden(
            f"only {version.expert.namespace!r} or a maintainer may change {version.ref}",
        )
