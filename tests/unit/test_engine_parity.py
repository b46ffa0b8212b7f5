"""Engine-level parity with torch.nn (no gRPC): outputs, state_dict and state versions of a
server-side `Layer` against a local torch module fed the same batches in the same modes,
plus failure atomicity (a request that raises changes neither state nor version).

Everything runs in this process with the same torch, so the arithmetic is the same and
results are compared bitwise.
"""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
from layercases import batches, local_module
from torch import nn

from normserve.server.engine import (
    EngineError,
    InvalidInput,
    Layer,
    NoRunningStats,
    Registry,
    RequestAbandoned,
    make_config,
)

EXACT = dict(rtol=0.0, atol=0.0)
MODES = ("train", "train", "eval", "train", "eval", "eval", "train", "eval")
BN = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
IN = ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")


# -- helpers ---------------------------------------------------------------------------------
def randomize_params(module: nn.Module, seed: int) -> None:
    """Non-trivial affine parameters (weight/bias start at 1/0, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.copy_(noise * 0.5 + (1.0 if pname == "weight" else 0.0))


def clone_state(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def assert_state_equal(actual: dict, expected: dict, **tol) -> None:
    tol = tol or EXACT
    assert set(actual) == set(expected), f"state keys {sorted(actual)} != {sorted(expected)}"
    for key, value in expected.items():
        got = actual[key]
        assert got.dtype == value.dtype, f"{key}: dtype {got.dtype} != {value.dtype}"
        assert tuple(got.shape) == tuple(value.shape), f"{key}: shape {tuple(got.shape)} != {tuple(value.shape)}"
        torch.testing.assert_close(got, value, **tol, msg=lambda m, key=key: f"state[{key!r}]: {m}")


def expected_nbt(module: nn.Module) -> int:
    nbt = getattr(module, "num_batches_tracked", None)
    return 0 if nbt is None else int(nbt)


def run_sequence(layer: Layer, module: nn.Module, xs, modes, **tol) -> None:
    """Feed `xs` to both in `modes`; compare outputs, state_dict and versions at every step."""
    tol = tol or EXACT
    tracks = getattr(module, "running_mean", None) is not None
    assert layer.has_running_stats == tracks
    version = layer.version.version
    for step, (x, mode) in enumerate(zip(xs, modes)):
        train = mode == "train"
        module.train(train)
        with torch.no_grad():
            expected = module(x)
        out, v = layer.forward(x, train)[:2]
        where = f"step {step} ({mode}, input {tuple(x.shape)} {x.dtype})"
        assert out.dtype == expected.dtype and out.shape == expected.shape, where
        torch.testing.assert_close(out, expected, **tol, msg=lambda m: f"{where}: output {m}")
        if train and tracks:
            version += 1
        assert v.version == version, f"{where}: version {v.version}, expected {version}"
        assert v.num_batches_tracked == expected_nbt(module), where
        state, sv = layer.state_dict()
        assert sv == v, where
        assert_state_equal(state, module.state_dict(), **tol)


def new_layer(kind: str, kwargs: dict, dtype: torch.dtype, state=None) -> Layer:
    return Registry().create("layer", make_config(kind, **kwargs, dtype=dtype), state)


# -- the argument grid ------------------------------------------------------------------------
def _grid():
    cases = []
    for kind in BN:
        for momentum, affine, track in itertools.product((0.1, None, 0.35), (True, False), (True, False)):
            cases.append((kind, dict(num_features=3, momentum=momentum, affine=affine, track_running_stats=track)))
        cases.append((kind, dict(num_features=4, eps=1e-3, momentum=1.0)))
        cases.append((kind, dict(num_features=2, momentum=0.0)))
        cases.append((kind, dict(num_features=3, bias=False)))
        cases.append((kind, dict(num_features=3, bias=False, momentum=None, eps=0.1)))
        cases.append((kind, dict(num_features=1)))
    for kind in IN:
        for affine, track in itertools.product((True, False), (True, False)):
            cases.append((kind, dict(num_features=3, affine=affine, track_running_stats=track)))
        cases.append((kind, dict(num_features=2, momentum=0.5, eps=1e-3, track_running_stats=True)))
        cases.append((kind, dict(num_features=3, affine=True, bias=False, track_running_stats=True, momentum=1.0)))
    for ns in (5, [5], (3, 4)):
        for affine, bias in ((True, True), (True, False), (False, True)):
            cases.append(("LayerNorm", dict(normalized_shape=ns, elementwise_affine=affine, bias=bias)))
    cases.append(("LayerNorm", dict(normalized_shape=[2, 3, 2], eps=1e-2)))
    for groups, channels in ((1, 6), (2, 6), (3, 6), (6, 6)):
        cases.append(("GroupNorm", dict(num_groups=groups, num_channels=channels)))
    cases.append(("GroupNorm", dict(num_groups=2, num_channels=4, affine=False, eps=1e-3)))
    cases.append(("GroupNorm", dict(num_groups=2, num_channels=4, bias=False)))
    for ns in (5, (3, 4)):
        for eps, affine in ((None, True), (1e-6, True), (None, False), (0.05, False)):
            cases.append(("RMSNorm", dict(normalized_shape=ns, eps=eps, elementwise_affine=affine)))
    return cases


GRID = _grid()


def _case_id(case) -> str:
    kind, kwargs = case
    return kind + "-" + ",".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("num_features", "num_channels"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", GRID, ids=[_case_id(c) for c in GRID])
def test_parity_grid(case, dtype):
    kind, kwargs = case
    seed = zlib.crc32(_case_id(case).encode()) % 10_000
    module = local_module(kind, kwargs, dtype)
    layer = new_layer(kind, kwargs, dtype)
    # A fresh layer has torch's initial state.
    state, v = layer.state_dict()
    assert v.version == 0 and v.num_batches_tracked == 0
    assert_state_equal(state, module.state_dict())
    # Non-trivial affine parameters, loaded into both.
    if any(True for _ in module.parameters()):
        randomize_params(module, seed)
        v = layer.load_state(clone_state(module.state_dict()))
        assert v.version == 1
    run_sequence(layer, module, batches(kind, kwargs, dtype, len(MODES), seed), MODES)


@pytest.mark.parametrize("kind", [*BN, *IN])
def test_initial_state_and_reset_running_stats(kind):
    """Create with an initial state (version 0), train, reset: parity all the way."""
    kwargs = dict(num_features=3, momentum=None if kind in BN else 0.2, affine=True, track_running_stats=True)
    dtype = torch.float64
    module = local_module(kind, kwargs, dtype)
    randomize_params(module, 7)
    xs = batches(kind, kwargs, dtype, 9, seed=11)
    module.train()
    with torch.no_grad():
        for x in xs[:3]:
            module(x)
    layer = new_layer(kind, kwargs, dtype, state=clone_state(module.state_dict()))
    state, v = layer.state_dict()
    assert v.version == 0 and v.num_batches_tracked == expected_nbt(module)
    assert_state_equal(state, module.state_dict())
    run_sequence(layer, module, xs[3:6], ("train", "eval", "train"))
    before = layer.version.version
    v = layer.reset_running_stats()
    module.reset_running_stats()
    assert v.version == before + 1 and v.num_batches_tracked == 0
    assert_state_equal(layer.state_dict()[0], module.state_dict())
    run_sequence(layer, module, xs[6:], ("eval", "train", "eval"))


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("BatchNorm2d", dict(num_features=3, track_running_stats=False)),
        ("InstanceNorm1d", dict(num_features=3)),
        ("LayerNorm", dict(normalized_shape=4)),
        ("GroupNorm", dict(num_groups=1, num_channels=2)),
        ("RMSNorm", dict(normalized_shape=4)),
    ],
)
def test_reset_without_running_stats_is_refused_and_changes_nothing(kind, kwargs):
    layer = new_layer(kind, kwargs, torch.float32)
    before, v0 = layer.state_dict()
    before = clone_state(before)
    with pytest.raises(NoRunningStats):
        layer.reset_running_stats()
    after, v1 = layer.state_dict()
    assert v1 == v0
    assert_state_equal(after, before)


@pytest.mark.parametrize("kind", ["BatchNorm1d", "BatchNorm3d", "InstanceNorm2d"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_load_state_then_eval_and_train_parity(kind, momentum):
    if momentum is None and kind.startswith("Instance"):
        momentum = 0.3
    kwargs = dict(num_features=4, momentum=momentum, affine=True, track_running_stats=True)
    dtype = torch.float64
    module = local_module(kind, kwargs, dtype)
    layer = new_layer(kind, kwargs, dtype)
    g = torch.Generator().manual_seed(3)
    randomize_params(module, 5)
    module.running_mean.copy_(torch.randn(4, generator=g, dtype=dtype) * 3)
    module.running_var.copy_(torch.rand(4, generator=g, dtype=dtype) * 5 + 0.1)
    module.num_batches_tracked.fill_(7)
    v = layer.load_state(clone_state(module.state_dict()))
    assert v.version == 1 and v.num_batches_tracked == 7
    assert_state_equal(layer.state_dict()[0], module.state_dict())
    run_sequence(layer, module, batches(kind, kwargs, dtype, 5, seed=9), ("eval", "train", "eval", "train", "eval"))


def test_load_state_converts_dtype_like_load_state_dict():
    """float64 values into a float32 layer are cast, as module.load_state_dict does."""
    kwargs = dict(num_features=3)
    module = local_module("BatchNorm2d", kwargs, torch.float32)
    layer = new_layer("BatchNorm2d", kwargs, torch.float32)
    g = torch.Generator().manual_seed(1)
    source = {
        "weight": torch.randn(3, generator=g, dtype=torch.float64),
        "bias": torch.randn(3, generator=g, dtype=torch.float64),
        "running_mean": torch.randn(3, generator=g, dtype=torch.float64),
        "running_var": torch.rand(3, generator=g, dtype=torch.float64) + 0.5,
        "num_batches_tracked": torch.tensor(4),
    }
    module.load_state_dict(source)
    layer.load_state(source)
    assert_state_equal(layer.state_dict()[0], module.state_dict())


# -- state that callers get is theirs to keep ---------------------------------------------
def test_state_dict_is_a_snapshot_later_updates_do_not_change():
    kwargs = dict(num_features=2, momentum=None)
    layer = new_layer("BatchNorm1d", kwargs, torch.float64)
    xs = batches("BatchNorm1d", kwargs, torch.float64, 3, seed=2)
    layer.forward(xs[0], True)
    state, v = layer.state_dict()
    copied = clone_state(state)
    layer.forward(xs[1], True)
    layer.reset_running_stats()
    layer.forward(xs[2], True)
    assert_state_equal(state, copied)
    assert v.num_batches_tracked == 1


# -- failure atomicity ----------------------------------------------------------------------
def _trained(kind: str, kwargs: dict, dtype: torch.dtype, steps: int = 3):
    module = local_module(kind, kwargs, dtype)
    layer = new_layer(kind, kwargs, dtype)
    xs = batches(kind, kwargs, dtype, steps + 2, seed=21)
    run_sequence(layer, module, xs[:steps], ["train"] * steps)
    return layer, module, xs[steps:]


def _bad_batches(kind: str, dtype: torch.dtype):
    c = 3
    good = {"BatchNorm1d": (6, c, 4), "BatchNorm2d": (4, c, 3, 3), "BatchNorm3d": (2, c, 2, 2, 2)}[kind]
    rank_wrong = {"BatchNorm1d": (2, c, 2, 2), "BatchNorm2d": (4, c, 3), "BatchNorm3d": (2, c, 2, 2)}[kind]
    one_per_channel = {"BatchNorm1d": [(1, c), (1, c, 1)], "BatchNorm2d": [(1, c, 1, 1)], "BatchNorm3d": [(1, c, 1, 1, 1)]}[kind]

    def x(shape, dt=dtype):
        return torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dt)

    cases = {}
    for i, special in enumerate((math.nan, math.inf, -math.inf)):
        t = x(good)
        t.view(-1)[5] = special
        cases[f"nonfinite{i}"] = t
    for i, shape in enumerate(one_per_channel):
        cases[f"one_value_per_channel{i}"] = x(shape)
    cases["wrong_channels"] = x((good[0], c + 1, *good[2:]))
    cases["wrong_rank"] = x(rank_wrong)
    cases["empty"] = x((0, *good[1:]))
    other = torch.float32 if dtype == torch.float64 else torch.float64
    cases["wrong_float_dtype"] = x(good, other)
    cases["int_dtype"] = torch.ones(good, dtype=torch.int64)
    cases["bool_dtype"] = torch.ones(good, dtype=torch.bool)
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", BN)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_failed_train_request_leaves_state_exactly_as_it_was(kind, momentum, dtype):
    kwargs = dict(num_features=3, momentum=momentum)
    layer, module, rest = _trained(kind, kwargs, dtype)
    for label, bad in _bad_batches(kind, dtype).items():
        before, v0 = layer.state_dict()
        before = clone_state(before)
        module.train()
        with pytest.raises(EngineError) as info:
            layer.forward(bad, True)
        assert isinstance(info.value, InvalidInput), f"{label}: {type(info.value).__name__}: {info.value}"
        after, v1 = layer.state_dict()
        assert v1 == v0, f"{label}: version moved {v0} -> {v1}"
        assert layer.version == v0, label
        assert_state_equal(after, before)
    # The layer goes on exactly like a module that never saw the bad batches.
    run_sequence(layer, module, rest, ("train", "eval"))


def test_failed_instance_norm_train_request_leaves_state_unchanged():
    """InstanceNorm with running stats: one spatial element in train mode is a torch error."""
    kwargs = dict(num_features=3, track_running_stats=True, affine=True)
    layer, module, rest = _trained("InstanceNorm1d", kwargs, torch.float32)
    for bad in (torch.randn(2, 3, 1), torch.randn(3, 1), torch.full((2, 3, 4), math.nan), torch.randn(2, 4, 5)):
        before, v0 = layer.state_dict()
        before = clone_state(before)
        with pytest.raises(InvalidInput):
            layer.forward(bad, True)
        after, v1 = layer.state_dict()
        assert v1 == v0
        assert_state_equal(after, before)
    run_sequence(layer, module, rest, ("train", "eval"))


@pytest.mark.parametrize("kind", ["BatchNorm2d", "InstanceNorm2d"])
def test_abandoned_train_request_leaves_state_unchanged(kind):
    """A caller gone before the commit (deadline, cancellation): the update is dropped."""
    kwargs = dict(num_features=3, track_running_stats=True)
    layer, module, rest = _trained(kind, kwargs, torch.float64)
    before, v0 = layer.state_dict()
    before = clone_state(before)
    asked = []

    def gone() -> bool:
        asked.append(True)
        return False

    with pytest.raises(RequestAbandoned):
        layer.forward(rest[0], True, still_wanted=gone)
    assert asked, "still_wanted was never consulted"
    after, v1 = layer.state_dict()
    assert v1 == v0
    assert_state_equal(after, before)
    # still_wanted returning True commits normally.
    module.train()
    with torch.no_grad():
        expected = module(rest[1])
    out, v2 = layer.forward(rest[1], True, still_wanted=lambda: True)[:2]
    torch.testing.assert_close(out, expected, **EXACT)
    assert v2.version == v0.version + 1
    assert_state_equal(layer.state_dict()[0], module.state_dict())


def test_failed_load_state_leaves_state_unchanged():
    kwargs = dict(num_features=3, momentum=None)
    layer, module, rest = _trained("BatchNorm2d", kwargs, torch.float32)
    good = clone_state(module.state_dict())
    bad_states = {
        "missing_key": {k: v for k, v in good.items() if k != "running_var"},
        "unexpected_key": {**good, "extra": torch.zeros(3)},
        # a good key first, then a wrong shape: nothing of it may stick
        "wrong_shape": {"weight": good["weight"] * 3, **{k: v for k, v in good.items() if k != "weight"}, "running_var": torch.ones(4)},
    }
    for label, bad in bad_states.items():
        before, v0 = layer.state_dict()
        before = clone_state(before)
        with pytest.raises(InvalidInput):
            layer.load_state(bad)
        after, v1 = layer.state_dict()
        assert v1 == v0, label
        assert_state_equal(after, before)
    run_sequence(layer, module, rest, ("train", "eval"))


@pytest.mark.parametrize("kind", ["BatchNorm2d", "InstanceNorm1d", "LayerNorm"])
def test_eval_with_non_finite_values_matches_torch_and_changes_nothing(kind):
    kwargs = {"BatchNorm2d": dict(num_features=3), "InstanceNorm1d": dict(num_features=3, track_running_stats=True),
              "LayerNorm": dict(normalized_shape=[4])}[kind]
    layer, module, rest = _trained(kind, kwargs, torch.float64)
    x = rest[0].clone()
    x.view(-1)[[0, 3]] = torch.tensor([math.nan, math.inf], dtype=x.dtype)
    before, v0 = layer.state_dict()
    before = clone_state(before)
    module.eval()
    with torch.no_grad():
        expected = module(x)
    out, v = layer.forward(x, False)[:2]
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert v == v0
    assert_state_equal(layer.state_dict()[0], before)


def test_eval_leaves_the_shared_module_in_eval_mode_after_train():
    """The mode belongs to one request: after a train request an eval uses running stats."""
    kwargs = dict(num_features=2)
    layer, module, _ = _trained("BatchNorm1d", kwargs, torch.float64)
    far = torch.randn(16, 2, dtype=torch.float64) * 20 + 100  # batch stats far from running stats
    module.eval()
    with torch.no_grad():
        expected = module(far)
    out, *_ = layer.forward(far, False)
    torch.testing.assert_close(out, expected, **EXACT)
    # With batch statistics the output would be ~N(0, 1); with the running ones it is huge.
    assert out.abs().mean() > 10


# -- which inputs are accepted follows torch ---------------------------------------------------
ACCEPTANCE_CASES = [
    ("BatchNorm1d", dict(num_features=3)),
    ("BatchNorm1d", dict(num_features=3, track_running_stats=False)),
    ("BatchNorm2d", dict(num_features=3, affine=False)),
    ("BatchNorm3d", dict(num_features=3)),
    ("InstanceNorm1d", dict(num_features=3)),
    ("InstanceNorm1d", dict(num_features=3, track_running_stats=True)),
    ("InstanceNorm2d", dict(num_features=3, affine=True)),
    ("InstanceNorm3d", dict(num_features=3)),
    ("LayerNorm", dict(normalized_shape=[3, 2])),
    ("GroupNorm", dict(num_groups=3, num_channels=3)),
    ("RMSNorm", dict(normalized_shape=[3, 2])),
]


def _candidate_shapes():
    """Ranks 1-6; 1-4 samples (or channels, read unbatched); the right channel count (3) or
    not; spatial sizes 1 or 2."""
    shapes = set()
    for rank in range(1, 7):
        for first in (1, 2, 3, 4):
            for second in (2, 3, 4):
                for fill in (1, 2):
                    shapes.add((first, second, *[fill] * (rank - 2))[:rank])
                    shapes.add((first, second, *[fill] * (rank - 3), 2)[:rank])
    return sorted(shapes, key=lambda s: (len(s), s))


@pytest.mark.filterwarnings("ignore:input's size at dim")  # torch's InstanceNorm channel warning
@pytest.mark.parametrize("case", ACCEPTANCE_CASES, ids=[_case_id(c) for c in ACCEPTANCE_CASES])
def test_accepts_exactly_the_inputs_torch_accepts(case):
    """For every candidate shape and mode: torch raises <=> the layer raises InvalidInput
    (state untouched); otherwise same output and same state. Covers batch size 1 in eval,
    unbatched InstanceNorm, channel counts InstanceNorm tolerates, and spatial size 1."""
    kind, kwargs = case
    dtype = torch.float64
    module = local_module(kind, kwargs, dtype)
    layer = new_layer(kind, kwargs, dtype)
    g = torch.Generator().manual_seed(8)
    accepted = 0
    for shape in _candidate_shapes():
        for mode in ("train", "eval"):
            x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 1
            module.train(mode == "train")
            before = clone_state(module.state_dict())
            try:
                with torch.no_grad():
                    expected = module(x)
            except Exception:  # noqa: BLE001 - whatever torch refuses
                expected = None
            if expected is None:
                # torch may have counted the batch before refusing it (num_batches_tracked);
                # the layer must not: put the local module back.
                module.load_state_dict(before)
                v0 = layer.version
                with pytest.raises(InvalidInput):
                    layer.forward(x, mode == "train")
                assert layer.version == v0
                assert_state_equal(layer.state_dict()[0], before)
                continue
            try:
                out, *_ = layer.forward(x, mode == "train")
            except EngineError as e:
                pytest.fail(f"{mode} input {shape}: torch accepts it, the layer raised {type(e).__name__}: {e}")
            accepted += 1
            torch.testing.assert_close(out, expected, **EXACT, msg=lambda m: f"{mode} input {shape}: {m}")
            assert_state_equal(layer.state_dict()[0], module.state_dict())
    assert accepted > 0


@pytest.mark.parametrize("kind", ("BatchNorm2d", "InstanceNorm1d", "LayerNorm", "GroupNorm"))
def test_torch_without_bias_argument_refuses_bias_false_and_builds_bias_true(kind, monkeypatch):
    """On a torch that lacks `bias` (before 2.13) the engine still builds bias=True layers."""
    from normserve.server.engine import specs

    monkeypatch.setitem(specs._TORCH_ACCEPTS, kind, set())
    kwargs = {"GroupNorm": dict(num_groups=1, num_channels=4), "LayerNorm": dict(normalized_shape=[4])}.get(
        kind, dict(num_features=4)
    )
    with pytest.raises(EngineError, match=rf"{kind}: bias=False needs torch >= 2.13"):
        make_config(kind, **kwargs, bias=False)
    built = specs.build_module(make_config(kind, **kwargs, bias=True))
    assert built.state_dict().keys() == getattr(nn, kind)(**kwargs).state_dict().keys()
