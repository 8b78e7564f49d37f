"""Errors the services raise, each with the HTTP status it maps to and a body for people.

Every error body has the same shape as a rejected package (protocol.validation):
`{"detail": {"error", "check", "file", "tensor", "expected", "message"}}` plus optional
extras (e.g. the existing version for a duplicate upload).
"""

from __future__ import annotations

from typing import Any

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
