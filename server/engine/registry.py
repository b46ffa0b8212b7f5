"""The set of named layers, restored from and logged to a state store."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Mapping, Optional

import torch

from .errors import InvalidSpec, LayerExists, LayerNotFound, LayerUnreadable, LimitExceeded
from .layer import Layer
from .shared import DELETED, Index, SharedStore
from .specs import LayerConfig, make_config, state_bytes
from .store import LayerRecord, StateStore

log = logging.getLogger("normserve.registry")

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
NAME_RULE = "1-128 characters: letters, digits and . _ : / -, starting with a letter or digit"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidSpec(f"invalid layer name {name!r}: expected {NAME_RULE}")
    return name


class Registry:
    """Thread-safe map of layer name -> Layer, bounded by `max_layers`.

    Creations and deletions are logged to the store under the registry lock, so a name's
    records are in order; `recover()` rebuilds the layers from the store at start-up.

    With a shared store (several replicas) the map is a cache of the store's layers: kept
    current from the store's notifications and periodic index reads, filled on a miss,
    and refused (StoreUnavailable) once older than the store's staleness bound.
    """

    def __init__(
        self,
        max_layers: int = 10_000,
        store: Optional[StateStore] = None,
        idempotency_window: int = 1024,
        max_layer_state_bytes: int = 32 << 20,
        device: torch.device | str = "cpu",
    ):
        self.device = torch.device(device)
        self.max_layers = max_layers
        self.max_layer_state_bytes = max_layer_state_bytes
        self.store = store if store is not None else StateStore()
        self.idempotency_window = idempotency_window
        self._layers: dict[str, Layer] = {}
        self._lock = threading.Lock()
        self.shared: Optional[SharedStore] = self.store if isinstance(self.store, SharedStore) else None
        # Shared stores only: the highest incarnation of each name seen deleted, and layers
        # whose record in the store can't be used here (name -> why).
        self._gone: dict[str, int] = {}
        self._unreadable: dict[str, str] = {}
        self._epoch: Optional[str] = None
        self.store.bind(self.records)

    def recover(self) -> int:
        """Load every layer the store holds; returns how many. A layer whose spec this
        server can't build stops start-up rather than being dropped from the store."""
        if self.shared is not None:
            self._follow(self.shared)
            return len(self._layers)
        for record in self.store.recover():
            try:
                config = make_config(record.kind, **record.args)
                layer = self._layer(record.name, config, record.state, record)
            except Exception as e:
                raise RuntimeError(f"cannot restore layer {record.name!r} ({record.kind}): {e}") from e
            self._layers[record.name] = layer
        return len(self._layers)

    def _layer(
        self,
        name: str,
        config: LayerConfig,
        state: Optional[Mapping[str, torch.Tensor]],
        record: Optional[LayerRecord] = None,
        incarnation: int = 0,
    ) -> Layer:
        return Layer(
            name,
            config,
            state,
            store=self.store,
            version=record.version if record else 0,
            request_ids=record.request_ids if record else (),
            idempotency_window=self.idempotency_window,
            device=self.device,
            incarnation=incarnation,
        )

    def records(self) -> list[LayerRecord]:
        """Every live layer's complete record (for store compaction)."""
        with self._lock:
            layers = list(self._layers.values())
        return [layer.record() for layer in layers]

    def create(
        self, name: str, config: LayerConfig, state: Optional[Mapping[str, torch.Tensor]] = None
    ) -> Layer:
        """Create a layer, optionally with an initial state_dict (all or nothing)."""
        check_name(name)
        size = state_bytes(config)
        if size > self.max_layer_state_bytes:
            raise LimitExceeded(
                f"{config.kind} state would take {size} bytes, over the limit "
                f"max_layer_state_bytes={self.max_layer_state_bytes}"
            )
        layer = self._layer(name, config, state)
        if self.shared is not None:
            layer.incarnation = self.shared.create(layer.record(), self.max_layers)
            with self._lock:
                current = self._layers.get(name)
                if current is not None and current.incarnation >= layer.incarnation:
                    return current  # already installed from the store's notification
                self._layers[name] = layer
            return layer
        with self._lock:
            if name in self._layers:
                raise LayerExists(f"layer {name!r} already exists")
            if len(self._layers) >= self.max_layers:
                raise LimitExceeded(f"too many layers: the limit is max_layers={self.max_layers}")
            ticket = self.store.append(layer.record())
            self._layers[name] = layer
        self.store.wait_durable(ticket)
        return layer

    def get(self, name: str) -> Layer:
        layer = self._layers.get(name)
        if self.shared is not None:
            self.shared.check_fresh()
            if layer is None or layer.deleted:
                # Created (or created again) on another replica moments ago?
                unreadable = self._unreadable.get(name)
                if unreadable is not None:
                    raise LayerUnreadable(unreadable)
                layer = self._refresh(name)
        if layer is None:
            raise LayerNotFound(f"layer {name!r} not found")
        return layer

    def list(self, prefix: str = "", fresh: bool = True) -> list[Layer]:
        """Layers whose names start with `prefix`; `fresh=False` skips the staleness check
        (for metrics, which must keep working while the shared store is away)."""
        if fresh and self.shared is not None:
            self.shared.check_fresh()
        with self._lock:
            layers = list(self._layers.values())
        return sorted((l for l in layers if l.name.startswith(prefix)), key=lambda l: l.name)

    def delete(self, name: str) -> None:
        if self.shared is not None:
            layer = self.get(name)
            try:
                self.shared.delete(name, layer.incarnation)
            except LayerNotFound:
                # This copy may be an older incarnation: delete the layer the store holds now.
                current = self._refresh(name)
                if current is None or current.incarnation == layer.incarnation:
                    raise
                self.shared.delete(name, current.incarnation)
                layer = current
            self._forget(layer)
            return
        with self._lock:
            layer = self._layers.get(name)
            if layer is None:
                raise LayerNotFound(f"layer {name!r} not found")
            ticket = layer.mark_deleted()
            del self._layers[name]
        self.store.wait_durable(ticket)

    # -- following a shared store ------------------------------------------------------
    def _follow(self, shared: SharedStore) -> None:
        started = time.monotonic()
        self._apply_index(*shared.index())
        shared.mark_synced(started)
        shared.watch(self._apply_change, self._apply_index)

    def _apply_change(self, name: str, incarnation: int, version: int) -> None:
        layer = self._layers.get(name)
        if version == DELETED:
            with self._lock:  # also when not cached: a fetch in flight must not bring it back
                self._gone[name] = max(self._gone.get(name, 0), incarnation)
            if layer is not None and layer.incarnation == incarnation:
                self._forget(layer)
        elif layer is None or layer.incarnation != incarnation or layer.version.version != version:
            try:
                self._refresh(name)
            except LayerUnreadable as e:  # this layer only: the others stay served
                if self._unreadable.get(name) != str(e):
                    log.error("%s", e)
                self._unreadable[name] = str(e)

    def _apply_index(self, index: Index, top: int, epoch: str) -> None:
        if self._epoch is not None and epoch != self._epoch:
            # The store was emptied or replaced (its epoch key is new): nothing cached can be
            # trusted to match it, and incarnation numbers may be given out again.
            log.error("the shared store was reset (epoch %s -> %s): reloading every layer", self._epoch, epoch)
            with self._lock:
                cached = list(self._layers.values())
            for layer in cached:
                self._forget(layer)
            self._gone.clear()
        self._epoch = epoch
        for name, (incarnation, version) in index.items():
            self._apply_change(name, incarnation, version)
        with self._lock:
            # Created after the index was read (incarnation above `top`): not gone.
            gone = [l for n, l in self._layers.items() if n not in index and l.incarnation <= top]
        for layer in gone:
            self._forget(layer)
        for name in [n for n in self._unreadable if n not in index]:
            self._unreadable.pop(name, None)

    def _refresh(self, name: str) -> Optional[Layer]:
        """Bring `name` up to the store's state; None when the store has no such layer.
        Raises LayerUnreadable when the store's record can't be used here."""
        assert self.shared is not None
        shared = self.shared
        # Read before the fetch: a layer installed after it (a concurrent create) is newer
        # than what the fetch saw and must not be dropped on its account.
        current = self._layers.get(name)
        found = shared.fetch(name)
        if found is None:
            if current is not None:
                self._forget(current)
            return None
        incarnation, record = found
        try:
            if current is not None and current.incarnation == incarnation:
                current.install(record, refetch=lambda: shared.fetch(name))
                layer = current
            elif current is not None and current.incarnation > incarnation:
                return current
            else:
                layer = self._layer(name, make_config(record.kind, **record.args), record.state, record, incarnation)
        except LayerUnreadable:
            raise
        except Exception as e:
            raise LayerUnreadable(f"layer {name!r} ({record.kind}) in the shared store can't be used here: {e}") from e
        self._unreadable.pop(name, None)
        if layer is current:
            return layer
        with self._lock:
            now = self._layers.get(name)
            if now is not None and now.incarnation >= incarnation:
                return now
            if incarnation <= self._gone.get(name, 0):
                return None  # deleted while it was being fetched
            if now is not None:
                now.deleted = True
            self._layers[name] = layer
        return layer

    def _forget(self, layer: Layer) -> None:
        with self._lock:
            if self._layers.get(layer.name) is layer:
                del self._layers[layer.name]
            layer.deleted = True
            if self.shared is not None:
                # A fetch that began before the deletion must not bring this one back.
                self._gone[layer.name] = max(self._gone.get(layer.name, 0), layer.incarnation)
