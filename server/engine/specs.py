"""Layer kinds, their constructor arguments (PyTorch's defaults filled in) and validation.

A `LayerConfig` is the torch-independent description of a layer: the torch.nn class name
and its keyword arguments, with `dtype` as a name ("float32"). `build_module` turns it
into a torch module with the arguments the installed torch understands.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .errors import InvalidSpec

_CLASSES: dict[str, type[nn.Module]] = {
    "BatchNorm1d": nn.BatchNorm1d,
    "BatchNorm2d": nn.BatchNorm2d,
    "BatchNorm3d": nn.BatchNorm3d,
    "InstanceNorm1d": nn.InstanceNorm1d,
    "InstanceNorm2d": nn.InstanceNorm2d,
    "InstanceNorm3d": nn.InstanceNorm3d,
    "LayerNorm": nn.LayerNorm,
    "GroupNorm": nn.GroupNorm,
    "RMSNorm": nn.RMSNorm,
}
KINDS: tuple[str, ...] = tuple(_CLASSES)

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Upper bound on the elements of one parameter vector: keeps a typo from allocating GiBs.
MAX_FEATURES = 1 << 24
# Inputs have at most 8 dims (the codec's limit), so a longer normalized_shape is unusable.
MAX_NORMALIZED_RANK = 8

_COMMON = {"eps": 1e-5, "dtype": "float32"}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "batch_norm": {**_COMMON, "momentum": 0.1, "affine": True, "track_running_stats": True, "bias": True},
    "instance_norm": {**_COMMON, "momentum": 0.1, "affine": False, "track_running_stats": False, "bias": True},
    "layer_norm": {**_COMMON, "elementwise_affine": True, "bias": True},
    "group_norm": {**_COMMON, "affine": True, "bias": True},
    "rms_norm": {"eps": None, "elementwise_affine": True, "dtype": "float32"},
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "batch_norm": ("num_features",),
    "instance_norm": ("num_features",),
    "layer_norm": ("normalized_shape",),
    "group_norm": ("num_groups", "num_channels"),
    "rms_norm": ("normalized_shape",),
}


def family(kind: str) -> str:
    """'BatchNorm2d' -> 'batch_norm', 'RMSNorm' -> 'rms_norm'."""
    if kind.startswith("BatchNorm"):
        return "batch_norm"
    if kind.startswith("InstanceNorm"):
        return "instance_norm"
    return {"LayerNorm": "layer_norm", "GroupNorm": "group_norm", "RMSNorm": "rms_norm"}[kind]


def spatial_dims(kind: str) -> int:
    """1, 2 or 3 for BatchNorm/InstanceNorm kinds (the digit in the name)."""
    return int(kind[-2])


def _accepts(cls: type[nn.Module], arg: str) -> bool:
    return arg in inspect.signature(cls.__init__).parameters


# Older torch releases lack some arguments (e.g. `bias` before 2.13): keep working there.
_TORCH_ACCEPTS = {kind: {a for a in ("bias",) if _accepts(cls, a)} for kind, cls in _CLASSES.items()}


@dataclass(frozen=True)
class LayerConfig:
    """A validated layer description: torch.nn class name plus every constructor argument."""

    kind: str
    args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return family(self.kind)

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.args["dtype"]]

    @property
    def tracks_running_stats(self) -> bool:
        return bool(self.args.get("track_running_stats", False))


def make_config(kind: str, **kwargs: Any) -> LayerConfig:
    """Validate torch-style constructor arguments for `kind` and fill in PyTorch's defaults.

    `dtype` may be a name ("float32") or a torch.dtype. Raises InvalidSpec with a message
    that says what was wrong and what was expected.
    """
    if kind not in _CLASSES:
        raise InvalidSpec(f"unknown layer kind {kind!r}; expected one of {', '.join(KINDS)}")
    fam = family(kind)
    allowed = set(_DEFAULTS[fam]) | set(_REQUIRED[fam])
    unknown = sorted(set(kwargs) - allowed - {"device"})
    if unknown:
        raise InvalidSpec(f"{kind} got unexpected argument(s) {unknown}; expected some of {sorted(allowed)}")
    if kwargs.get("device") not in (None, "cpu", torch.device("cpu")):
        raise InvalidSpec(f"{kind}: device must be left unset (layers live on the server)")
    kwargs.pop("device", None)
    missing = [a for a in _REQUIRED[fam] if a not in kwargs]
    if missing:
        raise InvalidSpec(f"{kind} requires argument(s) {missing}")
    args = {**_DEFAULTS[fam], **kwargs}
    _validate(kind, fam, args)
    return LayerConfig(kind=kind, args=args)


def _positive_int(kind: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSpec(f"{kind}: {name} must be an integer, got {value!r}")
    if not 0 < value <= MAX_FEATURES:
        raise InvalidSpec(f"{kind}: {name} must be in [1, {MAX_FEATURES}], got {value}")
    return value


def _flag(kind: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidSpec(f"{kind}: {name} must be a bool, got {value!r}")


def _validate(kind: str, fam: str, args: dict[str, Any]) -> None:
    dtype = args["dtype"]
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in FLOAT_DTYPES.items()}
        if dtype not in names:
            raise InvalidSpec(f"{kind}: dtype must be a floating type, got {dtype}")
        args["dtype"] = dtype = names[dtype]
    if dtype not in FLOAT_DTYPES:
        raise InvalidSpec(f"{kind}: dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")

    eps = args["eps"]
    if not (eps is None and fam == "rms_norm"):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0 < eps <= 1:
            raise InvalidSpec(f"{kind}: eps must be a finite number in (0, 1], got {eps!r}")
        args["eps"] = float(eps)

    if "momentum" in args:
        m = args["momentum"]
        if m is None and fam == "instance_norm":
            raise InvalidSpec(f"{kind}: momentum must be a number in [0, 1] (None is BatchNorm only)")
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or not 0 <= m <= 1:
                raise InvalidSpec(f"{kind}: momentum must be in [0, 1] or None, got {m!r}")
            args["momentum"] = float(m)

    for flag in ("affine", "track_running_stats", "bias", "elementwise_affine"):
        if flag in args:
            _flag(kind, flag, args[flag])
    if args.get("bias") is False and "bias" not in _TORCH_ACCEPTS[kind]:
        raise InvalidSpec(f"{kind}: bias=False needs torch >= 2.13 (server has {torch.__version__})")

    if fam in ("batch_norm", "instance_norm"):
        _positive_int(kind, "num_features", args["num_features"])
    elif fam == "group_norm":
        groups = _positive_int(kind, "num_groups", args["num_groups"])
        channels = _positive_int(kind, "num_channels", args["num_channels"])
        if channels % groups:
            raise InvalidSpec(f"{kind}: num_channels ({channels}) must be divisible by num_groups ({groups})")
    else:
        shape = args["normalized_shape"]
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = [shape]
        if not isinstance(shape, (list, tuple, torch.Size)) or not shape:
            raise InvalidSpec(f"{kind}: normalized_shape must be a non-empty list of positive ints, got {shape!r}")
        if len(shape) > MAX_NORMALIZED_RANK:
            raise InvalidSpec(f"{kind}: normalized_shape {list(shape)} has more than {MAX_NORMALIZED_RANK} dims")
        shape = [_positive_int(kind, "normalized_shape entries", d) for d in shape]
        if math.prod(shape) > MAX_FEATURES:
            raise InvalidSpec(f"{kind}: normalized_shape {shape} has more than {MAX_FEATURES} elements")
        args["normalized_shape"] = tuple(shape)


def state_bytes(config: LayerConfig) -> int:
    """An upper bound on the bytes of a layer's state, computed without allocating it."""
    args, fam = config.args, config.family
    if fam in ("batch_norm", "instance_norm"):
        n, tensors = args["num_features"], 4  # weight, bias, running_mean, running_var
    elif fam == "group_norm":
        n, tensors = args["num_channels"], 2
    else:
        n, tensors = math.prod(args["normalized_shape"]), 2
    return n * tensors * config.dtype.itemsize + 8


def build_module(config: LayerConfig, device: torch.device | str = "cpu") -> nn.Module:
    """A fresh torch module for `config` on `device`, in eval mode, with gradients off."""
    args = dict(config.args)
    args["dtype"] = config.dtype
    args["device"] = device
    if "bias" in args and "bias" not in _TORCH_ACCEPTS[config.kind]:
        del args["bias"]  # validated: only True reaches here on an older torch
    module = _CLASSES[config.kind](**args)
    module.requires_grad_(False)
    return module.eval()

