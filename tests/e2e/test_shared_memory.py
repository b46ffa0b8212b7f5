"""Same-host shared memory end to end: real server processes on 127.0.0.1, real POSIX
shared-memory segments, real channels.

- The SDK's `shared_memory=True` gives bitwise the bytes path's outputs and states (layer
  kinds x dtypes, train and eval, sync and async clients, numpy and torch, threads).
- Every error of the raw protocol (unknown region, places out of range or overflowing,
  wrong sizes, misalignment, bad keys and names, limits, the feature off) has its code and
  message, and a failed train request leaves the layer's state as it was.
- Regions go away: unregister, lease expiry, a client killed with SIGKILL, close().
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest
import torch
from layercases import batches
from serverproc import ServerProcess

from normserve.client import Client, errors
from normserve.client._proto import normserve_pb2 as pb
from normserve.client._proto import normserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

SEGMENT = 1 << 16


# -- helpers ---------------------------------------------------------------------------------
@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.NormServiceStub(channel)


@pytest.fixture
def segment():
    shm = shared_memory.SharedMemory(create=True, size=SEGMENT)
    yield shm
    shm.close()
    shm.unlink()


@pytest.fixture
def region(stub, segment, name):
    """A registered region over `segment`; unregistered afterwards (if still there)."""
    region = "r-" + name.replace("/", "-")[:100]
    stub.RegisterSharedMemory(pb.RegisterSharedMemoryRequest(name=region, key=segment.name, byte_size=SEGMENT))
    yield region
    try:
        stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name=region))
    except grpc.RpcError:
        pass


def ref(region: str, offset: int, byte_size: int) -> pb.SharedMemoryRef:
    return pb.SharedMemoryRef(region=region, offset=offset, byte_size=byte_size)


def shm_request(layer: str, x: np.ndarray, region: str, offset: int = 0, out_offset: int = 8192, **kw) -> pb.NormalizeRequest:
    """A train request whose input is at `offset` and output at `out_offset` of `region`."""
    request = pb.NormalizeRequest(layer=layer, mode=pb.MODE_TRAIN, request_id=kw.pop("request_id", ""))
    request.input.dtype = pb.DTYPE_FLOAT32
    request.input.shape[:] = x.shape
    request.input.shared_memory.CopyFrom(ref(region, offset, kw.pop("nbytes", x.nbytes)))
    if out_offset is not None:
        request.output_shared_memory.CopyFrom(ref(kw.pop("out_region", region), out_offset, kw.pop("out_nbytes", x.nbytes)))
    assert not kw
    return request


def put(segment: shared_memory.SharedMemory, x: np.ndarray, offset: int) -> None:
    segment.buf[offset : offset + x.nbytes] = x.tobytes()


def get(segment: shared_memory.SharedMemory, like: np.ndarray, offset: int) -> np.ndarray:
    return np.frombuffer(bytes(segment.buf[offset : offset + like.nbytes]), like.dtype).reshape(like.shape)


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs, timeout=30)
    return info.value.code(), info.value.details()


def x_bn(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((4, 3, 5, 5)) * 2 + 1).astype(np.float32)


def bn_train(x: np.ndarray) -> np.ndarray:
    """A fresh BatchNorm2d(3)'s train-mode output, locally."""
    with torch.no_grad():
        return torch.nn.BatchNorm2d(3).train()(torch.from_numpy(x)).numpy()


def same(a, b) -> bool:
    """Bitwise equality of two outputs (numpy or torch), dtype and shape included."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return type(a) is type(b) and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(same(a[k], b[k]) for k in a)


# -- parity with the bytes path ----------------------------------------------------------------
PARITY_CASES = [
    ("BatchNorm1d", {"num_features": 3}),
    ("BatchNorm2d", {"num_features": 3, "momentum": None}),
    ("BatchNorm3d", {"num_features": 2}),
    ("InstanceNorm2d", {"num_features": 3, "affine": True, "track_running_stats": True}),
    ("LayerNorm", {"normalized_shape": [4]}),
    ("GroupNorm", {"num_groups": 2, "num_channels": 4}),
    ("RMSNorm", {"normalized_shape": [4]}),
]


@pytest.mark.both_clients
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("kind, kwargs", PARITY_CASES, ids=[k for k, _ in PARITY_CASES])
def test_shared_memory_gives_the_bytes_paths_results(server, client_kind, name, kind, kwargs, dtype):
    """Twin layers, the same batches and modes: one through shared memory, one over gRPC
    bytes; outputs (type, dtype, bits), versions and states are identical."""
    from conftest import make_client

    layer_kwargs = {**kwargs, "dtype": str(dtype).removeprefix("torch.")}
    with make_client(client_kind, server.target, timeout=30, shared_memory=True) as shm, Client(server.target, timeout=30) as plain:
        plain.create_layer(name + "-b", kind, **layer_kwargs)
        plain.create_layer(name + "-s", kind, **layer_kwargs)
        for i, x in enumerate(batches(kind, kwargs, dtype, 6, seed=11)):
            mode = "eval" if i % 3 == 2 else "train"
            # numpy in for the dtypes numpy has, on every other batch; torch otherwise
            value = x.numpy() if dtype != torch.bfloat16 and i % 2 else x
            got = shm.normalize_result(name + "-s", value, mode)
            want = plain.normalize_result(name + "-b", value, mode)
            assert same(got.output, want.output), (i, mode)
            assert got.state == want.state
        assert same_state(shm.get_state(name + "-s", as_torch=True), plain.get_state(name + "-b", as_torch=True))
        regions = {r.name for r in shm_regions(server)}
        assert any(r.startswith("normserve-") for r in regions)


def shm_regions(server) -> list:
    with grpc.insecure_channel(server.target) as channel:
        return list(pb_grpc.NormServiceStub(channel).ListSharedMemory(pb.ListSharedMemoryRequest(), timeout=10).regions)


def outcome(client, layer: str, x, mode: str = "eval"):
    try:
        return client.normalize(layer, x, mode)
    except Exception as e:  # noqa: BLE001 - compared below
        return e


def same_outcome(shm, plain, layer: str, x, mode: str = "eval") -> bool:
    """The same output, or the same error class and message, on both paths."""
    a, b = outcome(shm, layer, x, mode), outcome(plain, layer, x, mode)
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b)
    return same(a, b)


def test_odd_inputs_strided_big_endian_and_growing_sizes(server, name):
    """Non-contiguous torch, big-endian and Fortran-order numpy, array-likes, and batches
    that outgrow the first segment all give the bytes path's results (or its errors)."""
    with Client(server.target, timeout=30, shared_memory=True) as shm, Client(server.target, timeout=30) as plain:
        plain.create_layer(name, "BatchNorm2d", num_features=3)
        inputs = [
            torch.randn(4, 5, 3, 6).permute(0, 2, 3, 1),
            x_bn(1).astype(">f4"),
            np.asfortranarray(x_bn(2)),
            x_bn(3).astype(np.float32).tolist(),  # float64 once np.asarray'd: refused alike
            np.random.default_rng(4).standard_normal((16, 3, 128, 128)).astype(np.float32),  # 3 MiB: > 1 MiB
            np.ones((2, 3, 2, 2), np.int64),
            [[1.0, "a"]],
        ]
        for i, x in enumerate(inputs):
            assert same_outcome(shm, plain, name, x), i


def test_errors_are_the_bytes_paths_errors(server, name):
    """A rejected batch raises the same error class and message on both paths."""
    with Client(server.target, timeout=30, shared_memory=True) as shm, Client(server.target, timeout=30) as plain:
        plain.create_layer(name, "BatchNorm2d", num_features=3)
        for bad, mode in ((np.ones((2, 4, 3, 3), np.float32), "eval"), (np.ones((1, 3, 1, 1), np.float32), "train")):
            assert isinstance(outcome(shm, name, bad, mode), Exception)
            assert same_outcome(shm, plain, name, bad, mode)
        assert plain.get_layer(name).state.version == 0


@pytest.mark.both_clients
def test_streams_go_through_shared_memory(server, client_kind, name):
    """Stream messages travel through segments too (several in flight): same outputs and
    states; a bad message raises at its position, and its segment is reused after."""
    from conftest import make_client

    with make_client(client_kind, server.target, timeout=30, shared_memory=True) as shm, Client(server.target, timeout=30) as plain:
        for suffix in ("-s", "-b"):
            plain.create_layer(name + suffix, "BatchNorm2d", num_features=3)
        xs = [x_bn(i) for i in range(6)]
        got = list(shm.normalize_stream(name + "-s", xs, "train"))
        want = list(plain.normalize_stream(name + "-b", xs, "train"))
        assert all(same(a, b) for a, b in zip(got, want)) and len(got) == len(want) == 6
        assert same_state(shm.get_state(name + "-s"), plain.get_state(name + "-b"))
        assert shm._segments._all and not shm._segments.unavailable
        with pytest.raises(errors.InvalidArgumentError) as info:
            list(shm.normalize_stream(name + "-s", [xs[0], np.ones((2, 4, 3, 3), np.float32), xs[1]], "eval"))
        assert info.value.sequence == 1
        assert same(shm.normalize(name + "-s", xs[2]), plain.normalize(name + "-b", xs[2]))


def test_concurrent_threads_share_one_client(server, name):
    """Calls in flight at once each get their own segment: no result sees another's bytes."""
    with Client(server.target, timeout=60, shared_memory=True) as shm, Client(server.target, timeout=60) as plain:
        plain.create_layer(name, "BatchNorm2d", num_features=3)
        inputs = [x_bn(100 + i) for i in range(6)]
        want = [plain.normalize(name, x) for x in inputs]
        failures: list[str] = []

        def run(i: int) -> None:
            for _ in range(5):
                if not same(shm.normalize(name, inputs[i]), want[i]):
                    failures.append(f"thread {i}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures


def test_close_unregisters_and_unlinks(server, name):
    c = Client(server.target, timeout=30, shared_memory=True)
    c.create_layer(name, "LayerNorm", normalized_shape=[3])
    c.normalize(name, np.ones((2, 3), np.float32))
    mine = {s.name: s.key for s in c._segments._all}
    assert mine and set(mine) <= {r.name for r in shm_regions(server)}
    c.close()
    assert not set(mine) & {r.name for r in shm_regions(server)}
    assert not [k for k in mine.values() if os.path.exists(f"/dev/shm/{k}")]


# -- the raw protocol: errors leave state alone ------------------------------------------------
@pytest.fixture
def bn(client, name):
    client.create_layer(name, "BatchNorm2d", num_features=3)
    return name


def unchanged(client, layer: str, before: tuple) -> bool:
    state, info = client.get_state(layer), client.get_layer(layer)
    return info == before[1] and same_state(state, before[0])


def test_raw_train_request_in_place_and_separate(client, stub, segment, region, bn):
    """Input and output in the region (apart, then the same place) = the bytes path."""
    x = x_bn()
    want = bn_train(x)
    put(segment, x, 0)
    response = stub.Normalize(shm_request(bn, x, region, 0, 8192))
    assert response.output.data == b"" and response.output.shared_memory == ref(region, 8192, x.nbytes)
    assert list(response.output.shape) == list(x.shape) and response.state.version == 1
    assert get(segment, x, 8192).tobytes() == want.tobytes()
    assert get(segment, x, 0).tobytes() == x.tobytes()  # the input is untouched
    response = stub.Normalize(shm_request(bn, x, region, 0, 0))  # in place
    assert get(segment, x, 0).tobytes() == want.tobytes() and response.state.version == 2
    # input in shared memory, output as bytes (and the reverse)
    put(segment, x, 0)
    response = stub.Normalize(shm_request(bn, x, region, 0, None))
    assert response.output.data == want.tobytes() and not response.output.HasField("shared_memory")
    request = pb.NormalizeRequest(layer=bn, mode=pb.MODE_EVAL, input=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=x.shape, data=x.tobytes()))
    request.output_shared_memory.CopyFrom(ref(region, 4096, x.nbytes))
    response = stub.Normalize(request)
    assert get(segment, x, 4096).tobytes() == client.normalize(bn, x).tobytes()


BAD_PLACES = {
    # name: (request overrides, code, message fragment)
    "unknown region": (dict(region="no-such-region"), grpc.StatusCode.NOT_FOUND, "unknown shared-memory region 'no-such-region'"),
    "input past the end": (dict(offset=SEGMENT - 64), grpc.StatusCode.INVALID_ARGUMENT, f"input: bytes [{SEGMENT - 64}, "),
    "input offset overflow": (dict(offset=2**64 - 16), grpc.StatusCode.INVALID_ARGUMENT, "overflows 64 bits"),
    "wrong byte_size": (dict(nbytes=299 * 4), grpc.StatusCode.INVALID_ARGUMENT, "shared_memory.byte_size is 1196 bytes; shape [4, 3, 5, 5] of float32 needs 1200"),
    "misaligned input": (dict(offset=2), grpc.StatusCode.INVALID_ARGUMENT, "input: offset 2 is not a multiple of the dtype's itemsize 4"),
    "output past the end": (dict(out_offset=SEGMENT - 600), grpc.StatusCode.INVALID_ARGUMENT, "output_shared_memory: bytes ["),
    "output offset overflow": (dict(out_offset=2**64 - 4), grpc.StatusCode.INVALID_ARGUMENT, "overflows 64 bits"),
    "output too small": (dict(out_nbytes=1000), grpc.StatusCode.INVALID_ARGUMENT, "byte_size 1000 is too small for the output [4, 3, 5, 5] float32 (1200 bytes)"),
    "misaligned output": (dict(out_offset=8190), grpc.StatusCode.INVALID_ARGUMENT, "output_shared_memory: offset 8190 is not a multiple"),
    "unknown output region": (dict(out_region="nope"), grpc.StatusCode.NOT_FOUND, "unknown shared-memory region 'nope'"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLACES))
def test_bad_places_are_refused_and_change_nothing(client, stub, segment, region, bn, case):
    overrides, code, fragment = BAD_PLACES[case]
    x = x_bn()
    client.normalize(bn, x, mode="train")
    before = (client.get_state(bn), client.get_layer(bn))
    put(segment, x, 0)
    put(segment, np.full(x.shape, 7, np.float32), 8192)
    kw = dict(overrides)
    request = shm_request(bn, x, kw.pop("region", region), kw.pop("offset", 0), kw.pop("out_offset", 8192), **kw)
    got_code, message = code_of(stub.Normalize, request)
    assert got_code == code and fragment in message, message
    assert unchanged(client, bn, before)
    assert get(segment, x, 8192).tobytes() == np.full(x.shape, 7, np.float32).tobytes()  # nothing written


def test_data_and_shared_memory_together_are_refused(stub, region, bn):
    x = x_bn()
    request = shm_request(bn, x, region)
    request.input.data = x.tobytes()
    got_code, message = code_of(stub.Normalize, request)
    assert got_code == grpc.StatusCode.INVALID_ARGUMENT and "either data or shared_memory" in message


def test_shared_memory_outside_normalize_is_refused(stub, region, name):
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], shared_memory=ref(region, 0, 12))
    got_code, message = code_of(
        stub.CreateLayer, pb.CreateLayerRequest(name=name, spec=pb.LayerSpec(batch_norm1d=pb.BatchNormSpec(num_features=3)), state={"weight": t})
    )
    assert got_code == grpc.StatusCode.INVALID_ARGUMENT and "Normalize inputs only" in message


def test_stream_messages_may_use_shared_memory(client, stub, segment, region, bn):
    """A stream answers a bad place with an Error for that message and goes on."""
    x = x_bn()
    put(segment, x, 0)
    good = shm_request(bn, x, region, 0, 8192)
    bad = shm_request(bn, x, region, 3, 8192)
    responses = list(stub.NormalizeStream(iter([good, bad, good]), timeout=30))
    assert [r.WhichOneof("result") for r in responses] == ["response", "error", "response"]
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses[2].response.state.version == 2


# -- registration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, fragment",
    [
        ("../etc/passwd", "invalid shared-memory key"),
        ("/dev/shm/x", "invalid shared-memory key"),
        ("a/b", "invalid shared-memory key"),
        (".hidden", "invalid shared-memory key"),
        ("", "invalid shared-memory key"),
        ("x" * 201, "invalid shared-memory key"),
    ],
)
def test_invalid_keys_are_refused(stub, name, key, fragment):
    got_code, message = code_of(stub.RegisterSharedMemory, pb.RegisterSharedMemoryRequest(name="k", key=key, byte_size=64))
    assert got_code == grpc.StatusCode.INVALID_ARGUMENT and fragment in message


def test_registration_errors(stub, segment, region):
    register = stub.RegisterSharedMemory
    cases = [
        (dict(name="x", key="normserve-test-no-such-segment", byte_size=64), grpc.StatusCode.NOT_FOUND, "no shared-memory segment /dev/shm/normserve-test-no-such-segment"),
        (dict(name="bad name!", key=segment.name, byte_size=64), grpc.StatusCode.INVALID_ARGUMENT, "invalid region name"),
        (dict(name="x", key=segment.name, byte_size=0), grpc.StatusCode.INVALID_ARGUMENT, "byte_size must be positive"),
        (dict(name="x", key=segment.name, byte_size=SEGMENT * 2), grpc.StatusCode.INVALID_ARGUMENT, f"has {SEGMENT} bytes; byte_size asks for {SEGMENT * 2}"),
        (dict(name="x", key=segment.name, byte_size=64, lease_seconds=-1), grpc.StatusCode.INVALID_ARGUMENT, "lease_seconds"),
        (dict(name=region, key=segment.name, byte_size=64), grpc.StatusCode.ALREADY_EXISTS, "already registered"),
    ]
    for fields, code, fragment in cases:
        got_code, message = code_of(register, pb.RegisterSharedMemoryRequest(**fields))
        assert got_code == code and fragment in message, (fields, message)
    # the same name, key and size again renews (idempotent), with the lease granted
    again = register(pb.RegisterSharedMemoryRequest(name=region, key="/" + segment.name, byte_size=SEGMENT, lease_seconds=5))
    assert again.region.lease_seconds == 5 and again.region.key == segment.name


def test_unregister_and_list(stub, segment, region, bn):
    listed = {r.name: r for r in stub.ListSharedMemory(pb.ListSharedMemoryRequest()).regions}
    assert listed[region].key == segment.name and listed[region].byte_size == SEGMENT
    assert [r.name for r in stub.ListSharedMemory(pb.ListSharedMemoryRequest(prefix=region)).regions] == [region]
    assert not stub.ListSharedMemory(pb.ListSharedMemoryRequest(prefix=region + "~")).regions
    stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name=region))
    assert region not in {r.name for r in stub.ListSharedMemory(pb.ListSharedMemoryRequest()).regions}
    got_code, message = code_of(stub.Normalize, shm_request(bn, x_bn(), region))
    assert got_code == grpc.StatusCode.NOT_FOUND and "unknown shared-memory region" in message
    got_code, _ = code_of(stub.UnregisterSharedMemory, pb.UnregisterSharedMemoryRequest(name=region))
    assert got_code == grpc.StatusCode.NOT_FOUND


def test_limits_name_their_settings(tmp_path):
    with ServerProcess("--max-shm-regions", "2", "--max-shm-bytes", str(3 * SEGMENT)) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.NormServiceStub(channel)
        segments = [shared_memory.SharedMemory(create=True, size=SEGMENT * 2) for _ in range(3)]
        try:

            def register(i: int, size: int, timeout: float = 10):
                request = pb.RegisterSharedMemoryRequest(name=f"r{i}", key=segments[i].name, byte_size=size)
                return stub.RegisterSharedMemory(request, timeout=timeout)

            got_code, message = code_of(register, 0, 4 * SEGMENT)
            assert got_code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"max_shm_bytes={3 * SEGMENT}" in message
            register(0, 2 * SEGMENT)
            got_code, message = code_of(register, 1, 2 * SEGMENT)
            assert got_code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_shm_bytes" in message
            register(1, SEGMENT)
            got_code, message = code_of(register, 2, 64)
            assert got_code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_shm_regions=2" in message
            # the SDK falls back to bytes for a call the limits refuse, with the same result
            with Client(server.target, timeout=30, shared_memory=True) as shm, Client(server.target, timeout=30) as plain:
                plain.create_layer("bn", "BatchNorm2d", num_features=3)
                assert same(shm.normalize("bn", x_bn(), "train"), bn_train(x_bn()))
        finally:
            for s in segments:
                s.close()
                s.unlink()


def test_disabled_server_refuses_and_the_sdk_falls_back():
    with ServerProcess("--max-shm-regions", "0") as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.NormServiceStub(channel)
        got_code, message = code_of(stub.RegisterSharedMemory, pb.RegisterSharedMemoryRequest(name="r", key="k", byte_size=64))
        assert got_code == grpc.StatusCode.FAILED_PRECONDITION and "max_shm_regions=0" in message
        with Client(server.target, timeout=30, shared_memory=True) as shm:
            shm.create_layer("bn", "BatchNorm2d", num_features=3)
            with pytest.warns(RuntimeWarning, match="can't use shared memory"):
                first = shm.normalize("bn", x_bn(), "train")
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # warned once per client
                shm.normalize("bn", x_bn(), "eval")
            assert shm.get_layer("bn").state.version == 1
            assert same(first, bn_train(x_bn()))


# -- leases and clients that go away -----------------------------------------------------------
@pytest.fixture(scope="module")
def lease_server():
    with ServerProcess("--shm-lease-seconds", "1") as server:
        yield server


def test_lease_expires_and_the_sdk_registers_again(lease_server):
    with Client(lease_server.target, timeout=30, shared_memory=True) as shm:
        shm.create_layer("bn-lease", "BatchNorm2d", num_features=3)
        y = shm.normalize("bn-lease", x_bn())
        assert len(shm_regions(lease_server)) == 1 and shm_regions(lease_server)[0].lease_seconds == 1
        deadline = time.monotonic() + 10
        while shm_regions(lease_server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not shm_regions(lease_server)
        assert lease_server.wait_for_log("lease of 1s expired")
        assert same(shm.normalize("bn-lease", x_bn()), y)  # registered again, transparently
        assert len(shm_regions(lease_server)) == 1


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from normserve.client import Client
    c = Client(sys.argv[1], timeout=30, shared_memory=True)
    c.normalize("bn-kill", np.ones((4, 3, 2, 2), np.float32), mode="train")
    print(c._segments._all[0].name, c._segments._all[0].key, flush=True)
    time.sleep(600)
    """
)


def test_regions_of_a_killed_client_are_released_within_the_lease(lease_server):
    with Client(lease_server.target, timeout=30) as c:
        c.create_layer("bn-kill", "BatchNorm2d", num_features=3)
    child = subprocess.Popen([sys.executable, "-c", CHILD, lease_server.target], stdout=subprocess.PIPE, text=True)
    try:
        region, key = child.stdout.readline().split()
        assert os.path.exists(f"/dev/shm/{key}")
        assert region in {r.name for r in shm_regions(lease_server)}
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        killed = time.monotonic()
        while region in {r.name for r in shm_regions(lease_server)}:
            assert time.monotonic() - killed < 1 + 2, "region not released within lease + sweep period"
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert lease_server.wait_for_log(f"{region} .* released: its lease")
    # The segment itself: multiprocessing's resource tracker (which outlives the client)
    # unlinks what the client left behind.
    deadline = time.monotonic() + 10
    while os.path.exists(f"/dev/shm/{key}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/dev/shm/{key}")


# -- tokens: regions belong to the token that registered them --------------------------------------
def test_regions_belong_to_their_token(tmp_path, segment):
    import json

    from normserve.server.transport.auth import digest

    tokens = {"alice": "tok-alice", "bob": "tok-bob"}
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": n, "sha256": digest(t), "role": "infer"} for n, t in tokens.items()]}))
    with ServerProcess("--tokens-file", str(path)) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.NormServiceStub(channel)
        alice, bob = ([("authorization", f"Bearer {tokens[n]}")] for n in ("alice", "bob"))
        got_code, _ = code_of(stub.RegisterSharedMemory, pb.RegisterSharedMemoryRequest(name="a", key=segment.name, byte_size=64))
        assert got_code == grpc.StatusCode.UNAUTHENTICATED
        stub.RegisterSharedMemory(pb.RegisterSharedMemoryRequest(name="a", key=segment.name, byte_size=64), metadata=alice)
        assert [r.name for r in stub.ListSharedMemory(pb.ListSharedMemoryRequest(), metadata=alice).regions] == ["a"]
        assert not stub.ListSharedMemory(pb.ListSharedMemoryRequest(), metadata=bob).regions
        got_code, _ = code_of(stub.UnregisterSharedMemory, pb.UnregisterSharedMemoryRequest(name="a"), metadata=bob)
        assert got_code == grpc.StatusCode.NOT_FOUND
        got_code, _ = code_of(
            stub.RegisterSharedMemory, pb.RegisterSharedMemoryRequest(name="a", key=segment.name, byte_size=64), metadata=bob
        )
        assert got_code == grpc.StatusCode.ALREADY_EXISTS
        request = pb.NormalizeRequest(layer="any", mode=pb.MODE_EVAL)
        request.input.CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], shared_memory=ref("a", 0, 16)))
        got_code, message = code_of(stub.Normalize, request, metadata=bob)
        assert got_code == grpc.StatusCode.NOT_FOUND
        stub.UnregisterSharedMemory(pb.UnregisterSharedMemoryRequest(name="a"), metadata=alice)


def test_metrics_count_shared_memory(server, name):
    import urllib.request

    with Client(server.target, timeout=30, shared_memory=True) as shm:
        shm.create_layer(name, "LayerNorm", normalized_shape=[4])
        shm.normalize(name, np.ones((2, 4), np.float32))
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'normserve_shared_memory_bytes_total{direction="in"}' in text
    assert "normserve_shared_memory_regions " in text and "normserve_shared_memory_mapped_bytes " in text
