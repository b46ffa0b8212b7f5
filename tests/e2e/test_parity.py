"""End-to-end parity with torch.nn through a real server process.

For every layer kind, a server-side layer and a local torch module get the same batches in
the same modes (mixed train/eval); outputs, the full state_dict and the reported state
versions must agree after every step. Expectations are computed with local torch only.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from layercases import batches, local_module, torch_lacks
from torch import nn

from normserve.client import errors

pytestmark = pytest.mark.e2e

MODES = ("train", "train", "eval", "train", "eval", "train", "eval")
TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    # Same kernels on both sides: these only allow for torch's thread-count differences.
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


# -- helpers ---------------------------------------------------------------------------------
def randomize(module: nn.Module, seed: int, running: bool = False) -> None:
    """Non-trivial parameters (and, with `running`, running statistics)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.copy_(noise * 0.5 + (1.0 if pname == "weight" else 0.0))
        if running:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g, dtype=torch.float64) * 3)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g, dtype=torch.float64) * 4 + 0.2)
            module.num_batches_tracked.fill_(7)


def as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def assert_state_equal(actual: dict, expected: dict, tol: dict) -> None:
    assert set(actual) == set(expected), f"state keys {sorted(actual)} != expected {sorted(expected)}"
    for key, value in expected.items():
        got = as_tensor(actual[key])
        assert got.dtype == value.dtype, f"state[{key!r}]: dtype {got.dtype} != {value.dtype}"
        assert tuple(got.shape) == tuple(value.shape), f"state[{key!r}]: shape {tuple(got.shape)} != {tuple(value.shape)}"
        kw = dict(rtol=0, atol=0) if not value.is_floating_point() else tol
        torch.testing.assert_close(got, value, **kw, msg=lambda m, key=key: f"state[{key!r}]: {m}")


def nbt(module: nn.Module) -> int:
    t = getattr(module, "num_batches_tracked", None)
    return 0 if t is None else int(t)


def tracks(module: nn.Module) -> bool:
    return getattr(module, "running_mean", None) is not None


def run_sequence(client, name, module, xs, modes, tol, version: int) -> int:
    """Send `xs` in `modes` to the server and to `module`; compare outputs, state_dict and
    state versions at every step. Returns the layer's version afterwards."""
    for step, (x, mode) in enumerate(zip(xs, modes)):
        module.train(mode == "train")
        with torch.no_grad():
            expected = module(x)
        result = client.normalize_result(name, x, mode)
        where = f"step {step} ({mode}, input {tuple(x.shape)} {x.dtype})"
        out = result.output
        assert isinstance(out, torch.Tensor), f"{where}: torch in gave {type(out)} out"
        assert out.dtype == expected.dtype and out.shape == expected.shape, where
        torch.testing.assert_close(out, expected, **tol, msg=lambda m: f"{where}: output {m}")
        if mode == "train" and tracks(module):
            version += 1
        assert result.state.version == version, f"{where}: version {result.state.version}, expected {version}"
        assert result.state.num_batches_tracked == nbt(module), where
        assert_state_equal(client.get_state(name, as_torch=True), module.state_dict(), tol)
    info = client.get_layer(name)
    assert (info.state.version, info.state.num_batches_tracked) == (version, nbt(module))
    assert info.has_running_stats == tracks(module)
    return version


def _seed(text: str) -> int:
    return zlib.crc32(text.encode()) % 100_000


# -- parity across kinds and constructor arguments ----------------------------------------------
CASES = [
    ("BatchNorm1d", dict(num_features=3)),
    ("BatchNorm1d", dict(num_features=3, momentum=None, bias=False)),
    ("BatchNorm1d", dict(num_features=2, affine=False, track_running_stats=False, eps=1e-3)),
    ("BatchNorm2d", dict(num_features=3, momentum=None)),
    ("BatchNorm2d", dict(num_features=3, affine=False, momentum=0.3)),
    ("BatchNorm2d", dict(num_features=3, track_running_stats=False)),
    ("BatchNorm3d", dict(num_features=2)),
    ("BatchNorm3d", dict(num_features=2, momentum=None, eps=1e-4, bias=False)),
    ("InstanceNorm1d", dict(num_features=3)),
    ("InstanceNorm1d", dict(num_features=3, affine=True, track_running_stats=True, momentum=0.2)),
    ("InstanceNorm2d", dict(num_features=3, track_running_stats=True)),
    ("InstanceNorm2d", dict(num_features=3, affine=True, bias=False)),
    ("InstanceNorm3d", dict(num_features=2, affine=True, track_running_stats=True, eps=1e-3)),
    ("InstanceNorm3d", dict(num_features=2)),
    ("LayerNorm", dict(normalized_shape=[4])),
    ("LayerNorm", dict(normalized_shape=(2, 3), elementwise_affine=False, eps=1e-3)),
    ("LayerNorm", dict(normalized_shape=4, bias=False)),
    ("GroupNorm", dict(num_groups=2, num_channels=6)),
    ("GroupNorm", dict(num_groups=3, num_channels=3, affine=False)),
    ("GroupNorm", dict(num_groups=1, num_channels=4, bias=False, eps=1e-3)),
    ("RMSNorm", dict(normalized_shape=[5])),
    ("RMSNorm", dict(normalized_shape=(2, 3), eps=1e-4, elementwise_affine=False)),
]


def _value_id(value) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return str(value)


def _case_id(case) -> str:
    """Ids become layer names (the `name` fixture): only letters, digits and . _ : / -."""
    kind, kwargs = case
    rest = "-".join(f"{k}:{_value_id(v)}" for k, v in kwargs.items() if k != "num_features")
    return f"{kind}-{rest}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_parity(client, name, case, dtype):
    kind, kwargs = case
    seed = _seed(_case_id(case) + str(dtype))
    module = local_module(kind, kwargs, dtype)
    info = client.create_layer(name, kind, dtype=dtype, **kwargs)
    assert info.kind == kind and info.args["dtype"] == str(dtype).removeprefix("torch.")
    assert (info.state.version, info.state.num_batches_tracked) == (0, 0)
    assert info.has_running_stats == tracks(module)
    assert_state_equal(client.get_state(name, as_torch=True), module.state_dict(), TOL[dtype])
    version = 0
    if any(True for _ in module.parameters()):
        randomize(module, seed)
        v = client.load_state(name, module.state_dict())
        version += 1
        assert v.version == version
    run_sequence(client, name, module, batches(kind, kwargs, dtype, len(MODES), seed), MODES, TOL[dtype], version)


def test_get_state_has_exactly_the_state_dict_keys(client, name):
    """Fresh layers of every kind and flag combination: same keys, dtypes, shapes, values."""
    configs = [
        *[(k, dict(num_features=3, affine=a, track_running_stats=t)) for k in ("BatchNorm1d", "InstanceNorm2d")
          for a in (True, False) for t in (True, False)],
        ("BatchNorm3d", dict(num_features=2, bias=False)),
        ("InstanceNorm3d", dict(num_features=2, affine=True, bias=False, track_running_stats=True)),
        ("LayerNorm", dict(normalized_shape=[2, 3])),
        ("LayerNorm", dict(normalized_shape=[2, 3], bias=False)),
        ("LayerNorm", dict(normalized_shape=[2, 3], elementwise_affine=False)),
        ("GroupNorm", dict(num_groups=2, num_channels=4)),
        ("GroupNorm", dict(num_groups=2, num_channels=4, affine=False)),
        ("GroupNorm", dict(num_groups=2, num_channels=4, bias=False)),
        ("RMSNorm", dict(normalized_shape=[3])),
        ("RMSNorm", dict(normalized_shape=[3], elementwise_affine=False)),
    ]
    for i, (kind, kwargs) in enumerate(configs):
        if torch_lacks(kind, kwargs):
            continue  # an older torch: the server refuses these (tests/unit/test_engine_parity.py)
        for dtype in (torch.float32, torch.float64):
            layer = f"{name}-{i}-{str(dtype)[-2:]}"
            client.create_layer(layer, kind, dtype=dtype, **kwargs)
            expected = local_module(kind, kwargs, dtype).state_dict()
            state = client.get_state(layer)  # numpy by default
            assert all(isinstance(v, np.ndarray) for v in state.values())
            assert_state_equal(state, expected, TOL[dtype])
            client.delete_layer(layer)


# -- numpy / torch in and out ---------------------------------------------------------------
@pytest.mark.parametrize("np_dtype", ["float32", "float64", "float16"])
def test_numpy_in_numpy_out(client, name, np_dtype):
    dtype = getattr(torch, np_dtype)
    kwargs = dict(num_features=3, momentum=None)
    module = local_module("BatchNorm2d", kwargs, dtype)
    client.create_layer(name, "BatchNorm2d", dtype=np_dtype, **kwargs)
    xs = batches("BatchNorm2d", kwargs, dtype, 4, seed=_seed(np_dtype))
    for step, (x, mode) in enumerate(zip(xs, ("train", "eval", "train", "eval"))):
        module.train(mode == "train")
        with torch.no_grad():
            expected = module(x)
        out = client.normalize(name, x.numpy(), mode=mode)
        assert isinstance(out, np.ndarray), f"numpy in gave {type(out)} out"
        assert out.dtype == np.dtype(np_dtype) and out.shape == tuple(x.shape)
        assert out.flags.writeable
        torch.testing.assert_close(torch.from_numpy(out), expected, **TOL[dtype])
        state = client.get_state(name)
        assert all(isinstance(v, np.ndarray) for v in state.values())
        assert state["num_batches_tracked"].dtype == np.int64 and state["num_batches_tracked"].shape == ()
        assert_state_equal(state, module.state_dict(), TOL[dtype])


def test_torch_in_torch_out_non_contiguous_input(client, name):
    """Any strides go in (the SDK sends C-order bytes); the values are the module's."""
    kwargs = dict(normalized_shape=[4])
    module = local_module("LayerNorm", kwargs, torch.float64)
    client.create_layer(name, "LayerNorm", dtype=torch.float64, **kwargs)
    x = (torch.randn(4, 6, dtype=torch.float64) * 3 + 1).t()  # (6, 4), not contiguous
    assert not x.is_contiguous()
    out = client.normalize(name, x, mode="eval")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == x.shape
    with torch.no_grad():
        torch.testing.assert_close(out, module(x), **TOL[torch.float64])


# -- create from a local module --------------------------------------------------------------
MODULES = [
    ("BatchNorm2d", dict(num_features=3, momentum=None), torch.float32),
    ("BatchNorm1d", dict(num_features=4, momentum=0.25, eps=1e-3, bias=False), torch.float64),
    ("BatchNorm3d", dict(num_features=2, affine=False), torch.float64),
    ("InstanceNorm1d", dict(num_features=3, affine=True, track_running_stats=True, momentum=0.4), torch.float32),
    ("InstanceNorm2d", dict(num_features=3), torch.float64),
    ("LayerNorm", dict(normalized_shape=[2, 3], bias=False, eps=1e-4), torch.float64),
    ("GroupNorm", dict(num_groups=2, num_channels=4), torch.float32),
    ("RMSNorm", dict(normalized_shape=[5]), torch.float64),
]


@pytest.mark.parametrize("kind, kwargs, dtype", MODULES, ids=[f"{k}-{d}".replace("torch.", "") for k, _, d in MODULES])
def test_create_from_trained_module_then_parity(request, client, name, kind, kwargs, dtype):
    module = local_module(kind, kwargs, dtype)
    randomize(module, _seed(request.node.name))
    xs = batches(kind, kwargs, dtype, 3 + len(MODES), seed=_seed(kind))
    module.train()
    with torch.no_grad():
        for x in xs[:3]:
            module(x)
    info = client.create_layer(name, module)
    assert info.kind == kind
    assert info.args["dtype"] == str(dtype).removeprefix("torch.") or not any(True for _ in module.state_dict())
    for key, value in kwargs.items():
        got = info.args[key]
        assert (list(got) if key == "normalized_shape" else got) == value, f"{key}: {got!r} != {value!r}"
    assert info.state.version == 0 and info.state.num_batches_tracked == nbt(module)
    assert_state_equal(client.get_state(name, as_torch=True), module.state_dict(), TOL[dtype])
    run_sequence(client, name, module, xs[3:], MODES, TOL[dtype], 0)


# -- load_state, reset_running_stats, versions ----------------------------------------------------
@pytest.mark.parametrize("as_numpy", [False, True], ids=["torch", "numpy"])
@pytest.mark.parametrize(
    "kind, kwargs, dtype",
    [
        ("BatchNorm2d", dict(num_features=3, momentum=None), torch.float64),
        ("BatchNorm1d", dict(num_features=4), torch.float32),
        ("InstanceNorm2d", dict(num_features=3, affine=True, track_running_stats=True), torch.float64),
    ],
    ids=["BatchNorm2d", "BatchNorm1d", "InstanceNorm2d"],
)
def test_load_state_then_eval_parity(request, client, name, kind, kwargs, dtype, as_numpy):
    module = local_module(kind, kwargs, dtype)
    client.create_layer(name, kind, dtype=dtype, **kwargs)
    xs = batches(kind, kwargs, dtype, 6, seed=_seed(request.node.name))
    client.normalize(name, xs[0], mode="train")  # the loaded state must replace this
    randomize(module, _seed(kind), running=True)
    state = {k: (v.numpy() if as_numpy else v) for k, v in module.state_dict().items()}
    v = client.load_state(name, state)
    assert v.version == 2 and v.num_batches_tracked == 7
    assert_state_equal(client.get_state(name, as_torch=True), module.state_dict(), TOL[dtype])
    run_sequence(client, name, module, xs[1:], ("eval", "eval", "train", "eval", "train"), TOL[dtype], 2)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("BatchNorm1d", dict(num_features=3, momentum=None)),
        ("BatchNorm3d", dict(num_features=2, momentum=0.5)),
        ("InstanceNorm1d", dict(num_features=3, track_running_stats=True)),
    ],
)
def test_reset_running_stats_parity(request, client, name, kind, kwargs):
    dtype = torch.float64
    module = local_module(kind, kwargs, dtype)
    client.create_layer(name, kind, dtype=dtype, **kwargs)
    xs = batches(kind, kwargs, dtype, 7, seed=_seed(request.node.name))
    version = run_sequence(client, name, module, xs[:3], ("train", "train", "eval"), TOL[dtype], 0)
    v = client.reset_running_stats(name)
    module.reset_running_stats()
    assert v.version == version + 1 and v.num_batches_tracked == 0
    assert_state_equal(client.get_state(name, as_torch=True), module.state_dict(), TOL[dtype])
    run_sequence(client, name, module, xs[3:], ("eval", "train", "train", "eval"), TOL[dtype], version + 1)


def test_reset_running_stats_on_a_layer_without_them_changes_nothing(client, name):
    client.create_layer(name, "LayerNorm", normalized_shape=[3])
    before = client.get_state(name, as_torch=True)
    with pytest.raises(errors.FailedPreconditionError):  # documented in normserve.client.errors
        client.reset_running_stats(name)
    info = client.get_layer(name)
    assert info.state.version == 0
    assert_state_equal(client.get_state(name, as_torch=True), before, TOL[torch.float32])


def test_state_version_grows_only_with_state_changes(client, name):
    """Train bumps layers with running stats; eval never does; kinds without running
    statistics never move."""
    bn, gn = name + "-bn", name + "-gn"
    client.create_layer(bn, "BatchNorm1d", num_features=2, momentum=None)
    client.create_layer(gn, "GroupNorm", num_groups=1, num_channels=2)
    x = torch.randn(5, 2) * 2 + 1
    seen = []
    for mode in ("eval", "train", "train", "eval", "eval", "train"):
        r_bn = client.normalize_result(bn, x, mode)
        r_gn = client.normalize_result(gn, x, mode)
        seen.append((mode, r_bn.state.version, r_bn.state.num_batches_tracked, r_gn.state.version, r_gn.state.num_batches_tracked))
    assert seen == [
        ("eval", 0, 0, 0, 0),
        ("train", 1, 1, 0, 0),
        ("train", 2, 2, 0, 0),
        ("eval", 2, 2, 0, 0),
        ("eval", 2, 2, 0, 0),
        ("train", 3, 3, 0, 0),
    ]
    assert client.reset_running_stats(bn).version == 4
    assert client.normalize_result(bn, x, "eval").state.version == 4
    assert client.normalize_result(bn, x, "train").state == client.get_layer(bn).state
    assert client.get_layer(bn).state.version == 5 and client.get_layer(bn).state.num_batches_tracked == 1


def test_failed_train_request_changes_nothing_through_the_server(client, name):
    kwargs = dict(num_features=3, momentum=None)
    module = local_module("BatchNorm2d", kwargs, torch.float32)
    client.create_layer(name, "BatchNorm2d", **kwargs)
    xs = batches("BatchNorm2d", kwargs, torch.float32, 4, seed=5)
    version = run_sequence(client, name, module, xs[:2], ("train", "train"), TOL[torch.float32], 0)
    nan = xs[2].clone()
    nan[0, 1, 0, 0] = float("nan")
    bad = [nan, torch.randn(1, 3, 1, 1), torch.randn(4, 2, 3, 3), torch.randn(4, 3, 3), xs[2].double()]
    for x in bad:
        with pytest.raises(errors.InvalidArgumentError):
            client.normalize(name, x, mode="train")
        assert client.get_layer(name).state.version == version
        assert_state_equal(client.get_state(name, as_torch=True), module.state_dict(), TOL[torch.float32])
    run_sequence(client, name, module, xs[2:], ("train", "eval"), TOL[torch.float32], version)


# -- reduced precision: smoke parity -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("BatchNorm2d", dict(num_features=3, momentum=None)),
        ("InstanceNorm1d", dict(num_features=3, affine=True, track_running_stats=True)),
        ("LayerNorm", dict(normalized_shape=[6])),
        ("GroupNorm", dict(num_groups=2, num_channels=4)),
        ("RMSNorm", dict(normalized_shape=[6])),
    ],
)
def test_reduced_precision_smoke(request, client, name, kind, kwargs, dtype):
    module = local_module(kind, kwargs, dtype)
    info = client.create_layer(name, kind, dtype=dtype, **kwargs)
    assert info.args["dtype"] == str(dtype).removeprefix("torch.")
    state = client.get_state(name, as_torch=True)
    assert all(v.dtype == dtype for k, v in state.items() if k != "num_batches_tracked")
    xs = batches(kind, kwargs, dtype, 4, seed=_seed(request.node.name))
    run_sequence(client, name, module, xs, ("train", "eval", "train", "eval"), TOL[dtype], 0)


@pytest.mark.parametrize(
    "kind, kwargs, eval_shape",
    [
        ("BatchNorm1d", dict(num_features=3), (1, 3)),
        ("BatchNorm2d", dict(num_features=3, momentum=None), (1, 3, 1, 1)),
        ("InstanceNorm1d", dict(num_features=3, track_running_stats=True), (3, 1)),
    ],
    ids=["BatchNorm1d", "BatchNorm2d", "InstanceNorm1d"],
)
def test_single_sample_eval_after_training(request, client, name, kind, kwargs, eval_shape):
    """One value per channel is refused in train mode but is ordinary inference in eval
    mode (running statistics): same as torch, and the state stays put."""
    dtype = torch.float64
    module = local_module(kind, kwargs, dtype)
    client.create_layer(name, kind, dtype=dtype, **kwargs)
    xs = batches(kind, kwargs, dtype, 3, seed=_seed(request.node.name))
    version = run_sequence(client, name, module, xs, ("train", "train", "train"), TOL[dtype], 0)
    x = torch.randn(eval_shape, dtype=dtype) * 4 - 2
    run_sequence(client, name, module, [x, x], ("eval", "eval"), TOL[dtype], version)
    with pytest.raises(errors.InvalidArgumentError):
        client.normalize(name, x, mode="train")
    assert_state_equal(client.get_state(name, as_torch=True), module.state_dict(), TOL[dtype])
