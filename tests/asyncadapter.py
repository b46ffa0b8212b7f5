"""Drive an AsyncClient from synchronous tests.

`SyncAsyncClient` owns an event loop running in a background thread and creates the
AsyncClient on it; every coroutine method is run there and waited for, and async
iterators (normalize_stream*) are pulled one item at a time. Results and exceptions are
the AsyncClient's own, so a test written for the sync Client runs unchanged against the
async one.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

from normserve.client import AsyncClient

_CALL_TIMEOUT = 300  # seconds: a hung call fails the test instead of hanging it


class SyncAsyncClient:
    def __init__(self, target: str, **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="async-client-loop", daemon=True)
        self._thread.start()

        async def make() -> AsyncClient:
            return AsyncClient(target, **kwargs)

        self.aclient: AsyncClient = self._wait(make())

    def _wait(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT)

    def _iterate(self, agen: Any) -> Any:
        try:
            while True:
                try:
                    yield self._wait(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._wait(agen.aclose())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.aclient, name)
        if inspect.isasyncgenfunction(attr):
            return lambda *a, **k: self._iterate(attr(*a, **k))
        if inspect.iscoroutinefunction(attr):
            return lambda *a, **k: self._wait(attr(*a, **k))
        return attr

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._wait(self.aclient.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> "SyncAsyncClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
