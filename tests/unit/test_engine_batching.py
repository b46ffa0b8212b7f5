"""Dynamic batching of eval requests (engine/batching.py), without gRPC.

The claim batching rests on: for every kind and dtype, running several eval requests
concatenated along dim 0 and splitting the output gives each request bitwise the output
it gets alone. Checked here for every kind x float32/float64/float16/bfloat16 x several
per-sample shapes and request sizes, then through the batching queue itself with
concurrent threads, a changing state, bad requests and cancelled ones.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from normserve.server.engine import EvalBatching, InvalidInput, Registry, RequestAbandoned, batchable, make_config

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SIZES = (1, 3, 2, 5, 1, 8)  # samples per request, concatenated in this order

# (kind, kwargs, per-sample shapes)
CASES = [
    ("BatchNorm1d", dict(num_features=16), [(16,), (16, 7)]),
    ("BatchNorm1d", dict(num_features=5, affine=False, momentum=None), [(5,), (5, 33)]),
    ("BatchNorm2d", dict(num_features=3), [(3, 5, 7), (3, 16, 16)]),
    ("BatchNorm2d", dict(num_features=17, bias=False), [(17, 4, 3)]),
    ("BatchNorm3d", dict(num_features=2), [(2, 3, 4, 5)]),
    ("InstanceNorm1d", dict(num_features=3), [(3, 9), (3, 40)]),
    ("InstanceNorm1d", dict(num_features=3, affine=True, track_running_stats=True), [(3, 9)]),
    ("InstanceNorm2d", dict(num_features=4, affine=True), [(4, 5, 6)]),
    ("InstanceNorm2d", dict(num_features=3, track_running_stats=True), [(3, 7, 7)]),
    ("InstanceNorm3d", dict(num_features=2, affine=True, track_running_stats=True), [(2, 3, 4, 5)]),
    ("LayerNorm", dict(normalized_shape=5), [(5,), (2, 5)]),
    ("LayerNorm", dict(normalized_shape=(3, 4)), [(3, 4), (6, 3, 4)]),
    ("LayerNorm", dict(normalized_shape=33, bias=False), [(33,), (3, 33)]),
    ("GroupNorm", dict(num_groups=2, num_channels=6), [(6,), (6, 5), (6, 3, 4)]),
    ("GroupNorm", dict(num_groups=3, num_channels=3, affine=False), [(3, 17)]),
    ("RMSNorm", dict(normalized_shape=5), [(5,), (2, 5)]),
    ("RMSNorm", dict(normalized_shape=(3, 4), eps=1e-5), [(3, 4)]),
    ("RMSNorm", dict(normalized_shape=33, elementwise_affine=False), [(33,), (4, 33)]),
]


def _id(case) -> str:
    kind, kwargs, _ = case
    return kind + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


def randomized_layer(kind: str, kwargs: dict, dtype: torch.dtype, seed: int = 0):
    """A layer whose state (running stats, affine parameters) is random, not 0/1."""
    layer = Registry().create("layer", make_config(kind, **kwargs, dtype=dtype))
    g = torch.Generator().manual_seed(seed)
    state, _ = layer.state_dict()
    new = {}
    for key, value in state.items():
        if key == "num_batches_tracked":
            new[key] = value.clone()
        elif key == "running_var":
            new[key] = (torch.rand(value.shape, generator=g, dtype=torch.float64) * 2 + 0.3).to(value.dtype)
        else:
            new[key] = (torch.randn(value.shape, generator=g, dtype=torch.float64) * 0.7 + 0.5).to(value.dtype)
    if new:
        layer.load_state(new)
    return layer


def inputs(per_sample: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n, *per_sample), generator=g, dtype=torch.float64) * 3 + 1).to(dtype) for n in SIZES]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_concatenated_eval_is_bitwise_equal_to_solo_eval(case, dtype):
    kind, kwargs, shapes = case
    layer = randomized_layer(kind, kwargs, dtype)
    snap = layer._snapshot
    for s, per_sample in enumerate(shapes):
        xs = inputs(per_sample, dtype, seed=s)
        assert all(batchable(layer.config, x) for x in xs), f"{kind} {per_sample} should be batchable"
        solo = [layer.forward(x, False).output for x in xs]
        together = layer._run(snap.module, torch.cat(xs)).split(list(SIZES))
        for i, (a, b) in enumerate(zip(solo, together)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b), (
                f"{kind} {dtype} per-sample {per_sample}: request {i} ({SIZES[i]} samples) differs by "
                f"{float((a.double() - b.double()).abs().max()):g} when batched"
            )


@pytest.mark.parametrize(
    "kind, kwargs, shape",
    [
        ("BatchNorm1d", dict(num_features=3, track_running_stats=False), (2, 3)),  # eval uses batch stats
        ("BatchNorm2d", dict(num_features=3, track_running_stats=False), (2, 3, 4, 4)),
        ("InstanceNorm1d", dict(num_features=3), (3, 7)),  # unbatched (C, L)
        ("InstanceNorm2d", dict(num_features=3), (3, 4, 4)),
        ("LayerNorm", dict(normalized_shape=(3, 4)), (3, 4)),  # no batch dim at all
        ("RMSNorm", dict(normalized_shape=5), (5,)),
    ],
)
def test_layouts_where_dim0_is_not_a_batch_are_not_batched(kind, kwargs, shape):
    layer = Registry().create("layer", make_config(kind, **kwargs))
    assert not batchable(layer.config, torch.zeros(shape))


# -- the queue -------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.batches: list[tuple[str, int, tuple[float, ...]]] = []
        self._lock = threading.Lock()

    def __call__(self, kind, requests, queued):
        with self._lock:
            self.batches.append((kind, requests, tuple(queued)))


def run_threads(n: int, job) -> list:
    results: list = [None] * n
    errors: list = []
    start = threading.Barrier(n)

    def run(i):
        try:
            start.wait(timeout=30)
            results[i] = job(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    return results


def test_a_lone_request_runs_at_once_alone():
    rec = Recorder()
    batching = EvalBatching(max_size=64, max_delay=0.5, observer=rec)
    layer = randomized_layer("BatchNorm1d", dict(num_features=16), torch.float32)
    x = torch.randn(1, 16)
    t0 = time.perf_counter()
    r = layer.forward(x, False, batching=batching)
    assert time.perf_counter() - t0 < 0.25, "a request at an idle layer waited for the batch delay"
    assert torch.equal(r.output, layer.forward(x, False).output)
    assert r.state == layer.version
    assert rec.batches == [("BatchNorm1d", 1, (r.queued_seconds,))]


@pytest.mark.parametrize("max_delay", [0.0, 0.002])
def test_concurrent_evals_are_batched_and_exact_while_the_state_changes(max_delay):
    """Threads hammer one layer while another thread trains it: every output equals eval
    with the state of the version it reports, and some forwards served several requests."""
    rec = Recorder()
    batching = EvalBatching(max_size=16, max_delay=max_delay, observer=rec)
    layer = randomized_layer("BatchNorm2d", dict(num_features=3, momentum=None), torch.float64)
    sizes: list[int] = []
    real_run = layer._run

    def run(module, x):
        sizes.append(x.shape[0])
        return real_run(module, x)

    layer._run = run  # type: ignore[method-assign]
    first, initial = layer.version.version, layer.state_dict()[0]
    stop = threading.Event()
    g = torch.Generator().manual_seed(5)
    train_xs = [torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(200)]

    def trainer():
        for x in train_xs:
            if stop.is_set():
                return
            layer.forward(x, True)
            time.sleep(0.0005)

    t = threading.Thread(target=trainer)
    t.start()

    def evaluator(i):
        gi = torch.Generator().manual_seed(100 + i)
        out = []
        for k in range(60):
            x = torch.randn(1 + (i + k) % 3, 3, 2, 2, generator=gi, dtype=torch.float64) * 5
            r = layer.forward(x, False, batching=batching)
            out.append((x, r.output, r.state.version))
        return out

    try:
        results = run_threads(8, evaluator)
    finally:
        stop.set()
        t.join(30)
    # Every state the layer went through, by replaying the train batches in order.
    module = torch.nn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    module.load_state_dict(initial)
    replayed = {first: {k: v.clone() for k, v in module.state_dict().items()}}
    module.train()
    with torch.no_grad():
        for n, x in enumerate(train_xs, start=1):
            module(x)
            replayed[first + n] = {k: v.clone() for k, v in module.state_dict().items()}
    ref = torch.nn.BatchNorm2d(3, momentum=None, dtype=torch.float64).eval()
    checked = 0
    for records in results:
        for x, out, v in records:
            ref.load_state_dict(replayed[v])
            with torch.no_grad():
                assert torch.equal(out, ref(x)), f"eval reporting version {v} does not match that state"
            checked += 1
    assert checked == 8 * 60
    assert sum(req for _, req, _ in rec.batches) == checked
    assert max(req for _, req, _ in rec.batches) > 1, "no forward ever served more than one request"
    assert max(sizes) <= 16, f"a forward ran {max(sizes)} samples, over max_size=16"


def test_a_bad_request_in_a_crowd_gets_its_own_error():
    """A float64 input to a float32 LayerNorm passes validation but fails in torch
    ("mixed dtype"): among concurrent good requests it gets its own error and the others
    still get their outputs."""
    batching = EvalBatching(max_size=64)
    layer = randomized_layer("LayerNorm", dict(normalized_shape=4), torch.float32)

    def job(i):
        x = torch.randn(2, 4, dtype=torch.float64 if i == 3 else torch.float32)
        try:
            return ("ok", x, layer.forward(x, False, batching=batching).output)
        except InvalidInput as e:
            return ("error", x, str(e))

    for _ in range(5):
        results = run_threads(8, job)
        for i, (what, x, out) in enumerate(results):
            if i == 3:
                assert what == "error" and "mixed dtype" in out, out
            else:
                assert what == "ok", out
                assert torch.equal(out, layer.forward(x, False).output)


def test_failed_batched_forward_falls_back_to_solo_runs(monkeypatch):
    """Whatever makes a batched forward fail, each member runs alone."""
    batching = EvalBatching(max_size=64)
    layer = randomized_layer("BatchNorm1d", dict(num_features=4), torch.float32)
    real_run = layer._run
    calls = []

    def run(module, x):
        calls.append(x.shape[0])
        if x.shape[0] > 1 and any(float(v) == 123.0 for v in x[:, 0]):
            raise InvalidInput("poisoned batch")
        if x.shape[0] == 1 and float(x[0, 0]) == 123.0:
            raise InvalidInput("the poisoned request")
        return real_run(module, x)

    monkeypatch.setattr(layer, "_run", run)
    gate = threading.Event()
    entered = threading.Event()

    def slow_run(module, x):
        entered.set()
        gate.wait(10)
        return run(module, x)

    # Hold the layer busy with one request so that the next ones queue up and batch.
    monkeypatch.setattr(layer, "_run", slow_run)
    holder = threading.Thread(target=lambda: layer.forward(torch.randn(1, 4), False, batching=batching))
    holder.start()
    assert entered.wait(10)
    monkeypatch.setattr(layer, "_run", run)
    xs = [torch.randn(1, 4) for _ in range(4)]
    xs[2][0, 0] = 123.0
    out: dict = {}

    def member(i):
        try:
            out[i] = layer.forward(xs[i], False, batching=batching).output
        except InvalidInput as e:
            out[i] = e

    members = [threading.Thread(target=member, args=(i,)) for i in range(4)]
    for m in members:
        m.start()
    deadline = time.monotonic() + 10
    while len(batching._queues[layer]._queue) < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.set()
    holder.join(10)
    for m in members:
        m.join(10)
    assert isinstance(out[2], InvalidInput) and "the poisoned request" in str(out[2])
    for i in (0, 1, 3):
        assert torch.equal(out[i], real_run(layer._snapshot.module, xs[i]))
    assert 4 in calls, "the four queued requests were never tried as one batch"


def test_a_cancelled_queued_request_leaves_the_queue():
    batching = EvalBatching(max_size=64)
    layer = randomized_layer("BatchNorm1d", dict(num_features=4), torch.float32)
    gate = threading.Event()
    entered = threading.Event()
    real_run = layer._run

    def slow_run(module, x):
        entered.set()
        gate.wait(10)
        return real_run(module, x)

    layer._run = slow_run  # type: ignore[method-assign]
    holder = threading.Thread(target=lambda: layer.forward(torch.randn(1, 4), False, batching=batching))
    holder.start()
    assert entered.wait(10)
    wanted = [True]
    outcome: list = []

    def queued():
        try:
            layer.forward(torch.randn(1, 4), False, lambda: wanted[0], batching=batching)
            outcome.append("answered")
        except RequestAbandoned as e:
            outcome.append(e)

    t = threading.Thread(target=queued)
    t.start()
    time.sleep(0.1)
    wanted[0] = False
    t.join(5)
    gate.set()
    holder.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], RequestAbandoned), outcome
    assert not batching._queues[layer]._queue and not batching._queues[layer]._busy


def test_train_requests_bypass_batching():
    rec = Recorder()
    batching = EvalBatching(max_size=64, observer=rec)
    layer = randomized_layer("BatchNorm1d", dict(num_features=4), torch.float32)
    before = layer.version.version
    layer.forward(torch.randn(3, 4), True, batching=batching)
    assert layer.version.version == before + 1 and rec.batches == []


@pytest.mark.parametrize("kwargs, message", [(dict(max_size=0), "max_size"), (dict(max_delay=-1.0), "max_delay")])
def test_invalid_batching_settings_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalBatching(**kwargs)
