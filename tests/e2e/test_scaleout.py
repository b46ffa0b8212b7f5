"""Several replicas sharing layer state through a real Redis (`--store redis://...`).

- Train updates spread over 3 replicas are linearizable: no lost update, one serial order.
- A replica killed with SIGKILL mid-load loses no acknowledged update; clients balancing
  over the replicas (`round_robin`) carry on; a restarted replica serves the current state.
- An eval on replica B reflects a train acknowledged by replica A within the bound.
- Creation, deletion, idempotency ids and compare-and-set hold across replicas.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import urllib.request
import uuid

import numpy as np
import pytest
import torch

from normserve.client import Client, RetryPolicy
from normserve.client.errors import AbortedError, AlreadyExistsError, NotFoundError, UnavailableError

from layercases import batches, local_module
from redisproc import start_or_skip
from serverproc import ServerProcess
from test_concurrency import C, initial_module, make_batches, replay, run_threads
from test_parity import MODES, TOL, as_tensor, assert_state_equal

pytestmark = pytest.mark.e2e

SERVICE = "normserve.v1.NormService"
REFRESH = 0.25  # store_refresh_seconds for these replicas
BOUND = 2 * REFRESH  # the documented staleness bound
TIGHT = dict(rtol=1e-9, atol=1e-9)
_prefixes = itertools.count()


def start_replicas(url: str, prefix: str, n: int, *extra: str) -> list[ServerProcess]:
    replicas = []
    try:
        for _ in range(n):
            args = ("--store", url, "--store-prefix", prefix, "--store-refresh-seconds", str(REFRESH), *extra)
            replicas.append(ServerProcess(*args).start())
    except BaseException:
        for r in replicas:
            r.kill()
        raise
    return replicas


@pytest.fixture(scope="module")
def replicas(redis):
    """3 replicas sharing a key prefix of the module's Redis (tests use their own layers;
    a test that kills one puts a restarted one in its place)."""
    procs = start_replicas(redis.url, f"test{next(_prefixes)}", 3)
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture
def clients(replicas):
    cs = [Client(r.target, timeout=30) for r in replicas]
    yield cs
    for c in cs:
        c.close()


def balanced_client(replicas: list[ServerProcess], **kwargs) -> Client:
    """One channel over every replica with gRPC's round_robin policy (client-side balancing)."""
    target = "ipv4:" + ",".join(r.target for r in replicas)
    return Client(target, options=[("grpc.lb_policy_name", "round_robin")], **kwargs)


def wait_for(predicate, timeout: float, what: str) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.002)
    return time.monotonic() - start


def assert_serial_history(records, n: int, final: dict, first_version: int = 1) -> None:
    """`records` = (batch, version, num_batches_tracked): one version per batch, and the
    batches replayed in version order give `final` (momentum=None BatchNorm2d, seed 1)."""
    versions = sorted(v for _, v, _ in records)
    assert versions == list(range(first_version, first_version + n)), "lost or duplicated update"
    for _, v, nbt in records:
        assert nbt == v - first_version + 1
    ordered = [x for x, _, _ in sorted(records, key=lambda r: r[1])]
    states = replay(initial_module(seed=1), ordered, first_version=first_version)
    assert int(final["num_batches_tracked"]) == n
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(final[key], states[first_version + n - 1][key], **TIGHT)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in ordered]).mean(0)
    torch.testing.assert_close(final["running_mean"], means, **TIGHT)


def test_trains_spread_over_three_replicas_lose_no_update(replicas, clients, name):
    threads, per_thread = 8, 25
    clients[0].create_layer(name, "BatchNorm2d", num_features=C, momentum=None, dtype=torch.float64)
    clients[1].load_state(name, initial_module(seed=1).state_dict())  # version 1
    batches = [make_batches(per_thread, seed=500 + t) for t in range(threads)]
    start = threading.Barrier(threads, timeout=60)

    def trainer(t: int):
        cs = [Client(r.target, timeout=30) for r in replicas]
        try:
            start.wait()
            out = []
            for i, x in enumerate(batches[t]):
                r = cs[(t + i) % 3].normalize_result(name, x, "train")  # every thread visits every replica
                assert not r.replayed
                out.append((x, r.state.version, r.state.num_batches_tracked))
            return out
        finally:
            for c in cs:
                c.close()

    records = [r for rs in run_threads([lambda t=t: trainer(t) for t in range(threads)]) for r in rs]
    n = threads * per_thread
    final = clients[2].get_state(name, as_torch=True)  # get_state waits for nothing: it may lag...
    wait_for(lambda: all(c.get_layer(name).state.version == n + 1 for c in clients), BOUND, "replicas converge")
    finals = [c.get_state(name, as_torch=True) for c in clients]
    for final in finals:
        assert_serial_history(records, n, final, first_version=2)
        for key in final:
            assert torch.equal(final[key], finals[0][key])
    # Each replica reports how fresh its copy is and how often another replica got there first.
    conflicts = 0
    for replica in replicas:
        text = urllib.request.urlopen(replica.metrics_url, timeout=10).read().decode()
        assert float(re.search(r"^normserve_store_sync_age_seconds (\S+)$", text, re.M).group(1)) < BOUND
        conflicts += float(re.search(r"^normserve_store_conflicts_total (\S+)$", text, re.M).group(1))
    print(f"{conflicts:.0f} commits recomputed after another replica's ({n} trains)")


def test_eval_on_b_sees_a_train_on_a_within_the_bound(clients, name):
    a, b = clients[0], clients[1]
    a.create_layer(name, "BatchNorm2d", num_features=C, momentum=0.3, dtype=torch.float64)
    x_eval = make_batches(1, seed=7, shape=(2, C, 3, 3))[0]
    delays = []
    for i, x in enumerate(make_batches(20, seed=8)):
        version = a.normalize_result(name, x, "train").state.version
        assert version == i + 1
        seen = {}

        def caught_up():
            seen["r"] = b.normalize_result(name, x_eval, "eval")
            return seen["r"].state.version >= version

        delays.append(wait_for(caught_up, BOUND, f"eval on B seeing version {version}"))
        # ... and B's answer is exactly eval mode with the state A produced.
        module = initial_module(seed=0).eval()
        module.load_state_dict(a.get_state(name, as_torch=True))
        with torch.no_grad():
            torch.testing.assert_close(seen["r"].output, module(x_eval), rtol=0, atol=0)
    print(f"B caught up after {np.median(delays) * 1e3:.2f} ms median, {max(delays) * 1e3:.2f} ms max")


def test_a_replica_killed_mid_load_loses_no_acknowledged_update(redis, replicas, clients, name):
    threads, per_thread = 6, 30
    clients[0].create_layer(name, "BatchNorm2d", num_features=C, momentum=None, dtype=torch.float64)
    clients[0].load_state(name, initial_module(seed=1).state_dict())
    batches = [make_batches(per_thread, seed=700 + t) for t in range(threads)]
    acked = [0]
    lock = threading.Lock()
    retry = RetryPolicy(max_attempts=10, initial_backoff=0.05, max_backoff=0.5)

    def trainer(t: int):
        out = []
        with balanced_client(replicas, timeout=60, retry=retry) as c:
            for x in batches[t]:
                # The SDK resends a failed call with the same request id: at most once applied.
                r = c.normalize_result(name, x, "train")
                out.append((x, r.state.version, r.state.num_batches_tracked))
                with lock:
                    acked[0] += 1
        return out

    killer_done = threading.Event()

    def killer():
        try:
            wait_for(lambda: acked[0] >= threads * per_thread // 3, 60, "load started")
            replicas[2].kill()  # SIGKILL, mid-load
        finally:
            killer_done.set()
        return []

    results = run_threads([lambda t=t: trainer(t) for t in range(threads)] + [killer])
    assert killer_done.is_set() and replicas[2].proc.returncode == -9
    records = [r for rs in results for r in rs]
    n = threads * per_thread
    assert len(records) == n
    final = clients[0].get_state(name, as_torch=True)
    assert_serial_history(records, n, final, first_version=2)

    # A restarted replica serves the current state, exactly.
    prefix = replicas[0].args[replicas[0].args.index("--store-prefix") + 1]
    (restarted,) = start_replicas(redis.url, prefix, 1)
    replicas[2] = restarted  # stopped by the fixture
    with Client(restarted.target, timeout=30) as c:
        assert c.get_layer(name).state.version == n + 1
        state = c.get_state(name, as_torch=True)
    for key in final:
        assert torch.equal(state[key], final[key])


def test_layers_created_and_deleted_on_one_replica_are_seen_by_the_others(clients, name):
    a, b, c = clients
    a.create_layer(name, "LayerNorm", normalized_shape=[4])
    assert b.get_layer(name).kind == "LayerNorm"  # at once: a miss asks the store
    with pytest.raises(AlreadyExistsError):
        c.create_layer(name, "GroupNorm", num_groups=1, num_channels=2)
    wait_for(lambda: name in [l.name for l in c.list_layers()], BOUND, "listed on C")
    b.delete_layer(name)
    for other in (a, c):
        wait_for(lambda: _missing(other, name), BOUND, "deletion seen")
    # Created again under the same name: a new layer everywhere, not the old one.
    a.create_layer(name, "BatchNorm1d", num_features=2)
    x = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    b.normalize(name, x, "train")
    wait_for(lambda: c.get_layer(name).kind == "BatchNorm1d" and c.get_layer(name).state.version == 1, BOUND, "C")


def _missing(client: Client, name: str) -> bool:
    try:
        client.get_layer(name)
    except NotFoundError:
        return True
    return False


def test_request_ids_and_compare_and_set_hold_across_replicas(clients, name):
    a, b, _ = clients
    a.create_layer(name, "BatchNorm2d", num_features=C)
    x = make_batches(1, seed=3, shape=(4, C, 2, 2))[0].float()
    rid = uuid.uuid4().hex
    first = a.normalize_result(name, x, "train", request_id=rid)
    again = b.normalize_result(name, x, "train", request_id=rid)  # a retry landing elsewhere
    assert (first.replayed, again.replayed) == (False, True)
    assert again.state == first.state
    assert torch.equal(torch.as_tensor(again.output), torch.as_tensor(first.output))
    wait_for(lambda: b.get_layer(name).state.num_batches_tracked == 1, BOUND, "B current")
    assert b.get_layer(name).state.num_batches_tracked == 1

    state = a.get_state(name)
    with pytest.raises(AbortedError):
        b.load_state(name, state, expected_version=0)  # it is at 1
    assert b.reset_running_stats(name, expected_version=1).version == 2
    with pytest.raises(AbortedError):
        a.load_state(name, state, expected_version=1)  # even if A's copy still says 1
    assert a.load_state(name, state, expected_version=2).version == 3


KINDS = [
    ("BatchNorm1d", dict(num_features=3)),
    ("BatchNorm2d", dict(num_features=3, momentum=None)),
    ("BatchNorm3d", dict(num_features=2, affine=False)),
    ("InstanceNorm1d", dict(num_features=3, affine=True, track_running_stats=True)),
    ("InstanceNorm2d", dict(num_features=3, track_running_stats=True, momentum=0.2)),
    ("InstanceNorm3d", dict(num_features=2)),
    ("LayerNorm", dict(normalized_shape=[4])),
    ("GroupNorm", dict(num_groups=2, num_channels=4)),
    ("RMSNorm", dict(normalized_shape=[2, 4], eps=1e-5)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind,kwargs", KINDS, ids=[k for k, _ in KINDS])
def test_parity_through_replicas(clients, name, kind, kwargs, dtype):
    """Each batch on the next replica, train and eval: outputs and state as torch's."""
    clients[0].create_layer(name, kind, **kwargs, dtype=dtype)
    module = local_module(kind, kwargs, dtype)
    version = 0
    for step, (x, mode) in enumerate(zip(batches(kind, kwargs, dtype, len(MODES), seed=11), MODES)):
        module.train(mode == "train")
        with torch.no_grad():
            expected = module(x)
        result = clients[step % 3].normalize_result(name, x, mode)
        torch.testing.assert_close(as_tensor(result.output), expected, **TOL[dtype])
        if mode == "train":  # the next replica must compute on this state: wait until it has it
            version = result.state.version
            wait_for(lambda: clients[(step + 1) % 3].get_layer(name).state.version >= version, BOUND, "next replica")
    # Replica 1 follows the store too: it reads the last update within the staleness bound.
    wait_for(lambda: clients[1].get_layer(name).state.version >= version, BOUND, "replica 1")
    assert_state_equal(clients[1].get_state(name, as_torch=True), module.state_dict(), TOL[dtype])


def test_replicas_refuse_stale_reads_while_the_store_is_away_and_recover(name):
    own = start_or_skip(persist=True)  # a restart on the same port brings the data back
    (replica,) = start_replicas(own.url, "outage", 1)
    try:
        with Client(replica.target, timeout=10, retry=None) as c:
            c.create_layer(name, "BatchNorm1d", num_features=2)
            x = np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32)
            c.normalize(name, x, "train")
            own.stop()
            with pytest.raises(UnavailableError, match="unavailable"):
                c.normalize(name, x, "train")
            time.sleep(BOUND + 0.1)
            with pytest.raises(UnavailableError, match="stale"):
                c.normalize(name, x, "eval")
            # Readiness (the service's health) follows the store; liveness ("") does not.
            wait_for(lambda: c.health(SERVICE) == "NOT_SERVING", BOUND, "NormService NOT_SERVING")
            assert c.health("") == "SERVING"
            own.restart()
            wait_for(lambda: _serves(c, name, x), 10, "serving again after the store came back")
            wait_for(lambda: c.health(SERVICE) == "SERVING", BOUND, "NormService SERVING again")
            assert c.get_layer(name).state.version == 1  # the update acknowledged before the outage
    finally:
        replica.stop()
        own.cleanup()


def _serves(client: Client, name: str, x) -> bool:
    try:
        client.normalize(name, x, "eval")
        return True
    except UnavailableError:
        return False
