"""The SDK's stream packing: what goes in a pack, the bounded read-ahead, discarding."""

from __future__ import annotations

import asyncio
import collections
import itertools
import queue
import threading
import time

import grpc
import numpy as np
import pytest

from normserve.client import _core as core
from normserve.client import _packing, codec, wire
from normserve.client._packing import PACK_MAX_BYTES, PACK_MAX_REQUESTS, READ_AHEAD
from normserve.client._proto import normserve_pb2 as pb


MEASURE_ONE = lambda _: (1, 1)  # noqa: E731 - every item sized and weighed 1
KEEP = NOTE = lambda _: None  # noqa: E731


def wait_for(condition, limit=10.0):
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_take_fills_a_pack_up_to_its_request_and_byte_limits():
    ready = collections.deque(range(200))
    assert _packing.take(ready, lambda _: 1) == list(range(PACK_MAX_REQUESTS))
    sizes = collections.deque([PACK_MAX_BYTES // 3] * 5)
    assert len(_packing.take(sizes, lambda n: n)) == 3 and len(sizes) == 2
    huge = collections.deque([PACK_MAX_BYTES * 4, 1])
    assert _packing.take(huge, lambda n: n) == [PACK_MAX_BYTES * 4]  # alone, whatever its size


def test_pack_carries_a_framed_requests_bytes_in_the_message():
    x = np.arange(16_384, dtype=np.float32).reshape(64, 256)
    framed = core.stream_request("l", pb.MODE_TRAIN, x)
    assert isinstance(framed, wire.Framed)  # 64 KiB: its bytes travel beside the message
    expected = pb.NormalizeRequest.FromString(framed.SerializeToString())
    packed = _packing.pack([framed, pb.NormalizeRequest(layer="m")])
    assert packed.requests[0] == expected and packed.requests[1].layer == "m"
    assert np.array_equal(codec.to_numpy(packed.requests[0].input), x)
    assert not _packing.packs(framed) and _packing.packs(pb.NormalizeRequest())


def test_pack_sends_the_bytes_the_request_was_made_with():
    """A caller may reuse its array once the call has it: the pack holds the old values."""
    x = np.zeros((64, 256), np.float32)
    framed = core.stream_request("l", pb.MODE_TRAIN, x)
    x[...] = 7.0
    assert np.array_equal(codec.to_numpy(_packing.pack([framed]).requests[0].input), np.zeros((64, 256), np.float32))


def test_pump_reads_ahead_a_bounded_distance_and_discards_on_close():
    pulled = itertools.count()
    discarded = []

    def endless():
        while True:
            yield next(pulled)

    pump = _packing.Pump(endless(), MEASURE_ONE, discarded.append)
    wait_for(lambda: len(pump._ahead.items) == READ_AHEAD)
    time.sleep(0.05)
    assert len(pump._ahead.items) == READ_AHEAD  # it stopped there
    assert pump.take(NOTE) == list(range(PACK_MAX_REQUESTS))
    wait_for(lambda: len(pump._ahead.items) == READ_AHEAD)  # and reads on when there is room
    pump.close()
    wait_for(lambda: len(discarded) == READ_AHEAD + 1)  # and the one it held, waiting for room
    assert sorted(discarded) == list(range(PACK_MAX_REQUESTS, PACK_MAX_REQUESTS + READ_AHEAD + 1))
    assert pump.take(NOTE) == []  # closed: nothing more is handed out


def test_pump_hands_out_everything_then_the_error():
    def failing():
        yield from range(3)
        raise ValueError("bad batch")

    pump = _packing.Pump(failing(), MEASURE_ONE, KEEP)
    taken = []
    while batch := pump.take(NOTE):
        taken += batch
    assert taken == [0, 1, 2] and isinstance(pump.error, ValueError)


def test_pump_take_waits_for_the_first_item_only():
    release = threading.Event()

    def slow():
        yield 1
        release.wait(10)
        yield 2

    pump = _packing.Pump(slow(), MEASURE_ONE, KEEP)
    assert pump.take(NOTE) == [1]  # does not wait for the second
    release.set()
    assert pump.take(NOTE) == [2] and pump.take(NOTE) == []


def test_async_pump_reads_ahead_a_bounded_distance_and_discards_on_close():
    async def main():
        pulled = itertools.count()
        discarded = []

        async def endless():
            while True:
                yield next(pulled)
                await asyncio.sleep(0)

        async def settle():
            for _ in range(4 * READ_AHEAD):
                await asyncio.sleep(0)

        pump = _packing.AsyncPump(endless(), MEASURE_ONE, discarded.append)
        await settle()
        assert len(pump._ahead.items) == READ_AHEAD
        assert await pump.take() == list(range(PACK_MAX_REQUESTS))
        await settle()
        assert len(pump._ahead.items) == READ_AHEAD
        pump.close()
        await settle()
        # what was read ahead, and the one it held, waiting for room
        assert sorted(discarded) == list(range(PACK_MAX_REQUESTS, PACK_MAX_REQUESTS + READ_AHEAD + 1))
        assert await pump.take() == []

    asyncio.run(main())


@pytest.mark.parametrize("error", [ValueError("bad batch"), asyncio.CancelledError()])
def test_async_pump_hands_out_everything_then_the_error(error):
    """A source that raises, even CancelledError, fails the stream: it doesn't end it."""

    async def main():
        async def failing():
            yield 1
            raise error

        pump = _packing.AsyncPump(failing(), MEASURE_ONE, KEEP)
        assert await pump.take() == [1] and await pump.take() == []
        assert pump.error is error

    asyncio.run(main())


def test_read_ahead_is_bounded_by_bytes_too():
    """Shared-memory segments are weighed: big batches are read ahead one or a few at a time."""
    for weight, ahead in ((3 << 20, 3), (20 << 20, 1)):
        pump = _packing.Pump(itertools.repeat("x"), lambda _, w=weight: (1, w), KEEP)
        wait_for(lambda: len(pump._ahead.items) == ahead)
        time.sleep(0.05)
        assert len(pump._ahead.items) == ahead
        pump.close()
    assert _packing.measure((pb.NormalizeRequest(layer="l"), None, None)) == (3, 3)
@pytest.mark.parametrize("n", [0, 1, 5])
def test_pump_of_a_short_source_ends(n):
    pump = _packing.Pump(iter(range(n)), MEASURE_ONE, KEEP)
    assert pump.take(NOTE) == list(range(n))[:PACK_MAX_REQUESTS] and pump.take(NOTE) == [] and pump.error is None


# -- sending a refused packed stream again ---------------------------------------------------
class Failed(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    "code, details, usable, masked_usable",
    [
        (grpc.StatusCode.UNIMPLEMENTED, "Method not found!", True, True),
        (grpc.StatusCode.INTERNAL, "Internal error from Core", False, True),  # grpc.aio's mask of it
        (grpc.StatusCode.INTERNAL, "something broke", False, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open streams", False, False),
        (grpc.StatusCode.UNAVAILABLE, "connection reset", False, False),
    ],
)
def test_replay_is_used_only_for_a_refused_rpc_before_any_answer(code, details, usable, masked_usable):
    replay = _packing.Replay()
    assert replay.usable(Failed(code, details)) is usable
    assert replay.usable(Failed(code, details), masked=True) is masked_usable
    replay.answered()
    assert replay.usable(Failed(code, details), masked=True) is False


def test_replay_keeps_what_was_sent_until_the_first_answer_only():
    replay = _packing.Replay()
    replay.record([1, 2])
    replay.record([3])
    assert list(replay.items) == [1, 2, 3]
    replay.answered()
    replay.record([4])
    assert not replay.items


def test_a_refused_streams_items_are_taken_again_first_and_its_sender_takes_nothing_more():
    gate: queue.Queue = queue.Queue()
    discarded: list = []
    pump = _packing.Pump(iter(gate.get, None), MEASURE_ONE, discarded.append)  # items as the test lets them
    replay = _packing.Replay()
    sent = collections.deque()

    def record(taken):  # as the packed call's sender records what it sends
        replay.record(taken)
        sent.extend(taken)

    gate.put(0)
    gate.put(1)
    wait_for(lambda: len(pump._ahead.items) == 2)
    assert pump.take(record, stop=lambda: replay.refused) == [0, 1]
    # The call is refused while its sender waits for more.
    after_refusal: list = []
    sender = threading.Thread(target=lambda: after_refusal.append(pump.take(record, stop=lambda: replay.refused)))
    sender.start()
    time.sleep(0.05)
    assert sender.is_alive()
    pump.requeue(lambda: replay.refuse(sent))
    sender.join(5)
    assert after_refusal == [[]] and not sent  # what the new call takes is recorded anew
    gate.put(2)
    wait_for(lambda: len(pump._ahead.items) == 3)
    assert pump.take(sent.extend) == [0, 1, 2] and list(sent) == [0, 1, 2]
    gate.put(3)
    wait_for(lambda: len(pump._ahead.items) == 1)
    replay2 = _packing.Replay()
    replay2.record([2])
    pump.requeue(lambda: replay2.refuse(collections.deque()))
    pump.close()  # a stream ending before the new call took them: the items are discarded
    assert discarded == [2, 3]


def test_async_pump_requeues_a_refused_streams_items_in_front():
    async def main():
        async def three():
            for i in range(3):
                yield i

        pump = _packing.AsyncPump(three(), MEASURE_ONE, KEEP)
        for _ in range(10):
            await asyncio.sleep(0)  # the pump reads all three
        replay = _packing.Replay()
        first = await pump.take()
        replay.record(first)
        pump.requeue(lambda: replay.refuse(collections.deque()))
        assert await pump.take(stop=lambda: replay.refused) == []
        return first, await pump.take()

    first, again = asyncio.run(main())
    assert first == [0, 1, 2] and again == [0, 1, 2]
