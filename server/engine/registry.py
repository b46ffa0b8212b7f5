"""The set of named layers, restored from and logged to a state store."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Mapping, Optional

import torch

from .errors import InvalidSpec, LayerExists, LayerNotFound, LimitExceeded
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
        if self.shared is not None:
            self.shared.check_fresh()
        layer = self._layers.get(name)
        if layer is None and self.shared is not None:
            layer = self._refresh(name)  # created on another replica moments ago?
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
            self.shared.delete(name, layer.incarnation)
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
            if layer is not None and layer.incarnation == incarnation:
                self._forget(layer)
        elif layer is None or layer.incarnation < incarnation or layer.version.version < version:
            self._refresh(name)

    def _apply_index(self, index: Index, top: int) -> None:
        for name, (incarnation, version) in index.items():
            self._apply_change(name, incarnation, version)
        with self._lock:
            # Created after the index was read (incarnation above `top`): not gone.
            gone = [l for n, l in self._layers.items() if n not in index and l.incarnation <= top]
        for layer in gone:
            self._forget(layer)

    def _refresh(self, name: str) -> Optional[Layer]:
        """Bring `name` up to the store's state; None when the store has no such layer."""
        assert self.shared is not None
        found = self.shared.fetch(name)
        current = self._layers.get(name)
        if found is None:
            if current is not None:
                self._forget(current)
            return None
        incarnation, record = found
        if current is not None and current.incarnation == incarnation:
            current.install(record)
            return current
        if current is not None and current.incarnation > incarnation:
            return current
        try:
            layer = self._layer(name, make_config(record.kind, **record.args), record.state, record, incarnation)
        except Exception as e:
            log.error("cannot build layer %r (%s) from the shared store: %s", name, record.kind, e)
            return None
        with self._lock:
            current = self._layers.get(name)
            if current is not None and current.incarnation >= incarnation:
                return current
            if current is not None:
                current.deleted = True
            self._layers[name] = layer
        return layer

    def _forget(self, layer: Layer) -> None:
        with self._lock:
            if self._layers.get(layer.name) is layer:
                del self._layers[layer.name]
            layer.deleted = True
