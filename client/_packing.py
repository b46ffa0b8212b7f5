"""Several stream requests per gRPC message (NormalizeStreamPacked).

gRPC costs about the same per message whatever its size, and for small tensors that cost
is most of a request. So a stream reads the caller's batches ahead (a bounded distance)
and sends every request that is ready as one NormalizePack. It never waits for more: a
lone request goes at once, so packing adds no latency, only fewer messages.

A stream whose first request carries a tensor of 32 KiB or more (wire.MIN_FRAMED_BYTES) uses
NormalizeStream instead: there the bytes, not the messages, are the cost, and its messages
carry the tensor without protobuf copying it. Requests through shared memory are small
whatever the tensor, so they are packed; their segments count towards the read-ahead.

A client asks once whether the server has NormalizeStreamPacked. Behind a balancer, a
stream may still reach a replica of an older version, which refuses it (UNIMPLEMENTED)
before running any of it: the requests sent until the first answer are kept (Replay), and
then sent again, with the rest, over NormalizeStream.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any, AsyncIterator, Callable, Generic, Iterator, Optional, TypeVar

import grpc

from . import _shm, wire
from ._proto import normserve_pb2 as pb

T = TypeVar("T")

_AIO_WRITE_AFTER_END = "Internal error from Core"
_READER_EXIT_SECONDS = 1.0

# Requests per pack at most (the server takes up to 1,024), and the bytes a pack may reach
# before it is sent with what it holds: packs stay far below any message size limit.
PACK_MAX_REQUESTS = 64
PACK_MAX_BYTES = 1 << 20
# Read ahead of what was sent, at most: this many batches, and this many bytes of messages
# and shared-memory segments (one batch always). Bounds what a fast iterator can take.
READ_AHEAD = 2 * PACK_MAX_REQUESTS
READ_AHEAD_BYTES = 8 << 20


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


def measure(item: Item) -> tuple[int, int]:
    """(what an item adds to a pack, what it holds while read ahead: its message and its
    shared-memory segment), measured once per item."""
    size = request_bytes(item[0])
    return size, size + (item[2].size if item[2] is not None else 0)


def note_sent(sent: "collections.deque[Any]", taken: list[Item]) -> None:
    """Record taken items as sent: (device, segment) each, in order (see core.stream_answer)."""
    sent.extend((device, segment) for _, device, segment in taken)


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


class _ReadAhead(Generic[T]):
    """The items read but not taken yet, each with its pack size and weight, and their
    total weight."""

    def __init__(self, measure: Callable[[T], tuple[int, int]]):
        self.items: collections.deque[tuple[T, int, int]] = collections.deque()
        self.measure = measure
        self.bytes = 0

    def full(self) -> bool:
        return len(self.items) >= READ_AHEAD or (bool(self.items) and self.bytes >= READ_AHEAD_BYTES)

    def add(self, item: T) -> None:
        size, weight = self.measure(item)
        self.items.append((item, size, weight))
        self.bytes += weight

    def push_front(self, items: list[T]) -> None:
        for item in reversed(items):
            size, weight = self.measure(item)
            self.items.appendleft((item, size, weight))
            self.bytes += weight

    def take(self) -> list[T]:
        taken = take(self.items, lambda entry: entry[1])
        self.bytes -= sum(weight for _, _, weight in taken)
        return [item for item, _, _ in taken]

    def clear(self) -> list[T]:
        left = [item for item, _, _ in self.items]
        self.items.clear()
        self.bytes = 0
        return left


class Replay(Generic[T]):
    """A packed stream's items from its start until its first answer. If the server
    refuses the packed RPC before answering, `refuse` hands them back (for the pump to send
    again, first, over NormalizeStream), and from then on the refused call's sender takes
    nothing more from the pump (`refused`)."""

    def __init__(self) -> None:
        self.items: collections.deque[T] = collections.deque()
        self.keeping = True  # until the first answer: afterwards nothing is sent again
        self.refused = False

    def answered(self) -> None:
        # Not under the pump's lock: a pack recorded at the same moment may stay in `items`,
        # unused, until the stream ends.
        if self.keeping:
            self.keeping = False
            self.items.clear()

    def record(self, taken: list[T]) -> None:
        if self.keeping:
            self.items.extend(taken)

    def refuse(self, sent: "collections.deque[Any]") -> list[T]:
        """The items to send again; what the refused call recorded as sent (`sent`) is
        recorded again as the new call takes them."""
        self.refused = True
        self.keeping = False
        sent.clear()
        kept = list(self.items)
        self.items.clear()
        return kept

    def usable(self, error: grpc.RpcError, masked: bool = False) -> bool:
        """Whether a packed call that failed with `error` is sent again unpacked: the
        server has no NormalizeStreamPacked, and so ran nothing. With `masked` (grpc.aio),
        also when a write into the call after the server had ended it replaced that status
        with a local INTERNAL (grpc/grpc#36066): then the server may have run requests whose
        answers were lost, and sending them again is safe within its idempotency window
        (train requests carry ids the server applies once; eval changes nothing)."""
        if not self.keeping:
            return False
        code = error.code()
        return code == grpc.StatusCode.UNIMPLEMENTED or (
            masked and code == grpc.StatusCode.INTERNAL and error.details() == _AIO_WRITE_AFTER_END
        )


class Pump(Generic[T]):
    """Reads `source` on a thread of its own, a bounded distance ahead (see READ_AHEAD);
    `take` hands out what is ready. The caller's iterator may block (a data loader, a
    window of requests in flight) while what it already gave is being sent."""

    def __init__(self, source: Iterator[T], measure: Callable[[T], tuple[int, int]], discard: Callable[[T], None]):
        self._source = source
        self._discard = discard  # for items read but never taken
        self._ahead = _ReadAhead(measure)
        self._cond = threading.Condition()
        self._done = False  # the source is exhausted or failed
        self._closed = False
        self.error: Optional[BaseException] = None  # what the source (or building) raised
        threading.Thread(target=self._read, name="normserve-stream-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            for item in self._source:
                with self._cond:
                    while self._ahead.full() and not self._closed:
                        self._cond.wait()
                    if not self._closed:
                        self._ahead.add(item)
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

    def take(self, record: Callable[[list[T]], None], stop: Callable[[], bool] = lambda: False) -> list[T]:
        """The ready items that fit one pack, waiting for the first; [] at the end, once
        closed, or once `stop()` (asked under the lock; see requeue). `record` sees them
        first, under the lock: once close() has returned, no item is handed out any more."""
        with self._cond:
            while not self._ahead.items and not self._done and not self._closed and not stop():
                self._cond.wait()
            if not self._ahead.items or self._closed or stop():
                return []
            taken = self._ahead.take()
            record(taken)
            self._cond.notify_all()
            return taken

    def requeue(self, take_back: Callable[[], list[T]]) -> None:
        """Under the lock: the items `take_back()` returns (taken before) go back in front,
        to be taken again first (or discarded by close()); then every take() asks its
        `stop` again."""
        with self._cond:
            self._ahead.push_front(take_back())
            self._cond.notify_all()

    def close(self) -> None:
        """Stop reading and discard what was read but not taken (an item being read now
        is discarded when it arrives)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            left = self._ahead.clear()
        for item in left:
            self._discard(item)


class AsyncPump(Generic[T]):
    """Pump for the AsyncClient: a task reads `source` ahead."""

    def __init__(
        self, source: AsyncIterator[T], measure: Callable[[T], tuple[int, int]], discard: Callable[[T], None]
    ):
        self._source = source
        self._discard = discard
        self._ahead = _ReadAhead(measure)
        self._holding: Optional[T] = None  # an item read while the read-ahead is full
        self._changed = asyncio.Event()  # set whenever the read-ahead or _done changes
        self._done = False
        self._closed = False
        self.error: Optional[BaseException] = None
        self._task = asyncio.ensure_future(self._read())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _read(self) -> None:
        try:
            async for item in self._source:
                self._holding = item
                while self._ahead.full() and not self._closed:
                    await self._changed.wait()
                self._holding = None
                if self._closed:
                    self._discard(item)
                    return
                self._ahead.add(item)
                self._notify()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's task
            if not self._closed:  # else: close() cancelled this task
                self.error = e
        finally:
            self._done = True
            self._notify()

    async def take(self, stop: Callable[[], bool] = lambda: False) -> list[T]:
        """The ready items that fit one pack, waiting for the first; [] at the end, once
        closed, or once `stop()` (see requeue)."""
        while not self._ahead.items and not self._done and not self._closed and not stop():
            await self._changed.wait()
        if not self._ahead.items or self._closed or stop():
            return []
        taken = self._ahead.take()
        self._notify()
        return taken

    def requeue(self, take_back: Callable[[], list[T]]) -> None:
        """As Pump.requeue."""
        self._ahead.push_front(take_back())
        self._notify()

    def close(self) -> None:
        """Stop reading and discard what was read but not taken."""
        self._closed = True
        self._task.cancel()
        left = self._ahead.clear()
        if self._holding is not None:
            left.append(self._holding)
            self._holding = None
        for item in left:
            self._discard(item)
        self._notify()

    async def aclose(self) -> None:
        """close(), then wait (a second at most) for the reading task to end: a batch it
        was preparing (e.g. registering its shared-memory segment) is given back by then."""
        self.close()
        await asyncio.wait([self._task], timeout=_READER_EXIT_SECONDS)
