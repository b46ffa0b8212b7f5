"""Several stream requests per gRPC message (NormalizeStreamPacked).

gRPC costs about the same per message whatever its size, and for small tensors that cost
is most of a request. So a stream reads the caller's batches ahead (a bounded distance)
and sends every request that is ready as one NormalizePack. It never waits for more: a
lone request goes at once, so packing adds no latency, only fewer messages.

A stream whose first request carries a tensor of 32 KiB or more (wire.MIN_FRAMED_BYTES) uses
NormalizeStream instead: there the bytes, not the messages, are the cost, and its messages
carry the tensor without protobuf copying it.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any, AsyncIterator, Callable, Generic, Iterator, Optional, TypeVar

from . import _shm, wire
from ._proto import normserve_pb2 as pb

T = TypeVar("T")

# Requests per pack at most (the server takes up to 1,024), and the bytes a pack may reach
# before it is sent with what it holds: packs stay far below any message size limit.
PACK_MAX_REQUESTS = 64
PACK_MAX_BYTES = 1 << 20
# Batches read ahead of what was sent, at most: bounds the memory a fast iterator can take.
READ_AHEAD = 2 * PACK_MAX_REQUESTS


def packs(request: Any) -> bool:
    """Whether a stream starting with `request` is sent in packs."""
    return not isinstance(request, wire.Framed)


def request_bytes(request: Any) -> int:
    if isinstance(request, wire.Framed):
        return len(request.SerializeToString())
    return int(request.ByteSize())


# A stream request as the clients prepare it: (message, the batch's torch device or None,
# its shared-memory segment or None).
Item = tuple[Any, Any, Optional[_shm.Segment]]


def item_bytes(item: Item) -> int:
    return request_bytes(item[0])


def discarder(pool: Optional[_shm.SegmentPool]) -> Callable[[Item], None]:
    """What to do with an item read ahead but never sent: its segment is free again."""

    def discard(item: Item) -> None:
        if item[2] is not None and pool is not None:
            pool.settle(item[2], clean=True)

    return discard


def pack(requests: list[Any]) -> pb.NormalizePack:
    """A NormalizePack of `requests` (a Framed one's bytes go into the message)."""
    return pb.NormalizePack(requests=[wire.plain(r) for r in requests])


def take(ready: "collections.deque[T]", size: Callable[[T], int]) -> list[T]:
    """The first of `ready` and as many after it as fit one pack (removed from `ready`)."""
    taken = [ready.popleft()]
    total = size(taken[0])
    while ready and len(taken) < PACK_MAX_REQUESTS:
        total += size(ready[0])
        if total > PACK_MAX_BYTES:
            break
        taken.append(ready.popleft())
    return taken


class Pump(Generic[T]):
    """Reads `source` on a thread of its own into a queue of at most READ_AHEAD items;
    `take` hands out what is ready. The caller's iterator may block (a data loader, a
    window of requests in flight) while what it already gave is being sent."""

    def __init__(self, source: Iterator[T], size: Callable[[T], int], discard: Callable[[T], None]):
        self._source = source
        self._size = size
        self._discard = discard  # for items read but never taken
        self._ready: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()
        self._done = False  # the source is exhausted, failed, or reading stopped
        self._closed = False
        self.error: Optional[BaseException] = None  # what the source (or building) raised
        threading.Thread(target=self._read, name="normserve-stream-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            for item in self._source:
                with self._cond:
                    while len(self._ready) >= READ_AHEAD and not self._closed:
                        self._cond.wait()
                    if not self._closed:
                        self._ready.append(item)
                        self._cond.notify_all()
                        continue
                self._discard(item)
                return
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self.error = e
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def take(self) -> list[T]:
        """The ready items that fit one pack, waiting for the first; [] at the end (or
        once closed)."""
        with self._cond:
            while not self._ready and not self._done and not self._closed:
                self._cond.wait()
            if not self._ready:
                return []
            taken = take(self._ready, self._size)
            self._cond.notify_all()
            return taken

    def close(self) -> None:
        """Stop reading and discard what was read but not taken (an item being read now
        is discarded when it arrives)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            left = list(self._ready)
            self._ready.clear()
        for item in left:
            self._discard(item)


class AsyncPump(Generic[T]):
    """Pump for the AsyncClient: a task reads `source` ahead, READ_AHEAD items at most."""

    def __init__(self, source: AsyncIterator[T], size: Callable[[T], int], discard: Callable[[T], None]):
        self._source = source
        self._size = size
        self._discard = discard
        self._ready: collections.deque[T] = collections.deque()
        self._changed = asyncio.Event()  # set whenever _ready or _done changes
        self._done = False
        self._closed = False
        self.error: Optional[Exception] = None
        self._task = asyncio.ensure_future(self._read())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _read(self) -> None:
        try:
            async for item in self._source:
                while len(self._ready) >= READ_AHEAD and not self._closed:
                    await self._changed.wait()
                if self._closed:
                    self._discard(item)
                    return
                self._ready.append(item)
                self._notify()
        except Exception as e:  # noqa: BLE001 - handed to the caller's task
            self.error = e
        finally:
            self._done = True
            self._notify()

    async def take(self) -> list[T]:
        """The ready items that fit one pack, waiting for the first; [] at the end."""
        while not self._ready and not self._done and not self._closed:
            await self._changed.wait()
        if not self._ready:
            return []
        taken = take(self._ready, self._size)
        self._notify()
        return taken

    def close(self) -> None:
        """Stop reading and discard what was read but not taken."""
        self._closed = True
        self._task.cancel()
        while self._ready:
            self._discard(self._ready.popleft())
        self._notify()
