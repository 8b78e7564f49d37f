"""Dependencies every router shares: settings, a database session, the blob store, tokens.

Routes declare what they need with these `Annotated` aliases, e.g.
`def route(session: SessionDep, token: ContributorDep) -> ...`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from coordinator.auth.models import Role, Token
from coordinator.auth.service import authenticate
from coordinator.core.config import Settings
from coordinator.core.errors import CoordinatorError, Forbidden
from coordinator.storage import BlobStore


class Unauthorized(CoordinatorError):
    status_code = 401
    error = "unauthorized"
    check = "authentication"

    def __init__(self, message: str, *, error: str | None = None) -> None:
        super().__init__(message)
        challenge = 'Bearer realm="phatgoose"'
        self.headers = {"WWW-Authenticate": f'{challenge}, error="{error}"' if error else challenge}


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]

_bearer = HTTPBearer(
    auto_error=False, description="A token from `phatgoose coordinator create-token`."
)
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


# Where `coordinator.core.edge` leaves the token it verified, in the request's state.
VERIFIED_TOKEN = "verified_token"


def _token_from(
    request: Request, session: Session, credentials: HTTPAuthorizationCredentials | None
) -> Token:
    if credentials is None:
        raise Unauthorized("this needs a bearer token: send 'Authorization: Bearer <token>'")
    verified = getattr(request.state, VERIFIED_TOKEN, None)
    if isinstance(verified, Token):
        return verified
    token = authenticate(session, credentials.credentials)
    # End the read transaction: a long upload must not hold a connection (or, on SQLite,
    # an open snapshot) while it streams.
    session.commit()
    if token is None:
        raise Unauthorized(
            "the bearer token is unknown, malformed or revoked", error="invalid_token"
        )
    return token


def require_token(request: Request, session: SessionDep, credentials: CredentialsDep) -> Token:
    """Any valid token that may write to the catalog: a contributor's or a maintainer's. A
    worker token is refused (403): it leases and reports evaluation jobs, reads and
    downloads, and does nothing else."""
    token = _token_from(request, session, credentials)
    if token.role == Role.WORKER:
        raise Forbidden(
            f"a worker token cannot do this; {token.name!r} is a worker (it leases and reports "
            "evaluation jobs, reads and downloads)",
            expected="a contributor or maintainer token",
        )
    return token


def require_identity(request: Request, session: SessionDep, credentials: CredentialsDep) -> Token:
    """Any valid token, a worker's too: for routes that only say who the token is."""
    return _token_from(request, session, credentials)


def require_worker(request: Request, session: SessionDep, credentials: CredentialsDep) -> Token:
    """A token that may lease and report evaluation jobs: a worker's, or a maintainer's
    (maintainers operate workers too)."""
    token = _token_from(request, session, credentials)
    if token.role not in (Role.WORKER, Role.MAINTAINER):
        raise Forbidden(
            f"this needs a worker or maintainer token; {token.name!r} is a {token.role}",
            expected="a worker or maintainer token",
        )
    return token


def require_maintainer(request: Request, session: SessionDep, credentials: CredentialsDep) -> Token:
    token = _token_from(request, session, credentials)
    if not token.is_maintainer:
        raise Forbidden(f"this needs a maintainer token; {token.name!r} is a {token.role}")
    return token


def require_reader(
    request: Request, session: SessionDep, credentials: CredentialsDep, settings: SettingsDep
) -> Token | None:
    """Reads are public unless `public_read` is off; a token sent anyway must be valid. Any
    valid token reads, a worker's too (it downloads the releases it evaluates)."""
    if credentials is None and settings.public_read:
        return None
    return _token_from(request, session, credentials)


TokenDep = Annotated[Token, Depends(require_token)]
IdentityDep = Annotated[Token, Depends(require_identity)]
WorkerDep = Annotated[Token, Depends(require_worker)]
MaintainerDep = Annotated[Token, Depends(require_maintainer)]
ReaderDep = Annotated[Token | None, Depends(require_reader)]
