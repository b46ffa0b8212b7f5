"""Server-side layers as torch.nn modules: client.module() and client.offload().

Acceptance: a small CNN (conv -> remote BatchNorm2d -> relu -> conv -> remote GroupNorm)
gives the same outputs as the all-local model across .train() / .eval() switches, and
the server's running statistics equal the local module's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from normserve.client import errors as E
from normserve.client.nn import RemoteNorm, is_norm_layer

pytestmark = pytest.mark.e2e

TOL = dict(rtol=1e-5, atol=1e-5)
SCHEDULE = ("train", "train", "eval", "train", "eval", "eval", "train", "eval")


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.GroupNorm(2, 6),
    )
    with torch.no_grad():  # non-trivial affine parameters
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[4].weight.uniform_(0.5, 1.5)
    return model


def inputs(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 3, 8, 8, generator=g) * (1 + step % 3) + step - 2


def assert_state_close(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        got = actual[key]
        assert got.dtype == value.dtype, key
        if value.is_floating_point():
            torch.testing.assert_close(got, value, **TOL, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(got, value), key


def test_cnn_with_remote_norm_layers_matches_the_local_model(client, name):
    local = cnn()
    remote = copy.deepcopy(local)
    placed = client.offload(remote, f"{name}/")
    assert placed == {"1": f"{name}/1", "4": f"{name}/4"}
    assert isinstance(remote[1], RemoteNorm) and isinstance(remote[4], RemoteNorm)
    assert isinstance(remote[0], nn.Conv2d) and isinstance(remote[3], nn.Conv2d)
    assert remote[1].kind == "BatchNorm2d" and remote[4].kind == "GroupNorm"
    assert client.get_layer(f"{name}/1").args["num_features"] == 8

    for step, mode in enumerate(SCHEDULE):
        local.train(mode == "train")
        remote.train(mode == "train")
        assert remote[1].training == (mode == "train")
        x = inputs(step)
        with torch.no_grad():
            expected, got = local(x), remote(x)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"step {step} ({mode}): {m}")
        # The server's running statistics are the local module's, at every step.
        assert_state_close(client.get_state(f"{name}/1", as_torch=True), local[1].state_dict())
    n_train = SCHEDULE.count("train")
    assert client.get_layer(f"{name}/1").state.num_batches_tracked == n_train == int(local[1].num_batches_tracked)
    assert client.get_layer(f"{name}/4").state.version == 0  # GroupNorm keeps no running stats
    # The whole model's state_dict has the local model's keys and values.
    assert_state_close(remote.state_dict(), local.state_dict())


def test_module_follows_train_and_eval(client, name):
    client.create_layer(name, "BatchNorm1d", num_features=4, momentum=None)
    bn = client.module(name)
    local = nn.BatchNorm1d(4, momentum=None)
    seq, local_seq = nn.Sequential(nn.Identity(), bn), nn.Sequential(nn.Identity(), local)
    assert bn.training  # like a fresh torch module
    for step, mode in enumerate(("train", "eval", "train", "eval")):
        seq.train(mode == "train")
        local_seq.train(mode == "train")
        x = torch.randn(6, 4) * 2 + step
        with torch.no_grad():
            torch.testing.assert_close(seq(x), local_seq(x), **TOL)
        version = client.get_layer(name).state.version
        assert version == (1 if step < 2 else 2)
    assert "BatchNorm1d" in repr(bn) and name in repr(bn)
    bn.reset_running_stats()
    assert client.get_layer(name).state.num_batches_tracked == 0


def test_module_of_an_unknown_layer_is_not_found(client, name):
    with pytest.raises(E.NotFoundError):
        client.module(name)


def test_state_dict_round_trip_through_the_server(client, name):
    trained = cnn(1)
    trained.train()
    with torch.no_grad():
        for step in range(3):
            trained(inputs(step))
    remote = cnn(2)
    client.offload(remote, f"{name}/")
    remote.load_state_dict(trained.state_dict())  # pushes the norm layers' state to the server
    assert_state_close(client.get_state(f"{name}/1", as_torch=True), trained[1].state_dict())
    assert_state_close(remote.state_dict(), trained.state_dict())
    remote.eval()
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(remote(inputs(9)), trained(inputs(9)), **TOL)

    bad = trained.state_dict()
    bad["1.running_var"] = torch.ones(5)
    with pytest.raises(RuntimeError, match="running_var"):
        remote.load_state_dict(bad)
    missing = {k: v for k, v in trained.state_dict().items() if k != "1.running_mean"}
    with pytest.raises(RuntimeError, match="running_mean"):
        remote.load_state_dict(missing)
    result = remote.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["1.running_mean"]


def test_offload_selects_layers(client, name):
    model = cnn()
    assert client.offload(model, f"{name}/a/", layers=["4"]) == {"4": f"{name}/a/4"}
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], RemoteNorm)

    model = cnn()
    assert client.offload(model, f"{name}/b/", layers=nn.BatchNorm2d) == {"1": f"{name}/b/1"}
    model = cnn()
    assert client.offload(model, f"{name}/c/", layers=lambda n, m: isinstance(m, nn.GroupNorm)) == {"4": f"{name}/c/4"}

    nested = nn.Sequential()
    nested.add_module("block", nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5)))
    nested.add_module("head", nn.Linear(5, 2))
    assert client.offload(nested, f"{name}/d/") == {"block.1": f"{name}/d/block.1"}
    assert isinstance(nested.block[1], RemoteNorm)
    nested.eval()
    with torch.no_grad():
        assert nested(torch.randn(2, 3)).shape == (2, 2)

    for bad in (["0"], ["nope"]):
        with pytest.raises(E.InvalidArgumentError):
            client.offload(cnn(), f"{name}/e/", layers=bad)
    with pytest.raises(ValueError):
        client.offload(cnn(), f"{name}/e/", if_exists="replace")
    assert not is_norm_layer(nn.Linear(2, 2)) and is_norm_layer(nn.RMSNorm(3))


def test_offload_if_exists(client, name):
    prefix = f"{name}/"
    trained = cnn()
    client.offload(trained, prefix)
    trained.train()
    with torch.no_grad():
        trained(inputs(0))
    server_state = client.get_state(f"{prefix}1", as_torch=True)
    assert int(server_state["num_batches_tracked"]) == 1

    fresh = cnn()
    with pytest.raises(E.AlreadyExistsError):
        client.offload(fresh, prefix)
    assert isinstance(fresh[1], nn.BatchNorm2d)  # unchanged

    reused = cnn()
    client.offload(reused, prefix, if_exists="reuse")
    assert_state_close(client.get_state(f"{prefix}1", as_torch=True), server_state)  # server state kept

    overwritten = cnn()
    client.offload(overwritten, prefix, if_exists="overwrite")
    assert int(client.get_state(f"{prefix}1", as_torch=True)["num_batches_tracked"]) == 0

    other = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))  # "1" exists with 8 features
    with pytest.raises(E.AlreadyExistsError, match="differs"):
        client.offload(other, prefix, if_exists="reuse")


def test_failed_offload_changes_nothing(client, name):
    prefix = f"{name}/"
    client.create_layer(f"{prefix}4", "LayerNorm", normalized_shape=[6])  # blocks the GroupNorm
    model = cnn()
    with pytest.raises(E.AlreadyExistsError):
        client.offload(model, prefix)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], nn.GroupNorm)
    with pytest.raises(E.NotFoundError):
        client.get_layer(f"{prefix}1")  # created, then removed again
    assert client.get_layer(f"{prefix}4").kind == "LayerNorm"  # not ours: left alone


def test_gradients_do_not_flow_and_say_so(client, name):
    model = cnn()
    client.offload(model, f"{name}/", layers=["1"])
    model.train()
    x = inputs(0)
    with pytest.warns(UserWarning, match="gradients do not flow"):
        out = model(x)
    assert out.shape == (4, 6, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # warned once per module
        with torch.no_grad():
            model(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_with_remote_layers(client, name):
    local = cnn().cuda()
    remote = copy.deepcopy(local)
    client.offload(remote, f"{name}/")
    for step, mode in enumerate(SCHEDULE[:4]):
        local.train(mode == "train")
        remote.train(mode == "train")
        x = inputs(step).cuda()
        with torch.no_grad():
            got, expected = remote(x), local(x)
        assert got.device == x.device
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
