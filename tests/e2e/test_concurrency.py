"""Concurrent requests against one layer of a real server process.

- Train updates are linearizable: N concurrent train requests leave the state a serial
  order of them gives; with momentum=None the running mean is the mean of the N batch
  means and num_batches_tracked is N (a lost update shows).
- The versions in train responses give that serial order; replaying the batches in it
  reconstructs every state the layer went through.
- Each concurrent eval reads one consistent snapshot: its output is exactly eval mode with
  the state of the version it reports (never batch statistics, never a mix of states).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from normserve.client import Client

pytestmark = pytest.mark.e2e

C = 3
TRAIN_THREADS = 8
TRAINS_PER_THREAD = 25
EVAL_THREADS = 3
MAX_EVALS_PER_THREAD = 400
TIGHT = dict(rtol=1e-9, atol=1e-9)  # float64; only summation order may differ
JOIN_TIMEOUT = 60


def make_batches(n: int, seed: int, shape=(4, C, 3, 3)) -> list[torch.Tensor]:
    """float64 batches with clearly different per-channel means and scales."""
    g = torch.Generator().manual_seed(seed)
    per_channel = (1, C) + (1,) * (len(shape) - 2)
    out = []
    for _ in range(n):
        mean = torch.empty(C, dtype=torch.float64).uniform_(-3, 3, generator=g).view(per_channel)
        scale = torch.empty(C, dtype=torch.float64).uniform_(0.5, 3, generator=g).view(per_channel)
        out.append(torch.randn(shape, generator=g, dtype=torch.float64) * scale + mean)
    return out


def initial_module(seed: int) -> nn.BatchNorm2d:
    """BatchNorm2d(momentum=None), float64, with non-trivial affine parameters."""
    g = torch.Generator().manual_seed(seed)
    module = nn.BatchNorm2d(C, momentum=None, dtype=torch.float64)
    module.requires_grad_(False)
    module.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
    module.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    return module


def run_threads(jobs) -> list:
    """Run callables concurrently; re-raise the first failure; every wait is bounded."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result(timeout=JOIN_TIMEOUT) for f in futures]


def replay(module: nn.BatchNorm2d, ordered: list[torch.Tensor], first_version: int) -> dict[int, dict]:
    """States after each update of `ordered` (train mode), keyed by the version produced;
    `first_version` - 1 maps to the state before any of them."""
    states = {first_version - 1: {k: v.clone() for k, v in module.state_dict().items()}}
    module.train()
    with torch.no_grad():
        for i, x in enumerate(ordered):
            module(x)
            states[first_version + i] = {k: v.clone() for k, v in module.state_dict().items()}
    return states


def eval_with(state: dict, x: torch.Tensor) -> torch.Tensor:
    module = nn.BatchNorm2d(C, momentum=None, dtype=torch.float64)
    module.load_state_dict(state)
    module.eval()
    with torch.no_grad():
        return module(x)


def test_concurrent_train_is_linearizable_and_evals_read_consistent_snapshots(server, client, name):
    base = initial_module(seed=1)
    client.create_layer(name, "BatchNorm2d", num_features=C, momentum=None, dtype=torch.float64)
    loaded = client.load_state(name, base.state_dict())
    assert loaded.version == 1 and loaded.num_batches_tracked == 0

    train_batches = [make_batches(TRAINS_PER_THREAD, seed=100 + t) for t in range(TRAIN_THREADS)]
    # Eval batches whose own statistics are far from any running statistics: batch-stat
    # normalization would give ~N(0, 1) outputs, running-stat normalization huge ones.
    eval_batches = [make_batches(8, seed=900 + t, shape=(2, C, 3, 3)) for t in range(EVAL_THREADS)]
    for batches in eval_batches:
        for x in batches:
            x.mul_(0.01).add_(40.0)

    start = threading.Barrier(TRAIN_THREADS + EVAL_THREADS, timeout=JOIN_TIMEOUT)
    trains_left = [TRAIN_THREADS]
    trains_done = threading.Event()
    lock = threading.Lock()

    def trainer(batches):
        records = []
        with Client(server.target, timeout=30) as c:
            start.wait()
            try:
                for x in batches:
                    r = c.normalize_result(name, x, "train")
                    records.append((x, r.output, r.state.version, r.state.num_batches_tracked))
            finally:
                with lock:
                    trains_left[0] -= 1
                    if trains_left[0] == 0:
                        trains_done.set()
        return records

    def evaluator(batches):
        records = []
        with Client(server.target, timeout=30) as c:
            start.wait()
            for i in range(MAX_EVALS_PER_THREAD):
                if trains_done.is_set() and i >= len(batches):
                    break
                x = batches[i % len(batches)]
                r = c.normalize_result(name, x, "eval")
                records.append((x, r.output, r.state.version, r.state.num_batches_tracked))
        return records

    results = run_threads(
        [lambda b=b: trainer(b) for b in train_batches] + [lambda b=b: evaluator(b) for b in eval_batches]
    )
    train_records = [r for rs in results[:TRAIN_THREADS] for r in rs]
    eval_records = results[TRAIN_THREADS:]
    n = TRAIN_THREADS * TRAINS_PER_THREAD
    assert len(train_records) == n

    # Every train request produced its own version: a serial order of all of them.
    versions = sorted(v for _, _, v, _ in train_records)
    assert versions == list(range(2, n + 2)), "train versions are not one serial order (lost or duplicated update)"
    for x, _, v, nbt in train_records:
        assert nbt == v - 1, f"version {v} reported num_batches_tracked {nbt}"

    # Train outputs use the batch's own statistics, whatever the state was.
    fresh = initial_module(seed=1).train()
    with torch.no_grad():
        for x, out, v, _ in train_records:
            torch.testing.assert_close(out, fresh(x), **TIGHT, msg=lambda m: f"train output at version {v}: {m}")

    # Final state: exactly N updates, cumulative averages of all batch statistics.
    final = client.get_state(name, as_torch=True)
    all_batches = [x for batches in train_batches for x in batches]
    batch_means = torch.stack([x.mean(dim=(0, 2, 3)) for x in all_batches])
    batch_vars = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in all_batches])
    assert int(final["num_batches_tracked"]) == n
    torch.testing.assert_close(final["running_mean"], batch_means.mean(0), **TIGHT)
    torch.testing.assert_close(final["running_var"], batch_vars.mean(0), **TIGHT)
    torch.testing.assert_close(final["weight"], base.weight)
    torch.testing.assert_close(final["bias"], base.bias)
    info = client.get_layer(name)
    assert (info.state.version, info.state.num_batches_tracked) == (n + 1, n)

    # Replaying the batches in version order reconstructs every intermediate state.
    ordered = [x for x, _, _, _ in sorted(train_records, key=lambda r: r[2])]
    states = replay(initial_module(seed=1), ordered, first_version=2)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(final[key], states[n + 1][key], **TIGHT)

    # Each eval saw one published state, exactly the version it reports.
    seen = set()
    for thread, records in enumerate(eval_records):
        assert records, f"eval thread {thread} sent nothing"
        last = 0
        for x, out, v, nbt in records:
            assert 1 <= v <= n + 1, f"eval reported version {v}"
            assert v >= last, f"eval thread {thread}: version went back from {last} to {v}"
            last = v
            assert nbt == v - 1
            assert out.abs().mean() > 5, f"eval at version {v} normalized with batch statistics (train mode leaked)"
            torch.testing.assert_close(out, eval_with(states[v], x), **TIGHT, msg=lambda m: f"eval at version {v}: {m}")
            seen.add(v)
    assert len(seen - {1, n + 1}) > 0, f"evals never overlapped the training (versions seen: {sorted(seen)})"


def test_concurrent_trains_with_a_reset_in_the_middle(server, client, name):
    """ResetRunningStats is one more linearized update: the final state averages exactly
    the batches whose versions come after the reset's."""
    threads, per_thread = 6, 20
    client.create_layer(name, "BatchNorm2d", num_features=C, momentum=None, dtype=torch.float64)
    train_batches = [make_batches(per_thread, seed=300 + t) for t in range(threads)]
    start = threading.Barrier(threads + 1, timeout=JOIN_TIMEOUT)
    progress = threading.Semaphore(0)

    def trainer(batches):
        records = []
        with Client(server.target, timeout=30) as c:
            start.wait()
            for x in batches:
                r = c.normalize_result(name, x, "train")
                records.append((x, r.state.version))
                progress.release()
        return records

    def resetter():
        with Client(server.target, timeout=30) as c:
            start.wait()
            for _ in range(threads * per_thread // 3):  # let about a third of the trains land first
                assert progress.acquire(timeout=JOIN_TIMEOUT)
            return c.reset_running_stats(name)

    results = run_threads([lambda b=b: trainer(b) for b in train_batches] + [resetter])
    reset = results[-1]
    records = [r for rs in results[:-1] for r in rs]
    total = threads * per_thread
    versions = sorted([v for _, v in records] + [reset.version])
    assert versions == list(range(1, total + 2)), "train and reset versions are not one serial order"
    after = [x for x, v in records if v > reset.version]
    assert 0 < len(after) < total

    final = client.get_state(name, as_torch=True)
    assert int(final["num_batches_tracked"]) == len(after)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in after]).mean(0)
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in after]).mean(0)
    torch.testing.assert_close(final["running_mean"], means, **TIGHT)
    torch.testing.assert_close(final["running_var"], variances, **TIGHT)


def test_concurrent_train_streams_and_unary_calls_are_linearizable(server, client, name):
    """Train batches arriving on several bidirectional streams and unary calls at once."""
    stream_threads, unary_threads, per_thread = 3, 3, 20
    client.create_layer(name, "BatchNorm1d", num_features=C, momentum=None, dtype=torch.float64)
    all_batches = [make_batches(per_thread, seed=500 + t, shape=(6, C)) for t in range(stream_threads + unary_threads)]
    start = threading.Barrier(stream_threads + unary_threads, timeout=JOIN_TIMEOUT)

    def streamer(batches):
        with Client(server.target, timeout=30) as c:
            start.wait()
            return [(x, r.state.version) for x, r in zip(batches, c.normalize_stream_results(name, batches, "train"))]

    def unary(batches):
        with Client(server.target, timeout=30) as c:
            start.wait()
            return [(x, c.normalize_result(name, x, "train").state.version) for x in batches]

    jobs = [lambda b=b: streamer(b) for b in all_batches[:stream_threads]]
    jobs += [lambda b=b: unary(b) for b in all_batches[stream_threads:]]
    records = [r for rs in run_threads(jobs) for r in rs]
    total = (stream_threads + unary_threads) * per_thread
    assert len(records) == total
    assert sorted(v for _, v in records) == list(range(1, total + 1))

    final = client.get_state(name, as_torch=True)
    assert int(final["num_batches_tracked"]) == total
    batches = [x for b in all_batches for x in b]
    torch.testing.assert_close(final["running_mean"], torch.stack([x.mean(0) for x in batches]).mean(0), **TIGHT)
    torch.testing.assert_close(final["running_var"], torch.stack([x.var(0) for x in batches]).mean(0), **TIGHT)
    # And the state is what the version order gives, replayed serially.
    module = nn.BatchNorm1d(C, momentum=None, dtype=torch.float64).train()
    with torch.no_grad():
        for x, _ in sorted(records, key=lambda r: r[1]):
            module(x)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(final[key], value, **TIGHT)
