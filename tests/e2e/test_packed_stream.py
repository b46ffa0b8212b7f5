"""NormalizeStreamPacked over a real server, and the SDK's choice of stream RPC.

The per-request semantics (order, parity, per-request errors) are shared with
NormalizeStream and checked for both RPCs in test_streaming.py; this file checks what is
particular to packs: whole-pack refusals, and how the SDK packs what it sends.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from normserve.client import AsyncClient, Client, codec, wire
from normserve.client import errors as E
from normserve.client._packing import PACK_MAX_REQUESTS
from normserve.client._proto import normserve_pb2 as pb
from normserve.client._proto import normserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

RPC_TIMEOUT = 60
SERVICE = "normserve.v1.NormService"


def train_request(layer: str, x: np.ndarray) -> pb.NormalizeRequest:
    return pb.NormalizeRequest(layer=layer, mode=pb.MODE_TRAIN, input=codec.encode(x))


def local_outputs(module: torch.nn.Module, batches, train: bool) -> list[torch.Tensor]:
    module.train(train)
    with torch.no_grad():
        return [module(torch.from_numpy(x)) for x in batches]


def assert_state(client, name, module: torch.nn.Module) -> None:
    state = client.get_state(name, as_torch=True)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


# -- whole-pack refusals -------------------------------------------------------------------
def test_oversized_pack_fails_the_stream_and_none_of_its_requests_run(client, channel, name):
    client.create_layer(name, "BatchNorm1d", num_features=4)
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    first = pb.NormalizePack(requests=[train_request(name, x)] * 2)
    too_many = pb.NormalizePack(requests=[train_request(name, x)] * 1025)
    answers = []
    with pytest.raises(grpc.RpcError) as info:
        for answer in pb_grpc.NormServiceStub(channel).NormalizeStreamPacked(iter([first, too_many]), timeout=RPC_TIMEOUT):
            answers.append(answer)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1024 requests; this one holds more" in info.value.details()
    assert [len(a.responses) for a in answers] == [2]  # the pack before it was answered
    assert client.get_layer(name).state.version == 2  # and none of the big pack's requests ran


def test_undecodable_pack_fails_the_stream_and_none_of_its_requests_run(client, channel, name):
    client.create_layer(name, "BatchNorm1d", num_features=4)
    good = train_request(name, np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)).SerializeToString()
    call = channel.stream_stream(f"/{SERVICE}/NormalizeStreamPacked", request_serializer=None, response_deserializer=None)
    for bad in (b"\x0a\x02\xff\xfe", b"\x0a\xff\xff\xff\xff\x0f"):  # bad UTF-8 in a request; a length past the end
        pack = b"\x0a" + wire._varint(len(good)) + good + bad
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([pack]), timeout=RPC_TIMEOUT))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid normserve.v1.NormalizePack message" in info.value.details()
    assert client.get_layer(name).state.version == 0


def test_a_large_tensor_in_a_pack_travels_in_the_message(client, channel, name):
    """Packs carry plain messages: a tensor over the framing threshold is answered too."""
    client.create_layer(name, "BatchNorm2d", num_features=3)
    g = np.random.default_rng(2)
    big = g.normal(size=(8, 3, 32, 32)).astype(np.float32)  # 96 KiB
    small = g.normal(size=(2, 3, 2, 2)).astype(np.float32)
    assert big.nbytes > wire.MIN_FRAMED_BYTES
    pack = pb.NormalizePack(requests=[train_request(name, small), train_request(name, big)])
    (answer,) = pb_grpc.NormServiceStub(channel).NormalizeStreamPacked(iter([pack]), timeout=RPC_TIMEOUT)
    expected = local_outputs(torch.nn.BatchNorm2d(3), [small, big], train=True)
    for response, want in zip(answer.responses, expected):
        assert response.WhichOneof("result") == "response", response.error
        torch.testing.assert_close(torch.from_numpy(codec.to_numpy(response.response.output)), want, rtol=1e-5, atol=1e-5)


# -- the SDK's stream ---------------------------------------------------------------------------
class RecordingInterceptor(grpc.StreamStreamClientInterceptor):
    """Records each stream call's method and the messages it sent."""

    def __init__(self):
        self.calls: list[tuple[str, list]] = []

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        sent: list = []
        self.calls.append((client_call_details.method, sent))

        def recorded():
            for message in request_iterator:
                sent.append(message)
                yield message

        return continuation(client_call_details, recorded())


@pytest.fixture
def recorded(server):
    interceptor = RecordingInterceptor()
    with Client(server.target, timeout=30, interceptors=[interceptor]) as c:
        yield c, interceptor


def test_sdk_packs_small_batches_and_matches_torch(recorded, name):
    client, interceptor = recorded
    client.create_layer(name, "BatchNorm1d", num_features=4, momentum=None)
    g = np.random.default_rng(3)
    batches = [g.normal(g.uniform(-2, 2), g.uniform(0.5, 3), (5, 4)).astype(np.float32) for _ in range(500)]
    outputs = list(client.normalize_stream(name, batches, mode="train"))

    local = torch.nn.BatchNorm1d(4, momentum=None)
    for got, want in zip(outputs, local_outputs(local, batches, train=True), strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    assert_state(client, name, local)
    (probe, probe_messages), (method, packs) = interceptor.calls  # a new client asks once
    assert probe.endswith("/NormalizeStreamPacked") and probe_messages == []
    assert method.endswith("/NormalizeStreamPacked")
    sizes = [len(p.requests) for p in packs]
    assert sum(sizes) == 500 and max(sizes) <= PACK_MAX_REQUESTS
    # The caller's list is read ahead while packs are on their way, so packs hold several.
    assert len(packs) < 500, sizes


def test_sdk_streams_large_batches_unpacked(recorded, name):
    client, interceptor = recorded
    client.create_layer(name, "BatchNorm2d", num_features=3)
    x = np.random.default_rng(4).normal(size=(8, 3, 32, 32)).astype(np.float32)
    outputs = list(client.normalize_stream(name, [x, x], mode="eval"))
    assert len(outputs) == 2
    ((method, messages),) = interceptor.calls  # no probe: it is asked only for small batches
    assert method.endswith("/NormalizeStream") and len(messages) == 2


def test_sdk_packed_stream_with_a_large_batch_midway_matches_torch(recorded, name):
    """The first batch decides the RPC; a large batch later in a packed stream still works."""
    client, interceptor = recorded
    client.create_layer(name, "BatchNorm2d", num_features=3)
    g = np.random.default_rng(5)
    batches = [g.normal(size=(2, 3, 4, 4)).astype(np.float32), g.normal(size=(16, 3, 32, 32)).astype(np.float32)]
    batches += [g.normal(size=(3, 3, 2, 2)).astype(np.float32) for _ in range(5)]
    outputs = list(client.normalize_stream(name, batches, mode="train"))
    local = torch.nn.BatchNorm2d(3)
    for got, want in zip(outputs, local_outputs(local, batches, train=True), strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    assert_state(client, name, local)
    assert [method.rsplit("/", 1)[1] for method, _ in interceptor.calls] == ["NormalizeStreamPacked"] * 2


def test_async_sdk_packs_small_batches_and_matches_torch(server, name):
    g = np.random.default_rng(6)
    batches = [g.normal(size=(4, 4)).astype(np.float32) for _ in range(300)]

    async def main():
        async with AsyncClient(server.target, timeout=30) as c:
            await c.create_layer(name, "BatchNorm1d", num_features=4)

            async def source():
                for x in batches:
                    yield x

            return [y async for y in c.normalize_stream(name, source(), mode="train")]

    outputs = asyncio.run(main())
    local = torch.nn.BatchNorm1d(4)
    for got, want in zip(outputs, local_outputs(local, batches, train=True), strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    with Client(server.target, timeout=30) as c:
        assert c.get_layer(name).state.version == 300
        assert_state(c, name, local)


def test_sdk_stops_reading_an_endless_iterator_when_the_caller_stops(client, name):
    """Stopping early stops the reader thread (tests/unit/test_packing.py: read-ahead is bounded)."""
    client.create_layer(name, "BatchNorm1d", num_features=4)
    x = np.ones((2, 4), np.float32)
    pulled = itertools.count()

    def endless():
        while True:
            next(pulled)
            yield x

    readers_before = sum(t.name == "normserve-stream-reader" for t in threading.enumerate())
    for i, _ in enumerate(client.normalize_stream(name, endless(), mode="eval")):
        if i == 20:
            break
    deadline = time.monotonic() + 10
    while sum(t.name == "normserve-stream-reader" for t in threading.enumerate()) > readers_before:
        assert time.monotonic() < deadline, "the stream's reader thread did not stop"
        time.sleep(0.01)
    count = next(pulled)
    time.sleep(0.2)
    assert next(pulled) == count + 1  # nothing was read since


def test_sdk_packed_stream_raises_the_error_at_its_position(client, name):
    client.create_layer(name, "BatchNorm1d", num_features=4)
    good, bad = np.ones((2, 4), np.float32), np.ones((2, 5), np.float32)
    outputs = []
    with pytest.raises(E.InvalidArgumentError) as info:
        for y in client.normalize_stream(name, [good] * 10 + [bad] + [good] * 10, mode="train"):
            outputs.append(y)
    assert info.value.sequence == 10 and len(outputs) == 10


# -- a server without NormalizeStreamPacked --------------------------------------------------------
def proxy(server, **stream_handlers):
    """A proxy on 127.0.0.1 that forwards every NormService method to the real server.
    A stream method named in `stream_handlers` gets `factory(forward)` as its handler
    instead (factory None: the proxy has no such method)."""
    upstream = grpc.insecure_channel(server.target)
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["NormService"].methods:
        path = f"/{SERVICE}/{method.name}"
        if method.client_streaming:
            forward = upstream.stream_stream(path, request_serializer=None, response_deserializer=None)
            factory = stream_handlers.get(method.name, lambda f: lambda it, ctx: f(it))
            if factory is not None:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(factory(forward))
        else:
            forward = upstream.unary_unary(path, request_serializer=None, response_deserializer=None)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(lambda req, ctx, f=forward: f(req))
    server = grpc.server(ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return f"127.0.0.1:{port}", lambda: (server.stop(None), upstream.close())


@pytest.fixture(scope="module")
def older_server(server):
    """A server of the API before NormalizeStreamPacked."""
    target, stop = proxy(server, NormalizeStreamPacked=None)
    yield target
    stop()


@pytest.fixture
def mixed_versions(server):
    """Replicas of two versions behind a balancer: the client's question (the first
    NormalizeStreamPacked call) reaches one that has the RPC, every later packed stream
    one that answers UNIMPLEMENTED, as a server without the method does (after `delay`
    seconds, while the client sends packs; `stream_refusal`: NormalizeStream is refused
    too, with that status)."""
    stops = []

    def make(delay=0.0, stream_refusal=None):
        calls = itertools.count()

        def packed(forward):
            def handler(requests, context):
                if next(calls):
                    time.sleep(delay)
                    context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
                return forward(requests)

            return handler

        def stream(forward):
            def handler(requests, context):
                if stream_refusal is not None:
                    context.abort(stream_refusal, "refused by the test")
                return forward(requests)

            return handler

        target, stop = proxy(server, NormalizeStreamPacked=packed, NormalizeStream=stream)
        stops.append(stop)
        return target

    yield make
    for stop in stops:
        stop()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_sdk_streams_unpacked_to_a_server_without_packs(older_server, name, kind):
    g = np.random.default_rng(7)
    batches = [g.normal(size=(4, 4)).astype(np.float32) for _ in range(50)]
    local = torch.nn.BatchNorm1d(4)
    expected = local_outputs(local, batches, train=True)
    halves = (batches[:25], batches[25:])  # two streams: the answer is asked once, remembered
    if kind == "sync":
        with Client(older_server, timeout=30) as c:
            c.create_layer(name, "BatchNorm1d", num_features=4)
            outputs = [y for half in halves for y in c.normalize_stream(name, half, mode="train")]
            assert c._packed is False
    else:

        async def main():
            async with AsyncClient(older_server, timeout=30) as c:
                await c.create_layer(name, "BatchNorm1d", num_features=4)
                got = []
                for half in halves:
                    got += [y async for y in c.normalize_stream(name, half, mode="train")]
                assert c._packed is False
                return got

        outputs = asyncio.run(main())
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


def windowed(batches, window: threading.Semaphore):
    """The caller's iterator of a window of requests in flight: the next batch only once
    an answer has freed a place."""
    for x in batches:
        window.acquire()
        yield x


def segments_settled(client, wait: float = 5.0) -> bool:
    """Every shared-memory segment is free again (within `wait`: the sync client's reader
    thread gives back the batch it was preparing once that is done)."""
    pool = client._segments
    deadline = time.monotonic() + wait
    while len(pool._free) != len(pool._all) and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(pool._free) == len(pool._all)


@pytest.mark.parametrize("delay", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["sync", "async", "sync-shm", "async-shm"])
def test_sdk_sends_a_refused_packed_stream_again_unpacked(mixed_versions, name, kind, delay):
    """Every batch is applied once, in order: outputs and running stats match torch (a
    refusal after 0.3 s: several packs were sent and are sent again)."""
    target = mixed_versions(delay)
    shm = kind.endswith("shm")
    g = np.random.default_rng(11)
    batches = [g.normal(g.uniform(-2, 2), 1.5, (6, 4)).astype(np.float32) for _ in range(300)]
    local = torch.nn.BatchNorm1d(4, momentum=None)
    expected = local_outputs(local, batches, train=True)
    halves = (batches[:150], batches[150:])  # two streams: each is refused, each is sent again
    if kind.startswith("sync"):
        with Client(target, timeout=30, shared_memory=shm) as c:
            c.create_layer(name, "BatchNorm1d", num_features=4, momentum=None)
            window = threading.Semaphore(100)
            outputs = []
            for half in halves:
                for y in c.normalize_stream(name, windowed(half, window), mode="train"):
                    outputs.append(y)
                    window.release()
            assert c._packed is True  # the next stream may reach a replica that has packs
            assert not shm or segments_settled(c)
            assert_state(c, name, local)
    else:

        async def main():
            async with AsyncClient(target, timeout=30, shared_memory=shm) as c:
                await c.create_layer(name, "BatchNorm1d", num_features=4, momentum=None)
                got = []
                for half in halves:
                    got += [y async for y in c.normalize_stream(name, half, mode="train")]
                assert c._packed is True
                assert not shm or segments_settled(c)
                return got

        outputs = asyncio.run(main())
        with Client(target, timeout=30) as c:
            assert_state(c, name, local)
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_refused_packed_stream_whose_resend_fails_raises_its_error_and_leaks_no_segment(mixed_versions, name, kind):
    target = mixed_versions(0.3, grpc.StatusCode.RESOURCE_EXHAUSTED)
    batches = [np.ones((6, 4), np.float32) * i for i in range(150)]
    if kind == "sync":
        with Client(target, timeout=30, shared_memory=True) as c:
            c.create_layer(name, "BatchNorm1d", num_features=4)
            with pytest.raises(E.ResourceExhaustedError, match="refused by the test"):
                list(c.normalize_stream(name, batches, mode="train"))
            assert segments_settled(c)
            assert c.get_layer(name).state.version == 0
    else:

        async def main():
            async with AsyncClient(target, timeout=30, shared_memory=True) as c:
                await c.create_layer(name, "BatchNorm1d", num_features=4)
                # grpc.aio may report a refusal that meets a write as INTERNAL (grpc/grpc#36066)
                with pytest.raises((E.ResourceExhaustedError, E.InternalError)):
                    [y async for y in c.normalize_stream(name, batches, mode="train")]
                assert segments_settled(c)
                assert (await c.get_layer(name)).state.version == 0

        asyncio.run(main())
