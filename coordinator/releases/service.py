"""Releases: resolve a maintainer's request into an immutable, numbered release.

`create_release` checks the request against the method's `protocol.MethodSpec` (its
hyper-parameters, resolved with their defaults) and against what the catalog knows of each
version (its base model, rank, adapted modules, and the router vectors the spec needs it to
ship) and freezes the result: the exact versions, their package digests and file sha256s,
the method's parameters, and the artifact manifest (`protocol.ReleaseManifest`) that
`phatgoose.load_release` reads. Numbers are 1, 2, 3, ... and safe under concurrency:
`number` is unique, and a creation that loses the race to a number retries with the next one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator.auth.models import Token
from coordinator.base_models import service as base_models
from coordinator.base_models.models import BaseModelRecord
from coordinator.core.db import begin_write, utcnow
from coordinator.core.errors import Conflict, CoordinatorError, NotFound
from coordinator.experts import service as experts
from coordinator.experts.files import copy_file, open_file, stored_file, stored_files
from coordinator.experts.models import Expert, ExpertVersion, manifest_privacy
from coordinator.experts.schemas import version_url
from coordinator.releases.models import Release, ReleaseExpert
from coordinator.releases.schemas import ReleaseCreate
from coordinator.storage import BlobStore
from protocol.methods import (
    METHOD_SPECS,
    ROUTER_NUMERICS,
    TOP_K_METHODS,
    ParamValue,
    RoutingMethod,
    resolve_params,
)
from protocol.package import ADAPTER_WEIGHTS_FILE
from protocol.peft_format import parse_lora_key
from protocol.privacy import PrivacyGuarantee, WeakestGuarantee, weakest_guarantee
from protocol.release import (
    RELEASE_FILE,
    RELEASE_FORMAT,
    RELEASE_FORMAT_VERSION,
    ReleaseBaseModel,
    ReleasedExpert,
    ReleaseFile,
    ReleaseManifest,
    expert_package_path,
)

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 2
_MAX_ATTEMPTS = 20


class ReleaseRejected(CoordinatorError):
    """The request cannot become a release; `check` says which rule it breaks."""

    status_code = 422
    error = "release_rejected"
    check = "release"


def create_release(
    session: Session,
    blobs: BlobStore,
    request: ReleaseCreate,
    *,
    by: Token | str,
    then: Callable[[Session, Release], None] | None = None,
) -> Release:
    """Validate `request`, then insert it as the next release number; return the release.
    `blobs` holds the versions' files (merged releases read which modules each adapts).
    `by`: the maintainer's token, or a name (the operator, from the command line).
    `then`: called with the release's row flushed, in the transaction that inserts it, before
    the commit (a channel records its move to the release there and queues its evaluation:
    all of it or none); what it raises rolls the release back and propagates."""
    params = method_params(request)
    versions, single = _resolve_experts(session, request)
    base = _base_model(session, request, versions)
    _check_method(session, request, versions, blobs)
    top_k = _top_k(request, versions)
    session.commit()  # end the read transaction of the lookups

    by_name = by if isinstance(by, str) else by.name
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            release = _insert_release(
                session, request, versions, single, base, top_k, params, by_name, then
            )
        except IntegrityError:
            session.rollback()
            log.info("release number taken concurrently; retry %d", attempt)
            time.sleep(random.uniform(0, 0.01 * attempt))
            continue
        except BaseException:
            session.rollback()
            raise
        log.info(
            "release %d: %s (k=%s, params %s) over %d experts by %s",
            release.number,
            release.method,
            release.top_k,
            params,
            len(versions),
            by_name,
        )
        return release
    raise Conflict("could not assign a release number; try again")


def _insert_release(
    session: Session,
    request: ReleaseCreate,
    versions: list[ExpertVersion],
    single: str | None,
    base: BaseModelRecord,
    top_k: int | None,
    params: dict[str, ParamValue],
    by_name: str,
    then: Callable[[Session, Release], None] | None = None,
) -> Release:
    begin_write(session)
    number = (session.scalar(select(func.max(Release.number))) or 0) + 1
    created_at = utcnow()
    manifest = build_manifest(
        number=number,
        method=request.method,
        top_k=top_k,
        method_params=params,
        expert=single,
        base=base,
        versions=versions,
        notes=request.notes,
        created_by=by_name,
        created_at=created_at,
    )
    release = Release(
        number=number,
        method=request.method,
        top_k=top_k,
        method_params=params,
        base_model_id=base.id,
        notes=request.notes,
        manifest=manifest,
        artifact_digest=manifest_digest(manifest),
        created_by=by_name,
        created_at=created_at,
        experts=[ReleaseExpert(position=i, expert_version_id=v.id) for i, v in enumerate(versions)],
    )
    session.add(release)
    if then is not None:
        session.flush()
        then(session, release)
    session.commit()
    return release


def build_manifest(
    *,
    number: int,
    method: RoutingMethod,
    top_k: int | None,
    method_params: dict[str, ParamValue],
    expert: str | None,
    base: BaseModelRecord,
    versions: list[ExpertVersion],
    notes: str,
    created_by: str,
    created_at: datetime,
) -> dict[str, Any]:
    """The artifact manifest (`release.json`) as JSON: everything `phatgoose.load_release`
    needs, validated by `protocol.ReleaseManifest` on the way out as on the way in."""
    experts = [
        ReleasedExpert(
            ref=version.ref,
            namespace=version.expert.namespace,
            name=version.expert.name,
            version=version.number,
            package_digest=version.package_digest,
            rank=version.rank,
            modules=version.module_count,
            path=expert_package_path(version.expert.namespace, version.expert.name, version.number),
            files=[
                ReleaseFile(
                    filename=f.filename,
                    sha256=f.sha256,
                    size=f.size,
                    url=f"{version_url(version)}/files/{f.filename}",
                )
                for f in version.files
            ],
        )
        for version in versions
    ]
    manifest = ReleaseManifest(
        format=RELEASE_FORMAT,
        format_version=RELEASE_FORMAT_VERSION,
        number=number,
        method=method,
        top_k=top_k,
        method_params=method_params,
        router_numerics=ROUTER_NUMERICS,
        expert=expert,
        base_model=ReleaseBaseModel(
            name=base.name,
            revision=base.revision,
            fingerprint=base.fingerprint,
            architecture=base.architecture,
        ),
        experts=experts,
        notes=notes,
        created_by=created_by,
        created_at=created_at,
    )
    return manifest.model_dump(mode="json")


def manifest_digest(manifest: dict[str, Any]) -> str:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


# --- validation ------------------------------------------------------------------------


def method_params(request: ReleaseCreate) -> dict[str, ParamValue]:
    """Every parameter of the request's method: those given, checked, and the defaults."""
    try:
        return resolve_params(request.method, request.params)
    except ValueError as error:  # names the method, the parameter and what it takes
        params = METHOD_SPECS[request.method].params
        takes = "; ".join(f"{p.name}: {p.expected()}" for p in params)
        raise ReleaseRejected(
            str(error),
            check="params",
            expected=takes or f"no params: method {request.method!r} has none",
        ) from None


def _resolve_experts(
    session: Session, request: ReleaseCreate
) -> tuple[list[ExpertVersion], str | None]:
    """The versions, in request order, and for `single` the chosen expert's full name."""
    refs = list(request.experts)
    spec = METHOD_SPECS[request.method]
    if not spec.takes_experts:
        if refs or request.expert:
            raise ReleaseRejected(
                f"method {spec.name!r} takes no experts, got {len(refs) + bool(request.expert)}",
                check="experts",
                expected="experts: [] and no expert",
            )
        return [], None
    if spec.single_expert:
        if not refs and request.expert:
            refs = [request.expert]
        if request.expert is None and len(refs) != 1:
            raise ReleaseRejected(
                f"method {spec.name!r} needs exactly one expert (or `expert` naming one of "
                f"them), got {len(refs)}",
                check="experts",
                expected="one expert",
            )
    elif request.expert is not None:
        raise ReleaseRejected(
            f"`expert` is for method 'single', not {request.method!r}", check="expert"
        )
    if not refs:
        raise ReleaseRejected(
            f"method {request.method!r} needs at least one expert", check="experts"
        )

    versions = [resolve_expert(session, ref, allow_yanked=request.allow_yanked) for ref in refs]
    names = [v.expert.full_name for v in versions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ReleaseRejected(
            f"an expert may appear once per release; repeated: {', '.join(repeated)}",
            check="duplicate",
            expected="each namespace/name once",
        )
    single = None
    if spec.single_expert:
        wanted = request.expert or refs[0]
        single = wanted.rsplit("@", 1)[0] if "@" in wanted else wanted
        if single not in names:
            raise ReleaseRejected(
                f"`expert` {wanted!r} is not among the release's experts ({', '.join(names)})",
                check="expert",
            )
        if request.expert and "@" in request.expert:
            chosen = versions[names.index(single)]
            if chosen.ref != request.expert:
                raise ReleaseRejected(
                    f"`expert` {request.expert!r} but the experts list has {chosen.ref}",
                    check="expert",
                )
    return versions, single


def resolve_expert(session: Session, ref: str, *, allow_yanked: bool = False) -> ExpertVersion:
    """`ns/name@version` exactly (refused when yanked unless `allow_yanked`), or `ns/name`:
    its newest version that is not yanked."""
    full_name, at, text_number = ref.partition("@")
    namespace, _, name = full_name.partition("/")
    number = experts.parse_version_number(text_number) if at else None
    if not namespace or not name or (at and number is None):
        raise ReleaseRejected(
            f"{ref!r} is not an expert reference",
            check="expert_ref",
            expected="namespace/name@version (version in ASCII digits, 1 to "
            f"{experts.MAX_VERSION_NUMBER}) or namespace/name",
        )
    expert = session.scalar(
        select(Expert).where(Expert.namespace == namespace, Expert.name == name)
    )
    if expert is None:
        raise ReleaseRejected(f"no expert named {full_name}", check="unknown_expert")
    block = expert.block
    if block is not None:
        raise ReleaseRejected(
            f"{full_name} is blocked ({block.target}, by {block.blocked_by}: {block.reason})",
            check="blocked",
            expected="experts that are not blocked",
        )
    if number is not None:
        version = next((v for v in expert.versions if v.number == number), None)
        if version is None:
            raise ReleaseRejected(f"{full_name} has no version {number}", check="unknown_expert")
        if version.yanked and not allow_yanked:
            raise ReleaseRejected(
                f"{version.ref} is yanked ({version.yank_reason}); pass allow_yanked: true "
                "to use it anyway",
                check="yanked",
                expected="a version that is not yanked",
            )
        return version
    active = [v for v in expert.versions if not v.yanked]
    if not active:
        raise ReleaseRejected(
            f"every version of {full_name} is yanked; name one exactly with allow_yanked: true",
            check="yanked",
            expected="a version that is not yanked",
        )
    return max(active, key=lambda v: v.number)


def _base_model(
    session: Session, request: ReleaseCreate, versions: list[ExpertVersion]
) -> BaseModelRecord:
    bases = {v.base_model.name for v in versions}
    if len(bases) > 1:
        by_base = ", ".join(f"{v.ref} on {v.base_model.name}" for v in versions)
        raise ReleaseRejected(
            f"a release's experts share one base model; these do not: {by_base}",
            check="base_model",
        )
    if request.base_model is not None:
        record = base_models.get_by_name(session, request.base_model)
        if record is None:
            raise ReleaseRejected(
                f"base model {request.base_model!r} is not registered", check="base_model"
            )
        if bases and bases != {record.name}:
            raise ReleaseRejected(
                f"base_model {request.base_model!r} but the experts are on {bases.pop()!r}",
                check="base_model",
            )
        return record
    if versions:
        return versions[0].base_model
    registered = base_models.list_base_models(session)
    if len(registered) == 1:
        return registered[0]
    raise ReleaseRejected(
        "method 'base' needs `base_model` naming a registered base model "
        f"({', '.join(b.name for b in registered) or 'none registered'})",
        check="base_model",
    )


def _check_method(
    session: Session, request: ReleaseCreate, versions: list[ExpertVersion], blobs: BlobStore
) -> None:
    """What the method's spec asks of the versions: shared shapes, shipped router vectors."""
    spec = METHOD_SPECS[request.method]
    if spec.same_shapes:
        # The modules each adapter really adapts (its tensor names), not what its manifest
        # says: two lists of target names can adapt different modules (exclude_modules).
        shapes = {(v.rank, adapted_modules(session, blobs, v)) for v in versions}
        if len(shapes) > 1:
            described = ", ".join(
                f"{v.ref} (r={v.rank}, {v.module_count} modules)" for v in versions
            )
            raise ReleaseRejected(
                f"method {spec.name!r} averages experts of identical shapes; these differ: "
                f"{described}",
                check="shapes",
                expected="the same rank and adapted modules for every expert",
            )
    for vector in spec.needs:
        missing = [v.ref for v in versions if not vector.shipped_in(v.manifest)]
        if missing:
            raise ReleaseRejected(
                f"method {spec.name!r} needs {vector.description}, which "
                f"{', '.join(missing)} do(es) not ship",
                check=vector.name,
                expected=f"versions that ship {vector.description}",
            )


def _top_k(request: ReleaseCreate, versions: list[ExpertVersion]) -> int | None:
    if not METHOD_SPECS[request.method].takes_top_k:
        if request.top_k not in (None, 1):
            raise ReleaseRejected(
                f"top_k is for {', '.join(TOP_K_METHODS)}; method {request.method!r} "
                f"selects no top-k (got top_k={request.top_k})",
                check="top_k",
            )
        return None
    if request.top_k is None:
        return min(DEFAULT_TOP_K, len(versions))
    if request.top_k > len(versions):
        raise ReleaseRejected(
            f"top_k={request.top_k} but the release has {len(versions)} expert(s)",
            check="top_k",
            expected=f"1 <= top_k <= {len(versions)}",
        )
    return request.top_k


# --- reading ---------------------------------------------------------------------------


def _release_query(base_model: str | None, method: str | None) -> Select[Release]:
    query = select(Release)
    if base_model is not None:
        query = query.join(BaseModelRecord, Release.base_model_id == BaseModelRecord.id).where(
            BaseModelRecord.name == base_model
        )
    if method is not None:
        query = query.where(Release.method == method)
    return query


def list_releases(
    session: Session, *, base_model: str | None = None, method: str | None = None
) -> list[Release]:
    """Every matching release, by number (for scripts; the API pages with `release_page`)."""
    return list(session.scalars(_release_query(base_model, method).order_by(Release.number)))


@dataclass(frozen=True)
class ReleasePage:
    items: list[Release]
    total: int


def release_page(
    session: Session,
    *,
    base_model: str | None = None,
    method: str | None = None,
    limit: int,
    offset: int,
) -> ReleasePage:
    """One page of the matching releases, by number, and how many match in all."""
    query = _release_query(base_model, method)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    items = session.scalars(query.order_by(Release.number).limit(limit).offset(offset))
    return ReleasePage(items=list(items), total=total)


def release_versions(session: Session, release: Release) -> list[ExpertVersion]:
    """The release's expert versions in its order."""
    return list(
        session.scalars(
            select(ExpertVersion)
            .join(ReleaseExpert, ReleaseExpert.expert_version_id == ExpertVersion.id)
            .where(ReleaseExpert.release_id == release.id)
            .order_by(ReleaseExpert.position)
        )
    )


def yanked_experts(session: Session, release_ids: list[int]) -> dict[int, list[str]]:
    """Per release id, the refs of its experts that are yanked now, in release order."""
    if not release_ids:
        return {}
    rows = session.execute(
        select(ReleaseExpert.release_id, ExpertVersion)
        .join(ExpertVersion, ExpertVersion.id == ReleaseExpert.expert_version_id)
        .where(ReleaseExpert.release_id.in_(release_ids), ExpertVersion.yanked_at.is_not(None))
        .order_by(ReleaseExpert.release_id, ReleaseExpert.position)
    ).all()
    found: dict[int, list[str]] = {release_id: [] for release_id in release_ids}
    for release_id, version in rows:
        found[release_id].append(version.ref)
    return found


def release_privacy(session: Session, release_ids: list[int]) -> dict[int, WeakestGuarantee]:
    """Per release id, the weakest DP guarantee among its experts (`protocol.privacy`): what
    the API and the pages report of it."""
    if not release_ids:
        return {}
    rows = session.execute(
        select(ReleaseExpert.release_id, ExpertVersion.manifest)
        .join(ExpertVersion, ExpertVersion.id == ReleaseExpert.expert_version_id)
        .where(ReleaseExpert.release_id.in_(release_ids))
    ).all()
    guarantees: dict[int, list[PrivacyGuarantee | None]] = {i: [] for i in release_ids}
    for release_id, manifest in rows:
        guarantees[release_id].append(manifest_privacy(manifest))
    return {release_id: weakest_guarantee(found) for release_id, found in guarantees.items()}


def withdraw_release(session: Session, release: Release, *, by_name: str, reason: str) -> Release:
    """Mark a release withdrawn: it stays readable and loadable (its artifact is frozen),
    shows as withdrawn, and new evaluations of it are refused unless overridden."""
    _lock_release(session, release)
    if release.withdrawn_at is not None:
        session.rollback()
        raise Conflict(
            f"release {release.number} is already withdrawn by {release.withdrawn_by}: "
            f"{release.withdrawn_reason}"
        )
    release.withdrawn_at = utcnow()
    release.withdrawn_by = by_name
    release.withdrawn_reason = reason
    session.commit()
    log.info("withdrew release %d by %s: %s", release.number, by_name, reason)
    return release


def restore_release(session: Session, release: Release, *, by_name: str) -> Release:
    _lock_release(session, release)
    if release.withdrawn_at is None:
        session.rollback()
        raise Conflict(f"release {release.number} is not withdrawn")
    release.withdrawn_at = None
    release.withdrawn_by = None
    release.withdrawn_reason = None
    session.commit()
    log.info("restored release %d by %s", release.number, by_name)
    return release


def _lock_release(session: Session, release: Release) -> None:
    begin_write(session)
    session.execute(select(Release.id).where(Release.id == release.id).with_for_update())
    session.refresh(release)


def releases_containing(
    session: Session, expert: Expert, *, limit: int = 50
) -> list[tuple[Release, int]]:
    """The newest `limit` releases that include a version of `expert`, newest first, each
    with that version's number (the expert page lists them; credit reads their lines)."""
    rows = session.execute(
        select(Release, ExpertVersion.number)
        .join(ReleaseExpert, ReleaseExpert.release_id == Release.id)
        .join(ExpertVersion, ExpertVersion.id == ReleaseExpert.expert_version_id)
        .where(ExpertVersion.expert_id == expert.id)
        .order_by(Release.number.desc())
        .limit(limit)
    ).all()
    return [(release, number) for release, number in rows]


def get_release(session: Session, number: int) -> Release:
    release = session.scalar(select(Release).where(Release.number == number))
    if release is None:
        raise NotFound(f"no release {number}")
    return release


def adapted_modules(session: Session, blobs: BlobStore, version: ExpertVersion) -> frozenset[str]:
    """The module paths a version's adapter holds tensors for, read from the safetensors
    header of its stored adapter (admission checked the header and bounded its size)."""
    adapter = next(f for f in version.files if f.filename == ADAPTER_WEIGHTS_FILE)
    with open_file(blobs, stored_file(session, adapter)) as blob:
        (length,) = struct.unpack("<Q", blob.read(8))
        header = json.loads(blob.read(length))
    return frozenset(parsed[0] for key in header if (parsed := parse_lora_key(key)))


def export_release(session: Session, blobs: BlobStore, release: Release, directory: Path) -> Path:
    """Write the release as a directory `phatgoose.load_release` reads: `release.json` and
    each expert's files under its `path`. Files are copied: `load_release` refuses a
    symbolic link that leads outside the directory, as a link into the blob store would."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = ReleaseManifest.model_validate(release.manifest).experts
    stored = stored_files(session, ((f.sha256, f.size) for e in entries for f in e.files))
    for entry in entries:
        package = directory / entry.path
        package.mkdir(parents=True, exist_ok=True)
        for file in entry.files:
            target = package / file.filename
            target.unlink(missing_ok=True)
            copy_file(blobs, stored[file.sha256], target)
    # The stored JSON as it is: `artifact_digest` is its digest.
    (directory / RELEASE_FILE).write_text(json.dumps(release.manifest, indent=2) + "\n")
    return directory
