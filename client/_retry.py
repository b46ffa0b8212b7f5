"""Retry policy and the attempt bookkeeping shared by the sync and async clients.

The clients differ only in how they wait (time.sleep vs asyncio.sleep); every decision --
whether to retry, how long to back off, how long the next attempt may take -- is made
here, so the twins can't drift.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable, Optional

import grpc

from .errors import NormServeError

__all__ = ["RetryPolicy"]

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How the SDK retries a unary call that failed with UNAVAILABLE or DEADLINE_EXCEEDED.

    - `max_attempts`: attempts in all, the first included (1 = never retry).
    - Backoff before retry n (1-based) is `min(max_backoff, initial_backoff *
      multiplier ** (n - 1))`, shortened by a random fraction of up to `jitter` (0 = none,
      1 = "full jitter"), so clients that failed together don't come back together.
    - `attempt_timeout`: optional deadline of each attempt (seconds). The call's own
      `timeout` is the deadline of the whole call, retries and backoff included: a retry
      is never started, and a backoff never slept, past it. A DEADLINE_EXCEEDED is thus
      retried only when an attempt's own (shorter) deadline fired, or when the server
      itself answered DEADLINE_EXCEEDED.
    - `retry_codes`: the status codes retried; only UNAVAILABLE and DEADLINE_EXCEEDED are
      allowed -- the codes for which the request may simply not have been processed.

    Why retrying is safe: train requests carry an idempotency id that stays the same
    across attempts (the server answers a repeated id with `replayed=True` and doesn't
    apply it twice); reads change nothing; create_layer / delete_layer reconcile a
    retry's ALREADY_EXISTS / NOT_FOUND (see `Client.create_layer`). Streams are never
    retried (their input iterator can't be replayed).
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 3.0
    multiplier: float = 2.0
    jitter: float = 0.2
    attempt_timeout: Optional[float] = None
    retry_codes: frozenset[grpc.StatusCode] = _RETRYABLE

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError(
                f"need 0 <= initial_backoff <= max_backoff, got {self.initial_backoff!r} and {self.max_backoff!r}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter!r}")
        if self.attempt_timeout is not None and not self.attempt_timeout > 0:
            raise ValueError(f"attempt_timeout must be positive or None, got {self.attempt_timeout!r}")
        codes = frozenset(self.retry_codes)
        if not codes <= _RETRYABLE:
            extra = ", ".join(sorted(c.name for c in codes - _RETRYABLE))
            raise ValueError(f"only UNAVAILABLE and DEADLINE_EXCEEDED can be retried safely, not {extra}")
        object.__setattr__(self, "retry_codes", codes)

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (1 = the first retry)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(retry - 1, 0))
        return base * (1.0 - self.jitter * rand())


NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_RETRY = RetryPolicy()


def deadline_after(timeout: Optional[float]) -> Optional[float]:
    """The time.monotonic() deadline `timeout` seconds from now (None: no deadline)."""
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: Optional[float]) -> Optional[float]:
    """Seconds left until a deadline_after() deadline (None: no deadline)."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class Attempts:
    """Bookkeeping for one logical call: the overall deadline and the attempts made."""

    def __init__(self, policy: Optional[RetryPolicy], timeout: Optional[float]):
        self.policy = policy or NO_RETRY
        self.deadline = deadline_after(timeout)
        self.number = 0

    @property
    def retried(self) -> bool:
        """True once a second attempt was started: an earlier one may have been applied."""
        return self.number > 1

    def start(self) -> Optional[float]:
        """Count a new attempt; returns its timeout (seconds, None = no deadline)."""
        self.number += 1
        limit, left = self.policy.attempt_timeout, remaining(self.deadline)
        if left is not None:
            limit = left if limit is None else min(limit, left)
        return limit

    def next_delay(self, err: NormServeError) -> Optional[float]:
        """Seconds to back off before retrying after `err`, or None to give up."""
        if err.code not in self.policy.retry_codes or self.number >= self.policy.max_attempts:
            return None
        delay = self.policy.backoff(self.number)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None  # the next attempt could not start before the call's deadline
        return delay

    def give_up(self, err: NormServeError) -> NormServeError:
        err.attempts = self.number
        return err
