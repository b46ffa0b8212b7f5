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
@pytest.fixture(scope="module")
def older_server(server):
    """A server of the API before NormalizeStreamPacked: a proxy on 127.0.0.1 that forwards
    every other NormService method to the real server, so this one is UNIMPLEMENTED."""
    upstream = grpc.insecure_channel(server.target)
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["NormService"].methods:
        if method.name == "NormalizeStreamPacked":
            continue
        path = f"/{SERVICE}/{method.name}"
        if method.client_streaming:
            forward = upstream.stream_stream(path, request_serializer=None, response_deserializer=None)
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(lambda it, ctx, f=forward: f(it))
        else:
            forward = upstream.unary_unary(path, request_serializer=None, response_deserializer=None)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(lambda req, ctx, f=forward: f(req))
    proxy = grpc.server(ThreadPoolExecutor(8))
    proxy.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = proxy.add_insecure_port("127.0.0.1:0")
    proxy.start()
    yield f"127.0.0.1:{port}"
    proxy.stop(None)
    upstream.close()


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
