"""Errors the services raise, each with the HTTP status it maps to and a body for people.

Every error body has the same shape as a rejected package (protocol.validation):
`{"detail": {"error", "check", "file", "tensor", "expected", "message"}}` plus optional
extras (e.g. the existing version for a duplicate upload).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

# How every error response is documented in the OpenAPI schema.
ERROR_RESPONSE: dict[str, Any] = {
    "description": "`{detail: {error, check, file, tensor, expected, message}}`"
}


class CoordinatorError(Exception):
    status_code = 400
    error = "bad_request"
    check = "request"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        tensor: str | None = None,
        expected: str | None = None,
        check: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.tensor = tensor
        self.expected = expected
        if check is not None:
            self.check = check
        self.extra = extra or {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": self.error,
            "file": self.file,
            "check": self.check,
            "tensor": self.tensor,
            "expected": self.expected,
            "message": self.message,
            **self.extra,
        }


def encodable(value: Any) -> Any:
    """`value` with every string UTF-8 encodable. A request can carry lone surrogates
    (`"\\ud800"` in its JSON) into a value an error echoes, such as a task name; the JSON
    answer would then fail to encode (a 500). They are written as `\\ud800` instead."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {encodable(key): encodable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [encodable(item) for item in value]
    return value


class BadRequest(CoordinatorError):
    status_code = 400


class Forbidden(CoordinatorError):
    error = "forbidden"
    status_code = 403
    check = "permission"


class NotFound(CoordinatorError):
    error = "not_found"
    status_code = 404
    check = "not_found"


class Conflict(CoordinatorError):
    error = "conflict"
    status_code = 409
    check = "conflict"


class PayloadTooLarge(CoordinatorError):
    error = "too_large"
    status_code = 413
    check = "size"


class UnsupportedMediaType(CoordinatorError):
    error = "unsupported_media_type"
    status_code = 415
    check = "content_type"


class Unprocessable(CoordinatorError):
    error = "package_rejected"
    status_code = 422
    check = "package"


class StorageError(CoordinatorError):
    """The catalog names a blob the store does not have (see the start-up report)."""

    status_code = 500
    error = "storage"
    check = "blob_missing"


# --- FastAPI's and Starlette's own refusals, in the same shape ----------------------------

_LOCATIONS = {"path": "path parameter", "query": "query parameter", "header": "header"}


def _where(loc: Sequence[Any]) -> str:
    """`("query", "release")` -> `query parameter 'release'`; a body field -> its JSON path."""
    if not loc:
        return "the request"
    kind, *rest = [str(part) for part in loc]
    if kind == "body":
        return "the body" + "".join(f"[{part!r}]" for part in rest)
    return f"{_LOCATIONS.get(kind, kind)} {'.'.join(rest)!r}"


def validation_error_body(errors: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A 422 for a request FastAPI could not read (a parameter out of range, a body of the
    wrong type), in the error shape: the first problem in `message`, all of them in
    `errors` (where and what, never the input itself, which may be huge or not text)."""
    problems = [
        {
            "where": _where(e.get("loc", ())),
            "expected": str(e.get("msg", "")),
            "type": e.get("type"),
        }
        for e in errors
    ] or [{"where": "the request", "expected": "a valid request", "type": None}]
    first = problems[0]
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return {
        "error": "invalid_request",
        "check": "request",
        "file": None,
        "tensor": None,
        "expected": first["expected"],
        "message": f"{first['where']}: {first['expected']}{more}",
        "errors": problems[:20],
    }


async def request_validation_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return JSONResponse({"detail": validation_error_body(error.errors())}, status_code=422)


async def http_error(_request: Request, error: Exception) -> Response:
    """Starlette's own 404 (no such route) and 405 (no such method), in the error shape."""
    assert isinstance(error, StarletteHTTPException)
    if error.status_code in (204, 304):  # no body allowed
        return Response(status_code=error.status_code, headers=error.headers)
    try:
        name = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
    except ValueError:
        name = "http_error"
    body = {
        "error": name,
        "check": "route",
        "file": None,
        "tensor": None,
        "expected": None,
        "message": str(error.detail),
    }
    return JSONResponse({"detail": body}, status_code=error.status_code, headers=error.headers)
