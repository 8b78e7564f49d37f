"""Security headers on every response: a Content-Security-Policy, no MIME sniffing, no
framing, no referrer beyond this origin.

The pages load only their own stylesheet, script and images (`/ui/static/`, PNG plots),
with no inline script or style, so their policy allows `'self'` and nothing else. The API
docs pages (`/docs`, `/redoc`) are FastAPI's: they load Swagger UI or ReDoc from a CDN and
start it with an inline script, so they get a policy of their own that allows exactly that.

An exception no handler caught would reach Starlette's outermost error middleware, whose
500 carries none of these headers: this middleware answers it first, in the error shape
and with the headers, and re-raises it for the server's log.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_CDN = "https://cdn.jsdelivr.net"
DOCS_POLICY = (
    f"default-src 'none'; script-src 'self' 'unsafe-inline' {_CDN}; "
    f"style-src 'self' 'unsafe-inline' {_CDN} https://fonts.googleapis.com; "
    "font-src https://fonts.gstatic.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
    "connect-src 'self'; worker-src blob:; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
_COMMON: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeadersMiddleware:
    """Pure ASGI: adds the headers a response does not set itself."""

    def __init__(self, app: ASGIApp, docs_paths: Collection[str] = ()) -> None:
        self.app = app
        self.docs_paths = frozenset(docs_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = DOCS_POLICY if scope["path"] in self.docs_paths else PAGE_POLICY
        extra = [*_COMMON, (b"content-security-policy", policy.encode())]

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend((name, value) for name, value in extra if name not in present)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if not started:
                await INTERNAL_ERROR(scope, receive, send_with_headers)
            raise


# Says nothing of the cause (that goes to the server's log).
INTERNAL_ERROR = JSONResponse(
    {
        "detail": {
            "error": "internal_error",
            "check": "server",
            "file": None,
            "tensor": None,
            "expected": None,
            "message": "the coordinator failed on this request; its log has the details",
        }
    },
    status_code=500,
)
