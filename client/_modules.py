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


def load_state_dict(source: Any, prefix: str = "") -> dict[str, Any]:
    """The tensors under `prefix` ("bn1" -> keys "bn1.*", prefix stripped) of a `.pt`
    checkpoint path, a state_dict, a checkpoint dict holding one under "state_dict", or a
    module. Files load with `torch.load(weights_only=True)`: no pickled code runs."""
    import os
    import pickle

    import torch

    if isinstance(source, (str, os.PathLike)):
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CodecError(f"{os.fspath(source)}: refused by torch.load(weights_only=True): {reason}") from None
    if hasattr(source, "state_dict") and callable(source.state_dict):
        source = source.state_dict()
    if isinstance(source, dict) and isinstance(source.get("state_dict"), dict):
        source = source["state_dict"]
    if not isinstance(source, dict):
        raise CodecError(f"expected a state_dict (a mapping of tensors), got {type(source).__name__}")
    lead = f"{prefix}." if prefix else ""
    state = {key[len(lead):]: value for key, value in source.items() if key.startswith(lead) and "." not in key[len(lead):]}
    if not state:
        nearby = sorted({k.rsplit(".", 1)[0] for k in source if "." in k})[:20]
        raise CodecError(f"no tensors under prefix {prefix!r}; module paths in the checkpoint include {nearby}")
    return state


def infer_kwargs(kind: str, state: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs implied by a state_dict's keys and shapes (explicit ones win)."""
    family = next((f for f in _ARGS if kind.startswith(f)), None)
    if family is None or kind not in KIND_FIELDS:
        raise CodecError(f"unknown layer kind {kind!r}; expected one of {', '.join(KIND_FIELDS)}")
    weight, bias = state.get("weight"), state.get("bias")
    sample = next((t for t in state.values() if t.is_floating_point()), None)
    kwargs: dict[str, Any] = {}
    if sample is not None:
        kwargs["dtype"] = str(sample.dtype).removeprefix("torch.")
    if family in ("BatchNorm", "InstanceNorm"):
        vector = state.get("running_mean", weight)
        if vector is not None:
            kwargs["num_features"] = int(vector.shape[0])
        kwargs["affine"] = weight is not None
        kwargs["track_running_stats"] = "running_mean" in state
    elif family == "GroupNorm":
        if weight is not None:
            kwargs["num_channels"] = int(weight.shape[0])
        kwargs["affine"] = weight is not None
    else:
        if weight is not None:
            kwargs["normalized_shape"] = list(weight.shape)
        kwargs["elementwise_affine"] = weight is not None
    if weight is not None and bias is None and family != "RMSNorm":
        kwargs["bias"] = False
    return kwargs
