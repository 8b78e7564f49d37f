"""Bounded integers for paths and query strings, shared by every router (API and pages).

Ids, version and release numbers are 32-bit `Integer` columns: PostgreSQL raises on a larger
value (a `DataError`) and SQLite's driver on one past 64 bits (an `OverflowError`), so an
unbounded `int` parameter turns `?offset=10**30` into a 5xx. The bound on the parameter makes
it a 422 naming the parameter and its range before any query runs. (Pydantic reads only
ASCII digits: `"١"` and `"²"` are 422s too, not 1 and 2 as Python's `int()` would read them.)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

# The largest value of the database's `Integer` columns (ids, numbers, offsets into them).
DB_INT_MAX = 2**31 - 1

# A row's number or id in a path: `/releases/{number}`, `/results/{result_id}`.
RowNumber = Annotated[int, Path(ge=1, le=DB_INT_MAX)]
# The same in a query string, as an optional filter: `?release=3`.
RowFilter = Annotated[int | None, Query(ge=1, le=DB_INT_MAX)]
# How many rows a page skips.
Offset = Annotated[int, Query(ge=0, le=DB_INT_MAX, description="rows to skip")]
# How many rows one page of an API list holds (base models, evaluations, releases).
PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="rows per page")]


class Utf8QueryMiddleware:
    """Refuses (400, in the error shape) a query string that is not UTF-8, before routing.

    An HTTP server passes raw bytes in the query string through; Starlette decodes it as
    UTF-8 whenever `request.url` is built (the pages' links, the router's trailing-slash
    redirect), so `?\\xff` was a 500 there. Percent-encoded bytes (`%FF`) are ASCII and
    pass: each parameter's own validation refuses what it cannot read.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                scope.get("query_string", b"").decode("utf-8")
            except UnicodeDecodeError:
                body = {
                    "error": "bad_request",
                    "check": "query_string",
                    "file": None,
                    "tensor": None,
                    "expected": "a query string of percent-encoded UTF-8",
                    "message": "the query string is not valid UTF-8",
                }
                await JSONResponse({"detail": body}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)
