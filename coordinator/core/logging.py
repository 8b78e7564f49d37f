"""Logging with a request id on every line, and the middleware that assigns it.

The id comes from the client's `X-Request-ID` header when it is sane, else a new one; it is
echoed in the response and kept in a context variable, which worker threads inherit.

One record is one line: `SafeFormatter` escapes control characters (CR, LF, the other C0
and C1 characters, U+2028 and U+2029) in every message, whatever its call site put in it
(a percent-decoded URL path, a yank reason, an expert name), so text from a request can
never start a line of its own and pass for another record.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextvars import ContextVar
from typing import IO, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

log = logging.getLogger("coordinator.http")


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (or "-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"

_CONTROL = [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_ESCAPES = {c: {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}.get(c, f"\\x{c:02x}") for c in _CONTROL}
_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_control(text: str) -> str:
    """`text` on one line: control characters as backslash escapes (LF as `\\n`, ...)."""
    return text.translate(_ESCAPES)


class SafeFormatter(logging.Formatter):
    """Escapes control characters in the message; traceback lines are indented, so that
    every line at column 0 starts a record."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.msg, record.args
        record.msg, record.args = escape_control(record.getMessage()), None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = saved

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    lines = text.replace("\r\n", "\n").split("\n")
    return "\n".join("    " + escape_control(line) for line in lines)


def log_handler(stream: IO[str] | None = None) -> logging.Handler:
    """The coordinator's handler: request ids, one line per record."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(SafeFormatter(LOG_FORMAT))
    return handler


def configure_logging(level: str = "INFO") -> None:
    """Attach one handler with the request-id format to the root logger (once)."""
    root = logging.getLogger()
    if not any(isinstance(f, RequestIdFilter) for h in root.handlers for f in h.filters):
        root.addHandler(log_handler())
    root.setLevel(level.upper())


class RequestIdMiddleware:
    """Pure ASGI middleware (does not buffer bodies, so uploads stay streamed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = (
            dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        )
        request_id = incoming if _SANE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER.lower().encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(
                "%s %s -> %d in %.1f ms",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
            )
            request_id_var.reset(token)
