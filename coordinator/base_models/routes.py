"""Base model routes: list, read, and (maintainers) register a spec."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import quote

from fastapi import APIRouter, Response
from pydantic import BaseModel

from coordinator.base_models import service
from coordinator.base_models.models import BaseModelRecord
from coordinator.core.deps import MaintainerDep, ReaderDep, SessionDep
from coordinator.core.errors import ERROR_RESPONSE, Conflict, NotFound
from coordinator.core.params import PAGE_SIZE, Offset, PageLimit
from protocol import API_PREFIX, BaseModelSpec

router = APIRouter(prefix="/base-models", tags=["base models"])


class BaseModelSummary(BaseModel):
    name: str
    revision: str | None
    fingerprint: str
    architecture: str
    linear_modules: int
    registered_at: datetime

    @classmethod
    def of(cls, record: BaseModelRecord) -> BaseModelSummary:
        return cls(
            name=record.name,
            revision=record.revision,
            fingerprint=record.fingerprint,
            architecture=record.architecture,
            linear_modules=len(record.spec.get("linear_modules", [])),
            registered_at=record.created_at,
        )


@router.get(
    "",
    summary="Registered base models by name, one page (X-Total-Count: all of them)",
    responses={422: ERROR_RESPONSE},
)
def list_base_models(
    session: SessionDep,
    _reader: ReaderDep,
    response: Response,
    limit: PageLimit = PAGE_SIZE,
    offset: Offset = 0,
) -> list[BaseModelSummary]:
    # The body stays a list (as before); the total is a header.
    response.headers["X-Total-Count"] = str(service.count_base_models(session))
    records = service.list_base_models(session, limit=limit, offset=offset)
    return [BaseModelSummary.of(r) for r in records]


@router.get("/{name}", summary="A base model's full spec (identity and linear modules)")
def get_base_model(name: str, session: SessionDep, _reader: ReaderDep) -> BaseModelSpec:
    record = service.get_by_name(session, name)
    if record is None:
        raise NotFound(f"no base model named {name!r}")
    return record.to_spec()


@router.post(
    "",
    status_code=201,
    summary="Register a base model spec (maintainers)",
    responses={409: {"description": "another spec is registered under this name"}},
)
def register_base_model(
    spec: BaseModelSpec, response: Response, session: SessionDep, _maintainer: MaintainerDep
) -> BaseModelSummary:
    try:
        record = service.register_base_model(session, spec)
    except service.BaseModelConflict as error:
        raise Conflict(str(error)) from error
    # Percent-encoded: a header is latin-1, a name may be any text.
    response.headers["Location"] = f"{API_PREFIX}/base-models/{quote(record.name, safe='')}"
    return BaseModelSummary.of(record)
