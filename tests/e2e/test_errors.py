"""Every error condition of DESIGN.md section 5, over a real server process.

Each test checks the status code twice (the SDK's typed exception and `err.code`, or the
raw RpcError for malformed messages the SDK would refuse to build) and that the layer's
state -- every state_dict value and the version from GetLayer -- did not move.
Expected values are computed with local torch; no numbers are hard-coded.
"""

from __future__ import annotations

import math
import queue
import re
import signal
import time

import grpc
import numpy as np
import pytest
import torch

from normserve.client import Client, codec
from normserve.client import errors as E
from normserve.client._proto import normserve_pb2 as pb
from normserve.client._proto import normserve_pb2_grpc as pb_grpc
from serverproc import ServerProcess

pytestmark = pytest.mark.e2e

IA = grpc.StatusCode.INVALID_ARGUMENT
RPC_TIMEOUT = 30


# -- helpers -----------------------------------------------------------------------------
def expect(exc_type, code, fn, *args, **kwargs):
    """Call fn; it must raise exc_type with err.code == code. Returns the error."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    err = info.value
    assert isinstance(err, E.NormServeError)
    assert err.code == code, f"{err!r}"
    return err


def raw_error(rpc, request, timeout=RPC_TIMEOUT):
    """Call a raw stub method; it must fail. Returns (code, details)."""
    with pytest.raises(grpc.RpcError) as info:
        rpc(request, timeout=timeout)
    return info.value.code(), info.value.details() or ""


def snapshot(client, name):
    """(state_dict as torch tensors, StateVersion from GetLayer)."""
    state = client.get_state(name, as_torch=True)
    return {k: v.clone() for k, v in state.items()}, client.get_layer(name).state


def assert_same_state(client, name, before):
    state, version = snapshot(client, name)
    assert version == before[1], f"version moved: {before[1]} -> {version}"
    assert sorted(state) == sorted(before[0])
    for key, value in state.items():
        assert value.dtype == before[0][key].dtype, key
        assert torch.equal(value, before[0][key]), f"state[{key!r}] changed"


def tensor_msg(x: np.ndarray) -> pb.Tensor:
    return codec.encode(x)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def local_train(module: torch.nn.Module, batches) -> torch.nn.Module:
    module.train()
    with torch.no_grad():
        for x in batches:
            module(torch.as_tensor(x))
    return module.eval()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.NormServiceStub(channel)
    channel.close()


@pytest.fixture
def bn(client, name):
    """A BatchNorm2d(3) whose running statistics have moved away from the defaults (so
    a reset or a partial update would show). Returns its name."""
    client.create_layer(name, "BatchNorm2d", num_features=3)
    g = rng(1)
    for _ in range(2):
        client.normalize(name, g.normal(0.5, 2.0, (4, 3, 5, 5)).astype(np.float32), "train")
    info = client.get_layer(name)
    assert info.state.num_batches_tracked == 2 and info.state.version == 2
    return name


def good_batch(seed=0, shape=(4, 3, 5, 5)) -> np.ndarray:
    return rng(seed).normal(0.0, 1.0, shape).astype(np.float32)


# -- NOT_FOUND ---------------------------------------------------------------------------
_BN_STATE = {k: v.numpy() for k, v in torch.nn.BatchNorm2d(3).state_dict().items()}
UNKNOWN_OPS = {
    "normalize_train": lambda c, n: c.normalize(n, good_batch(), "train"),
    "normalize_eval": lambda c, n: c.normalize(n, good_batch(), "eval"),
    "get_layer": lambda c, n: c.get_layer(n),
    "delete_layer": lambda c, n: c.delete_layer(n),
    "get_state": lambda c, n: c.get_state(n),
    "load_state": lambda c, n: c.load_state(n, _BN_STATE),
    "reset_running_stats": lambda c, n: c.reset_running_stats(n),
}


@pytest.mark.parametrize("op", sorted(UNKNOWN_OPS))
def test_unknown_layer_is_not_found(client, bn, op):
    before = snapshot(client, bn)
    missing = bn + "-missing"
    err = expect(E.NotFoundError, grpc.StatusCode.NOT_FOUND, UNKNOWN_OPS[op], client, missing)
    assert isinstance(err, LookupError)
    assert missing in err.message and "not found" in err.message
    # Nothing was created under the unknown name, and the neighbour did not move.
    assert missing not in [layer.name for layer in client.list_layers(missing)]
    assert_same_state(client, bn, before)


def test_deleted_layer_is_not_found(client, bn):
    client.delete_layer(bn)
    expect(E.NotFoundError, grpc.StatusCode.NOT_FOUND, client.get_layer, bn)
    expect(E.NotFoundError, grpc.StatusCode.NOT_FOUND, client.normalize, bn, good_batch(), "train")
    expect(E.NotFoundError, grpc.StatusCode.NOT_FOUND, client.delete_layer, bn)


# -- ALREADY_EXISTS ----------------------------------------------------------------------
def test_name_taken_is_already_exists(client, bn):
    before = snapshot(client, bn)
    info = client.get_layer(bn)
    err = expect(E.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS, client.create_layer, bn, "BatchNorm2d", num_features=3)
    assert bn in err.message
    # A different kind with an initial state must not replace the existing layer either.
    ln = torch.nn.LayerNorm(5)
    expect(E.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS, client.create_layer, bn, ln)
    assert_same_state(client, bn, before)
    assert client.get_layer(bn) == info


# -- bad specs ---------------------------------------------------------------------------
BAD_SPECS = [
    # (id, kind, kwargs, word the message must contain)
    ("groups-not-dividing", "GroupNorm", dict(num_groups=4, num_channels=6), "divisible"),
    ("groups-zero", "GroupNorm", dict(num_groups=0, num_channels=6), "num_groups"),
    ("channels-negative", "GroupNorm", dict(num_groups=2, num_channels=-4), "num_channels"),
    ("bn-features-zero", "BatchNorm2d", dict(num_features=0), "num_features"),
    ("bn-features-negative", "BatchNorm1d", dict(num_features=-3), "num_features"),
    ("bn-features-huge", "BatchNorm1d", dict(num_features=1 << 40), "num_features"),
    ("in-features-zero", "InstanceNorm3d", dict(num_features=0), "num_features"),
    ("ln-shape-zero", "LayerNorm", dict(normalized_shape=[0]), "normalized_shape"),
    ("ln-shape-negative", "LayerNorm", dict(normalized_shape=[4, -1]), "normalized_shape"),
    ("ln-shape-too-many-elements", "LayerNorm", dict(normalized_shape=[1 << 13, 1 << 13]), "normalized_shape"),
    ("rms-shape-zero", "RMSNorm", dict(normalized_shape=[3, 0]), "normalized_shape"),
    ("ln-shape-empty", "LayerNorm", dict(normalized_shape=[]), "normalized_shape"),
    ("rms-shape-empty", "RMSNorm", dict(normalized_shape=[]), "normalized_shape"),
    ("bn-eps-zero", "BatchNorm2d", dict(num_features=3, eps=0.0), "eps"),
    ("bn-eps-negative", "BatchNorm2d", dict(num_features=3, eps=-1e-5), "eps"),
    ("bn-eps-nan", "BatchNorm2d", dict(num_features=3, eps=math.nan), "eps"),
    ("bn-eps-inf", "BatchNorm2d", dict(num_features=3, eps=math.inf), "eps"),
    ("bn-eps-huge", "BatchNorm2d", dict(num_features=3, eps=1e30), "eps"),
    ("ln-eps-zero", "LayerNorm", dict(normalized_shape=[4], eps=0.0), "eps"),
    ("gn-eps-nan", "GroupNorm", dict(num_groups=1, num_channels=2, eps=math.nan), "eps"),
    ("rms-eps-negative", "RMSNorm", dict(normalized_shape=[4], eps=-1.0), "eps"),
    ("in-eps-huge", "InstanceNorm1d", dict(num_features=2, eps=1e300), "eps"),
    ("bn-momentum-negative", "BatchNorm1d", dict(num_features=3, momentum=-0.1), "momentum"),
    ("bn-momentum-above-one", "BatchNorm1d", dict(num_features=3, momentum=1.5), "momentum"),
    ("bn-momentum-nan", "BatchNorm1d", dict(num_features=3, momentum=math.nan), "momentum"),
    ("in-momentum-above-one", "InstanceNorm2d", dict(num_features=3, momentum=2.0), "momentum"),
]


@pytest.mark.parametrize("kind,kwargs,word", [s[1:] for s in BAD_SPECS], ids=[s[0] for s in BAD_SPECS])
def test_bad_spec_is_invalid_argument(client, name, kind, kwargs, word):
    err = expect(E.InvalidArgumentError, IA, client.create_layer, name, kind, **kwargs)
    assert isinstance(err, ValueError)
    assert word in err.message, err.message
    expect(E.NotFoundError, grpc.StatusCode.NOT_FOUND, client.get_layer, name)


def test_spec_without_kind_is_invalid_argument(stub, client, name):
    code, details = raw_error(stub.CreateLayer, pb.CreateLayerRequest(name=name, spec=pb.LayerSpec()))
    assert code == IA
    assert "kind" in details and "BatchNorm2d" in details  # says what is expected
    expect(E.NotFoundError, grpc.StatusCode.NOT_FOUND, client.get_layer, name)


def test_spec_with_unknown_kind_is_invalid_argument(server, client, name):
    # A LayerSpec whose oneof holds a kind this server doesn't know (field 42): what a
    # newer client would send. Hand-encoded: CreateLayerRequest{name, spec{42: {}}}.
    unknown_kind = b"\xd2\x02\x00"  # field 42, length-delimited, empty
    raw = pb.CreateLayerRequest(name=name).SerializeToString() + b"\x12" + bytes([len(unknown_kind)]) + unknown_kind
    with grpc.insecure_channel(server.target) as channel:
        create = channel.unary_unary(
            "/normserve.v1.NormService/CreateLayer",
            request_serializer=None,
            response_deserializer=pb.CreateLayerResponse.FromString,
        )
        code, details = raw_error(create, raw)
    assert code == IA
    assert "kind" in details
    expect(E.NotFoundError, grpc.StatusCode.NOT_FOUND, client.get_layer, name)


@pytest.mark.parametrize("dtype", [pb.DTYPE_INT64, 99])
def test_spec_with_non_float_dtype_is_invalid_argument(stub, client, name, dtype):
    spec = pb.LayerSpec(batch_norm2d=pb.BatchNormSpec(num_features=3, dtype=dtype))
    code, details = raw_error(stub.CreateLayer, pb.CreateLayerRequest(name=name, spec=spec))
    assert code == IA and "dtype" in details
    expect(E.NotFoundError, grpc.StatusCode.NOT_FOUND, client.get_layer, name)


@pytest.mark.parametrize(
    "bad_name",
    ["", "-leading-dash", ".hidden", "has space", "tab\tname", "new\nline", "x" * 129, "名前", "a;b", "a\x00b"],
    ids=["empty", "dash", "dot", "space", "tab", "newline", "129-chars", "non-ascii", "semicolon", "nul"],
)
def test_invalid_layer_name_is_invalid_argument(client, bad_name):
    err = expect(E.InvalidArgumentError, IA, client.create_layer, bad_name, "LayerNorm", normalized_shape=[4])
    assert "name" in err.message
    assert bad_name not in [layer.name for layer in client.list_layers()]


def test_longest_valid_name_is_accepted(client, name):
    long_name = (name + "x" * 128)[:128]
    client.create_layer(long_name, "LayerNorm", normalized_shape=[4])
    assert client.get_layer(long_name).name == long_name
    client.delete_layer(long_name)


def test_bad_initial_state_creates_nothing(client, name):
    state = torch.nn.BatchNorm1d(4).state_dict()
    del state["running_var"]
    err = expect(E.InvalidArgumentError, IA, client.create_layer, name, "BatchNorm1d", num_features=4, state=state)
    assert "running_var" in err.message
    expect(E.NotFoundError, grpc.StatusCode.NOT_FOUND, client.get_layer, name)


# -- malformed tensors (raw stub: the SDK can't build these) -----------------------------
def _req(name, tensor, mode=pb.MODE_TRAIN):
    return pb.NormalizeRequest(layer=name, mode=mode, input=tensor)


@pytest.mark.parametrize("mode", [pb.MODE_TRAIN, pb.MODE_EVAL], ids=["train", "eval"])
@pytest.mark.parametrize("delta", [-4, -1, 4, 1000], ids=["4-short", "1-short", "4-long", "1000-long"])
def test_byte_count_mismatch_is_invalid_argument(client, stub, bn, mode, delta):
    before = snapshot(client, bn)
    t = tensor_msg(good_batch())
    data = t.data + b"\0" * delta if delta > 0 else t.data[:delta]
    code, details = raw_error(stub.Normalize, _req(bn, pb.Tensor(dtype=t.dtype, shape=t.shape, data=data), mode))
    assert code == IA
    assert str(len(data)) in details and str(len(t.data)) in details and "bytes" in details
    assert_same_state(client, bn, before)


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 6, 99, -1])
def test_unknown_dtype_is_invalid_argument(client, stub, bn, dtype):
    before = snapshot(client, bn)
    t = tensor_msg(good_batch())
    code, details = raw_error(stub.Normalize, _req(bn, pb.Tensor(dtype=dtype, shape=t.shape, data=t.data)))
    assert code == IA
    assert "dtype" in details and "DTYPE_FLOAT32" in details
    assert_same_state(client, bn, before)


@pytest.mark.parametrize("shape", [[4, 3, -5, -5], [-4, 3, 5, -5], [-1]])
def test_negative_dimension_is_invalid_argument(client, stub, bn, shape):
    before = snapshot(client, bn)
    t = tensor_msg(good_batch())
    code, details = raw_error(stub.Normalize, _req(bn, pb.Tensor(dtype=t.dtype, shape=shape, data=t.data)))
    assert code == IA and "negative" in details
    assert_same_state(client, bn, before)


def test_rank_over_maximum_is_invalid_argument(client, stub, bn):
    before = snapshot(client, bn)
    shape = [1] * (codec.MAX_RANK + 1)
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, data=b"\0" * 4)
    code, details = raw_error(stub.Normalize, _req(bn, t))
    assert code == IA and "rank" in details
    assert_same_state(client, bn, before)


@pytest.mark.parametrize("shape", [[1 << 40, 1 << 40, 0], [0, 1 << 40, 1 << 40]])
def test_impossible_empty_shape_is_invalid_argument(client, stub, bn, shape):
    """A zero-element tensor whose other dims overflow int64 when multiplied: a client
    mistake, so INVALID_ARGUMENT like any other malformed tensor (not INTERNAL)."""
    before = snapshot(client, bn)
    code, details = raw_error(stub.Normalize, _req(bn, pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape)))
    assert code == IA, f"{code}: {details}"
    assert_same_state(client, bn, before)


# -- inputs that don't fit the layer -----------------------------------------------------
SHAPE_MISMATCH = [
    # (id, kind, kwargs, input shape, word the message must contain)
    ("bn2d-rank3", "BatchNorm2d", dict(num_features=3), (3, 5, 5), "rank"),
    ("bn2d-rank5", "BatchNorm2d", dict(num_features=3), (2, 3, 4, 5, 5), "rank"),
    ("bn2d-channels", "BatchNorm2d", dict(num_features=3), (4, 2, 5, 5), "3 channels"),
    ("bn1d-rank4", "BatchNorm1d", dict(num_features=4), (2, 4, 3, 3), "(N, C)"),
    ("bn1d-channels", "BatchNorm1d", dict(num_features=4), (8, 5), "4 channels"),
    ("bn3d-rank4", "BatchNorm3d", dict(num_features=2), (2, 2, 3, 3), "rank"),
    ("in2d-affine-channels", "InstanceNorm2d", dict(num_features=3, affine=True), (2, 4, 5, 5), "3 channels"),
    ("in1d-rank4", "InstanceNorm1d", dict(num_features=3), (2, 3, 4, 4), "rank"),
    ("ln-tail", "LayerNorm", dict(normalized_shape=[3, 4]), (2, 4, 3), "(3, 4)"),
    ("ln-too-short", "LayerNorm", dict(normalized_shape=[3, 4]), (4,), "(3, 4)"),
    ("rms-tail", "RMSNorm", dict(normalized_shape=[6]), (2, 5), "(6,)"),
    ("gn-channels", "GroupNorm", dict(num_groups=2, num_channels=4), (3, 6, 2), "4"),
    ("gn-rank1", "GroupNorm", dict(num_groups=2, num_channels=4), (4,), "(N, 4, *)"),
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "kind,kwargs,shape,word", [s[1:] for s in SHAPE_MISMATCH], ids=[s[0] for s in SHAPE_MISMATCH]
)
def test_shape_incompatible_with_layer_is_invalid_argument(client, name, kind, kwargs, shape, word, mode):
    client.create_layer(name, kind, **kwargs)
    before = snapshot(client, name)
    err = expect(E.InvalidArgumentError, IA, client.normalize, name, good_batch(shape=shape), mode)
    assert word in err.message, err.message
    assert str(shape) in err.message  # says what it got
    assert_same_state(client, name, before)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", ["float64", "int64"])
def test_wrong_input_dtype_is_invalid_argument(client, bn, dtype, mode):
    before = snapshot(client, bn)
    x = (good_batch() * 10).astype(dtype)
    err = expect(E.InvalidArgumentError, IA, client.normalize, bn, x, mode)
    assert dtype in err.message
    assert_same_state(client, bn, before)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (4, 3, 0, 5), (4, 3, 5, 0)])
def test_empty_tensor_is_invalid_argument(client, bn, shape, mode):
    before = snapshot(client, bn)
    err = expect(E.InvalidArgumentError, IA, client.normalize, bn, np.zeros(shape, np.float32), mode)
    assert "empty" in err.message
    assert_same_state(client, bn, before)


@pytest.mark.parametrize(
    "kind,shape",
    [("BatchNorm2d", (1, 3, 1, 1)), ("BatchNorm1d", (1, 3)), ("BatchNorm1d", (1, 3, 1)), ("BatchNorm3d", (1, 3, 1, 1, 1))],
)
def test_batchnorm_train_with_one_value_per_channel_is_invalid_argument(client, name, kind, shape):
    client.create_layer(name, kind, num_features=3)
    client.normalize(name, good_batch(2, (4, 3) + shape[2:] if len(shape) > 2 else (4, 3)), "train")
    before = snapshot(client, name)
    x = good_batch(3, shape)
    # PyTorch refuses it too.
    local = getattr(torch.nn, kind)(3).train()
    with pytest.raises(ValueError):
        local(torch.from_numpy(x))
    err = expect(E.InvalidArgumentError, IA, client.normalize, name, x, "train")
    assert "more than 1 value per channel" in err.message
    assert_same_state(client, name, before)
    # Eval with the same batch is fine (torch allows it) and still changes nothing.
    local.load_state_dict(before[0])
    out = client.normalize(name, x, "eval")
    np.testing.assert_allclose(out, local.eval()(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert_same_state(client, name, before)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_train_batch_is_invalid_argument(client, bn, bad):
    before = snapshot(client, bn)
    x = good_batch(4)
    x[2, 1, 3, 0] = bad
    err = expect(E.InvalidArgumentError, IA, client.normalize, bn, x, "train")
    assert "NaN or Inf" in err.message
    assert_same_state(client, bn, before)


@pytest.mark.parametrize("mode", [3, 7, 1000, -1])
def test_unknown_mode_is_invalid_argument(client, stub, bn, mode):
    before = snapshot(client, bn)
    code, details = raw_error(stub.Normalize, _req(bn, tensor_msg(good_batch()), mode=mode))
    assert code == IA
    assert str(mode) in details and "MODE_TRAIN" in details and "MODE_EVAL" in details
    assert_same_state(client, bn, before)


def test_unspecified_mode_is_eval_and_changes_nothing(client, stub, bn):
    before = snapshot(client, bn)
    x = good_batch(5)
    response = stub.Normalize(_req(bn, tensor_msg(x), mode=pb.MODE_UNSPECIFIED), timeout=RPC_TIMEOUT)
    np.testing.assert_array_equal(codec.to_numpy(response.output), client.normalize(bn, x, "eval"))
    assert response.state.version == before[1].version
    assert_same_state(client, bn, before)


# -- state errors ------------------------------------------------------------------------
def _bad_state(client, bn, how):
    """A state dict for `bn` with every value changed (so a partial load would show),
    then broken in one way."""
    state = {k: v.clone() for k, v in client.get_state(bn, as_torch=True).items()}
    state["weight"] = state["weight"] * 2 + 1
    state["bias"] = state["bias"] - 3
    state["running_mean"] = state["running_mean"] + 7
    state["num_batches_tracked"] = state["num_batches_tracked"] + 5
    if how == "missing-key":
        del state["running_var"]
    elif how == "unexpected-key":
        state["running_max"] = torch.zeros(3)
    elif how == "missing-and-unexpected":
        state["running_variance"] = state.pop("running_var")
    elif how == "wrong-shape":
        state["running_var"] = torch.ones(4)
    elif how == "wrong-rank":
        state["weight"] = torch.ones(3, 1)
    elif how == "scalar-for-vector":
        state["running_var"] = torch.tensor(1.0)
    elif how == "nan":
        state["running_var"][1] = math.nan
    elif how == "inf":
        state["weight"][0] = math.inf
    elif how == "int-for-float":
        state["running_var"] = torch.ones(3, dtype=torch.int64)
    elif how == "float-for-int":
        state["num_batches_tracked"] = torch.tensor(3.0)
    elif how == "negative-count":
        state["num_batches_tracked"] = torch.tensor(-1)
    elif how == "overflows-layer-dtype":
        # Finite in float64, Inf once stored in the float32 layer.
        state["running_var"] = torch.full((3,), 1e300, dtype=torch.float64)
    else:  # pragma: no cover
        raise AssertionError(how)
    return state


LOAD_STATE_ERRORS = [
    ("missing-key", "running_var"),
    ("unexpected-key", "running_max"),
    ("missing-and-unexpected", "running_variance"),
    ("wrong-shape", "running_var"),
    ("wrong-rank", "weight"),
    ("scalar-for-vector", "running_var"),
    ("nan", "running_var"),
    ("inf", "weight"),
    ("int-for-float", "running_var"),
    ("float-for-int", "num_batches_tracked"),
    ("negative-count", "num_batches_tracked"),
]


@pytest.mark.parametrize("how,key", LOAD_STATE_ERRORS, ids=[h for h, _ in LOAD_STATE_ERRORS])
def test_bad_load_state_is_invalid_argument_and_atomic(client, bn, how, key):
    before = snapshot(client, bn)
    err = expect(E.InvalidArgumentError, IA, client.load_state, bn, _bad_state(client, bn, how))
    assert key in err.message, err.message
    assert_same_state(client, bn, before)


def test_load_state_error_message_lists_expected_keys(client, bn):
    err = expect(E.InvalidArgumentError, IA, client.load_state, bn, _bad_state(client, bn, "missing-key"))
    for key in torch.nn.BatchNorm2d(3).state_dict():
        assert key in err.message
    assert "missing" in err.message and "expected" in err.message


def test_load_state_that_overflows_the_layer_dtype_is_invalid_argument(client, bn):
    """1e300 is finite as float64 but Inf in the float32 layer: the server rejects NaN/Inf
    in state, so it must not let Inf in through the dtype conversion."""
    before = snapshot(client, bn)
    state = _bad_state(client, bn, "overflows-layer-dtype")
    try:
        client.load_state(bn, state)
        raised = None
    except E.NormServeError as err:
        raised = err
    after = client.get_state(bn, as_torch=True)
    assert torch.isfinite(after["running_var"]).all(), f"LoadState accepted it: running_var is now {after['running_var']}"
    assert isinstance(raised, E.InvalidArgumentError) and raised.code == IA, repr(raised)
    assert "running_var" in raised.message
    assert_same_state(client, bn, before)


@pytest.mark.parametrize(
    "kind,kwargs",
    [
        ("LayerNorm", dict(normalized_shape=[4])),
        ("GroupNorm", dict(num_groups=2, num_channels=4)),
        ("RMSNorm", dict(normalized_shape=[4])),
        ("InstanceNorm2d", dict(num_features=3)),
        ("BatchNorm1d", dict(num_features=3, track_running_stats=False)),
    ],
    ids=["LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm2d", "BatchNorm1d-untracked"],
)
def test_reset_without_running_stats_is_failed_precondition(client, name, kind, kwargs):
    client.create_layer(name, kind, **kwargs)
    before = snapshot(client, name)
    err = expect(E.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION, client.reset_running_stats, name)
    assert "running statistics" in err.message and name in err.message
    assert_same_state(client, name, before)


# -- SDK-side validation (never reaches a server) ----------------------------------------
@pytest.fixture
def offline_client():
    """A client pointed at a port nothing listens on: anything that reached the network
    would fail UNAVAILABLE, so INVALID_ARGUMENT proves the SDK refused locally."""
    with Client("127.0.0.1:1", timeout=5) as c:
        yield c


@pytest.mark.parametrize("mode", ["predict", "", "TRAINING", None, 1, pb.MODE_TRAIN])
def test_sdk_rejects_bad_mode_locally(offline_client, mode):
    err = expect(E.InvalidArgumentError, IA, offline_client.normalize, "x", good_batch(), mode)
    assert "mode" in err.message and "'train'" in err.message


def test_sdk_rejects_bad_mode_in_stream_locally(offline_client):
    with pytest.raises(E.InvalidArgumentError) as info:
        list(offline_client.normalize_stream("x", [good_batch()], "inference"))
    assert info.value.code == IA


@pytest.mark.parametrize(
    "x",
    [
        np.ones((2, 3), np.int32),
        np.ones((2, 3), np.complex64),
        np.ones((2, 3), np.bool_),
        np.ones((2, 3), np.uint8),
        np.array([["a", "b"]]),
        np.array([[object()]]),
        torch.ones(2, 3, dtype=torch.int32),
        torch.ones(2, 3, dtype=torch.complex64),
        torch.ones(2, 3, dtype=torch.uint8),
    ],
    ids=["np-int32", "np-complex64", "np-bool", "np-uint8", "np-str", "np-object", "torch-int32", "torch-complex64", "torch-uint8"],
)
def test_sdk_rejects_unsupported_dtype_locally(offline_client, x):
    err = expect(E.InvalidArgumentError, IA, offline_client.normalize, "x", x, "train")
    assert "dtype" in err.message and "float32" in err.message


def test_sdk_rejects_unknown_kind_and_argument_locally(offline_client):
    err = expect(E.InvalidArgumentError, IA, offline_client.create_layer, "x", "BatchNorm4d", num_features=3)
    assert "BatchNorm4d" in err.message and "BatchNorm2d" in err.message
    err = expect(E.InvalidArgumentError, IA, offline_client.create_layer, "x", "BatchNorm2d", num_features=3, dropout=0.1)
    assert "dropout" in err.message
    expect(E.InvalidArgumentError, IA, offline_client.create_layer, "x", "InstanceNorm1d", num_features=3, momentum=None)
    # And the offline client really is offline.
    expect(E.UnavailableError, grpc.StatusCode.UNAVAILABLE, offline_client.get_layer, "x")


# -- deadline ----------------------------------------------------------------------------
def test_deadline_exceeded_leaves_state_consistent(client, name):
    """Train requests whose deadline expires long before the server could finish them:
    DEADLINE_EXCEEDED, and none of them is applied (a later train request, serialized
    behind any of them still running, sees a state that saw only itself)."""
    client.create_layer(name, "BatchNorm2d", num_features=8, momentum=None)
    before = snapshot(client, name)
    big = rng(6).normal(1.0, 3.0, (8, 8, 128, 128)).astype(np.float32)  # ~1M values
    for timeout in (0.001, 0.01):
        err = expect(E.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED, client.normalize, name, big, "train", timeout=timeout)
        assert isinstance(err, TimeoutError)
    expect(E.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED, client.normalize, name, big, "eval", timeout=0.001)
    assert_same_state(client, name, before)

    x = good_batch(7, (4, 8, 3, 3))
    result = client.normalize_result(name, x, "train")
    assert result.state.version == 1 and result.state.num_batches_tracked == 1
    local = local_train(torch.nn.BatchNorm2d(8, momentum=None), [x])
    state = client.get_state(name, as_torch=True)
    torch.testing.assert_close(state, local.state_dict(), rtol=1e-5, atol=1e-5)


# -- limits (own server) -----------------------------------------------------------------
MAX_MESSAGE_BYTES = 200_000
MAX_ELEMENTS = 5_000
MAX_LAYERS = 2


@pytest.fixture(scope="module")
def limited_server():
    with ServerProcess(
        "--max-message-bytes", str(MAX_MESSAGE_BYTES),
        "--max-tensor-elements", str(MAX_ELEMENTS),
        "--max-layers", str(MAX_LAYERS),
    ) as proc:
        yield proc


@pytest.fixture
def limited(limited_server):
    """(client, name of a trained BatchNorm1d(4)) on the limited server; the layer is
    deleted afterwards so the layer count stays predictable."""
    with Client(limited_server.target, timeout=RPC_TIMEOUT) as c:
        c.create_layer("lim", "BatchNorm1d", num_features=4)
        c.normalize("lim", good_batch(8, (16, 4)), "train")
        try:
            yield c, "lim"
        finally:
            c.delete_layer("lim")


def test_message_over_limit_is_resource_exhausted(limited):
    c, layer = limited
    before = snapshot(c, layer)
    x = good_batch(9, (MAX_MESSAGE_BYTES // 16 + 1, 4))  # > limit bytes; SDK allows 64 MiB
    assert x.nbytes > MAX_MESSAGE_BYTES
    err = expect(E.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED, c.normalize, layer, x, "train")
    assert str(MAX_MESSAGE_BYTES) in err.message, err.message
    assert_same_state(c, layer, before)


def test_tensor_over_element_limit_is_resource_exhausted(limited):
    c, layer = limited
    before = snapshot(c, layer)
    x = good_batch(10, (MAX_ELEMENTS // 4 + 1, 4))
    assert x.nbytes < MAX_MESSAGE_BYTES  # only the element limit is crossed
    for mode in ("train", "eval"):
        err = expect(E.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED, c.normalize, layer, x, mode)
        assert str(MAX_ELEMENTS) in err.message and "limit" in err.message, err.message
        assert str(x.size) in err.message
    assert_same_state(c, layer, before)
    # Exactly at the limit is fine.
    at_limit = good_batch(11, (MAX_ELEMENTS // 4, 4))
    assert c.normalize_result(layer, at_limit, "train").state.version == before[1].version + 1


def test_limits_inside_a_stream(limited_server, limited):
    """A tensor over the element limit fails only its own stream message; a message over
    the size limit fails the whole stream (gRPC refuses to read it) with
    RESOURCE_EXHAUSTED. What was answered before stays applied, nothing else."""
    c, layer = limited
    start = c.get_layer(layer).state
    g0, g1 = good_batch(14, (16, 4)), good_batch(15, (16, 4))
    too_many = good_batch(16, (MAX_ELEMENTS // 4 + 1, 4))
    too_big = good_batch(17, (MAX_MESSAGE_BYTES // 16 + 1, 4))
    RE = grpc.StatusCode.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(limited_server.target) as channel:
        stub = pb_grpc.NormServiceStub(channel)
        responses = list(stub.NormalizeStream(iter([_req(layer, tensor_msg(x)) for x in (g0, too_many, g1)]), timeout=RPC_TIMEOUT))
        assert [r.WhichOneof("result") for r in responses] == ["response", "error", "response"]
        assert responses[1].error.code == RE.value[0] and str(MAX_ELEMENTS) in responses[1].error.message
        assert [r.response.state.version for r in (responses[0], responses[2])] == [start.version + 1, start.version + 2]

        call = stub.NormalizeStream(iter([_req(layer, tensor_msg(x)) for x in (g0, too_big, g1)]), timeout=RPC_TIMEOUT)
        first = next(call)
        assert first.response.state.version == start.version + 3
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == RE and str(MAX_MESSAGE_BYTES) in (info.value.details() or "")
    assert c.get_layer(layer).state.version == start.version + 3

    # The SDK raises the per-message error, typed, at its position.
    with pytest.raises(E.ResourceExhaustedError) as info:
        list(c.normalize_stream(layer, [g0, too_many], "train"))
    assert info.value.code == RE and info.value.sequence == 1


def test_too_many_layers_is_resource_exhausted(limited):
    c, layer = limited
    assert len(c.list_layers()) == 1
    c.create_layer("second", "LayerNorm", normalized_shape=[4])
    try:
        before = {n: snapshot(c, n) for n in (layer, "second")}
        err = expect(E.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED, c.create_layer, "third", "LayerNorm", normalized_shape=[4])
        assert "max_layers" in err.message and str(MAX_LAYERS) in err.message, err.message
        expect(E.NotFoundError, grpc.StatusCode.NOT_FOUND, c.get_layer, "third")
        for n, snap in before.items():
            assert_same_state(c, n, snap)
        # A taken name at the limit is still ALREADY_EXISTS; freeing a slot lets a create in.
        expect(E.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS, c.create_layer, "second", "LayerNorm", normalized_shape=[4])
    finally:
        c.delete_layer("second")
    c.create_layer("third", "LayerNorm", normalized_shape=[4])
    c.delete_layer("third")


# -- shutting down (own server) ----------------------------------------------------------
def test_shutting_down_is_unavailable_while_open_stream_finishes():
    srv = ServerProcess("--grace-seconds", "30").start()
    requests: queue.Queue = queue.Queue()

    def request_iter():
        while True:
            item = requests.get(timeout=30)
            if item is None:
                return
            yield item

    channel = grpc.insecure_channel(srv.target)
    call = None
    try:
        with Client(srv.target, timeout=10) as c:
            c.create_layer("bn", "BatchNorm1d", num_features=4)
            x1, x2 = good_batch(12, (8, 4)), good_batch(13, (6, 4))
            local = torch.nn.BatchNorm1d(4).train()
            call = pb_grpc.NormServiceStub(channel).NormalizeStream(request_iter(), timeout=60)
            requests.put(pb.NormalizeRequest(layer="bn", mode=pb.MODE_TRAIN, input=tensor_msg(x1)))
            first = next(call)
            assert first.sequence == 0 and first.response.state.version == 1

            srv.signal(signal.SIGTERM)
            assert srv.wait_for_log("shutting down", timeout=10)
            # New calls, on the existing channel and on a fresh one, are refused.
            deadline = time.monotonic() + 10
            while True:
                try:
                    c.get_layer("bn", timeout=2)
                except E.UnavailableError as err:
                    assert err.code == grpc.StatusCode.UNAVAILABLE
                    break
                assert time.monotonic() < deadline, "server still accepts new calls after SIGTERM"
                time.sleep(0.05)
            with Client(srv.target, timeout=2) as fresh:
                err = expect(E.UnavailableError, grpc.StatusCode.UNAVAILABLE, fresh.normalize, "bn", x1, "eval")
                assert isinstance(err, ConnectionError)

            # The stream that was open keeps being served during the grace period.
            requests.put(pb.NormalizeRequest(layer="bn", mode=pb.MODE_TRAIN, input=tensor_msg(x2)))
            second = next(call)
            assert second.sequence == 1 and second.response.state.version == 2
            with torch.no_grad():
                local(torch.from_numpy(x1))
                expected = local(torch.from_numpy(x2)).numpy()
            np.testing.assert_allclose(codec.to_numpy(second.response.output), expected, rtol=1e-5, atol=1e-5)
            requests.put(None)
            assert list(call) == []
            assert call.code() == grpc.StatusCode.OK
        # With the last call done, the server exits well before the 30 s grace is up.
        assert srv.proc.wait(timeout=15) == 0
    finally:
        requests.put(None)
        if call is not None:
            call.cancel()
        channel.close()
        srv.kill()
