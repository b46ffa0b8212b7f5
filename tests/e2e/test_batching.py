"""Dynamic batching of eval requests, against a real server process with --batching on.

- Concurrent eval clients get outputs bitwise equal to torch eval of the layer's state,
  and each response's version is the state it was computed with.
- Train is never batched: the interleaved train/eval property of test_concurrency (exact
  running statistics, every eval matching the state of the version it reports) holds with
  batching on.
- A bad request in a crowd of good ones gets its own precise error; the others succeed.
- Concurrent eval streams are batched exactly too.
- The batching metrics are populated.
"""

from __future__ import annotations

import re
import threading
import urllib.request

import pytest
import torch
from serverproc import ServerProcess
from torch import nn

import test_concurrency
from normserve.client import Client
from normserve.client.errors import InvalidArgumentError

pytestmark = pytest.mark.e2e

CLIENTS = 12
PER_CLIENT = 40


@pytest.fixture(scope="module")
def batch_server():
    with ServerProcess("--batching", "on", "--batch-max-size", "32") as proc:
        yield proc


def run_threads(n: int, job) -> list:
    return test_concurrency.run_threads([lambda i=i: job(i) for i in range(n)])


def scrape(server) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, kind: str) -> float:
    m = re.search(rf'^{name}{{kind="{kind}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def random_state(module: nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if key == "num_batches_tracked":
            state[key] = value
        elif key == "running_var":
            state[key] = (torch.rand(value.shape, generator=g, dtype=torch.float64) + 0.5).to(value.dtype)
        else:
            state[key] = (torch.randn(value.shape, generator=g, dtype=torch.float64) * 0.5 + 0.3).to(value.dtype)
    return state


CASES = [
    ("BatchNorm1d", dict(num_features=16), torch.float32, (1, 16)),
    ("BatchNorm2d", dict(num_features=3), torch.float64, (2, 3, 5, 5)),
    ("InstanceNorm1d", dict(num_features=4, affine=True, track_running_stats=True), torch.float32, (1, 4, 9)),
    ("LayerNorm", dict(normalized_shape=[8]), torch.float32, (3, 8)),
    ("GroupNorm", dict(num_groups=2, num_channels=6), torch.float64, (2, 6, 4)),
    ("RMSNorm", dict(normalized_shape=[5]), torch.bfloat16, (2, 5)),
]


@pytest.mark.parametrize("kind, kwargs, dtype, shape", CASES, ids=[c[0] for c in CASES])
def test_concurrent_evals_are_exact_and_report_their_state(batch_server, name, kind, kwargs, dtype, shape):
    reference = getattr(nn, kind)(**kwargs, dtype=dtype)
    reference.load_state_dict(random_state(reference, seed=len(name)))
    reference.eval()
    with Client(batch_server.target, timeout=30) as c:
        c.create_layer(name, kind, **kwargs, dtype=dtype)
        version = c.load_state(name, reference.state_dict()).version
    before = scrape(batch_server)

    def client(i):
        g = torch.Generator().manual_seed(i)
        out = []
        with Client(batch_server.target, timeout=30) as c:
            for k in range(PER_CLIENT):
                x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
                r = c.normalize_result(name, x, "eval")
                out.append((x, r.output, r.state.version))
        return out

    results = run_threads(CLIENTS, client)
    with torch.no_grad():
        for records in results:
            for x, out, v in records:
                assert v == version
                expected = reference(x)
                assert out.dtype == expected.dtype and out.shape == expected.shape
                assert torch.equal(out, expected), f"{kind}: batched eval output differs from torch eval"
    after = scrape(batch_server)
    requests = metric(after, "normserve_batch_requests_sum", kind) - metric(before, "normserve_batch_requests_sum", kind)
    assert requests == CLIENTS * PER_CLIENT, "every eval request went through the batching queue"
    queued = metric(after, "normserve_batch_queue_duration_seconds_count", kind) - metric(
        before, "normserve_batch_queue_duration_seconds_count", kind
    )
    assert queued == CLIENTS * PER_CLIENT


def test_evals_interleaved_with_trains_match_the_state_of_their_version(batch_server, name):
    """Train requests are never batched: exact running statistics, linearizable versions,
    and every concurrent (batched) eval equals eval mode with the state it reports."""
    with Client(batch_server.target, timeout=30) as c:
        test_concurrency.test_concurrent_train_is_linearizable_and_evals_read_consistent_snapshots(
            batch_server, c, name
        )


def test_some_forwards_serve_several_requests(batch_server, name):
    """Under concurrent load some forwards coalesce requests (asserted over the whole run
    of this layer, so it does not hinge on timing of any single request)."""
    with Client(batch_server.target, timeout=30) as c:
        c.create_layer(name, "LayerNorm", normalized_shape=[256], dtype=torch.float64)
    before = scrape(batch_server)
    x = torch.randn(16, 256, dtype=torch.float64)

    def client(i):
        with Client(batch_server.target, timeout=30) as c:
            for _ in range(100):
                c.normalize(name, x, mode="eval")

    run_threads(16, client)
    after = scrape(batch_server)
    delta = {
        m: metric(after, m, "LayerNorm") - metric(before, m, "LayerNorm")
        for m in ("normserve_batch_requests_sum", "normserve_batch_requests_count")
    }
    assert delta["normserve_batch_requests_sum"] == 1600
    assert delta["normserve_batch_requests_count"] < 1600, "no forward ever served more than one request"


def test_a_bad_request_in_a_crowd_gets_its_own_error(batch_server, name):
    c_features = 4
    reference = nn.BatchNorm1d(c_features)
    reference.load_state_dict(random_state(reference, seed=7))
    reference.eval()
    with Client(batch_server.target, timeout=30) as c:
        c.create_layer(name, "BatchNorm1d", num_features=c_features)
        c.load_state(name, reference.state_dict())
        bad = torch.randn(2, c_features + 1)
        with pytest.raises(InvalidArgumentError) as alone:
            c.normalize(name, bad, mode="eval")
    message = alone.value.message
    start = threading.Barrier(CLIENTS)

    def client(i):
        g = torch.Generator().manual_seed(i)
        out = []
        with Client(batch_server.target, timeout=30) as c:
            start.wait(30)
            for k in range(30):
                if i == 0 and k % 3 == 0:
                    with pytest.raises(InvalidArgumentError) as e:
                        c.normalize(name, bad, mode="eval")
                    assert e.value.message == message
                    continue
                x = torch.randn(1 + k % 3, c_features, generator=g)
                out.append((x, c.normalize(name, x, mode="eval")))
        return out

    results = run_threads(CLIENTS, client)
    assert "expects 4 channels" in message, message
    with torch.no_grad():
        for records in results:
            for x, out in records:
                assert torch.equal(out, reference(x))


def test_concurrent_streams_are_batched_exactly(batch_server, name):
    """Stream messages go through the same queue: several eval streams at once get, in
    order, exactly torch eval's outputs."""
    reference = nn.GroupNorm(2, 4)
    reference.load_state_dict(random_state(reference, seed=3))
    reference.eval()
    with Client(batch_server.target, timeout=30) as c:
        c.create_layer(name, "GroupNorm", num_groups=2, num_channels=4)
        c.load_state(name, reference.state_dict())

    def streamer(i):
        g = torch.Generator().manual_seed(50 + i)
        xs = [torch.randn(1 + k % 2, 4, 3, generator=g) for k in range(30)]
        with Client(batch_server.target, timeout=30) as c:
            return xs, list(c.normalize_stream(name, xs, mode="eval"))

    with torch.no_grad():
        for xs, outs in run_threads(6, streamer):
            assert len(outs) == len(xs)
            for x, out in zip(xs, outs):
                assert torch.equal(out, reference(x))
