"""The one place that maps domain errors to gRPC status codes (DESIGN.md section 5)."""

from __future__ import annotations

import logging
import uuid

import grpc

from normserve.client.codec import CodecError, TensorElementsExceeded

from ..engine import errors as e
from ..shm import ShmDisabled, ShmExists, ShmForbidden, ShmInvalid, ShmLimitExceeded, ShmNotFound
from .auth import PermissionDenied, Unauthenticated

log = logging.getLogger("normserve.transport")

# Most specific classes first.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (e.LayerNotFound, grpc.StatusCode.NOT_FOUND),
    (e.LayerExists, grpc.StatusCode.ALREADY_EXISTS),
    (e.InvalidSpec, grpc.StatusCode.INVALID_ARGUMENT),
    (e.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (e.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.NoRunningStats, grpc.StatusCode.FAILED_PRECONDITION),
    (e.RequestAbandoned, grpc.StatusCode.CANCELLED),
    # A failed test-and-set: gRPC's guidance is ABORTED ("retry at a higher level":
    # re-read the state, then try again), not FAILED_PRECONDITION.
    (e.VersionConflict, grpc.StatusCode.ABORTED),
    # The shared store is away: transient, and the SDK retries (train ids keep it exactly-once).
    (e.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (TensorElementsExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShmNotFound, grpc.StatusCode.NOT_FOUND),
    (ShmExists, grpc.StatusCode.ALREADY_EXISTS),
    (ShmInvalid, grpc.StatusCode.INVALID_ARGUMENT),
    (ShmLimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShmDisabled, grpc.StatusCode.FAILED_PRECONDITION),
    (ShmForbidden, grpc.StatusCode.PERMISSION_DENIED),
    (CodecError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception. Unexpected ones become INTERNAL with a request id
    that is logged with the traceback; the caller never sees the traceback."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    request_id = uuid.uuid4().hex[:16]
    log.error("internal error in %s (request id %s)", method, request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
