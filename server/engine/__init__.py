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
    StoreUnavailable,
    VersionConflict,
)
from .batching import EvalBatching, batchable
from .layer import ForwardResult, Layer, StateVersion
from .redis_store import RedisStore
from .registry import Registry
from .shared import SharedStore
from .specs import KINDS, LayerConfig, make_config
from .store import DURABILITY_MODES, DiskStore, LayerRecord, StateDirInUse, StateStore

__all__ = [
    "DURABILITY_MODES",
    "KINDS",
    "DiskStore",
    "EvalBatching",
    "ForwardResult",
    "LayerRecord",
    "StateDirInUse",
    "StateStore",
    "VersionConflict",
    "EngineError",
    "InvalidInput",
    "InvalidSpec",
    "Layer",
    "LayerConfig",
    "LayerExists",
    "LayerNotFound",
    "LimitExceeded",
    "NoRunningStats",
    "RedisStore",
    "Registry",
    "SharedStore",
    "StoreUnavailable",
    "RequestAbandoned",
    "StateVersion",
    "batchable",
    "make_config",
]
