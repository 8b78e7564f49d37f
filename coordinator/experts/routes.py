"""Expert catalog routes: thin wrappers over `coordinator.experts.service`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BeforeValidator
from starlette.concurrency import run_in_threadpool

from coordinator.core.deps import (
    BlobsDep,
    MaintainerDep,
    ReaderDep,
    SessionDep,
    SettingsDep,
    TokenDep,
)
from coordinator.core.errors import ERROR_RESPONSE, StorageError
from coordinator.core.params import Offset
from coordinator.experts import diff as expert_diff
from coordinator.experts import service
from coordinator.experts.delta import assemble_package
from coordinator.experts.files import open_file, stored_file, stored_segments
from coordinator.experts.models import Channel, ExpertVersion
from coordinator.experts.schemas import (
    BlockRequest,
    BlockState,
    ExpertDetail,
    ExpertVersionDetail,
    ExpertVersionDiff,
    ExpertVersionPage,
    ExpertVersionSummary,
    YankRequest,
    version_url,
)
from coordinator.experts.upload import UPLOAD_FIELD, receive_package, upload_folder
from coordinator.storage import BlobNotFound
from protocol import PACKAGE_FILES
from protocol.segments import (
    LAYOUT_FIELD,
    LAYOUT_FILE,
    SEGMENT_FIELD,
    MissingReply,
    MissingRequest,
)

log = logging.getLogger(__name__)


def _ascii_version(value: object) -> object:
    # Pydantic's int reads '+1', ' 1', '1_0' and '1.0' as numbers: one version, many URLs.
    if isinstance(value, str) and service.parse_version_number(value) is None:
        raise ValueError(
            f"a version number is 1 to {service.MAX_VERSION_NUMBER} in ASCII digits [0-9]"
        )
    return value


# Version numbers are 32-bit integers in the database: a larger one is a 422, not a 500.
VersionNumber = Annotated[
    int,
    BeforeValidator(_ascii_version),
    Path(ge=1, le=service.MAX_VERSION_NUMBER, description="the version number"),
]

experts_router = APIRouter(prefix="/experts", tags=["experts"])
namespaces_router = APIRouter(prefix="/namespaces", tags=["experts"])
blobs_router = APIRouter(prefix="/blobs", tags=["experts"])


_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [UPLOAD_FIELD],
                    "properties": {
                        UPLOAD_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "the package files, each with its file name "
                            f"({', '.join(PACKAGE_FILES)})",
                        },
                        LAYOUT_FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": f"a delta upload's {LAYOUT_FILE}: each package "
                            "file not sent whole, by digest, size and segments "
                            "(protocol.segments.PackageLayout)",
                        },
                        SEGMENT_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "a delta upload's segments the coordinator "
                            "lacks, each with its sha256 as file name",
                        },
                    },
                }
            }
        },
    }
}


@experts_router.post(
    "",
    status_code=201,
    summary="Publish an expert package (a new version)",
    openapi_extra=_UPLOAD_BODY,
    responses={
        400: ERROR_RESPONSE,
        401: ERROR_RESPONSE,
        403: ERROR_RESPONSE,
        409: ERROR_RESPONSE,
        413: ERROR_RESPONSE,
        415: ERROR_RESPONSE,
        422: ERROR_RESPONSE,
    },
)
async def upload_expert(
    request: Request,
    response: Response,
    session: SessionDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    token: TokenDep,
) -> ExpertVersionDetail:
    """Stream the package files to disk (cut off at the size limits), validate them, store
    them and publish a new version. The same content twice is 409 with the existing version.

    A delta upload sends `layout.json` (field `layout`) and only the segments the coordinator
    lacks (field `segments`, each named by its sha256; `POST /blobs/missing` says which): the
    package is rebuilt whole from them and the stored ones, then admitted like any other."""
    with upload_folder(settings.upload_tmp_dir) as folder:
        received = await receive_package(request, folder, settings.admission)

        def publish() -> ExpertVersion:
            files = assemble_package(session, blobs, received, folder, settings.admission)
            return service.register_expert_package(
                session, blobs, settings, files=files, uploader=token, channel=Channel.HTTP
            )

        version = await run_in_threadpool(publish)
    response.headers["Location"] = version_url(version)
    return ExpertVersionDetail.of(version)


@experts_router.get("", summary="List expert versions")
def list_experts(
    session: SessionDep,
    _reader: ReaderDep,
    namespace: str | None = None,
    name: str | None = None,
    base_model: Annotated[str | None, Query(description="a base model's name")] = None,
    uploaded_by: Annotated[str | None, Query(description="the uploading token's name")] = None,
    status: service.Status = service.Status.ACTIVE,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> ExpertVersionPage:
    page = service.list_versions(
        session,
        namespace=namespace,
        name=name,
        base_model=base_model,
        uploaded_by=uploaded_by,
        status=status,
        limit=limit,
        offset=offset,
    )
    return ExpertVersionPage(
        items=[ExpertVersionSummary.of(v) for v in page.items],
        total=page.total,
        limit=limit,
        offset=offset,
    )


@experts_router.get("/{namespace}/{name}", summary="An expert, its block and a page of versions")
def get_expert(
    namespace: str,
    name: str,
    session: SessionDep,
    _reader: ReaderDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> ExpertDetail:
    expert = service.get_expert(session, namespace, name)
    page = service.expert_versions(session, expert, limit=limit, offset=offset)
    return ExpertDetail.of(expert, page.items, total=page.total, limit=limit, offset=offset)


@experts_router.get(
    "/{namespace}/{name}/{version}", summary="One version: manifest, provenance, files"
)
def get_version(
    namespace: str, name: str, version: VersionNumber, session: SessionDep, _reader: ReaderDep
) -> ExpertVersionDetail:
    return ExpertVersionDetail.of(service.get_version(session, namespace, name, version))


@experts_router.get(
    "/{namespace}/{name}/{version}/diff",
    summary="What changed against another version on the same base (default: the previous one)",
    responses={404: ERROR_RESPONSE, 422: ERROR_RESPONSE, 500: ERROR_RESPONSE},
)
def diff_version(
    namespace: str,
    name: str,
    version: VersionNumber,
    session: SessionDep,
    blobs: BlobsDep,
    settings: SettingsDep,
    _reader: ReaderDep,
    against: Annotated[
        str | None,
        Query(
            max_length=expert_diff.MAX_REF_CHARS,
            description="namespace/name@version of the reference; default: the version before",
            examples=["alice/hyperbaton@1"],
        ),
    ] = None,
) -> ExpertVersionDiff:
    """Per module the relative change of the update, ranks, scales, gate cosine and which
    tensors are byte-identical; per file whether its bytes are the same; a summary."""
    pair = expert_diff.resolve_pair(session, namespace, name, version, against)
    a, b = ExpertVersionSummary.of(pair.a), ExpertVersionSummary.of(pair.b)
    stored_a, stored_b = pair.stored(session)
    session.commit()  # end the read transaction: the diff reads whole packages
    diff = expert_diff.diff_stored(blobs, settings, stored_a, stored_b)
    return ExpertVersionDiff(a=a, b=b, diff=diff)


@experts_router.get(
    "/{namespace}/{name}/{version}/files/{filename}",
    summary="Download one package file (yanked versions too)",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        404: ERROR_RESPONSE,
        500: ERROR_RESPONSE,
    },
)
def download_file(
    namespace: str,
    name: str,
    version: VersionNumber,
    filename: str,
    session: SessionDep,
    blobs: BlobsDep,
    _reader: ReaderDep,
) -> Response:
    found = service.get_version(session, namespace, name, version)
    file = service.get_file(found, filename)
    stored = stored_file(session, file)
    session.commit()  # end the read transaction: the download may take a while
    try:
        # A file stored whole in a folder is sent from its path; one in pieces, or in a
        # store without local files (object storage), is streamed from the store, which is
        # where a missing blob is found.
        path = blobs.local_path(file.sha256) if stored.whole else None
        handle = open_file(blobs, stored) if path is None else None
    except BlobNotFound as error:
        log.error("download of %s %s: %s", found.ref, filename, error)
        raise StorageError(
            f"the stored bytes of {found.ref} {filename} are missing on the coordinator",
            file=filename,
        ) from error
    media_type = "application/json" if filename.endswith(".json") else "application/octet-stream"
    headers = {"ETag": f'"{file.sha256}"', "X-Content-SHA256": file.sha256}
    if handle is not None:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
        headers["Content-Length"] = str(file.size)
        return StreamingResponse(_chunks(handle), media_type=media_type, headers=headers)
    assert path is not None
    return FileResponse(path, media_type=media_type, filename=filename, headers=headers)


def _chunks(handle: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(size):
            yield chunk


@experts_router.post(
    "/{namespace}/{name}/{version}/yank",
    summary="Yank a version (owner or maintainer)",
    responses={403: ERROR_RESPONSE, 404: ERROR_RESPONSE, 409: ERROR_RESPONSE},
)
def yank(
    namespace: str,
    name: str,
    version: VersionNumber,
    body: YankRequest,
    session: SessionDep,
    token: TokenDep,
) -> ExpertVersionDetail:
    found = service.get_version(session, namespace, name, version)
    return ExpertVersionDetail.of(
        service.yank_version(session, found, by=token, reason=body.reason)
    )


@experts_router.post(
    "/{namespace}/{name}/{version}/unyank",
    summary="Undo a yank (the owner its own yank; a maintainer any)",
    responses={403: ERROR_RESPONSE, 404: ERROR_RESPONSE, 409: ERROR_RESPONSE},
)
def unyank(
    namespace: str, name: str, version: VersionNumber, session: SessionDep, token: TokenDep
) -> ExpertVersionDetail:
    found = service.get_version(session, namespace, name, version)
    return ExpertVersionDetail.of(service.unyank_version(session, found, by=token))


_BLOCK_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: ERROR_RESPONSE,
    403: ERROR_RESPONSE,
    409: ERROR_RESPONSE,
}


@experts_router.post(
    "/{namespace}/{name}/block",
    summary="Block an expert (maintainers): no new versions or releases of it",
    responses=_BLOCK_RESPONSES,
)
def block_expert(
    namespace: str, name: str, body: BlockRequest, session: SessionDep, token: MaintainerDep
) -> BlockState:
    return BlockState.of(service.block(session, namespace, name, by=token, reason=body.reason))


@experts_router.post(
    "/{namespace}/{name}/unblock",
    summary="Lift a block on an expert (maintainers)",
    status_code=200,
    responses=_BLOCK_RESPONSES,
)
def unblock_expert(namespace: str, name: str, session: SessionDep, token: MaintainerDep) -> None:
    service.unblock(session, namespace, name, by=token)


@namespaces_router.post(
    "/{namespace}/block",
    summary="Block a namespace (maintainers): no new versions of any of its experts",
    responses=_BLOCK_RESPONSES,
)
def block_namespace(
    namespace: str, body: BlockRequest, session: SessionDep, token: MaintainerDep
) -> BlockState:
    return BlockState.of(service.block(session, namespace, None, by=token, reason=body.reason))


@namespaces_router.post(
    "/{namespace}/unblock",
    summary="Lift a block on a namespace (maintainers)",
    responses=_BLOCK_RESPONSES,
)
def unblock_namespace(namespace: str, session: SessionDep, token: MaintainerDep) -> None:
    service.unblock(session, namespace, None, by=token)


@blobs_router.post(
    "/missing",
    summary="Which of these digests the catalog lacks (before a delta upload)",
    responses={401: ERROR_RESPONSE, 403: ERROR_RESPONSE, 422: ERROR_RESPONSE},
)
def missing_blobs(request: MissingRequest, session: SessionDep, _token: TokenDep) -> MissingReply:
    """The digests (of segments, or of whole package files) that a delta upload must send:
    those no catalog file or piece of one has. Any token that may publish may ask; anyone
    who can ask could already read the whole catalog (docs/security.md)."""
    held = stored_segments(session, request.sha256)
    return MissingReply(missing=[d for d in dict.fromkeys(request.sha256) if d not in held])


router = APIRouter()
router.include_router(experts_router)
router.include_router(namespaces_router)
router.include_router(blobs_router)
