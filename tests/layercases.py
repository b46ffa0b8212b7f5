"""Inputs and local reference modules shared by the engine and end-to-end parity suites."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn


def input_shapes(kind: str, kwargs: dict) -> list[tuple[int, ...]]:
    """Shapes torch accepts for the layer, cycled through a sequence (ranks get mixed)."""
    if kind.startswith(("BatchNorm", "InstanceNorm")):
        c = kwargs["num_features"]
        return {
            "BatchNorm1d": [(8, c), (5, c, 6)],
            "BatchNorm2d": [(4, c, 3, 5), (2, c, 4, 4)],
            "BatchNorm3d": [(2, c, 2, 3, 4), (3, c, 2, 2, 3)],
            "InstanceNorm1d": [(4, c, 7), (c, 9)],
            "InstanceNorm2d": [(3, c, 4, 5), (c, 5, 4)],
            "InstanceNorm3d": [(2, c, 2, 3, 4), (c, 3, 2, 3)],
        }[kind]
    if kind == "GroupNorm":
        c = kwargs["num_channels"]
        return [(4, c), (3, c, 5), (2, c, 3, 4)]
    ns = kwargs["normalized_shape"]
    ns = (ns,) if isinstance(ns, int) else tuple(ns)
    return [(6, *ns), (2, 3, *ns), ns]


def batches(kind: str, kwargs: dict, dtype: torch.dtype, n: int, seed: int) -> list[torch.Tensor]:
    """`n` batches with different means and scales."""
    g = torch.Generator().manual_seed(seed)
    shapes = input_shapes(kind, kwargs)
    out = []
    for i in range(n):
        scale = float(torch.empty(()).uniform_(0.3, 4.0, generator=g))
        shift = float(torch.empty(()).uniform_(-5.0, 5.0, generator=g))
        x = torch.randn(shapes[i % len(shapes)], generator=g, dtype=torch.float64) * scale + shift
        out.append(x.to(dtype))
    return out


def torch_lacks(kind: str, kwargs: dict) -> list[str]:
    """Arguments this torch's module doesn't take (e.g. `bias` before torch 2.13)."""
    return sorted(set(kwargs) - set(inspect.signature(getattr(nn, kind).__init__).parameters))


def local_module(kind: str, kwargs: dict, dtype: torch.dtype) -> nn.Module:
    """The reference module; skips the test where this torch has no such module to compare with."""
    if missing := torch_lacks(kind, kwargs):
        pytest.skip(f"torch {torch.__version__} has no {kind} argument {missing}")
    module = getattr(nn, kind)(**kwargs, dtype=dtype)
    module.requires_grad_(False)
    return module
