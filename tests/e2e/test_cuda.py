"""Layers on a GPU (--device cuda): parity with local CUDA modules. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from serverproc import ServerProcess

from normserve.client import Client

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


@pytest.fixture(scope="module")
def gpu_server():
    with ServerProcess("--device", "cuda") as server:
        assert "compute on cuda" in server.log()
        yield server


@pytest.mark.parametrize(
    "kind, kwargs, shape",
    [
        ("BatchNorm2d", dict(num_features=3, momentum=None), (8, 3, 16, 16)),
        ("BatchNorm1d", dict(num_features=16), (4, 16)),
        ("InstanceNorm2d", dict(num_features=3, affine=True, track_running_stats=True), (4, 3, 8, 8)),
        ("GroupNorm", dict(num_groups=2, num_channels=4), (4, 4, 8)),
        ("LayerNorm", dict(normalized_shape=[8]), (4, 5, 8)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_parity(gpu_server, kind, kwargs, shape, dtype):
    local = getattr(torch.nn, kind)(**kwargs, device="cuda", dtype=dtype)
    name = f"gpu-{kind}-{str(dtype)[6:]}"
    gen = torch.Generator().manual_seed(0)
    with Client(gpu_server.target, timeout=60) as c:
        c.create_layer(name, kind, dtype=dtype, **kwargs)
        for step, mode in enumerate(["train", "train", "eval", "train", "eval"]):
            x = (torch.randn(shape, generator=gen, dtype=dtype) * (step + 1) + step).cuda()
            local.train(mode == "train")
            with torch.no_grad():
                expected = local(x)
            out = c.normalize(name, x, mode=mode)
            assert out.device.type == "cuda"  # returned on the input's device
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        state = c.get_state(name, as_torch=True)
        for key, value in local.state_dict().items():
            torch.testing.assert_close(state[key], value.cpu(), rtol=1e-5, atol=1e-5)


def test_gpu_w3_batch_round_trip(gpu_server):
    x = torch.randn(32, 3, 224, 224)
    local = torch.nn.BatchNorm2d(3).cuda()
    with Client(gpu_server.target, timeout=120) as c:
        c.create_layer("gpu-w3", "BatchNorm2d", num_features=3)
        out = c.normalize("gpu-w3", x, mode="train")
        with torch.no_grad():
            torch.testing.assert_close(out, local(x.cuda()).cpu(), rtol=1e-5, atol=1e-5)
