"""Tensors through both clients: numpy and torch, any layout, dtypes preserved, clear
errors for what can't be sent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normserve.client import errors as E

pytestmark = [pytest.mark.e2e, pytest.mark.both_clients]


def local_eval(kind, kwargs, x):
    """The local module's eval output for `x` (converted to a plain contiguous tensor)."""
    m = getattr(torch.nn, kind)(**kwargs).eval()
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype="<f8"))
    with torch.no_grad():
        return m(x.to(kwargs.get("dtype", torch.float32)))


@pytest.fixture
def ln64(client, name):
    client.create_layer(name, "LayerNorm", normalized_shape=[4], dtype="float64")
    return name


def _numpy_layouts():
    base = np.random.default_rng(0).normal(2.0, 3.0, (6, 8))
    return {
        "strided": base[:, ::2],
        "transposed": base[:4, :].T,
        "fortran": np.asfortranarray(base[:, :4]),
        "big-endian": base[:, :4].astype(">f8"),
        "reversed": base[::-1, 4:],
        "list": base[:, :4].tolist(),
    }


@pytest.mark.parametrize("layout", sorted(_numpy_layouts()))
def test_numpy_inputs_of_any_layout(client, ln64, layout):
    x = _numpy_layouts()[layout]
    out = client.normalize(ln64, x, "eval")
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.flags.c_contiguous and out.flags.writeable
    expected = local_eval("LayerNorm", dict(normalized_shape=[4], dtype=torch.float64), x)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-12, atol=1e-12)


def _torch_layouts():
    base = torch.randn(6, 8, dtype=torch.float64) * 3 + 2
    return {
        "strided": base[:, ::2],
        "transposed": base[:4, :].t()[:, :4],
        "expanded": base[0, :4].expand(5, 4),
        "channels-last-4d": torch.randn(2, 3, 5, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
        "requires-grad": base[:, :4].clone().requires_grad_(True),
    }


@pytest.mark.parametrize("layout", sorted(_torch_layouts()))
def test_torch_inputs_of_any_layout(client, ln64, layout):
    x = _torch_layouts()[layout]
    assert layout == "channels-last-4d" or not x.is_contiguous() or x.requires_grad
    out = client.normalize(ln64, x, "eval")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.device == x.device
    assert out.shape == x.shape and not out.requires_grad
    expected = local_eval("LayerNorm", dict(normalized_shape=[4], dtype=torch.float64), x.detach())
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_dtype_is_preserved(client, name, dtype):
    client.create_layer(name, "BatchNorm1d", num_features=3, dtype=dtype)
    x = (torch.randn(8, 3) * 2 + 1).to(dtype)
    result = client.normalize_result(name, x, "train")
    assert result.output.dtype == dtype and result.output.shape == x.shape
    state = client.get_state(name, as_torch=True)
    assert state["running_mean"].dtype == dtype


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_numpy_dtype_is_preserved(client, name, dtype):
    client.create_layer(name, "GroupNorm", num_groups=1, num_channels=3, dtype=dtype)
    out = client.normalize(name, np.random.default_rng(1).normal(size=(4, 3)).astype(dtype), "train")
    assert out.dtype == np.dtype(dtype)


BAD_INPUTS = {
    "np-int64": (lambda: np.ones((4, 4), np.int64), "int64"),
    "np-int32": (lambda: np.ones((4, 4), np.int32), "int32"),
    "np-complex": (lambda: np.ones((4, 4), np.complex128), "complex128"),
    "torch-int64": (lambda: torch.ones(4, 4, dtype=torch.int64), "int64"),
    "torch-bool": (lambda: torch.ones(4, 4, dtype=torch.bool), "bool"),
    "torch-sparse": (lambda: torch.eye(4, dtype=torch.float64).to_sparse(), "layout"),
    "torch-meta": (lambda: torch.empty(4, 4, device="meta"), "meta"),
    "ragged-list": (lambda: [[1.0, 2.0, 3.0, 4.0], [1.0]], "encode"),
    "string": (lambda: "abcd", "dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_unsupported_inputs_are_clear_local_errors(client, ln64, case):
    make, word = BAD_INPUTS[case]
    with pytest.raises(E.InvalidArgumentError) as info:
        client.normalize(ln64, make(), "train")
    assert word in info.value.message, info.value.message
    if "dtype" in info.value.message:
        assert "float32" in info.value.message  # says what is expected
    assert client.get_layer(ln64).state.version == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_come_back_on_their_device(client, name):
    client.create_layer(name, "BatchNorm2d", num_features=3)
    x = torch.randn(4, 3, 5, 5, device="cuda")
    out = client.normalize(name, x.transpose(2, 3), "train")
    assert out.device == x.device and out.dtype == x.dtype
    local = torch.nn.BatchNorm2d(3).cuda().train()
    with torch.no_grad():
        torch.testing.assert_close(out, local(x.transpose(2, 3)), rtol=1e-4, atol=1e-4)
    state = client.get_state(name, as_torch=True)
    assert state["running_mean"].device.type == "cpu"
