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
    ├── AbortedError                           compare-and-set (expected_version) mismatch
    └── InternalError                          server bug; the message has a request id

The sync `Client` and the `AsyncClient` raise the same classes. A call the SDK retried
(UNAVAILABLE / DEADLINE_EXCEEDED, see `RetryPolicy`) and finally gave up on raises the last
attempt's error; `err.attempts` says how many attempts were made. An error answered for
one message of a stream has `err.sequence`, that message's 0-based position.
"""

from __future__ import annotations

from typing import Optional

import grpc

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NormServeError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
    "from_status",
    "from_status_value",
]


class NormServeError(Exception):
    """A failed normserve call. `code` is the grpc.StatusCode, `message` the server's text.

    `attempts` is the number of attempts the SDK made (more than 1 when it retried);
    `sequence` is set on errors answered for one message of a stream (else None).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.attempts = 1
        self.sequence: Optional[int] = None

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return text if self.attempts <= 1 else f"{text} (after {self.attempts} attempts)"


class InvalidArgumentError(NormServeError, ValueError):
    """INVALID_ARGUMENT: a bad spec, shape, dtype or value (also raised locally, before
    anything is sent, for values the SDK can't encode)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(NormServeError, LookupError):
    """NOT_FOUND: no layer of that name."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(NormServeError):
    """ALREADY_EXISTS: the layer name is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(NormServeError):
    """FAILED_PRECONDITION: e.g. resetting the running statistics of a layer that keeps none."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(NormServeError):
    """RESOURCE_EXHAUSTED: a message, tensor, layer-count, state-size or stream limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(NormServeError):
    """UNAUTHENTICATED: missing or invalid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(NormServeError):
    """PERMISSION_DENIED: the caller's role lacks the right."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(NormServeError, ConnectionError):
    """UNAVAILABLE: the server can't be reached or is shutting down (retried by default)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(NormServeError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout passed before the answer came."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(NormServeError):
    """CANCELLED: the call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class AbortedError(NormServeError):
    """ABORTED: a compare-and-set (`expected_version`) found another version; re-read, retry."""

    code = grpc.StatusCode.ABORTED


class InternalError(NormServeError):
    """INTERNAL: a server bug; the message carries the request id the server logged."""

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
    """The NormServeError for a failed gRPC call (sync or asyncio)."""
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else str(err)
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return from_status(code, str(details or ""))


def from_status_value(value: int, message: str) -> NormServeError:
    """For the numeric codes in stream Error messages."""
    return from_status(_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN), message)
