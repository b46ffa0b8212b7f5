"""Plain result types returned by the SDK."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class StateVersion:
    """`version` grows by one with every state change of a layer (train request, load,
    reset); `num_batches_tracked` is torch's counter (0 for kinds without one)."""

    version: int
    num_batches_tracked: int


@dataclass(frozen=True)
class LayerInfo:
    """A server-side layer: torch class name, full constructor kwargs, state version."""

    name: str
    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    state: StateVersion = StateVersion(0, 0)
    has_running_stats: bool = False


@dataclass(frozen=True)
class NormalizeResult(Generic[T]):
    """One normalized batch and the state version it read (eval) or produced (train)."""

    output: T
    state: StateVersion
    request_id: str = ""
    # True when the server had already applied this request id (a retry): nothing changed.
    replayed: bool = False
