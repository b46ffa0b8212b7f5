"""Read the constructor arguments back out of a local torch.nn normalization module."""

from __future__ import annotations

from typing import Any

from .codec import KIND_FIELDS, CodecError

_ARGS = {
    "BatchNorm": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "InstanceNorm": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "LayerNorm": ("normalized_shape", "eps", "elementwise_affine"),
    "GroupNorm": ("num_groups", "num_channels", "eps", "affine"),
    "RMSNorm": ("normalized_shape", "eps", "elementwise_affine"),
}


def module_spec(module: Any) -> tuple[str, dict[str, Any]]:
    """(torch class name, constructor kwargs) that rebuild `module`'s configuration."""
    import torch

    kind = type(module).__name__
    if kind not in KIND_FIELDS or type(module) is not getattr(torch.nn, kind, None):
        raise CodecError(
            f"unsupported module type {type(module).__qualname__}; expected a torch.nn "
            f"{', '.join(KIND_FIELDS)} (not a subclass)"
        )
    family = next(f for f in _ARGS if kind.startswith(f))
    kwargs: dict[str, Any] = {a: getattr(module, a) for a in _ARGS[family]}
    if "normalized_shape" in kwargs:
        kwargs["normalized_shape"] = list(kwargs["normalized_shape"])
    floats = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    if floats:
        kwargs["dtype"] = str(floats[0].dtype).removeprefix("torch.")
    affine = kwargs.get("affine", kwargs.get("elementwise_affine", False))
    if affine and kind != "RMSNorm" and getattr(module, "bias", None) is None:
        kwargs["bias"] = False  # only sent when False: older servers lack the argument
    return kind, kwargs
