"""Errors raised by the normserve SDK.

Every error the SDK raises for a failed call is a `NormServeError`, which keeps the gRPC
status code (`err.code`, a `grpc.StatusCode`) and the server's message (`err.message`).
Each status code has its own subclass; some also derive from the builtin exception a
Python user would reach for:

    NormServeError
    ├── InvalidArgumentError (ValueError)      bad spec, shape, dtype, values; also raised
    │                                          locally for values the SDK can't encode
    ├── NotFoundError (LookupError)            unknown layer
    ├── AlreadyExistsError                     layer name taken
    ├── FailedPreconditionError                e.g. reset on a layer without running stats
    ├── ResourceExhaustedError                 message/tensor/layer-count limits
    ├── UnauthenticatedError / PermissionDeniedError
    ├── UnavailableError (ConnectionError)     server down or shutting down
    ├── DeadlineExceededError (TimeoutError)
    ├── CancelledError
    ├── AbortedError
    └── InternalError                          server bug; the message has a request id
"""

from __future__ import annotations

from typing import Optional

import grpc


class NormServeError(Exception):
    """A failed normserve call. `code` is the grpc.StatusCode, `message` the server's text."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(NormServeError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(NormServeError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(NormServeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(NormServeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(NormServeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(NormServeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(NormServeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(NormServeError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(NormServeError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(NormServeError):
    code = grpc.StatusCode.CANCELLED


class AbortedError(NormServeError):
    code = grpc.StatusCode.ABORTED


class InternalError(NormServeError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[NormServeError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        AbortedError,
        InternalError,
    )
}
_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def from_status(code: grpc.StatusCode, message: str) -> NormServeError:
    """The NormServeError subclass for a status code."""
    return _BY_CODE.get(code, NormServeError)(message, code)


def from_rpc_error(err: grpc.RpcError) -> NormServeError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return from_status(code, details or "")


def from_status_value(value: int, message: str) -> NormServeError:
    """For the numeric codes in stream Error messages."""
    return from_status(_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN), message)
