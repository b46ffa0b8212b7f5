"""Domain errors. The transport maps each class to one gRPC status code."""


class EngineError(Exception):
    """Base of every error the engine raises on purpose; the message is for the caller."""


class LayerNotFound(EngineError):
    """No layer has that name."""


class LayerExists(EngineError):
    """The name is taken."""


class InvalidSpec(EngineError):
    """A layer's constructor arguments are invalid."""


class InvalidInput(EngineError):
    """A batch or a state dict does not fit the layer (shape, dtype, values)."""


class LimitExceeded(EngineError):
    """A configured limit (layer count, tensor size) would be exceeded."""


class NoRunningStats(EngineError):
    """The operation needs running statistics and the layer keeps none."""


class RequestAbandoned(EngineError):
    """The caller went away (deadline, cancellation) before the update was committed."""


class VersionConflict(EngineError):
    """A compare-and-set found the layer at another version than the caller expected."""


class StoreUnavailable(EngineError):
    """The shared store can't be reached, or this replica's copy is older than promised."""


class LayerUnreadable(StoreUnavailable):
    """The shared store holds a record of this layer that can't be used here (damaged, or
    a spec this server can't build); other layers are unaffected."""
