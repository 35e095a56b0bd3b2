"""OpenAI-style error bodies and the HTTP status each domain error maps to."""

from __future__ import annotations

from typing import Any

from deepserve import errors

HTTP_STATUS: dict[type[errors.DeepServeError], tuple[int, str]] = {
    errors.InvalidArgument: (400, "invalid_request_error"),
    errors.FailedPrecondition: (400, "invalid_request_error"),
    errors.AlreadyExists: (409, "invalid_request_error"),
    errors.Conflict: (409, "invalid_request_error"),
    errors.Unauthenticated: (401, "authentication_error"),
    errors.PermissionDenied: (403, "permission_error"),
    errors.NotFound: (404, "not_found_error"),
    errors.ResourceExhausted: (429, "rate_limit_error"),
    errors.Unavailable: (503, "service_unavailable"),
    errors.DeadlineExceeded: (504, "timeout"),
    errors.Unimplemented: (501, "not_implemented"),
    errors.Cancelled: (499, "cancelled"),
}


def status_and_type(exc: errors.DeepServeError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]  # type: ignore[index]
    return 500, "server_error"


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def body_for(exc: errors.DeepServeError) -> tuple[int, dict[str, Any]]:
    status, type_ = status_and_type(exc)
    code = (
        "model_not_found" if isinstance(exc, errors.NotFound) and exc.field == "model" else exc.code
    )
    return status, error_body(exc.message, type_, exc.field, code)
