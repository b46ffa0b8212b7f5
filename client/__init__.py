"""normserve Python SDK.

    from normserve.client import Client

    with Client("127.0.0.1:50051") as c:
        c.create_layer("bn", "BatchNorm2d", num_features=3, momentum=None)
        y = c.normalize("bn", x, mode="train")

numpy is required; torch is optional (torch tensors in give torch tensors out).
"""

from . import errors
from ._client import Client
from .errors import NormServeError
from .types import LayerInfo, NormalizeResult, StateVersion

__all__ = ["Client", "LayerInfo", "NormServeError", "NormalizeResult", "StateVersion", "errors"]
