"""The set of named layers."""

from __future__ import annotations

import re
import threading
from typing import Mapping, Optional

import torch

from .errors import InvalidSpec, LayerExists, LayerNotFound, LimitExceeded
from .layer import Layer
from .specs import LayerConfig

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
NAME_RULE = "1-128 characters: letters, digits and . _ : / -, starting with a letter or digit"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidSpec(f"invalid layer name {name!r}: expected {NAME_RULE}")
    return name


class Registry:
    """Thread-safe map of layer name -> Layer, bounded by `max_layers`."""

    def __init__(self, max_layers: int = 10_000):
        self.max_layers = max_layers
        self._layers: dict[str, Layer] = {}
        self._lock = threading.Lock()

    def create(
        self, name: str, config: LayerConfig, state: Optional[Mapping[str, torch.Tensor]] = None
    ) -> Layer:
        """Create a layer, optionally with an initial state_dict (all or nothing)."""
        check_name(name)
        layer = Layer(name, config, state)
        with self._lock:
            if name in self._layers:
                raise LayerExists(f"layer {name!r} already exists")
            if len(self._layers) >= self.max_layers:
                raise LimitExceeded(f"too many layers: the limit is max_layers={self.max_layers}")
            self._layers[name] = layer
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
            if self._layers.pop(name, None) is None:
                raise LayerNotFound(f"layer {name!r} not found")

    def __len__(self) -> int:
        return len(self._layers)
