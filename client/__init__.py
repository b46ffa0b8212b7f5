"""normserve Python SDK.

    from normserve.client import Client

    with Client("127.0.0.1:50051", timeout=10) as c:
        c.create_layer("bn", "BatchNorm2d", num_features=3, momentum=None)
        y = c.normalize("bn", x, mode="train")

    async with AsyncClient("127.0.0.1:50051") as c:   # the asyncio twin
        y = await c.normalize("bn", x, mode="eval")

numpy is required; torch is optional (torch tensors in give torch tensors out, on their
device). Public names:

- `Client`, `AsyncClient`: sync and asyncio clients with the same methods and errors.
- `RetryPolicy`: retries with backoff for UNAVAILABLE / DEADLINE_EXCEEDED (on by default).
- `tls_credentials(ca_cert, cert, key)`: TLS channel credentials from PEM files or bytes.
- `LayerInfo`, `StateVersion`, `NormalizeResult`: result types.
- `NormServeError` and `errors`: the one error hierarchy (see normserve.client.errors).
- `Metadata`: the type of per-call metadata.
- `normserve.client.nn` (import it explicitly; needs torch): `RemoteNorm`, `offload`.
- `normserve.client.codec`: the tensor/spec codec shared with the server.
"""

from . import errors
from ._async_client import AsyncClient
from ._client import Client
from ._core import Metadata, tls_credentials
from ._retry import RetryPolicy
from .errors import NormServeError
from .types import LayerInfo, NormalizeResult, StateVersion

__all__ = [
    "AsyncClient",
    "Client",
    "LayerInfo",
    "Metadata",
    "NormServeError",
    "NormalizeResult",
    "RetryPolicy",
    "StateVersion",
    "errors",
    "tls_credentials",
]
