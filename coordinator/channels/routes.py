"""Release channel routes: thin wrappers over `coordinator.channels.service`. Reads are a
reader's; every change a maintainer's; advancing also a worker's (remote workers call it
each poll)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from coordinator.channels import diff, service
from coordinator.channels.schemas import (
    AdvanceReport,
    ChannelCreate,
    ChannelDetail,
    ChannelDiff,
    ChannelEntryInfo,
    ChannelUpdate,
    PauseRequest,
    PinRequest,
    RollbackRequest,
    channel_url,
)
from coordinator.core.deps import MaintainerDep, ReaderDep, SessionDep, SettingsDep, WorkerDep
from coordinator.core.errors import ERROR_RESPONSE, NotFound
from coordinator.core.params import PAGE_SIZE, Offset, PageLimit, RowNumber
from coordinator.evaluations.task_names import check_requested_tasks
from coordinator.releases import service as releases

router = APIRouter(tags=["release channels"])

_CHANGE: dict[int | str, dict[str, Any]] = {
    401: ERROR_RESPONSE,
    403: ERROR_RESPONSE,
    404: ERROR_RESPONSE,
    409: ERROR_RESPONSE,
}
_TOTAL: dict[int | str, dict[str, Any]] = {
    200: {"headers": {"X-Total-Count": {"description": "all of them"}}}
}


@router.post(
    "/channels",
    status_code=201,
    summary="Create a release channel (maintainers): a name, a recipe, a benchmark spec",
    responses={401: ERROR_RESPONSE, 403: ERROR_RESPONSE, 409: ERROR_RESPONSE, 422: ERROR_RESPONSE},
)
def create_channel(
    body: ChannelCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    token: MaintainerDep,
) -> ChannelDetail:
    if body.spec is not None:
        check_requested_tasks(body.spec, settings.tasks_dir)
    channel = service.create_channel(session, body, by=token.name)
    response.headers["Location"] = channel_url(channel.full_name)
    return ChannelDetail.of(channel)


@router.get("/channels", summary="List release channels by name", responses=_TOTAL)
def list_channels(
    response: Response,
    session: SessionDep,
    _reader: ReaderDep,
    limit: PageLimit = PAGE_SIZE,
    offset: Offset = 0,
) -> list[ChannelDetail]:
    page = service.channel_page(session, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(page.total)
    return [ChannelDetail.of(channel) for channel in page.items]


@router.post(
    "/channels/advance",
    summary="Advance every channel that follows the catalog (workers and maintainers); "
    "idempotent: a catalog change builds one release however many callers",
    responses={401: ERROR_RESPONSE, 403: ERROR_RESPONSE},
)
def advance(
    request: Request, session: SessionDep, settings: SettingsDep, _token: WorkerDep
) -> AdvanceReport:
    return service.advance_channels(session, request.app.state.blobs, settings)


@router.get(
    "/channels/{namespace}/{name}",
    summary="A release channel: the release it points at now, its recipe and state",
    responses={404: ERROR_RESPONSE},
)
def get_channel(
    namespace: str, name: str, session: SessionDep, _reader: ReaderDep
) -> ChannelDetail:
    return ChannelDetail.of(service.get_channel(session, namespace, name))


@router.patch(
    "/channels/{namespace}/{name}",
    summary="Change a channel's recipe, spec, follow or notes (maintainers)",
    responses={**_CHANGE, 422: ERROR_RESPONSE},
)
def update_channel(
    namespace: str,
    name: str,
    body: ChannelUpdate,
    session: SessionDep,
    settings: SettingsDep,
    token: MaintainerDep,
) -> ChannelDetail:
    channel = service.get_channel(session, namespace, name)
    if body.spec is not None:
        check_requested_tasks(body.spec, settings.tasks_dir)
    return ChannelDetail.of(service.update_channel(session, channel, body, by=token.name))


@router.get(
    "/channels/{namespace}/{name}/history",
    summary="A channel's moves, newest first (X-Total-Count: all of them)",
    responses={404: ERROR_RESPONSE, **_TOTAL},
)
def history(
    namespace: str,
    name: str,
    response: Response,
    session: SessionDep,
    _reader: ReaderDep,
    limit: PageLimit = PAGE_SIZE,
    offset: Offset = 0,
) -> list[ChannelEntryInfo]:
    channel = service.get_channel(session, namespace, name)
    page = service.history_page(session, channel, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(page.total)
    return [ChannelEntryInfo.of(entry, number) for entry, number in page.items]


@router.post(
    "/channels/{namespace}/{name}/pin",
    summary="Point the channel at a release and hold it there (maintainers)",
    responses={**_CHANGE, 422: ERROR_RESPONSE},
)
def pin(
    namespace: str, name: str, body: PinRequest, session: SessionDep, token: MaintainerDep
) -> ChannelDetail:
    channel = service.get_channel(session, namespace, name)
    service.pin(session, channel, body.release, by=token.name, reason=body.reason)
    return ChannelDetail.of(channel)


@router.post(
    "/channels/{namespace}/{name}/unpin",
    summary="Let a pinned channel follow the catalog again (maintainers)",
    responses=_CHANGE,
)
def unpin(namespace: str, name: str, session: SessionDep, token: MaintainerDep) -> ChannelDetail:
    channel = service.get_channel(session, namespace, name)
    service.unpin(session, channel, by=token.name)
    return ChannelDetail.of(channel)


@router.post(
    "/channels/{namespace}/{name}/rollback",
    summary="Point the channel back at its previous release, pinned there (maintainers)",
    responses={**_CHANGE, 422: ERROR_RESPONSE},
)
def rollback(
    namespace: str, name: str, body: RollbackRequest, session: SessionDep, token: MaintainerDep
) -> ChannelDetail:
    channel = service.get_channel(session, namespace, name)
    service.rollback(session, channel, by=token.name, reason=body.reason)
    return ChannelDetail.of(channel)


@router.post(
    "/channels/{namespace}/{name}/pause",
    summary="Hold the channel where it is until resumed (maintainers)",
    responses={**_CHANGE, 422: ERROR_RESPONSE},
)
def pause(
    namespace: str, name: str, body: PauseRequest, session: SessionDep, token: MaintainerDep
) -> ChannelDetail:
    channel = service.get_channel(session, namespace, name)
    return ChannelDetail.of(service.pause(session, channel, by=token.name, reason=body.reason))


@router.post(
    "/channels/{namespace}/{name}/resume",
    summary="Let a paused channel advance again (maintainers)",
    responses=_CHANGE,
)
def resume(namespace: str, name: str, session: SessionDep, token: MaintainerDep) -> ChannelDetail:
    channel = service.get_channel(session, namespace, name)
    return ChannelDetail.of(service.resume(session, channel, by=token.name))


@router.get(
    "/releases/{number}/channel-diff",
    summary="A release against the previous release of its channel: experts added and "
    "removed, per-task differences with paired intervals, how routing shifted",
    responses={404: ERROR_RESPONSE},
)
def channel_diff(number: RowNumber, session: SessionDep, _reader: ReaderDep) -> ChannelDiff:
    release = releases.get_release(session, number)
    found = diff.release_channel_diff(session, release)
    if found is None:
        raise NotFound(f"release {number} is in no release channel", check="channel")
    return found
