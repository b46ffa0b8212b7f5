"""The set of named layers, restored from and logged to a state store."""

from __future__ import annotations

import logging
import re
import threading
from typing import Mapping, Optional

import torch

from .errors import InvalidSpec, LayerExists, LayerNotFound, LimitExceeded
from .layer import Layer
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
        self.store.bind(self.records)

    def recover(self) -> int:
        """Load every layer the store holds; returns how many. A layer whose spec this
        server can't build stops start-up rather than being dropped from the store."""
        for record in self.store.recover():
            try:
                config = make_config(record.kind, **record.args)
                layer = self._layer(record.name, config, record.state, record)
            except Exception as e:
                raise RuntimeError(f"cannot restore layer {record.name!r} ({record.kind}): {e}") from e
            self._layers[record.name] = layer
        return len(self._layers)

    def _layer(
        self, name: str, config: LayerConfig, state: Optional[Mapping[str, torch.Tensor]], record: Optional[LayerRecord] = None
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
        try:
            return self._layers[name]
        except KeyError:
            raise LayerNotFound(f"layer {name!r} not found") from None

    def list(self, prefix: str = "") -> list[Layer]:
        with self._lock:
            layers = list(self._layers.values())
        return sorted((l for l in layers if l.name.startswith(prefix)), key=lambda l: l.name)

    def delete(self, name: str) -> None:
        with self._lock:
            layer = self._layers.get(name)
            if layer is None:
                raise LayerNotFound(f"layer {name!r} not found")
            ticket = layer.mark_deleted()
            del self._layers[name]
        self.store.wait_durable(ticket)
