"""Domain errors shared by every service.

Domain code raises these; only the rpc layer (deepserve.rpc) and the HTTP layer translate them to
gRPC status codes or OpenAI-style HTTP errors. Domain modules therefore never import grpc.
"""

from __future__ import annotations


class DeepServeError(Exception):
    """Base class: a message for the caller and, where one input is at fault, the field's name."""

    code: str = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(DeepServeError):
    """The request itself is wrong; retrying it unchanged cannot succeed."""

    code = "invalid_argument"


class NotFound(DeepServeError):
    """A named object (model, job, pod, request) does not exist."""

    code = "not_found"


class AlreadyExists(DeepServeError):
    """Creating an object whose name is taken."""

    code = "already_exists"


class FailedPrecondition(DeepServeError):
    """The system is not in a state that allows the operation (e.g. no model loaded)."""

    code = "failed_precondition"


class Conflict(DeepServeError):
    """A compare-and-swap lost against a concurrent writer; the caller may re-read and retry."""

    code = "aborted"


class ResourceExhausted(DeepServeError):
    """A configured bound (queue length, rate limit, pool size) is reached."""

    code = "resource_exhausted"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class Unavailable(DeepServeError):
    """A dependency (instance, store) cannot be reached now; retrying later may succeed."""

    code = "unavailable"


class Unimplemented(DeepServeError):
    """The operation belongs to a feature that is not built yet; the message names the feature."""

    code = "unimplemented"


class Unauthenticated(DeepServeError):
    """Missing or unknown credentials."""

    code = "unauthenticated"


class PermissionDenied(DeepServeError):
    """Known caller, operation not allowed."""

    code = "permission_denied"


class DeadlineExceeded(DeepServeError):
    """The operation ran past its deadline."""

    code = "deadline_exceeded"


class Cancelled(DeepServeError):
    """The caller or an operator aborted the operation."""

    code = "cancelled"
