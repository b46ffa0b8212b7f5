"""The engine: named, stateful torch normalization layers. Knows nothing of gRPC."""

from .errors import (
    EngineError,
    InvalidInput,
    InvalidSpec,
    LayerExists,
    LayerNotFound,
    LimitExceeded,
    NoRunningStats,
    RequestAbandoned,
)
from .layer import Layer, StateVersion
from .registry import Registry
from .specs import KINDS, LayerConfig, make_config

__all__ = [
    "KINDS",
    "EngineError",
    "InvalidInput",
    "InvalidSpec",
    "Layer",
    "LayerConfig",
    "LayerExists",
    "LayerNotFound",
    "LimitExceeded",
    "NoRunningStats",
    "Registry",
    "RequestAbandoned",
    "StateVersion",
    "make_config",
]
