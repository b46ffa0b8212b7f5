"""The one codec module, shared by server and client.

Tensors: numpy / torch <-> normserve.v1.Tensor. Layer specs: (torch class name, torch
constructor kwargs) <-> normserve.v1.LayerSpec.

Wire format: dtype enum, shape, raw little-endian C-order bytes. Decoding validates the
message completely (known dtype, non-negative dims, byte length = prod(shape) * itemsize)
before any tensor is built, and builds it without copying the bytes. torch is optional:
only the torch functions need it.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ._proto import normserve_pb2 as pb
from .wire import MIN_FRAMED_BYTES, Buffer

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # the zero-copy paths below assume the wire's byte order
    raise ImportError("normserve supports little-endian hosts only")

# Tensors decoded from protobuf bytes are never written in place (the server only reads
# its inputs); torch's warning about the read-only buffer is noise on every request.
warnings.filterwarnings("ignore", message="The given (buffer|NumPy array) is not writable", category=UserWarning)

DTYPE_NAMES: dict["pb.DType", str] = {
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT64: "float64",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
    pb.DTYPE_INT64: "int64",
}
DTYPE_ENUMS: dict[str, "pb.DType"] = {name: enum for enum, name in DTYPE_NAMES.items()}
ITEMSIZE: dict[str, int] = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8}
# numpy has no bfloat16: such tensors travel as torch tensors only.
NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<") for name in ("float32", "float64", "float16", "int64")
}
_NAMES_OF_NUMPY_DTYPES: dict[np.dtype, str] = {dtype: name for name, dtype in NUMPY_DTYPES.items()}

MAX_RANK = 8


class CodecError(ValueError):
    """A message or a local value that can't be converted; the message says why."""


class TensorElementsExceeded(CodecError):
    """A tensor is over a configured size limit (elements or rank)."""


def check(
    t: pb.Tensor, max_elements: Optional[int] = None, data: Optional[Buffer] = None, max_rank: int = MAX_RANK
) -> tuple[str, tuple[int, ...]]:
    """Validate a Tensor message; returns (dtype name, shape). Pass `data` when the caller
    already holds t.data: every access to a bytes field copies it. A tensor in shared
    memory must have no data and a byte_size that matches its shape. Over MAX_RANK dims is a
    malformed tensor; over a lower configured `max_rank`, a limit (TensorLimitExceeded)."""
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        if t.dtype == pb.DTYPE_UNSPECIFIED and not t.shape and not t.data:
            raise CodecError("a tensor is required (dtype, shape and data are all unset)")
        expected = ", ".join(pb.DType.Name(e) for e in DTYPE_NAMES)
        raise CodecError(f"unknown tensor dtype {t.dtype}; expected one of {expected}")
    shape = tuple(t.shape)
    if len(shape) > MAX_RANK:
        raise CodecError(f"tensor rank {len(shape)} exceeds the maximum of {MAX_RANK}")
    if len(shape) > max_rank:
        raise TensorElementsExceeded(f"tensor rank {len(shape)} is over the limit max_tensor_rank={max_rank}")
    if shape and min(shape) < 0:
        raise CodecError(f"tensor shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    # With a zero dim the other dims may still be absurd: check them as if each were >= 1.
    extent = count if count else math.prod(max(d, 1) for d in shape)
    if extent * ITEMSIZE[name] >= 1 << 62:
        raise CodecError(f"tensor shape {list(shape)} is too large (its size in bytes overflows 62 bits)")
    if max_elements is not None and count > max_elements:
        raise TensorElementsExceeded(
            f"tensor shape {list(shape)} has {count} elements, over the limit max_tensor_elements={max_elements}"
        )
    if t.HasField("shared_memory"):
        if t.data if data is None else data:
            raise CodecError("a tensor carries either data or shared_memory, not both")
        size, what = t.shared_memory.byte_size, "shared_memory.byte_size is"
    else:
        size, what = len(t.data if data is None else data), "data has"
    expected_bytes = count * ITEMSIZE[name]
    if size != expected_bytes:
        raise CodecError(f"tensor {what} {size} bytes; shape {list(shape)} of {name} needs {expected_bytes}")
    return name, shape


def _inline_only(t: pb.Tensor) -> None:
    if t.HasField("shared_memory"):
        raise CodecError("this tensor must carry its bytes in data: shared_memory is accepted for Normalize inputs only")


# -- torch -------------------------------------------------------------------------------
def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise CodecError("torch is not installed; use numpy arrays") from e
    return torch


def to_torch(
    t: pb.Tensor, max_elements: Optional[int] = None, max_rank: int = MAX_RANK, data: Optional[Buffer] = None
) -> "torch.Tensor":
    """Decode without copying: the tensor views the message's bytes, or `data` when its
    bytes travelled beside it (wire.Framed); treat it as read-only."""
    torch = _torch()
    if data is None:
        data = t.data
    _inline_only(t)
    name, shape = check(t, max_elements, data, max_rank)
    dtype = getattr(torch, name)
    if not data:
        return torch.empty(shape, dtype=dtype)
    array_dtype = NUMPY_DTYPES.get(name)
    if array_dtype is not None:
        # numpy shapes it: torch's own view would release and retake the GIL, which costs
        # a thread switch per request on a busy server.
        return torch.from_numpy(np.frombuffer(data, dtype=array_dtype).reshape(shape))
    return torch.frombuffer(data, dtype=dtype).view(shape)


def torch_view(buffer: Any, name: str, shape: tuple[int, ...], offset: int) -> "torch.Tensor":
    """A tensor of dtype `name` and `shape` viewing `buffer` (e.g. a shared-memory map) at
    byte `offset`, without copying; the caller has checked the bounds."""
    torch = _torch()
    dtype = getattr(torch, name)
    count = math.prod(shape)
    if not count:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(shape)


def copy_out(view: Any, device: Any = None) -> Any:
    """A decoded view (of message bytes or a shared-memory region) copied into memory of
    its own: a numpy array when `device` is None, else a torch tensor on `device`."""
    if device is None:
        return view.copy()
    return view.clone() if getattr(device, "type", device) == "cpu" else view.to(device)


def numpy_view(buffer: Any, name: str, shape: tuple[int, ...], offset: int) -> np.ndarray:
    """The numpy twin of torch_view (not for bfloat16, which numpy lacks)."""
    if name not in NUMPY_DTYPES:
        raise CodecError(f"{name} tensors have no numpy dtype; decode them with torch")
    return np.frombuffer(buffer, dtype=NUMPY_DTYPES[name], count=math.prod(shape), offset=offset).reshape(shape)


def _fill(out: Optional[pb.Tensor], dtype: "pb.DType", shape: Any, data: bytes) -> pb.Tensor:
    """Set the fields of `out` (or of a new Tensor) in place. Passing a filled Tensor to a
    parent message's constructor would copy its bytes once more: fill the field instead,
    e.g. `from_torch(x, out=response.output)`."""
    if out is None:
        out = pb.Tensor()
    out.dtype = dtype
    out.shape[:] = shape
    out.data = data
    return out


def tensor_dtype_name(x: "torch.Tensor") -> str:
    """The wire name of a torch tensor's dtype; CodecError for dtypes the wire lacks."""
    name = str(x.dtype).removeprefix("torch.")
    if name not in DTYPE_ENUMS:
        raise CodecError(f"unsupported tensor dtype {x.dtype}; expected one of {', '.join(DTYPE_ENUMS)}")
    return name


def array_dtype_name(x: np.ndarray) -> str:
    """The wire name of a numpy array's dtype; CodecError for dtypes the wire lacks."""
    name = _NAMES_OF_NUMPY_DTYPES.get(x.dtype)  # a dict lookup: dtype.name is slow
    if name is not None:
        return name
    name = x.dtype.name  # e.g. another byte order
    if name not in NUMPY_DTYPES:
        raise CodecError(f"unsupported array dtype {x.dtype}; expected one of {', '.join(NUMPY_DTYPES)}")
    return str(name)


def _torch_array(x: "torch.Tensor") -> tuple[str, tuple[int, ...], np.ndarray]:
    """(dtype name, shape, the tensor's bytes as a C-contiguous CPU array)."""
    torch = _torch()
    name = tensor_dtype_name(x)
    # Only the calls needed: each torch call releases and retakes the GIL (see to_torch).
    if x.requires_grad:
        x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)  # numpy can't hold bfloat16; the bytes are the same
    return name, tuple(x.shape), np.ascontiguousarray(x.numpy())


def _numpy_array(x: Any) -> tuple[str, tuple[int, ...], np.ndarray]:
    x = np.asarray(x)
    name = array_dtype_name(x)
    # ascontiguousarray makes 0-d arrays 1-d: the shape is the input's.
    return name, x.shape, np.ascontiguousarray(x, dtype=NUMPY_DTYPES[name])


def from_torch(x: "torch.Tensor", out: Optional[pb.Tensor] = None) -> pb.Tensor:
    """Encode a torch tensor (any device, any strides) with one copy into the message."""
    name, shape, array = _torch_array(x)
    return _fill(out, DTYPE_ENUMS[name], shape, array.tobytes())


# -- numpy -------------------------------------------------------------------------------
def to_numpy(t: pb.Tensor, max_elements: Optional[int] = None, data: Optional[Buffer] = None) -> np.ndarray:
    """Decode without copying into a read-only array (of `data`, when given: see to_torch)."""
    if data is None:
        data = t.data
    _inline_only(t)
    name, shape = check(t, max_elements, data)
    if name not in NUMPY_DTYPES:
        raise CodecError(f"{name} tensors have no numpy dtype; decode them with torch")
    return np.frombuffer(data, dtype=NUMPY_DTYPES[name]).reshape(shape)


def from_numpy(x: np.ndarray, out: Optional[pb.Tensor] = None) -> pb.Tensor:
    name, shape, array = _numpy_array(x)
    return _fill(out, DTYPE_ENUMS[name], shape, array.tobytes())


def is_torch(x: Any) -> bool:
    """True for a torch.Tensor, without importing torch when it isn't loaded already."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def encode(x: Any, out: Optional[pb.Tensor] = None) -> pb.Tensor:
    """numpy array, torch tensor or anything np.asarray accepts -> Tensor message (`out`,
    filled in place, when given)."""
    return from_torch(x, out) if is_torch(x) else from_numpy(x, out)


def encode_head(x: Any, out: pb.Tensor) -> Buffer:
    """Like `encode`, but only dtype and shape go into `out`: the bytes are returned, for
    wire.Framed to send beside the message without copying them into it. Small tensors
    (under wire.MIN_FRAMED_BYTES) go into `out` after all; b"" is returned then."""
    name, shape, array = _torch_array(x) if is_torch(x) else _numpy_array(x)
    small = array.nbytes < MIN_FRAMED_BYTES
    _fill(out, DTYPE_ENUMS[name], shape, array.tobytes() if small else b"")
    return b"" if small else array.reshape(-1).view(np.uint8).data  # a memoryview of the array, no copy


# -- layer specs -------------------------------------------------------------------------
KIND_FIELDS: dict[str, str] = {
    "BatchNorm1d": "batch_norm1d",
    "BatchNorm2d": "batch_norm2d",
    "BatchNorm3d": "batch_norm3d",
    "InstanceNorm1d": "instance_norm1d",
    "InstanceNorm2d": "instance_norm2d",
    "InstanceNorm3d": "instance_norm3d",
    "LayerNorm": "layer_norm",
    "GroupNorm": "group_norm",
    "RMSNorm": "rms_norm",
}
FIELD_KINDS: dict[str, str] = {f: k for k, f in KIND_FIELDS.items()}
_FLOAT_NAMES = ("float32", "float64", "float16", "bfloat16")


def spec_to_kwargs(spec: pb.LayerSpec) -> tuple[str, dict[str, Any]]:
    """LayerSpec -> (torch class name, constructor kwargs). Unset optional fields are left
    out (the layer's defaults apply); momentum=None comes from `cumulative_average`."""
    which = spec.WhichOneof("kind")
    if which is None:
        raise CodecError(f"layer spec names no kind; expected one of {', '.join(KIND_FIELDS)}")
    msg = getattr(spec, which)
    kwargs: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        name = field.name
        value = getattr(msg, name)
        if name == "dtype":
            if value != pb.DTYPE_UNSPECIFIED:
                dtype = DTYPE_NAMES.get(value)
                if dtype not in _FLOAT_NAMES:
                    raise CodecError(f"layer dtype must be a floating type, got {pb.DType.Name(value) if dtype else value}")
                kwargs["dtype"] = dtype
        elif name == "cumulative_average":
            if value:
                kwargs["momentum"] = None
        elif field.has_presence:
            if msg.HasField(name):
                kwargs[name] = value
        elif field.is_repeated:
            kwargs[name] = list(value)
        else:
            kwargs[name] = value
    return FIELD_KINDS[which], kwargs


def kwargs_to_spec(kind: str, kwargs: dict[str, Any]) -> pb.LayerSpec:
    """(torch class name, constructor kwargs) -> LayerSpec. `dtype` may be a torch.dtype or
    a name; `momentum=None` becomes `cumulative_average`."""
    which = KIND_FIELDS.get(kind)
    if which is None:
        raise CodecError(f"unknown layer kind {kind!r}; expected one of {', '.join(KIND_FIELDS)}")
    spec = pb.LayerSpec()
    msg = getattr(spec, which)
    fields = {f.name for f in msg.DESCRIPTOR.fields} - {"cumulative_average"}
    for name, value in kwargs.items():
        if name not in fields:
            raise CodecError(f"{kind} has no argument {name!r}; expected some of {sorted(fields)}")
        try:
            if name == "dtype":
                dtype = str(value).removeprefix("torch.")
                if dtype not in _FLOAT_NAMES:
                    raise CodecError(f"{kind}: dtype must be one of {', '.join(_FLOAT_NAMES)}, got {value!r}")
                msg.dtype = DTYPE_ENUMS[dtype]
            elif name == "momentum" and value is None:
                if "cumulative_average" not in {f.name for f in msg.DESCRIPTOR.fields}:
                    raise CodecError(f"{kind}: momentum must be a number (None is BatchNorm only)")
                msg.cumulative_average = True
            elif name == "eps" and value is None and kind == "RMSNorm":
                continue
            elif name == "normalized_shape":
                msg.normalized_shape.extend([value] if isinstance(value, int) else list(value))
            else:
                setattr(msg, name, value)
        except (TypeError, ValueError) as e:
            if isinstance(e, CodecError):
                raise
            raise CodecError(f"{kind}: invalid value {value!r} for {name}: {e}") from None
    return spec
