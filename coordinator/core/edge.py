"""The HTTP edge: what every request goes through before the app reads a byte of its body.

FastAPI reads and parses a JSON body before it solves a route's dependencies, so a token
check in a dependency comes after the body is in memory. This pure ASGI middleware runs
before routing instead, in this order:

1. the per-address rate limit (when on): before the token is looked up, so a flood of
   forged tokens is paid for by the flooder's own address;
2. the bearer token, verified against the database (in a worker thread) when the request
   carries one and either writes (any method but GET, HEAD and OPTIONS) or the limiter needs
   to know whose budget to charge;
3. the per-client rate limit: the verified token's bucket, else the address's anonymous one;
4. a write without a valid token is 401 here, and no body byte has been read;
5. every body but the streamed package upload (which has its own limits) is capped: a
   declared `Content-Length` over the cap is 413 at once, and a body without one, or longer
   than it said, is cut off with 413 at the first chunk past the cap.

Routes still declare their token dependencies: they decide the role and namespace checks
(reusing the token verified here, when there is one), and public reads keep answering 401
for a bad token there.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import anyio.to_thread
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.auth.models import Token
from coordinator.auth.service import authenticate
from coordinator.core.deps import VERIFIED_TOKEN, Unauthorized
from coordinator.core.errors import CoordinatorError, PayloadTooLarge
from coordinator.core.ratelimit import RateLimits, send_too_many_requests

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def bearer_credentials(scope: Scope) -> str | None:
    """The credentials of an `Authorization: Bearer <credentials>` header, as FastAPI's
    `HTTPBearer` reads them; None for no header or another scheme."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials
            return None
    return None


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _has_body(scope: Scope) -> bool:
    declared = _declared_length(scope)
    if declared is not None:
        return declared > 0
    return any(name == b"transfer-encoding" for name, _ in scope.get("headers", []))


class _BodyTooLarge(Exception):
    """Raised from `receive` at the first chunk past the cap."""


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        sessions: sessionmaker[Session],
        max_body_bytes: int,
        streamed_routes: Collection[tuple[str, str]] = (),
        limits: RateLimits | None = None,
    ) -> None:
        self.app = app
        self.sessions = sessions
        self.max_body_bytes = max_body_bytes
        self.streamed_routes = frozenset(streamed_routes)
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.limits is not None:
            limiter, decision = self.limits.charge_address(scope)
            if not decision.allowed:
                await send_too_many_requests(send, limiter, decision, "this address")
                return

        writes = scope["method"] not in SAFE_METHODS
        credentials = bearer_credentials(scope)
        verified: str | None = None
        if credentials is not None and (writes or self.limits is not None):
            token = await anyio.to_thread.run_sync(self._verify, credentials)
            if token is not None:
                verified = token.public_id
                # The route's token dependency takes it from here rather than asking the
                # database a second time.
                scope.setdefault("state", {})[VERIFIED_TOKEN] = token

        if self.limits is not None:
            limiter, decision = self.limits.charge_client(scope, verified)
            if not decision.allowed:
                who = "this token" if verified else "this address"
                await send_too_many_requests(send, limiter, decision, who)
                return

        if writes and verified is None:
            if credentials is None:
                refusal = Unauthorized(
                    "this needs a bearer token: send 'Authorization: Bearer <token>'"
                )
            else:
                refusal = Unauthorized(
                    "the bearer token is unknown, malformed or revoked", error="invalid_token"
                )
            await self._refuse(scope, receive, send, refusal)
            return

        if (scope["method"], scope["path"]) in self.streamed_routes:
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(scope, receive, send, self._too_large())
            return
        await self._capped(scope, receive, send)

    def _verify(self, credentials: str) -> Token | None:
        """The live token `credentials` stand for, else None; detached from its session
        (which never commits, so its attributes stay loaded)."""
        with self.sessions() as session:
            return authenticate(session, credentials)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is over {self.max_body_bytes} bytes",
            check="request_size",
            expected=f"a body of at most {self.max_body_bytes} bytes "
            "(PHATGOOSE_MAX_REQUEST_BODY_BYTES; package uploads have their own limits)",
        )

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, error: CoordinatorError
    ) -> None:
        headers = dict(getattr(error, "headers", None) or {})
        if _has_body(scope):
            # The body stays unread: the connection cannot carry another request.
            headers["Connection"] = "close"
        response = JSONResponse(
            {"detail": error.to_dict()}, status_code=error.status_code, headers=headers
        )
        await response(scope, receive, send)

    async def _capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        over = False
        started = False  # the app (or this middleware) began a response

        async def capped_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                # Whatever the app made of the refusal (FastAPI turns a failed body read
                # into a 400), the answer is 413.
                if not started:
                    started = True
                    await self._refuse(scope, receive, send, self._too_large())
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except Exception:
            if not over:
                raise
            if not started:
                started = True
                await self._refuse(scope, receive, send, self._too_large())
