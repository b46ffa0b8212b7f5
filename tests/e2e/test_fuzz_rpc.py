"""Fuzzing every RPC of normserve.v1.NormService over a real channel (own server process on
127.0.0.1, port 0).

Requests go out as raw bytes (`request_serializer=None`): random bytes, well-framed random
fields, and serialized valid requests mutated at the byte level, to every unary RPC and,
as streams of one to four messages, to NormalizeStream (and as packs of them to
NormalizeStreamPacked). Properties:

- Every call ends with a status the method can legitimately return for bad input (never
  INTERNAL, never UNKNOWN, never a hang: each call has a deadline and DEADLINE_EXCEEDED
  fails the test); an OK response parses as the method's response message and its tensors
  are well-formed; every stream message gets its answer, in order.
- A few pre-created "guard" layers keep their state (every state_dict tensor byte for byte,
  and the version) through everything that was refused. Requests that legitimately
  succeed on a guard (a valid train batch, LoadState, ResetRunningStats) are detected and
  must move the version by exactly one (zero for replays and for kinds without running
  statistics); the guards are re-read then, and compared at checkpoints otherwise.
- Every state a layer reaches through accepted train requests is one the server accepts
  back (LoadState of its own GetState; restart recovery runs the same validation).
- Afterwards the server is healthy (grpc.health.v1 SERVING; normal requests work), its
  /metrics recorded no INTERNAL/UNKNOWN status, its log holds no traceback, and on SIGTERM
  it exits 0 within its grace period (the last test; it stops the module's server).

Bytes that don't parse as the request message are bad input too: INVALID_ARGUMENT (for a
stream message: an Error answer, and the stream goes on). Left to grpc-python's default
deserializer they get INTERNAL "Exception deserializing request!" with a logged traceback,
and each such stream may leave an RPC that never finishes, so the server hangs on SIGTERM;
`test_undecodable_*` and `test_server_exits_cleanly_on_sigterm_after_fuzzing` pin that.

Runtime: ~3 thousand RPCs in about 25 s of fuzzing on a busy 2-core machine (under a
minute for the file). Longer run: NORMSERVE_FUZZ_EXAMPLES=N runs N examples per fuzz test
(as in tests/unit/test_fuzz_decoder.py), e.g.

    NORMSERVE_FUZZ_EXAMPLES=50000 pytest tests/e2e/test_fuzz_rpc.py -s
"""

from __future__ import annotations

import collections
import math
import os
import re
import signal
import subprocess
import urllib.request
from typing import Any, Optional

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normserve.client import Client, codec, wire
from normserve.client import errors as E
from normserve.client._proto import normserve_pb2 as pb
from serverproc import ServerProcess

pytestmark = pytest.mark.e2e

FUZZ_EXAMPLES = int(os.environ.get("NORMSERVE_FUZZ_EXAMPLES", "0") or 0)


def fuzz(default: int):
    return settings(
        max_examples=FUZZ_EXAMPLES or default,
        deadline=None,
        database=None,  # examples replayed against a fresh server would mean little
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


try:  # pytest-timeout (pyproject sets 300 s per test): give long runs room
    import pytest_timeout  # noqa: F401

    pytestmark = [pytestmark, pytest.mark.timeout(max(300, int(FUZZ_EXAMPLES * 0.1)))]
except ImportError:
    pass

S = grpc.StatusCode
RPC_TIMEOUT = 30
MAX_ELEMENTS = 4096
MAX_MESSAGE = 256 * 1024
GRACE = 2  # the server's --grace-seconds: a clean SIGTERM exit takes about this long at most
SERVICE = "normserve.v1.NormService"
UNARY = {
    "CreateLayer": (pb.CreateLayerRequest, pb.CreateLayerResponse),
    "GetLayer": (pb.GetLayerRequest, pb.GetLayerResponse),
    "ListLayers": (pb.ListLayersRequest, pb.ListLayersResponse),
    "DeleteLayer": (pb.DeleteLayerRequest, pb.DeleteLayerResponse),
    "ResetRunningStats": (pb.ResetRunningStatsRequest, pb.ResetRunningStatsResponse),
    "GetState": (pb.GetStateRequest, pb.GetStateResponse),
    "LoadState": (pb.LoadStateRequest, pb.LoadStateResponse),
    "Normalize": (pb.NormalizeRequest, pb.NormalizeResponse),
    "RegisterSharedMemory": (pb.RegisterSharedMemoryRequest, pb.RegisterSharedMemoryResponse),
    "UnregisterSharedMemory": (pb.UnregisterSharedMemoryRequest, pb.UnregisterSharedMemoryResponse),
    "ListSharedMemory": (pb.ListSharedMemoryRequest, pb.ListSharedMemoryResponse),
}
assert set(UNARY) | {"NormalizeStream", "NormalizeStreamPacked"} == set(pb.DESCRIPTOR.services_by_name["NormService"].methods_by_name)

# What each method may answer to any input (DESIGN.md section 5 and the proto).
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "CreateLayer": {S.OK, S.INVALID_ARGUMENT, S.ALREADY_EXISTS, S.RESOURCE_EXHAUSTED},
    "GetLayer": {S.OK, S.NOT_FOUND},
    "ListLayers": {S.OK},
    "DeleteLayer": {S.OK, S.NOT_FOUND},
    "ResetRunningStats": {S.OK, S.NOT_FOUND, S.FAILED_PRECONDITION, S.ABORTED},
    "GetState": {S.OK, S.NOT_FOUND},
    "LoadState": {S.OK, S.NOT_FOUND, S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED, S.ABORTED},
    "Normalize": {S.OK, S.NOT_FOUND, S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED},
    "RegisterSharedMemory": {S.OK, S.NOT_FOUND, S.INVALID_ARGUMENT, S.ALREADY_EXISTS, S.RESOURCE_EXHAUSTED},
    "UnregisterSharedMemory": {S.OK, S.NOT_FOUND},
    "ListSharedMemory": {S.OK},
}
# A shared-memory segment the fuzzed RegisterSharedMemory requests may name (made by `fz`).
SEGMENT_KEY = f"normserve-fuzz-{os.getpid()}"
SEGMENT_BYTES = 4096
REGIONS = ["fz-r1", "fz-r2"]
STREAM_MESSAGE_ERRORS = {S.NOT_FOUND.value[0], S.INVALID_ARGUMENT.value[0], S.RESOURCE_EXHAUSTED.value[0]}

# Guard layers: (kind, kwargs, keeps running statistics).
GUARDS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "guard-bn2d": ("BatchNorm2d", dict(num_features=3), True),
    "guard-bn1d-cma": ("BatchNorm1d", dict(num_features=4, momentum=None, dtype=torch.float64), True),
    "guard-in1d": ("InstanceNorm1d", dict(num_features=2, affine=True, track_running_stats=True), True),
    "guard-gn": ("GroupNorm", dict(num_groups=2, num_channels=4), False),
    "guard-ln-h": ("LayerNorm", dict(normalized_shape=[3], dtype=torch.float16), False),
    "guard-rms": ("RMSNorm", dict(normalized_shape=[2, 2]), False),
}
SCRATCH = [f"fz-s{i}" for i in range(6)]
ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT64: 8, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2, pb.DTYPE_INT64: 8}
TORCH_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# -- the server and the bookkeeping --------------------------------------------------------
def read_state(channel: grpc.Channel, name: str):
    """(version, num_batches_tracked, {key: (dtype, shape, bytes)}) of a layer."""
    rpc = channel.unary_unary(f"/{SERVICE}/GetState", pb.GetStateRequest.SerializeToString, pb.GetStateResponse.FromString)
    r = rpc(pb.GetStateRequest(name=name), timeout=RPC_TIMEOUT)
    return (r.version.version, r.version.num_batches_tracked,
            {k: (t.dtype, tuple(t.shape), t.data) for k, t in sorted(r.state.items())})


class Guards:
    """Guard layers' expected states. `accepted` is told of every request that succeeded on
    a guard and may change it; `check` compares every guard with what is expected."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.expected = {name: read_state(channel, name) for name in GUARDS}
        self.recent: collections.deque[str] = collections.deque(maxlen=40)  # since last check
        self.checks = 0
        self.accepted_changes = 0

    def note(self, what: str) -> None:
        self.recent.append(what)

    def accepted(self, name: str, bump: int, version: Optional[int] = None) -> None:
        old = self.expected[name]
        new = read_state(self.channel, name)
        assert new[0] == old[0] + bump, (
            f"{name}: version {old[0]} -> {new[0]} after an accepted change expected to add {bump}; "
            f"recent requests:\n" + "\n".join(self.recent)
        )
        if version is not None:
            assert version == new[0], f"{name}: response says version {version}, layer is at {new[0]}"
        if bump == 0:
            assert new == old, f"{name}: state changed by a request that must not change it:\n" + "\n".join(self.recent)
        self.accepted_changes += bump
        self.expected[name] = new

    def check(self) -> None:
        for name, expected in self.expected.items():
            now = read_state(self.channel, name)
            assert now[0] == expected[0], f"{name}: version moved {expected[0]} -> {now[0]}; recent requests:\n" + "\n".join(self.recent)
            assert now == expected, f"{name}: state changed; recent requests:\n" + "\n".join(self.recent)
        self.recent.clear()
        self.checks += 1


class Fuzzer:
    def __init__(self, server: ServerProcess):
        self.server = server
        self.channel = grpc.insecure_channel(server.target)
        self.unary = {m: self.channel.unary_unary(f"/{SERVICE}/{m}", request_serializer=None, response_deserializer=None) for m in UNARY}
        self.stream = self.channel.stream_stream(f"/{SERVICE}/NormalizeStream", request_serializer=None, response_deserializer=None)
        self.packed = self.channel.stream_stream(
            f"/{SERVICE}/NormalizeStreamPacked", request_serializer=None, response_deserializer=None
        )
        self.codes: collections.Counter[str] = collections.Counter()
        self.since_check = 0
        self.guards: Optional[Guards] = None

    # One unary call of raw bytes, checked; returns (code, parsed request or None).
    def send(self, method: str, raw: bytes) -> tuple[grpc.StatusCode, Any]:
        req_cls, resp_cls = UNARY[method]
        try:
            req = req_cls.FromString(raw)
        except DecodeError:
            req = None
        if req is not None and method == "DeleteLayer" and req.name in GUARDS:
            return S.OK, None  # would legitimately delete a guard: not sent
        self.guards.note(f"{method} {raw!r}"[:300])
        try:
            response = self.unary[method](raw, timeout=RPC_TIMEOUT)
            code, details = S.OK, ""
        except grpc.RpcError as e:
            response, code, details = None, e.code(), e.details() or ""
        self.codes[f"{method}:{code.name}"] += 1
        if req is None:
            assert code == S.INVALID_ARGUMENT, f"undecodable {method} request {raw!r} answered {code.name}: {details}"
        else:
            assert code in ALLOWED[method], f"{method} answered {code.name} ({details}) to {req!r}"
        if code == S.OK:
            resp = resp_cls.FromString(response)
            check_response(method, req, resp)
            self.after_ok(method, req, resp)
        self.tick()
        return code, req

    def after_ok(self, method: str, req, resp) -> None:
        """Book a successful request that may have changed a guard."""
        name = req.layer if method in ("Normalize", "NormalizeStream") else getattr(req, "name", "")
        if name not in GUARDS:
            return
        tracks = GUARDS[name][2]
        if method in ("Normalize", "NormalizeStream"):
            if req.mode == pb.MODE_TRAIN:
                bump = 0 if (resp.replayed or not tracks) else 1
                self.guards.accepted(name, bump, resp.state.version if bump else None)
        elif method in ("LoadState", "ResetRunningStats"):
            self.guards.accepted(name, 1, resp.state.version)
        elif method == "CreateLayer":
            raise AssertionError(f"CreateLayer of existing layer {name!r} succeeded")

    def tick(self) -> None:
        self.since_check += 1
        if self.since_check >= 100:
            self.guards.check()
            self.since_check = 0


def tensor_ok(t: pb.Tensor) -> None:
    assert t.dtype in ITEMSIZE and all(d >= 0 for d in t.shape), t
    assert len(t.data) == math.prod(t.shape) * ITEMSIZE[t.dtype], "malformed tensor in a response"


def check_response(method: str, req, resp) -> None:
    """An OK response is well-formed and answers the request."""
    if method in ("Normalize", "NormalizeStream"):
        tensor_ok(resp.output)
        assert list(resp.output.shape) == list(req.input.shape)
        assert resp.request_id == req.request_id
    elif method == "GetState":
        for t in resp.state.values():
            tensor_ok(t)
    elif method in ("GetLayer", "CreateLayer"):
        assert resp.layer.name == req.name and resp.layer.kind
    elif method == "RegisterSharedMemory":
        assert resp.region.name == req.name and 0 < resp.region.byte_size <= SEGMENT_BYTES
    elif method == "ListSharedMemory":
        assert all(r.name.startswith(req.prefix) for r in resp.regions)
    elif method == "ListLayers":
        assert all(l.name.startswith(req.prefix) for l in resp.layers)
        assert [l.name for l in resp.layers] == sorted(l.name for l in resp.layers)


@pytest.fixture(scope="module")
def fz():
    with ServerProcess(
        "--max-tensor-elements", str(MAX_ELEMENTS), "--max-message-bytes", str(MAX_MESSAGE), "--grace-seconds", str(GRACE)
    ) as server:
        g = np.random.default_rng(7)
        with Client(server.target, timeout=RPC_TIMEOUT) as c:
            for name, (kind, kwargs, tracks) in GUARDS.items():
                c.create_layer(name, kind, **kwargs)
                dtype = kwargs.get("dtype", torch.float32)
                state = {k: torch.as_tensor(v) for k, v in c.get_state(name, as_torch=True).items()}
                for key, value in state.items():
                    if value.is_floating_point() and "running" not in key:
                        state[key] = torch.from_numpy(g.uniform(0.5, 2, value.shape)).to(dtype)
                c.load_state(name, state)
                if tracks:
                    for _ in range(3):
                        c.normalize(name, torch.from_numpy(g.normal(1, 2, shape_for(name, 4))).to(dtype), "train")
        segment = os.open(f"/dev/shm/{SEGMENT_KEY}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(segment, SEGMENT_BYTES)
        os.close(segment)
        f = Fuzzer(server)
        f.guards = Guards(f.channel)
        try:
            yield f
        finally:
            os.unlink(f"/dev/shm/{SEGMENT_KEY}")
        f.channel.close()
        server.kill()  # normally gone already (test_server_exits_cleanly_on_sigterm_after_fuzzing)


def shape_for(name: str, n: int = 2, extra: int = 2) -> list[int]:
    kind, kwargs, _ = GUARDS[name]
    if kind == "BatchNorm2d":
        return [n, 3, extra, 2]
    if kind == "BatchNorm1d":
        return [n, 4]
    if kind == "InstanceNorm1d":
        return [n, 2, extra + 1]
    if kind == "GroupNorm":
        return [n, 4, extra]
    return [n] + list(kwargs["normalized_shape"])


# -- strategies ----------------------------------------------------------------------------
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def raw_field(draw, numbers=st.integers(1, 8)) -> bytes:
    number, wire = draw(numbers), draw(st.sampled_from([0, 1, 2, 5]))
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(draw(st.integers(0, 2**64 - 1)))
    if wire in (1, 5):
        return key + draw(st.binary(min_size=8 if wire == 1 else 4, max_size=8 if wire == 1 else 4))
    payload = draw(st.binary(max_size=24))
    return key + varint(len(payload)) + payload


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """0-3 byte-level edits of `data`."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup", "truncate", "field"]))
        pos = draw(st.integers(0, len(buf)))
        if op == "flip" and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del buf[pos : pos + draw(st.integers(1, 6))]
        elif op == "dup":
            end = draw(st.integers(pos, min(len(buf), pos + 32)))
            buf[end:end] = buf[pos:end]
        elif op == "truncate":
            del buf[pos:]
        else:
            buf += draw(raw_field())
    return bytes(buf)


known_names = st.sampled_from(sorted(GUARDS) + SCRATCH)
junk_names = st.one_of(st.sampled_from(["", "absent", "x" * 129, "bad name", "-x", "ü"]), st.text(max_size=10))


@st.composite
def names(draw, known=known_names) -> str:
    """3 in 4: a guard or scratch layer (or `known`); else a missing or invalid name."""
    return draw(known if draw(st.integers(0, 3)) else junk_names)

wild_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def tensors(draw, shape=None, dtype=None, clean=False) -> pb.Tensor:
    """A tensor shaped for a layer (values tame or wild), or a random Tensor message;
    `clean`: always `shape` and `dtype`, values in [-100, 100]."""
    if clean:
        count = math.prod(shape)
        x = torch.tensor(draw(st.lists(st.floats(-100, 100), min_size=count, max_size=count)), dtype=torch.float64)
        return codec.from_torch(x.reshape(shape).to(dtype))
    if shape is None or draw(st.integers(0, 5)) == 0:
        dtype_enum = draw(st.one_of(st.sampled_from(sorted(pb.DType.values())), st.integers(-(2**31), 2**31 - 1)))
        dims = draw(st.lists(st.one_of(st.integers(0, 4), st.sampled_from([-1, 2**40, 2**62])), max_size=10))
        fits = all(d >= 0 for d in dims) and math.prod(dims) <= 256
        data = draw(st.one_of(st.binary(max_size=64), st.just(b"\0" * (math.prod(dims) * 4) if fits else b"")))
        return pb.Tensor(dtype=dtype_enum, shape=dims, data=data)
    tdtype = dtype if (dtype is not None and draw(st.integers(0, 5))) else draw(st.sampled_from(TORCH_DTYPES))
    count = math.prod(shape)
    elements = wild_floats if draw(st.integers(0, 3)) == 0 else st.floats(-100, 100)
    x = torch.tensor(draw(st.lists(elements, min_size=count, max_size=count)), dtype=torch.float64)
    return codec.from_torch(x.reshape(shape).to(tdtype))


@st.composite
def specs(draw) -> pb.LayerSpec:
    """Layer specs, valid about half the time; bad sizes, eps, momentum and dtypes else."""
    kind = draw(st.sampled_from(list(codec.KIND_FIELDS)))
    if draw(st.booleans()):
        size = st.integers(1, 4)
    else:
        size = st.one_of(st.integers(1, 4), st.integers(-2, 0), st.sampled_from([2**24, 2**24 + 1, 2**62]))
    kwargs: dict[str, Any] = {}
    if kind.startswith(("BatchNorm", "InstanceNorm")):
        kwargs["num_features"] = draw(size)
    elif kind == "GroupNorm":
        groups = draw(size)
        multiple = min(groups * draw(st.integers(1, 2)), 2**62)  # int64 fields: 2**63 can't be sent
        kwargs.update(num_groups=groups, num_channels=multiple if draw(st.booleans()) else draw(size))
    else:
        kwargs["normalized_shape"] = draw(st.lists(size, min_size=draw(st.integers(0, 1)), max_size=4))
    if draw(st.integers(0, 3)) == 0:
        kwargs["eps"] = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-5, 0.0, 2.0])))
    if kind.startswith("BatchNorm") and draw(st.integers(0, 3)) == 0:
        kwargs["momentum"] = draw(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1)))
    if draw(st.booleans()):
        kwargs["dtype"] = draw(st.sampled_from(["float32", "float64", "float16", "bfloat16"]))
    try:
        spec = codec.kwargs_to_spec(kind, kwargs)
    except codec.CodecError:
        spec = codec.kwargs_to_spec(kind, {k: v for k, v in kwargs.items() if k != "momentum"})
    if draw(st.integers(0, 9)) == 0:  # dtype enums the SDK can't produce
        getattr(spec, spec.WhichOneof("kind")).dtype = draw(st.sampled_from([pb.DTYPE_INT64, 9, -3]))
    return spec


def guard_state(name: str, draw) -> dict[str, pb.Tensor]:
    """A state for a guard-like layer: right keys and shapes, random values, some damage."""
    kind, kwargs, _ = GUARDS[name]
    module = getattr(torch.nn, kind)(**kwargs)
    state = {}
    for key, value in module.state_dict().items():
        roll = draw(st.integers(0, 19))
        if roll == 0:
            continue
        if roll == 1:
            state[key] = draw(tensors())
        elif value.is_floating_point():
            state[key] = draw(tensors(list(value.shape), value.dtype, clean=roll > 3))
        else:
            state[key] = codec.from_torch(torch.tensor(draw(st.integers(-3, 2**40))))
    if draw(st.integers(0, 19)) == 0:
        state[draw(st.text(max_size=6))] = draw(tensors())
    return state


@st.composite
def requests(draw, method: str):
    """A plausible request of `method` (often valid, aimed at guards and scratch layers)."""
    name = draw(names())
    if method == "CreateLayer":
        req = pb.CreateLayerRequest(name=draw(names(st.sampled_from(SCRATCH))), spec=draw(specs()))
        if draw(st.integers(0, 4)) == 0:
            for k, t in guard_state(draw(st.sampled_from(sorted(GUARDS))), draw).items():
                req.state[k].CopyFrom(t)
        return req
    if method == "DeleteLayer":
        return pb.DeleteLayerRequest(name=draw(names(st.sampled_from(SCRATCH))))
    if method in ("GetLayer", "GetState"):
        return UNARY[method][0](name=name)
    if method == "ListLayers":
        return pb.ListLayersRequest(prefix=draw(st.one_of(st.sampled_from(["", "guard-", "fz-", "zz"]), st.text(max_size=4))))
    if method == "RegisterSharedMemory":
        return pb.RegisterSharedMemoryRequest(
            name=draw(st.one_of(st.sampled_from(REGIONS), st.text(max_size=6))),
            key=draw(st.one_of(st.just(SEGMENT_KEY), st.just("/" + SEGMENT_KEY), st.sampled_from(["fz-absent", "../x", ""]))),
            byte_size=draw(st.one_of(st.sampled_from([64, SEGMENT_BYTES]), st.integers(0, 2**64 - 1))),
            lease_seconds=draw(st.one_of(st.just(0.0), st.floats(allow_nan=True))),
        )
    if method == "UnregisterSharedMemory":
        return pb.UnregisterSharedMemoryRequest(name=draw(st.one_of(st.sampled_from(REGIONS), st.text(max_size=6))))
    if method == "ListSharedMemory":
        return pb.ListSharedMemoryRequest(prefix=draw(st.one_of(st.sampled_from(["", "fz-"]), st.text(max_size=3))))
    if method in ("ResetRunningStats", "LoadState"):
        if method == "ResetRunningStats":
            name = draw(names(st.sampled_from([g for g, (_, _, tracks) in GUARDS.items() if tracks] + SCRATCH)))
        else:
            name = draw(names(st.sampled_from(sorted(GUARDS))))
        req = UNARY[method][0](name=name)
        if draw(st.integers(0, 2)) == 0:
            req.expected_version = draw(st.one_of(st.integers(0, 12), st.just(2**64 - 1)))
        if method == "LoadState":
            for k, t in guard_state(name if name in GUARDS else draw(st.sampled_from(sorted(GUARDS))), draw).items():
                req.state[k].CopyFrom(t)
        return req
    assert method == "Normalize"
    layer = name if name in GUARDS else draw(st.one_of(st.just(name), st.sampled_from(sorted(GUARDS))))
    if layer in GUARDS:
        kwargs = GUARDS[layer][1]
        shape = shape_for(layer, draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        if draw(st.integers(0, 5)) == 0:
            shape = draw(st.lists(st.integers(0, 4), max_size=6))
        x = draw(tensors(shape, kwargs.get("dtype", torch.float32)))
    else:
        x = draw(tensors())
    mode = draw(st.one_of(st.sampled_from([pb.MODE_TRAIN, pb.MODE_EVAL, pb.MODE_UNSPECIFIED]), st.integers(-5, 2**31 - 1)))
    return pb.NormalizeRequest(layer=layer, mode=mode, input=x, request_id=draw(st.sampled_from(["", "", "rid-1", "rid-2"])))


def request_bytes(method: str):
    return st.one_of(
        requests(method).map(lambda r: r.SerializeToString()),
        requests(method).flatmap(lambda r: mutated(r.SerializeToString())),
    )


# -- fuzz tests ----------------------------------------------------------------------------
def test_random_bytes_to_every_unary_rpc(fz):
    @fuzz(500)
    @given(st.sampled_from(sorted(UNARY)), st.one_of(
        st.binary(max_size=64),
        st.lists(raw_field(), max_size=6).map(b"".join),
    ))
    def run(method, raw):
        fz.send(method, raw)

    run()
    fz.guards.check()


def test_mutated_valid_requests_to_every_unary_rpc(fz):
    @fuzz(1500)
    @given(st.sampled_from(sorted(UNARY)).flatmap(lambda m: st.tuples(st.just(m), request_bytes(m))))
    def run(method_raw):
        fz.send(*method_raw)

    run()
    fz.guards.check()
    seen = {k for k, n in fz.codes.items() if n}
    # Not vacuous: every RPC was called and answered both OK and an error at least once
    # (short runs, NORMSERVE_FUZZ_EXAMPLES below the default, skip this).
    for method in UNARY if (FUZZ_EXAMPLES or 1500) >= 1500 else ():
        assert f"{method}:OK" in seen, sorted(seen)
        if method not in ("ListLayers", "ListSharedMemory"):
            assert any(k.startswith(f"{method}:") and not k.endswith(":OK") for k in seen), (method, sorted(seen))
    print("\nunary fuzz codes:", dict(sorted(fz.codes.items())), "guard checks:", fz.guards.checks, "accepted guard changes:", fz.guards.accepted_changes)


@st.composite
def streams(draw) -> list[bytes]:
    msgs = draw(st.lists(st.one_of(
        request_bytes("Normalize"),
        request_bytes("Normalize"),
        request_bytes("Normalize"),
        st.binary(max_size=32),
    ), min_size=1, max_size=4))
    parsed = parse_requests(msgs)
    if None in parsed:
        # The stream may die at the bad message, losing answers to messages already
        # applied: keep trains on guards out of such streams.
        msgs = [m for m, p in zip(msgs, parsed) if p is None or not (p.layer in GUARDS and p.mode == pb.MODE_TRAIN)]
    return msgs


def parse_requests(msgs: list[bytes]) -> list[Optional[pb.NormalizeRequest]]:
    """Each stream message parsed, or None where it doesn't parse."""
    parsed: list[Optional[pb.NormalizeRequest]] = []
    for raw in msgs:
        try:
            parsed.append(pb.NormalizeRequest.FromString(raw))
        except DecodeError:
            parsed.append(None)
    return parsed


def test_fuzzed_streams(fz):
    counts = collections.Counter()

    @fuzz(400)
    @given(streams())
    def run(msgs):
        parsed = parse_requests(msgs)
        fz.guards.note(f"NormalizeStream {msgs!r}"[:600])
        answers = []
        try:
            for raw in fz.stream(iter(msgs), timeout=RPC_TIMEOUT):
                answers.append(pb.NormalizeStreamResponse.FromString(raw))
            code, details = S.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        counts[code.name] += 1
        check_stream_answers(fz, answers, parsed, counts)
        assert code == S.OK, f"stream failed with {code.name}: {details}"
        assert len(answers) == len(msgs), "every message gets exactly one answer"
        fz.tick()

    run()
    fz.guards.check()
    print("\nstream fuzz:", dict(counts))
    if (FUZZ_EXAMPLES or 400) >= 400:
        assert counts["OK"] > 0 and sum(n for k, n in counts.items() if k.startswith("error:")) > 0, counts


def check_stream_answers(fz: Fuzzer, answers: list, parsed: list, counts: collections.Counter) -> None:
    """Answers that came are in order and well-formed; OK train answers on guards are
    booked once per guard, after the stream (its trains may follow each other)."""
    bumps: dict[str, list] = {}
    for i, answer in enumerate(answers):
        assert answer.sequence == i
        req = parsed[i]
        if answer.WhichOneof("result") == "error":
            counts[f"error:{answer.error.code}"] += 1
            assert answer.error.code in STREAM_MESSAGE_ERRORS, answer
            assert req is not None or answer.error.code == S.INVALID_ARGUMENT.value[0], answer
            assert answer.error.message
        else:
            assert req is not None, "an undecodable message was answered with a result"
            check_response("NormalizeStream", req, answer.response)
            if req.layer in GUARDS and req.mode == pb.MODE_TRAIN:
                bump = 0 if (answer.response.replayed or not GUARDS[req.layer][2]) else 1
                entry = bumps.setdefault(req.layer, [0, None])
                entry[0] += bump
                if bump:
                    assert entry[1] is None or answer.response.state.version == entry[1] + 1, "stream trains out of order"
                    entry[1] = answer.response.state.version
    for name, (bump, version) in bumps.items():
        fz.guards.accepted(name, bump, version)


def _pack(msgs: list[bytes]) -> bytes:
    """A NormalizePack of serialized requests (field 1, length-delimited), as raw bytes."""
    return b"".join(b"\x0a" + wire._varint(len(m)) + m for m in msgs)


def test_fuzzed_packed_streams(fz):
    """The same streams as packs (all of a stream's messages in one, after an empty one):
    one answer per request in order; a pack holding an undecodable request fails the
    stream with INVALID_ARGUMENT and no answer (that none of its requests ran is checked
    in test_packed_stream.py)."""
    counts = collections.Counter()

    @fuzz(150)
    @given(streams())
    def run(msgs):
        parsed = parse_requests(msgs)
        fz.guards.note(f"NormalizeStreamPacked {msgs!r}"[:600])
        answers = []
        try:
            for raw in fz.packed(iter([b"", _pack(msgs)]), timeout=RPC_TIMEOUT):
                answers.extend(pb.NormalizeStreamPack.FromString(raw).responses)
            code, details = S.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        counts[code.name] += 1
        check_stream_answers(fz, answers, parsed, counts)
        if None in parsed:
            assert code == S.INVALID_ARGUMENT and not answers, (code, details, answers)
            assert "NormalizePack" in details
        else:
            assert code == S.OK, f"stream failed with {code.name}: {details}"
            assert len(answers) == len(msgs), "every request gets exactly one answer"
        fz.tick()

    run()
    fz.guards.check()
    print("\npacked stream fuzz:", dict(counts))
    if (FUZZ_EXAMPLES or 150) >= 150:
        assert counts["OK"] > 0 and counts["INVALID_ARGUMENT"] > 0, counts


# -- bytes that don't parse --------------------------------------------------------------
UNDECODABLE = {
    "wire type 7": b"\x0f\x00",
    "truncated length": b"\x0a\x05ab",
    "bad UTF-8 string": b"\x0a\x02\xff\xfe",
}


def _tracebacks(text: str) -> int:
    return text.count("Traceback (most recent call last)")


def test_undecodable_request_is_invalid_argument_without_a_logged_traceback(fz):
    """DESIGN.md section 5: bad input is INVALID_ARGUMENT; INTERNAL is for server bugs
    (and then comes with a request id). An unparseable request is bad input."""
    before = _tracebacks(fz.server.log())
    answers = {}
    for method in sorted(UNARY):
        for what, raw in UNDECODABLE.items():
            try:
                fz.unary[method](raw, timeout=RPC_TIMEOUT)
                answers[(method, what)] = "OK"
            except grpc.RpcError as e:
                answers[(method, what)] = f"{e.code().name}: {e.details()}"
    wrong = {k: v for k, v in answers.items() if not v.startswith("INVALID_ARGUMENT")}
    logged = _tracebacks(fz.server.log()) - before
    assert not wrong and not logged, (
        f"{len(wrong)} of {len(answers)} undecodable requests not answered INVALID_ARGUMENT, e.g. "
        f"{next(iter(wrong.items()), None)}; {logged} tracebacks logged for them"
    )


def test_undecodable_stream_message_gets_an_error_and_the_stream_goes_on(fz):
    """The proto: 'A bad message is answered with an Error for that message and the
    stream goes on'."""
    good = pb.NormalizeRequest(layer="guard-gn", mode=pb.MODE_EVAL,
                               input=codec.from_torch(torch.ones(shape_for("guard-gn"))))
    msgs = [good.SerializeToString(), UNDECODABLE["bad UTF-8 string"], good.SerializeToString()]
    answers = []
    try:
        for raw in fz.stream(iter(msgs), timeout=RPC_TIMEOUT):
            answers.append(pb.NormalizeStreamResponse.FromString(raw))
    except grpc.RpcError as e:
        pytest.fail(f"stream ended with {e.code().name}: {e.details()} after {len(answers)} of 3 answers")
    assert [a.WhichOneof("result") for a in answers] == ["response", "error", "response"]
    assert answers[1].error.code == S.INVALID_ARGUMENT.value[0]


# -- state the server produces must be state it accepts -------------------------------------
def test_state_produced_by_accepted_train_batches_can_be_loaded_back(fz):
    """Every state a layer reaches through accepted requests must pass the server's own
    state validation: LoadState of the GetState result, and -- through the same check --
    the restore at restart (Registry.recover), which refuses to start on a bad one.

    Fuzzed with finite train batches on float16/float32 BatchNorm layers."""
    client = Client(fz.server.target, timeout=RPC_TIMEOUT, retry=None)
    counter = iter(range(10**9))

    @fuzz(60)
    @given(st.sampled_from([torch.float16, torch.float32]), st.data())
    def run(dtype, data):
        name = f"fz-roundtrip-{next(counter)}"
        client.create_layer(name, "BatchNorm1d", num_features=2, dtype=dtype)
        try:
            finfo = torch.finfo(dtype)
            values = st.floats(-float(finfo.max), float(finfo.max), width=16 if dtype == torch.float16 else 32)
            n = data.draw(st.integers(2, 6))
            x = torch.tensor(data.draw(st.lists(values, min_size=2 * n, max_size=2 * n)), dtype=torch.float64)
            x = x.to(dtype).reshape(n, 2)
            try:
                client.normalize(name, x, "train")
            except E.InvalidArgumentError:
                return  # refusing a batch whose statistics overflow the layer's dtype is fine too
            state = client.get_state(name, as_torch=True)
            try:
                client.load_state(name, state)
            except Exception as e:
                raise AssertionError(
                    f"the server refuses the state its own train request produced ({e}); "
                    f"batch {x.tolist()} -> running_var {state['running_var'].tolist()}"
                ) from None
        finally:
            client.delete_layer(name)

    try:
        run()
    finally:
        client.close()


# -- afterwards ---------------------------------------------------------------------------
def test_server_healthy_and_clean_after_fuzzing(fz):
    with Client(fz.server.target, timeout=RPC_TIMEOUT, retry=None) as c:
        assert fz.server.proc.poll() is None, "server process died"
        assert c.health() == "SERVING" and c.health(SERVICE) == "SERVING"
        x = torch.randn(shape_for("guard-bn2d", 4, 3))
        assert c.normalize("guard-bn2d", x, "eval").shape == x.shape
        c.create_layer("fz-after", "LayerNorm", normalized_shape=[3])
        y = c.normalize("fz-after", torch.randn(4, 3), "train")
        torch.testing.assert_close(y.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
        c.delete_layer("fz-after")
    fz.guards.check()

    text = urllib.request.urlopen(fz.server.metrics_url, timeout=10).read().decode()
    by_code: collections.Counter[str] = collections.Counter()
    for m in re.finditer(r'(?m)^normserve_requests_total\{([^}]*)\} (\S+)$', text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        by_code[labels["code"]] += float(m.group(2))
    print("\nserver-side request counts by code:", dict(by_code))
    assert by_code["OK"] > 0
    assert by_code["INTERNAL"] == 0 and by_code["UNKNOWN"] == 0, dict(by_code)

    log = fz.server.log()
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 300) : log.index("Traceback") + 1500]
    assert "internal error" not in log


def test_server_exits_cleanly_on_sigterm_after_fuzzing(fz):
    """SIGTERM: in-flight calls get the grace period, then the process exits 0. Runs last
    (it stops the module's server). Streams whose message doesn't parse are sent first:
    with grpc-python's own request deserializer each could leave an RPC that never
    finishes, and `server.stop(grace).wait()` then never returned."""
    bad_stream = [UNDECODABLE["bad UTF-8 string"]]
    for _ in range(20):
        try:
            list(fz.stream(iter(bad_stream), timeout=RPC_TIMEOUT))
        except grpc.RpcError:
            pass  # what matters here is the shutdown below
    server = fz.server
    server.signal(signal.SIGTERM)
    try:
        status = server.proc.wait(GRACE + 15)
    except subprocess.TimeoutExpired:
        server.kill()
        pytest.fail(
            f"server still running {GRACE + 15}s after SIGTERM (grace {GRACE}s); killed. Log tail:\n"
            + server.log()[-1500:]
        )
    assert status == 0, server.log()[-1500:]
    assert server.wait_for_log(r"INFO normserve: stopped", timeout=5)
