"""NormalizeStream (and NormalizeStreamPacked) over a real server: order, parity with local
torch and with unary calls, per-message errors, cancellation, concurrency, empty streams,
stream deadlines.

Expectations are computed with local torch modules fed the same batches.
"""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from normserve.client import codec
from normserve.client import errors as E
from normserve.client._proto import normserve_pb2 as pb
from normserve.client._proto import normserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

RPC_TIMEOUT = 60
# Streams are checked for order and state, not for the last ulp: torch's own CPU kernels
# differ by a few 1e-6 between thread counts (the server runs torch with 1 thread).
TOL = dict(rtol=1e-5, atol=1e-5)


# -- helpers -----------------------------------------------------------------------------
def batch(g: np.random.Generator, shape) -> np.ndarray:
    return g.normal(g.uniform(-2, 2), g.uniform(0.5, 3), shape).astype(np.float32)


def run_local(module: torch.nn.Module, x, train: bool) -> torch.Tensor:
    module.train(train)
    with torch.no_grad():
        return module(torch.as_tensor(x))


def assert_close(actual, expected: torch.Tensor) -> None:
    """Server output (numpy or torch) vs. local torch, within the parity tolerance."""
    if not torch.is_tensor(actual):
        actual = torch.from_numpy(np.asarray(actual))
    torch.testing.assert_close(actual, expected, **TOL)


def assert_state_matches(client, name, module: torch.nn.Module) -> None:
    state = client.get_state(name, as_torch=True)
    expected = module.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, **TOL, msg=lambda m, k=key: f"state[{k!r}]: {m}")


def request(layer, x, mode=pb.MODE_TRAIN, request_id="") -> pb.NormalizeRequest:
    return pb.NormalizeRequest(layer=layer, mode=mode, input=codec.encode(x), request_id=request_id)


def wait_until_stable(client, name, quiet=0.3, limit=15.0):
    """The layer's StateVersion once it has stopped moving for `quiet` seconds."""
    deadline = time.monotonic() + limit
    last, since = client.get_layer(name).state, time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "state kept changing after the stream was cancelled"
        time.sleep(0.05)
        now = client.get_layer(name).state
        if now != last:
            last, since = now, time.monotonic()
    return last


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.NormServiceStub(channel)
    channel.close()


@pytest.fixture(params=["NormalizeStream", "NormalizeStreamPacked"])
def exchange(request, stub):
    """Requests in, one NormalizeStreamResponse per request out, through one stream of
    either RPC. Packed: the requests go in packs of 1 to 5 (and an empty one), and every
    pack must be answered by a pack of as many responses."""
    if request.param == "NormalizeStream":
        return lambda requests: list(stub.NormalizeStream(iter(requests), timeout=RPC_TIMEOUT))

    def packed(requests):
        g = np.random.default_rng(len(requests))
        packs, i = [pb.NormalizePack()], 0
        while i < len(requests):
            n = int(g.integers(1, 6))
            packs.append(pb.NormalizePack(requests=requests[i:i + n]))
            i += n
        answers = list(stub.NormalizeStreamPacked(iter(packs), timeout=RPC_TIMEOUT))
        assert [len(a.responses) for a in answers] == [len(p.requests) for p in packs]
        return [r for a in answers for r in a.responses]

    return packed


# -- order and parity --------------------------------------------------------------------
def test_one_response_per_request_in_order_matching_torch(client, exchange, name):
    """40 batches of varying shapes and modes through one raw stream: every response has
    the request's position, its request_id, the output and state version torch gives."""
    client.create_layer(name, "BatchNorm1d", num_features=4, momentum=0.3)
    local = torch.nn.BatchNorm1d(4, momentum=0.3)
    g = np.random.default_rng(100)
    batches, modes = [], []
    for i in range(40):
        n = int(g.integers(2, 10))
        shape = (n, 4) if g.random() < 0.5 else (n, 4, int(g.integers(1, 7)))
        batches.append(batch(g, shape))
        modes.append(pb.MODE_TRAIN if g.random() < 0.6 else pb.MODE_EVAL)
    assert pb.MODE_EVAL in modes and pb.MODE_TRAIN in modes

    requests = [request(name, x, m, request_id=f"req-{i}") for i, (x, m) in enumerate(zip(batches, modes))]
    responses = exchange(requests)

    assert [r.sequence for r in responses] == list(range(len(batches)))
    trained = 0
    for i, (r, x, m) in enumerate(zip(responses, batches, modes)):
        assert r.WhichOneof("result") == "response", f"message {i}: {r.error}"
        assert r.response.request_id == f"req-{i}"
        expected = run_local(local, x, m == pb.MODE_TRAIN)
        trained += m == pb.MODE_TRAIN
        out = codec.to_numpy(r.response.output)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert_close(out, expected)
        assert (r.response.state.version, r.response.state.num_batches_tracked) == (trained, trained)
    assert_state_matches(client, name, local)
    assert client.get_layer(name).state.version == trained


STREAM_KINDS = [
    # (id, kind, kwargs, shape maker(g) -> shape)
    ("GroupNorm", "GroupNorm", dict(num_groups=2, num_channels=4),
     lambda g: (int(g.integers(1, 5)), 4) + tuple(int(d) for d in g.integers(1, 5, int(g.integers(0, 3))))),
    ("InstanceNorm1d-tracked", "InstanceNorm1d", dict(num_features=3, affine=True, track_running_stats=True),
     lambda g: ((3, int(g.integers(2, 9))) if g.random() < 0.3 else (int(g.integers(1, 5)), 3, int(g.integers(2, 9))))),
    ("LayerNorm", "LayerNorm", dict(normalized_shape=[3, 5]),
     lambda g: tuple(int(d) for d in g.integers(1, 4, int(g.integers(0, 3)))) + (3, 5)),
    ("RMSNorm", "RMSNorm", dict(normalized_shape=[6], eps=1e-6),
     lambda g: tuple(int(d) for d in g.integers(1, 5, int(g.integers(0, 3)))) + (6,)),
    ("BatchNorm3d-cumulative", "BatchNorm3d", dict(num_features=2, momentum=None),
     lambda g: (int(g.integers(1, 4)), 2, int(g.integers(1, 4)), int(g.integers(2, 4)), int(g.integers(1, 4)))),
]


@pytest.mark.parametrize("kind,kwargs,make_shape", [k[1:] for k in STREAM_KINDS], ids=[k[0] for k in STREAM_KINDS])
def test_sdk_stream_train_matches_local_module(client, name, kind, kwargs, make_shape):
    client.create_layer(name, kind, **kwargs)
    local = getattr(torch.nn, kind)(**kwargs)
    g = np.random.default_rng(sum(map(ord, kind)))
    batches = [batch(g, make_shape(g)) for _ in range(25)]
    assert len({x.shape for x in batches}) > 3
    # Half numpy, half torch: each output comes back in its input's kind.
    inputs = [torch.from_numpy(x) if i % 2 else x for i, x in enumerate(batches)]
    results = list(client.normalize_stream_results(name, inputs, "train", timeout=RPC_TIMEOUT))
    assert len(results) == len(batches)
    tracks = client.get_layer(name).has_running_stats
    for i, (res, x) in enumerate(zip(results, inputs)):
        assert torch.is_tensor(res.output) == torch.is_tensor(x)
        assert_close(res.output, run_local(local, x, True))
        assert res.state.version == (i + 1 if tracks else 0)
    assert_state_matches(client, name, local)


def test_stream_train_equals_unary_train(client, name):
    streamed, unary = name + "-stream", name + "-unary"
    for n in (streamed, unary):
        client.create_layer(n, "BatchNorm2d", num_features=3, momentum=None)
    local = torch.nn.BatchNorm2d(3, momentum=None)
    g = np.random.default_rng(101)
    batches = [batch(g, (int(g.integers(2, 6)), 3, int(g.integers(1, 6)), int(g.integers(1, 6)))) for _ in range(15)]

    stream_results = list(client.normalize_stream_results(streamed, batches, "train", timeout=RPC_TIMEOUT))
    unary_results = [client.normalize_result(unary, x, "train") for x in batches]

    for s, u, x in zip(stream_results, unary_results, batches, strict=True):
        np.testing.assert_array_equal(s.output, u.output)  # same server, same arithmetic
        assert s.state == u.state
        assert_close(s.output, run_local(local, x, True))
    a, b = client.get_state(streamed, as_torch=True), client.get_state(unary, as_torch=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert client.get_layer(streamed).state == client.get_layer(unary).state
    assert client.get_layer(streamed).state.num_batches_tracked == len(batches)
    assert_state_matches(client, streamed, local)


# -- errors within a stream --------------------------------------------------------------
def test_bad_messages_get_an_error_each_and_the_stream_goes_on(client, exchange, name):
    client.create_layer(name, "BatchNorm2d", num_features=3)
    local = torch.nn.BatchNorm2d(3)
    g = np.random.default_rng(102)
    good = [batch(g, (4, 3, 5, 5)) for _ in range(4)]
    nan_batch = batch(g, (4, 3, 5, 5))
    nan_batch[1, 2, 0, 0] = np.nan
    t = codec.encode(good[0])
    IA, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    plan = [
        # (request, expected error code or None for a good one)
        (request(name, good[0], request_id="g0"), None),
        (request(name, batch(g, (4, 2, 5, 5))), IA),  # wrong channel count
        (request(name, good[1], request_id="g1"), None),
        (request(name + "-missing", good[1]), NF),
        (pb.NormalizeRequest(layer=name, mode=pb.MODE_TRAIN,
                             input=pb.Tensor(dtype=t.dtype, shape=t.shape, data=t.data[:-4])), IA),  # byte count
        (request(name, nan_batch), IA),
        (pb.NormalizeRequest(layer=name, mode=9, input=t), IA),  # unknown mode
        (request(name, good[2], mode=pb.MODE_EVAL, request_id="g2"), None),
        (request(name, batch(g, (1, 3, 1, 1))), IA),  # one value per channel
        (pb.NormalizeRequest(layer=name, mode=pb.MODE_TRAIN,
                             input=pb.Tensor(dtype=42, shape=t.shape, data=t.data)), IA),  # unknown dtype
        (request(name, good[3], request_id="g3"), None),
    ]
    responses = exchange([p[0] for p in plan])
    assert [r.sequence for r in responses] == list(range(len(plan)))

    trained = 0
    for (req, code), r in zip(plan, responses):
        if code is not None:
            assert r.WhichOneof("result") == "error", f"message {r.sequence} should have failed"
            assert r.error.code == code.value[0], (r.sequence, r.error)
            assert r.error.message
            assert E.from_status_value(r.error.code, r.error.message).code == code
            continue
        assert r.WhichOneof("result") == "response", (r.sequence, r.error)
        train = req.mode == pb.MODE_TRAIN
        trained += train
        assert r.response.request_id == req.request_id
        assert_close(codec.to_numpy(r.response.output), run_local(local, codec.to_numpy(req.input), train))
        assert r.response.state.version == trained
    assert trained == 3
    assert client.get_layer(name).state.version == trained
    assert_state_matches(client, name, local)


def test_sdk_stream_raises_typed_error_at_its_position(client, name):
    client.create_layer(name, "BatchNorm2d", num_features=3)
    g = np.random.default_rng(103)
    good = [batch(g, (4, 3, 4, 4)) for _ in range(4)]
    bad = batch(g, (4, 5, 4, 4))
    outputs = []
    with pytest.raises(E.InvalidArgumentError) as info:
        for out in client.normalize_stream(name, [good[0], good[1], bad, good[2], good[3]], "train", timeout=RPC_TIMEOUT):
            outputs.append(out)
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.sequence == 2
    assert "channels" in err.message and str(bad.shape) in err.message
    assert len(outputs) == 2

    local = torch.nn.BatchNorm2d(3)
    for out, x in zip(outputs, good):
        assert_close(out, run_local(local, x, True))
    # The server may have applied the good batches sent after the bad one before the SDK
    # cancelled; whatever it applied is a prefix of them, in order.
    state = wait_until_stable(client, name)
    n = state.num_batches_tracked
    assert 2 <= n <= 4 and state.version == n
    for x in good[2:n]:
        run_local(local, x, True)
    assert_state_matches(client, name, local)


def test_sdk_stream_unknown_layer_raises_not_found_first(client, name):
    g = np.random.default_rng(104)
    it = client.normalize_stream(name, [batch(g, (2, 3)) for _ in range(3)], "train", timeout=RPC_TIMEOUT)
    with pytest.raises(E.NotFoundError) as info:
        next(it)
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.sequence == 0
    assert name in info.value.message


def test_sdk_stream_local_encode_error_after_sent_batches(client, name):
    client.create_layer(name, "BatchNorm1d", num_features=3)
    g = np.random.default_rng(105)
    good = [batch(g, (5, 3)) for _ in range(2)]
    outputs = []
    with pytest.raises(E.InvalidArgumentError) as info:
        for out in client.normalize_stream(name, [*good, np.ones((5, 3), np.int32), good[0]], "train", timeout=RPC_TIMEOUT):
            outputs.append(out)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "int32" in info.value.message
    local = torch.nn.BatchNorm1d(3)
    assert len(outputs) == 2
    for out, x in zip(outputs, good):
        assert_close(out, run_local(local, x, True))
    assert client.get_layer(name).state.num_batches_tracked == 2
    assert_state_matches(client, name, local)


# -- cancellation ------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["raw-cancel", "sdk-break"])
def test_client_cancellation_mid_stream_leaves_a_consistent_prefix(client, stub, name, how):
    client.create_layer(name, "BatchNorm2d", num_features=3, momentum=0.2)
    g = np.random.default_rng(106)
    batches = [batch(g, (8, 3, 48, 48)) for _ in range(40)]  # each takes the server a few ms
    k = 5

    # Local state after each prefix of the batches.
    local = torch.nn.BatchNorm2d(3, momentum=0.2)
    prefix_states, outputs_expected = [copy.deepcopy(local.state_dict())], []
    for x in batches:
        outputs_expected.append(run_local(local, x, True))
        prefix_states.append(copy.deepcopy(local.state_dict()))

    received = []
    if how == "raw-cancel":
        call = stub.NormalizeStream(iter([request(name, x) for x in batches]), timeout=RPC_TIMEOUT)
        for r in call:
            received.append(codec.to_numpy(r.response.output))
            if len(received) == k:
                break
        call.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.CANCELLED
    else:
        it = client.normalize_stream(name, batches, "train", timeout=RPC_TIMEOUT)
        for out in it:
            received.append(out)
            if len(received) == k:
                break
        it.close()  # what leaving a for loop early does to a generator

    for out, expected in zip(received, outputs_expected, strict=False):
        assert_close(out, expected)
    state = wait_until_stable(client, name)
    n = state.num_batches_tracked
    assert k <= n and state.version == n
    # Cancelling stops the stream: the server does not work through all 40 batches
    # (it stops within a few; each batch takes it milliseconds).
    assert n < len(batches), "the server kept applying batches after the client cancelled"
    server_state = client.get_state(name, as_torch=True)
    for key, value in prefix_states[n].items():
        torch.testing.assert_close(server_state[key], value, **TOL)

    # The server still serves, from that state.
    local.load_state_dict(prefix_states[n])
    x = batch(g, (4, 3, 5, 5))
    result = client.normalize_result(name, x, "train")
    assert result.state.version == n + 1
    assert_close(result.output, run_local(local, x, True))
    y = batch(g, (2, 3, 5, 5))
    assert_close(list(client.normalize_stream(name, [y], "eval"))[0], run_local(local, y, False))
    assert_state_matches(client, name, local)


# -- concurrency -------------------------------------------------------------------------
def test_concurrent_streams(client, server, name):
    """Four streams on their own layers and three streams training one shared layer, all
    at once. Own layers match local torch; the shared layer's updates are linearizable:
    the versions handed out are exactly 1..N, and with momentum=None its running stats
    are the mean of all batch statistics whatever the interleaving."""
    own_specs = {
        "bn1d": ("BatchNorm1d", dict(num_features=3), lambda g: (int(g.integers(2, 6)), 3)),
        "gn": ("GroupNorm", dict(num_groups=3, num_channels=6), lambda g: (2, 6, int(g.integers(1, 5)))),
        "ln": ("LayerNorm", dict(normalized_shape=[7]), lambda g: (int(g.integers(1, 4)), 7)),
        "in2d": ("InstanceNorm2d", dict(num_features=2, track_running_stats=True), lambda g: (2, 2, 3, int(g.integers(2, 5)))),
    }
    shared, per_stream, n_shared_streams = name + "-shared", 12, 3
    client.create_layer(shared, "BatchNorm1d", num_features=4, momentum=None)
    for key, (kind, kwargs, _) in own_specs.items():
        client.create_layer(f"{name}-{key}", kind, **kwargs)

    def own_stream(key, seed):
        kind, kwargs, make_shape = own_specs[key]
        g = np.random.default_rng(seed)
        batches = [batch(g, make_shape(g)) for _ in range(per_stream)]
        results = list(client.normalize_stream_results(f"{name}-{key}", batches, "train", timeout=RPC_TIMEOUT))
        return key, batches, results

    def shared_stream(seed):
        g = np.random.default_rng(seed)
        batches = [batch(g, (int(g.integers(3, 9)), 4)) for _ in range(per_stream)]
        # Its own channel for each of these, so the streams really run side by side.
        with grpc.insecure_channel(server.target) as channel:
            call = pb_grpc.NormServiceStub(channel).NormalizeStream(
                iter([request(shared, x) for x in batches]), timeout=RPC_TIMEOUT)
            responses = list(call)
        return batches, responses

    with ThreadPoolExecutor(max_workers=len(own_specs) + n_shared_streams) as pool:
        own = [pool.submit(own_stream, key, 200 + i) for i, key in enumerate(own_specs)]
        sh = [pool.submit(shared_stream, 300 + i) for i in range(n_shared_streams)]
        own_results = [f.result(timeout=120) for f in own]
        shared_results = [f.result(timeout=120) for f in sh]

    for key, batches, results in own_results:
        kind, kwargs, _ = own_specs[key]
        local = getattr(torch.nn, kind)(**kwargs)
        assert len(results) == len(batches)
        for res, x in zip(results, batches):
            assert_close(res.output, run_local(local, x, True))
        assert_state_matches(client, f"{name}-{key}", local)

    versions, means, variances = [], [], []
    for batches, responses in shared_results:
        assert [r.sequence for r in responses] == list(range(per_stream))
        mine = [r.response.state.version for r in responses]
        assert mine == sorted(mine) and len(set(mine)) == len(mine)  # in order within a stream
        versions += mine
        for r, x in zip(responses, batches):
            # Train output uses only the batch's own statistics.
            assert_close(codec.to_numpy(r.response.output), run_local(torch.nn.BatchNorm1d(4), x, True))
            t = torch.from_numpy(x).double()
            means.append(t.mean(0))
            variances.append(t.var(0, unbiased=True))
    total = per_stream * n_shared_streams
    assert sorted(versions) == list(range(1, total + 1)), "lost or duplicated update"
    state = client.get_state(shared, as_torch=True)
    assert int(state["num_batches_tracked"]) == total
    torch.testing.assert_close(state["running_mean"].double(), torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["running_var"].double(), torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6)


# -- edges -------------------------------------------------------------------------------
def test_stream_with_zero_messages_completes_cleanly(client, stub, name):
    client.create_layer(name, "BatchNorm1d", num_features=2)
    before = client.get_state(name, as_torch=True), client.get_layer(name).state
    call = stub.NormalizeStream(iter(()), timeout=RPC_TIMEOUT)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK
    assert list(client.normalize_stream(name, [], "train", timeout=RPC_TIMEOUT)) == []
    assert list(client.normalize_stream(name + "-no-such-layer", iter(()), "train", timeout=RPC_TIMEOUT)) == []
    after = client.get_state(name, as_torch=True), client.get_layer(name).state
    assert after[1] == before[1]
    for key in before[0]:
        assert torch.equal(after[0][key], before[0][key])
    # And the server is fine afterwards.
    x = np.random.default_rng(107).normal(size=(3, 2)).astype(np.float32)
    assert client.normalize_result(name, x, "train").state.version == before[1].version + 1


def test_stream_deadline_ends_the_stream_keeping_answered_batches(client, name):
    client.create_layer(name, "BatchNorm1d", num_features=3)
    g = np.random.default_rng(108)
    good = [batch(g, (4, 3)) for _ in range(2)]
    release = threading.Event()

    def slow_batches():
        yield from good
        release.wait(10)  # the caller never sends a third batch in time
        yield good[0]

    outputs = []
    try:
        with pytest.raises(E.DeadlineExceededError) as info:
            for out in client.normalize_stream(name, slow_batches(), "train", timeout=1.0):
                outputs.append(out)
    finally:
        release.set()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    local = torch.nn.BatchNorm1d(3)
    assert len(outputs) == 2
    for out, x in zip(outputs, good):
        assert_close(out, run_local(local, x, True))
    assert client.get_layer(name).state.num_batches_tracked == 2
    assert_state_matches(client, name, local)
