"""The SDK's public API, pinned: exported names, sync/async twins with identical
signatures, docstrings everywhere, and imports that need neither torch nor
grpcio-health-checking."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest

import normserve.client as sdk
from normserve.client import AsyncClient, Client, errors, types

EXPORTED = {
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
}
CLIENT_METHODS = {
    "close",
    "health",
    "ready",
    "create_layer",
    "import_state",
    "get_layer",
    "list_layers",
    "delete_layer",
    "get_state",
    "load_state",
    "reset_running_stats",
    "normalize",
    "normalize_result",
    "normalize_stream",
    "normalize_stream_results",
}
# A torch.nn.Module's forward is synchronous: these exist on the sync client only.
SYNC_ONLY = {"module", "offload"}
STREAMS = {"normalize_stream", "normalize_stream_results"}
ERRORS = {
    "NormServeError",
    "InvalidArgumentError",
    "NotFoundError",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "PermissionDeniedError",
    "UnavailableError",
    "DeadlineExceededError",
    "CancelledError",
    "AbortedError",
    "InternalError",
}


def public_methods(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if not n.startswith("_") and callable(v)}


def test_exported_names_are_pinned():
    assert set(sdk.__all__) == EXPORTED
    for name in EXPORTED:
        assert hasattr(sdk, name), name


def test_client_methods_are_pinned():
    assert public_methods(Client) == CLIENT_METHODS | SYNC_ONLY
    assert public_methods(AsyncClient) == CLIENT_METHODS


@pytest.mark.parametrize("method", sorted(CLIENT_METHODS))
def test_async_twin_has_the_same_signature(method):
    sync, aio = getattr(Client, method), getattr(AsyncClient, method)
    s, a = inspect.signature(sync), inspect.signature(aio)
    assert list(s.parameters) == list(a.parameters), method
    for p in s.parameters.values():
        q = a.parameters[p.name]
        assert (p.kind, p.default) == (q.kind, q.default), f"{method}({p.name})"
    if method in STREAMS:
        assert inspect.isasyncgenfunction(aio), method
    else:
        assert inspect.iscoroutinefunction(aio), method


def test_constructors_take_the_same_arguments():
    s, a = inspect.signature(Client.__init__), inspect.signature(AsyncClient.__init__)
    assert [(p.name, p.kind, p.default) for p in s.parameters.values()] == [
        (p.name, p.kind, p.default) for p in a.parameters.values()
    ]
    for name in ("timeout", "metadata", "credentials", "compression", "retry", "keepalive_time",
                 "keepalive_timeout", "max_message_bytes", "interceptors", "options", "shared_memory"):
        assert name in s.parameters
    # Same-host shared memory is opt-in: the server must be on this host.
    assert s.parameters["shared_memory"].default is False


def test_errors_module_is_pinned():
    assert set(errors.__all__) == ERRORS | {"from_rpc_error", "from_status", "from_status_value"}
    for name in ERRORS:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.NormServeError)


def _undocumented(obj, qualname: str) -> list[str]:
    missing = [] if inspect.getdoc(obj) else [qualname]
    if inspect.isclass(obj):
        for attr, value in vars(obj).items():
            if attr.startswith("_") or not (callable(value) or isinstance(value, property)):
                continue
            if not inspect.getdoc(value):
                missing.append(f"{qualname}.{attr}")
    return missing


def test_every_public_name_has_a_docstring():
    import normserve.client.nn as nn_mod

    missing = _undocumented(sdk, "normserve.client")
    for module in (sdk, errors, nn_mod):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or name in ("Metadata", "LayerSelector"):
                continue
            missing += _undocumented(obj, f"{module.__name__}.{name}")
    for name in ("LayerInfo", "StateVersion", "NormalizeResult"):
        missing += _undocumented(getattr(types, name), f"types.{name}")
    assert not missing, f"public names without a docstring: {missing}"


def test_package_is_typed():
    root = os.path.dirname(sdk.__file__)
    assert os.path.exists(os.path.join(root, "py.typed"))


_BLOCK = """
import sys
class _Block:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in ("torch", "grpc_health", "grpc_reflection"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, _Block)
"""


def test_client_needs_neither_torch_nor_grpc_health():
    code = _BLOCK + textwrap.dedent(
        """
        import asyncio
        import normserve.client as sdk
        from normserve.client import AsyncClient, Client, RetryPolicy

        fast = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01)
        with Client("127.0.0.1:1", timeout=2, retry=fast) as c:
            assert c.ready() is False          # health via the SDK, nothing listening
            try:
                c.module("x")
            except ImportError as e:
                assert "torch" in str(e)
            else:
                raise SystemExit("module() without torch should raise ImportError")

        async def main():
            async with AsyncClient("127.0.0.1:1", timeout=2, retry=fast) as a:
                assert await a.ready() is False
        asyncio.run(main())
        import normserve.client._cli
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "grpc_health")]
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
