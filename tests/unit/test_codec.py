"""The tensor and layer-spec codec (normserve.client.codec), shared by server and client.

Wire format (DESIGN.md section 4, proto `Tensor`): dtype enum, shape, raw little-endian
C-order bytes; len(data) == prod(shape) * itemsize; an empty shape is a scalar.
"""

from __future__ import annotations

import math
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from normserve.client import codec
from normserve.client._proto import normserve_pb2 as pb
from normserve.client.codec import CodecError, TensorElementsExceeded

NUMPY_DTYPES = ["float32", "float64", "float16", "int64"]
TORCH_DTYPES = NUMPY_DTYPES + ["bfloat16"]
ENUM = {
    "float32": pb.DTYPE_FLOAT32,
    "float64": pb.DTYPE_FLOAT64,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "int64": pb.DTYPE_INT64,
}
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8}


def _np_sample(dtype: str, shape=(2, 3, 4)) -> np.ndarray:
    n = math.prod(shape)
    if dtype == "int64":
        values = np.arange(n, dtype=np.int64) * 7919 - 2**40
    else:
        values = np.linspace(-3.5, 1e3, n).astype(dtype)
        values.flat[0] = -0.0
    return values.reshape(shape)


def _torch_sample(dtype: str, shape=(2, 3, 4)) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.linspace(-3.5, 1e3, math.prod(shape)).reshape(shape).to(torch.bfloat16)
    return torch.from_numpy(_np_sample(dtype, shape).copy())


def _underlying_bytes(arr: np.ndarray) -> bytes:
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, bytes), f"decoded array is not a view of a bytes object (base {type(base)})"
    return base


def _address(buf: bytes) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


# -- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_round_trip(dtype):
    x = _np_sample(dtype)
    t = codec.from_numpy(x)
    assert t.dtype == ENUM[dtype]
    assert list(t.shape) == [2, 3, 4]
    assert len(t.data) == x.size * ITEMSIZE[dtype]
    y = codec.to_numpy(t)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    assert np.signbit(y.flat[0]) == np.signbit(x.flat[0])  # -0.0 survives (bit exact)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_round_trip(dtype):
    x = _torch_sample(dtype)
    t = codec.from_torch(x)
    assert t.dtype == ENUM[dtype]
    assert list(t.shape) == [2, 3, 4]
    assert len(t.data) == x.numel() * ITEMSIZE[dtype]
    y = codec.to_torch(t)
    assert y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape)
    assert torch.equal(y, x)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_and_torch_encode_identically(dtype):
    x = _np_sample(dtype)
    assert codec.from_numpy(x) == codec.from_torch(torch.from_numpy(x.copy()))
    # ... and encode() dispatches on the value's type.
    assert codec.encode(x) == codec.encode(torch.from_numpy(x.copy())) == codec.from_numpy(x)


def test_encode_accepts_array_likes():
    t = codec.encode([[1.0, 2.0], [3.0, 4.0]])
    assert t.dtype == pb.DTYPE_FLOAT64 and list(t.shape) == [2, 2]
    np.testing.assert_array_equal(codec.to_numpy(t), [[1.0, 2.0], [3.0, 4.0]])


def test_torch_tensor_requiring_grad_encodes():
    x = torch.ones(3, requires_grad=True) * 2
    assert torch.equal(codec.to_torch(codec.from_torch(x)), torch.full((3,), 2.0))


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_scalar_shape_is_empty(dtype):
    x = np.array(-2.5 if dtype != "int64" else -7, dtype=dtype)
    t = codec.from_numpy(x)
    assert list(t.shape) == []
    assert len(t.data) == ITEMSIZE[dtype]
    y = codec.to_numpy(t)
    assert y.shape == () and y.dtype == np.dtype(dtype) and y == x


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_scalar_shape_is_empty(dtype):
    x = torch.tensor(-2.5 if dtype != "int64" else -7).to(getattr(torch, dtype))
    t = codec.from_torch(x)
    assert list(t.shape) == []
    assert len(t.data) == ITEMSIZE[dtype]
    y = codec.to_torch(t)
    assert y.dim() == 0 and y.dtype == x.dtype and torch.equal(y, x)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_zero_element_tensors(dtype):
    x = torch.empty(0, 3, dtype=getattr(torch, dtype))
    t = codec.from_torch(x)
    assert list(t.shape) == [0, 3] and t.data == b""
    assert codec.to_torch(t).shape == (0, 3)
    if dtype != "bfloat16":
        assert codec.to_numpy(t).shape == (0, 3)


def test_non_contiguous_numpy_is_sent_in_c_order():
    base = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    for view in (base.transpose(2, 0, 1), base[:, ::2, 1:4], base[::-1], np.asfortranarray(base)):
        assert not view.flags.c_contiguous or view is base
        t = codec.from_numpy(view)
        assert list(t.shape) == list(view.shape)
        assert t.data == np.ascontiguousarray(view).tobytes()
        np.testing.assert_array_equal(codec.to_numpy(t), view)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_non_contiguous_torch_is_sent_in_c_order(dtype):
    base = _torch_sample(dtype, (3, 4, 5))
    for view in (base.permute(2, 0, 1), base[:, ::2, 1:4], base.transpose(0, 2)[1], base.expand(2, 3, 4, 5)):
        assert not view.is_contiguous()
        t = codec.from_torch(view)
        assert list(t.shape) == list(view.shape)
        y = codec.to_torch(t)
        assert y.is_contiguous() and torch.equal(y, view)


# -- zero-copy decode ----------------------------------------------------------------------
def _no_field(name: str) -> bool:
    """HasField of a stand-in message whose only fields are dtype, shape and data."""
    return False


def test_to_numpy_views_the_message_bytes():
    data = np.arange(24, dtype="<f4").tobytes()
    msg = SimpleNamespace(dtype=pb.DTYPE_FLOAT32, shape=[2, 3, 4], data=data, HasField=_no_field)
    y = codec.to_numpy(msg)
    assert np.shares_memory(y, np.frombuffer(data, dtype=np.uint8))
    assert y.ctypes.data == _address(data)
    assert not y.flags.writeable  # a view of immutable bytes must not be writable
    # A real protobuf message: the decoded array views the bytes object the message gave.
    real = codec.from_numpy(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    y = codec.to_numpy(real)
    assert not y.flags.owndata
    assert np.shares_memory(y, np.frombuffer(_underlying_bytes(y), dtype=np.uint8))


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_to_torch_views_the_message_bytes(dtype):
    data = codec.from_torch(_torch_sample(dtype)).data
    msg = SimpleNamespace(dtype=ENUM[dtype], shape=[2, 3, 4], data=data, HasField=_no_field)
    y = codec.to_torch(msg)
    start = _address(data)
    assert y.data_ptr() == start
    assert y.data_ptr() + y.numel() * y.element_size() == start + len(data)


# -- byte order ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, fmt",
    [("float32", "<f"), ("float64", "<d"), ("float16", "<e"), ("int64", "<q")],
)
def test_wire_bytes_are_little_endian(dtype, fmt):
    values = [1.0, -2.5, 65504.0 if dtype == "float16" else 1e4] if dtype != "int64" else [1, -2, 2**40 + 3]
    expected = b"".join(struct.pack(fmt, v) for v in values)
    for order in ("<", ">"):
        x = np.array(values, dtype=np.dtype(dtype).newbyteorder(order))
        t = codec.from_numpy(x)
        assert t.data == expected, f"{order}{dtype} array was not sent little-endian"
        assert t.dtype == ENUM[dtype]
        np.testing.assert_array_equal(codec.to_numpy(t), np.array(values, dtype=dtype))
    assert codec.from_torch(torch.tensor(values, dtype=getattr(torch, dtype))).data == expected


def test_bfloat16_wire_bytes_are_little_endian():
    # bfloat16 is the top half of float32: 1.0 = 0x3F80, -2.0 = 0xC000.
    t = codec.from_torch(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    assert t.data == struct.pack("<HH", 0x3F80, 0xC000)
    decoded = codec.to_torch(pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=[2], data=struct.pack("<HH", 0x4040, 0xBF80)))
    assert decoded.tolist() == [3.0, -1.0]


def test_decode_reads_little_endian_bytes():
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[2], data=struct.pack("<dd", 0.5, -8.0))
    assert codec.to_numpy(t).tolist() == [0.5, -8.0]
    assert codec.to_torch(t).tolist() == [0.5, -8.0]
    t = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[], data=struct.pack("<q", -(2**62)))
    assert int(codec.to_torch(t)) == -(2**62) and int(codec.to_numpy(t)) == -(2**62)


# -- validation ----------------------------------------------------------------------------
DECODERS = [codec.to_numpy, codec.to_torch]


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("nbytes", [0, 23, 25, 48])
def test_wrong_byte_count_rejected(decode, nbytes):
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * nbytes)
    with pytest.raises(CodecError) as e:
        decode(t)
    msg = str(e.value)
    assert str(nbytes) in msg and "24" in msg, msg  # what it got and what it needed


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 99, -1])
def test_unknown_dtype_rejected(decode, dtype):
    t = pb.Tensor(dtype=dtype, shape=[1], data=b"\0" * 4)
    with pytest.raises(CodecError) as e:
        decode(t)
    assert "dtype" in str(e.value) and "DTYPE_FLOAT32" in str(e.value)


@pytest.mark.parametrize("decode", DECODERS)
def test_negative_dims_rejected(decode):
    # (-1) * (-2) == 2 elements would match 8 bytes: the sign must be checked on its own.
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, -2], data=b"\0" * 8)
    with pytest.raises(CodecError, match="negative"):
        decode(t)


@pytest.mark.parametrize("decode", DECODERS)
def test_rank_over_max_rejected(decode):
    ok = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * codec.MAX_RANK, data=b"\0" * 4)
    assert decode(ok).shape == (1,) * codec.MAX_RANK
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * (codec.MAX_RANK + 1), data=b"\0" * 4)
    with pytest.raises(CodecError) as e:
        decode(t)
    assert "rank" in str(e.value) and str(codec.MAX_RANK) in str(e.value)


@pytest.mark.parametrize("decode", DECODERS)
def test_element_limit(decode):
    t = codec.from_numpy(np.zeros((4, 25), dtype=np.float32))
    assert decode(t, max_elements=100).shape == (4, 25)
    with pytest.raises(TensorElementsExceeded) as e:
        decode(t, max_elements=99)
    assert isinstance(e.value, CodecError)
    assert "100" in str(e.value) and "99" in str(e.value)


def test_element_limit_checked_before_byte_count():
    # A huge declared shape with no data must be refused for its size, not by allocation.
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 20, 1 << 20], data=b"")
    with pytest.raises(TensorElementsExceeded):
        codec.to_torch(t, max_elements=1 << 25)
    with pytest.raises(CodecError):
        codec.to_numpy(t)


def test_bfloat16_has_no_numpy_dtype():
    t = codec.from_torch(torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(CodecError, match="torch"):
        codec.to_numpy(t)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_, np.uint8, np.int16])
def test_unsupported_numpy_dtypes_rejected(dtype):
    with pytest.raises(CodecError) as e:
        codec.encode(np.zeros(3, dtype=dtype))
    msg = str(e.value)
    assert np.dtype(dtype).name in msg and "float32" in msg, msg


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.bool, torch.uint8, torch.int8])
def test_unsupported_torch_dtypes_rejected(dtype):
    with pytest.raises(CodecError) as e:
        codec.encode(torch.zeros(3, dtype=dtype))
    msg = str(e.value)
    assert str(dtype).removeprefix("torch.") in msg and "bfloat16" in msg, msg


def test_non_numeric_values_rejected():
    with pytest.raises(CodecError):
        codec.encode(["a", "b"])


# -- layer specs ---------------------------------------------------------------------------
SPEC_CASES = [
    ("BatchNorm1d", {"num_features": 7}),
    ("BatchNorm2d", {"num_features": 3, "eps": 1e-3, "momentum": 0.25, "affine": False,
                     "track_running_stats": True, "dtype": "float64"}),
    ("BatchNorm3d", {"num_features": 2, "momentum": None, "bias": False, "dtype": "bfloat16"}),
    ("BatchNorm2d", {"num_features": 1, "momentum": 0.0, "eps": 0.0}),  # zero is not "unset"
    ("InstanceNorm1d", {"num_features": 4}),
    ("InstanceNorm2d", {"num_features": 4, "eps": 1e-6, "momentum": 0.5, "affine": True,
                        "track_running_stats": True, "bias": True, "dtype": "float16"}),
    ("InstanceNorm3d", {"num_features": 1, "affine": False, "track_running_stats": False}),
    ("LayerNorm", {"normalized_shape": [4, 5], "eps": 1e-4, "elementwise_affine": False, "bias": False}),
    ("LayerNorm", {"normalized_shape": [8], "dtype": "float32"}),
    ("GroupNorm", {"num_groups": 2, "num_channels": 6, "eps": 0.01, "affine": True, "bias": False, "dtype": "float64"}),
    ("RMSNorm", {"normalized_shape": [3], "eps": 1e-6, "elementwise_affine": False}),
    ("RMSNorm", {"normalized_shape": [2, 3]}),
]


@pytest.mark.parametrize("kind, kwargs", SPEC_CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(SPEC_CASES)])
def test_spec_round_trip(kind, kwargs):
    spec = codec.kwargs_to_spec(kind, kwargs)
    assert spec.WhichOneof("kind") == codec.KIND_FIELDS[kind]
    wire = pb.LayerSpec.FromString(spec.SerializeToString())
    back_kind, back = codec.spec_to_kwargs(wire)
    assert back_kind == kind
    assert back == kwargs


def test_every_kind_has_a_spec_field():
    assert set(codec.KIND_FIELDS) == {
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
        "InstanceNorm3d", "LayerNorm", "GroupNorm", "RMSNorm",
    }
    assert set(codec.KIND_FIELDS.values()) == {f.name for f in pb.LayerSpec.DESCRIPTOR.oneofs_by_name["kind"].fields}


@pytest.mark.parametrize("kind", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_momentum_none_is_cumulative_average(kind):
    spec = codec.kwargs_to_spec(kind, {"num_features": 3, "momentum": None})
    msg = getattr(spec, codec.KIND_FIELDS[kind])
    assert msg.WhichOneof("momentum_option") == "cumulative_average" and msg.cumulative_average
    assert codec.spec_to_kwargs(spec)[1] == {"num_features": 3, "momentum": None}
    # Unset momentum is left out (torch's default 0.1 applies), not None.
    assert "momentum" not in codec.spec_to_kwargs(codec.kwargs_to_spec(kind, {"num_features": 3}))[1]


@pytest.mark.parametrize("kind", ["InstanceNorm2d", "LayerNorm", "GroupNorm", "RMSNorm"])
def test_momentum_none_rejected_outside_batchnorm(kind):
    with pytest.raises(CodecError, match="momentum"):
        codec.kwargs_to_spec(kind, {"momentum": None})


@pytest.mark.parametrize(
    "dtype, name",
    [(torch.float64, "float64"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16"),
     (torch.float32, "float32"), ("float64", "float64"), ("bfloat16", "bfloat16")],
)
def test_spec_dtype_as_torch_dtype_or_name(dtype, name):
    spec = codec.kwargs_to_spec("GroupNorm", {"num_groups": 1, "num_channels": 2, "dtype": dtype})
    assert spec.group_norm.dtype == ENUM[name]
    assert codec.spec_to_kwargs(spec)[1]["dtype"] == name


@pytest.mark.parametrize("dtype", [torch.int64, "int64", torch.int32, "float128", "double", None])
def test_spec_non_float_dtype_rejected(dtype):
    with pytest.raises(CodecError, match="dtype"):
        codec.kwargs_to_spec("LayerNorm", {"normalized_shape": [2], "dtype": dtype})


def test_spec_int64_dtype_on_the_wire_rejected():
    spec = pb.LayerSpec(layer_norm=pb.LayerNormSpec(normalized_shape=[2], dtype=pb.DTYPE_INT64))
    with pytest.raises(CodecError, match="float"):
        codec.spec_to_kwargs(spec)


def test_unset_dtype_is_left_out():
    spec = pb.LayerSpec(batch_norm1d=pb.BatchNormSpec(num_features=2))
    assert codec.spec_to_kwargs(spec) == ("BatchNorm1d", {"num_features": 2})


@pytest.mark.parametrize(
    "kind, kwargs, bad",
    [
        ("BatchNorm2d", {"num_features": 3, "device": "cpu"}, "device"),
        ("LayerNorm", {"normalized_shape": [3], "momentum": 0.1}, "momentum"),
        ("GroupNorm", {"num_groups": 1, "num_channels": 2, "track_running_stats": True}, "track_running_stats"),
        ("RMSNorm", {"normalized_shape": [3], "bias": False}, "bias"),
        ("BatchNorm1d", {"num_features": 3, "cumulative_average": True}, "cumulative_average"),
        ("InstanceNorm1d", {"numfeatures": 3}, "numfeatures"),
    ],
)
def test_unknown_kwargs_rejected(kind, kwargs, bad):
    with pytest.raises(CodecError) as e:
        codec.kwargs_to_spec(kind, kwargs)
    assert repr(bad) in str(e.value) and kind in str(e.value)


def test_unknown_kind_rejected():
    with pytest.raises(CodecError) as e:
        codec.kwargs_to_spec("BatchNorm4d", {"num_features": 3})
    assert "BatchNorm4d" in str(e.value) and "BatchNorm2d" in str(e.value)


def test_spec_without_kind_rejected():
    with pytest.raises(CodecError, match="kind"):
        codec.spec_to_kwargs(pb.LayerSpec())


@pytest.mark.parametrize(
    "kwargs", [{"num_features": "three"}, {"num_features": 2.5}, {"eps": "small"}, {"affine": "yes"}]
)
def test_wrongly_typed_values_rejected(kwargs):
    with pytest.raises(CodecError) as e:
        codec.kwargs_to_spec("BatchNorm2d", kwargs)
    assert next(iter(kwargs)) in str(e.value)


def test_normalized_shape_int_becomes_list():
    spec = codec.kwargs_to_spec("LayerNorm", {"normalized_shape": 5})
    assert codec.spec_to_kwargs(spec) == ("LayerNorm", {"normalized_shape": [5]})
    spec = codec.kwargs_to_spec("RMSNorm", {"normalized_shape": torch.Size([2, 3]), "eps": None})
    assert codec.spec_to_kwargs(spec) == ("RMSNorm", {"normalized_shape": [2, 3]})  # eps None = unset


# -- property: arbitrary shapes and dtypes round-trip bit-exactly ------------------------
_DTYPES = st.sampled_from(["<f2", "<f4", "<f8", "<i8", ">f2", ">f4", ">f8", ">i8"])
_SHAPES = hnp.array_shapes(min_dims=0, max_dims=codec.MAX_RANK, min_side=0, max_side=3)


@st.composite
def _arrays(draw):
    dtype = np.dtype(draw(_DTYPES))
    shape = draw(_SHAPES)
    a = draw(hnp.arrays(dtype, shape, elements=None if dtype.kind == "f" else st.integers(-(2**63), 2**63 - 1)))
    if a.ndim > 1 and draw(st.booleans()):
        a = a.transpose(draw(st.permutations(range(a.ndim))))
    return a


def _bits(a: np.ndarray) -> np.ndarray:
    le = a.astype(a.dtype.newbyteorder("<"))
    return le.view(f"<u{le.dtype.itemsize}") if le.size else le


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_arrays())
def test_property_round_trip(a):
    name = a.dtype.newbyteorder("=").name
    t = pb.Tensor.FromString(codec.encode(a).SerializeToString())
    assert t.dtype == ENUM[name]
    assert tuple(t.shape) == a.shape
    assert len(t.data) == a.size * a.dtype.itemsize

    back = codec.to_numpy(t)
    assert back.shape == a.shape and back.dtype == np.dtype(name)
    np.testing.assert_array_equal(_bits(back), _bits(a))  # bit-exact, NaN payloads included

    native = torch.from_numpy(a.astype(a.dtype.newbyteorder("<"), order="C"))
    assert codec.from_torch(native) == t
    tt = codec.to_torch(t)
    assert tt.dtype == getattr(torch, name) and tuple(tt.shape) == a.shape
    np.testing.assert_array_equal(_bits(tt.numpy()), _bits(a))


@settings(max_examples=50, deadline=None, database=None)
@given(hnp.arrays(np.float32, _SHAPES, elements=st.floats(-2.0**100, 2.0**100, width=32, allow_nan=False)))
def test_property_bfloat16_round_trip(a):
    x = torch.from_numpy(a.copy()).to(torch.bfloat16)
    t = codec.from_torch(x)
    assert t.dtype == pb.DTYPE_BFLOAT16 and tuple(t.shape) == a.shape and len(t.data) == 2 * a.size
    y = codec.to_torch(pb.Tensor.FromString(t.SerializeToString()))
    assert y.dtype == torch.bfloat16 and torch.equal(y.view(torch.int16), x.view(torch.int16))
