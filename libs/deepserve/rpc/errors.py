"""Maps domain errors to gRPC status codes (server side) and back (client side)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from deepserve import errors
from deepserve.rpc.interceptor_base import (
    MethodWrappingInterceptor,
    StreamBehavior,
    UnaryBehavior,
)

log = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.DeepServeError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
}
ERROR_OF = {code: cls for cls, code in STATUS_OF.items()}

# Trailing metadata keys that carry structured parts of an error across the wire.
FIELD_KEY = "deepserve-field"
RETRY_AFTER_KEY = "deepserve-retry-after-s"


def status_of(exc: errors.DeepServeError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def _trailers(exc: errors.DeepServeError) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    if exc.field:
        out.append((FIELD_KEY, exc.field))
    if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_s is not None:
        out.append((RETRY_AFTER_KEY, f"{exc.retry_after_s:.3f}"))
    return tuple(out)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, errors.DeepServeError):
        context.set_trailing_metadata(_trailers(exc))
        await context.abort(status_of(exc), str(exc))
    log.exception("unhandled error in RPC", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def error_from_rpc(exc: grpc.aio.AioRpcError) -> errors.DeepServeError:
    """The domain error a failed call stands for, so callers handle one error family."""
    trailers = dict(exc.trailing_metadata() or ())
    field = trailers.get(FIELD_KEY)
    message = exc.details() or exc.code().name
    cls = ERROR_OF.get(exc.code(), errors.Unavailable)
    if cls is errors.ResourceExhausted:
        retry = trailers.get(RETRY_AFTER_KEY)
        return errors.ResourceExhausted(
            message, field=field, retry_after_s=float(retry) if retry else None
        )
    err = cls(message, field=field)
    # Strip the "field: " prefix the server's str() added, so it is not shown twice.
    if field and message.startswith(f"{field}: "):
        err.message = message[len(field) + 2 :]
    return err


class DomainErrorInterceptor(MethodWrappingInterceptor):
    """Turns DeepServeError raised by a servicer into the matching status code and message."""

    def wrap_unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except errors.DeepServeError as exc:
                await _abort(context, exc)
            except (grpc.aio.AbortError, grpc.aio.BaseError):
                raise
            except Exception as exc:
                await _abort(context, exc)

        return unary_unary

    def wrap_stream(self, method: str, behavior: StreamBehavior) -> StreamBehavior:
        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for item in behavior(request, context):
                    yield item
            except errors.DeepServeError as exc:
                await _abort(context, exc)
            except (grpc.aio.AbortError, grpc.aio.BaseError):
                raise
            except Exception as exc:
                await _abort(context, exc)

        return unary_stream
