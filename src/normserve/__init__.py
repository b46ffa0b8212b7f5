"""normserve: stateful PyTorch normalization layers served over gRPC.

`normserve.client` is the Python SDK (torch optional); `normserve.server` the service.
"""

__version__ = "0.1.0"
