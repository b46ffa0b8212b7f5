"""The contract of a state store shared by several server replicas.

With the embedded store each process is the truth about its layers and the store only
makes that truth durable. With a shared store the store is the truth: a replica keeps a
cached copy of every layer (so eval requests cost no round trip), commits a change only
if the store still holds the version the change was computed from (compare-and-set),
and learns of other replicas' changes from the store's notifications and from a full
index read every `refresh_seconds`.
"""

from __future__ import annotations

from typing import Callable, Optional

from .errors import StoreUnavailable
from .store import LayerRecord, StateStore

# name -> (incarnation, version). An incarnation number is given to every creation, so a
# layer deleted and created again under the same name is never mistaken for the old one.
Index = dict[str, tuple[int, int]]
DELETED = -1  # the version a notification carries when a layer was deleted


class StaleState(Exception):
    """A commit's base version is no longer current; `record` is the store's current one."""

    def __init__(self, record: LayerRecord):
        super().__init__(f"layer {record.name!r} moved on to version {record.version}")
        self.record = record


class Superseded(StoreUnavailable):
    """The layer this replica computed on was deleted and created again elsewhere: nothing
    was applied, and a retry (UNAVAILABLE) reaches the new layer."""


class AlreadyApplied(Exception):
    """The train request id was already applied (by any replica): the state it produced."""

    def __init__(self, version: int, num_batches_tracked: int):
        super().__init__(f"request already applied at version {version}")
        self.version = version
        self.num_batches_tracked = num_batches_tracked


class SharedStore(StateStore):
    """Operations a shared store adds; `append`/`wait_durable` are unused (commits are
    synchronous compare-and-sets, acknowledged when the store has them)."""

    shared = True
    url = ""
    refresh_seconds = 0.5
    conflicts = 0  # commits refused as stale (another replica changed the layer first)

    def create(self, record: LayerRecord, max_layers: int) -> int:
        """Store a new layer atomically; returns its incarnation. Raises LayerExists or
        LimitExceeded (the limit counts every replica's layers)."""
        raise NotImplementedError

    def commit(self, record: LayerRecord, incarnation: int, base_version: int, request_id: str, window: int) -> None:
        """Store `record` (version base_version + 1) if the layer is still at
        `base_version`. Raises StaleState, AlreadyApplied (request_id seen among the
        layer's last `window` ids), LayerNotFound (deleted) or Superseded (created again)."""
        raise NotImplementedError

    def delete(self, name: str, incarnation: int) -> None:
        raise NotImplementedError

    def fetch(self, name: str) -> Optional[tuple[int, LayerRecord]]:
        """The layer's (incarnation, record), or None when it does not exist."""
        raise NotImplementedError

    def index(self) -> tuple[Index, int, str]:
        """Every layer's incarnation and version, the highest incarnation given so far (a
        layer with a higher one was created later) and the store's epoch (a new one when the
        store was emptied or replaced), read atomically."""
        raise NotImplementedError

    def watch(self, on_change: Callable[[str, int, int], None], on_index: Callable[[Index, int, str], None]) -> None:
        """Start following the store: `on_change(name, incarnation, version)` per
        notification (version DELETED for a deletion), `on_index(*index())` at least every
        `refresh_seconds`."""
        raise NotImplementedError

    def sync_age(self) -> float:
        """Seconds since the last complete index read began."""
        raise NotImplementedError

    def check_fresh(self) -> None:
        """Raise StoreUnavailable when the last complete index read is older than the
        staleness bound (2 x refresh_seconds)."""
        raise NotImplementedError
