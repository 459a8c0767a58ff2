"""Typed errors and the one table that maps them to gRPC status codes and HTTP statuses."""
from __future__ import annotations

import math

import grpc

# gRPC code -> HTTP status, as Triton's HTTP frontend answers for the same failure.
_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class GatewayError(Exception):
    """A request failure with the gRPC code it is answered with; HTTP derives from the code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def http_status(self) -> int:
        return http_status(self.code)

    def headers(self) -> dict[str, str]:
        """Extra response headers (HTTP) or trailing metadata (gRPC) this error carries."""
        return {}


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class StateUnavailable(Unavailable):
    """The route state store (state file or Redis) cannot be read or written: admin changes and
    rollout steps are refused, the last known state stays in force."""


class Unauthenticated(GatewayError):
    """No usable credentials: none sent where the policy needs some, or a token that fails checks."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class PermissionDenied(GatewayError):
    """A known caller that no access rule allows this action on this model."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(GatewayError):
    """Over a limit: the caller may retry after retry_after_s seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float, scope: str = "") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.scope = scope  # which limit: model, client or global

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class DeadlineExceeded(GatewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class BackendError(GatewayError):
    """Triton's own answer: its code and message pass to the client unchanged."""


def http_status(code: grpc.StatusCode) -> int:
    """HTTP status for a gRPC code (the same table GatewayError uses)."""
    return _HTTP_STATUS.get(code, 500)
