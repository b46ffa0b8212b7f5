"""The registry over a shared store (real Redis), without the follower thread, so each
interleaving is driven by the test: races with creations and deletions, a store that lost
writes or was emptied, a damaged record, a layer created again elsewhere."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from normserve.server.engine import LayerNotFound, RedisStore, Registry, StoreUnavailable, make_config
from normserve.server.engine.errors import LayerUnreadable
from normserve.server.engine.store import encode_record

_prefixes = itertools.count()
BN = make_config("BatchNorm1d", num_features=2)


class HookedStore(RedisStore):
    """fetch() runs `hook` after reading, before returning: a concurrent change lands there."""

    hook = None

    def fetch(self, name):
        found = super().fetch(name)
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return found


@pytest.fixture
def prefix():
    return f"reg{next(_prefixes)}"


def registry(redis, prefix) -> Registry:
    store = HookedStore(redis.url, prefix=prefix, refresh_seconds=600)
    store.mark_synced(time.monotonic())  # no follower: the test decides what each replica knows
    return Registry(store=store)


def train(layer, seed=0):
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(seed))
    return layer.forward(x, train=True)


def test_a_miss_racing_a_create_keeps_the_created_layer(redis, prefix):
    r = registry(redis, prefix)
    created = []
    r.store.hook = lambda: created.append(r.create("a", BN))  # lands between fetch and install
    with pytest.raises(LayerNotFound):
        r.get("a")  # the fetch saw nothing...
    assert not created[0].deleted  # ...but must not drop what the create installed
    assert r.get("a") is created[0]
    assert train(r.get("a")).state.version == 1


def test_a_fetch_older_than_a_delete_does_not_bring_the_layer_back(redis, prefix):
    a, b = registry(redis, prefix), registry(redis, prefix)
    a.create("x", BN)
    a.get("x")
    # b's miss fetches the layer, then a deletes it and b hears of the deletion, before b installs.
    layer_a = a.get("x")
    b.store.hook = lambda: (a.delete("x"), b._apply_change("x", layer_a.incarnation, -1))
    with pytest.raises(LayerNotFound):
        b.get("x")
    with pytest.raises(LayerNotFound):
        b.get("x")


def test_a_layer_created_again_elsewhere_is_retried_not_lost(redis, prefix):
    a, b = registry(redis, prefix), registry(redis, prefix)
    a.create("x", BN)
    old = b.get("x")
    a.delete("x")
    a.create("x", make_config("BatchNorm1d", num_features=2, momentum=0.5))
    with pytest.raises(StoreUnavailable, match="created again"):  # UNAVAILABLE: the SDK retries
        train(old)
    new = b.get("x")
    assert new is not old and new.config.args["momentum"] == 0.5
    assert train(new).state.version == 1
    # Deleting through a stale copy deletes the layer the store holds now.
    a.get("x")  # a caches this incarnation...
    b.delete("x")
    b.create("x", BN)  # ...which b replaces
    a.delete("x")
    assert b.store.fetch("x") is None


def test_a_store_that_lost_writes_is_followed_not_fought(redis, prefix):
    a, b = registry(redis, prefix), registry(redis, prefix)
    layer = a.create("x", BN)
    for seed in range(3):
        train(layer, seed)
    b_layer = b.get("x")
    assert b_layer.version.version == 3
    # Redis loses the last two updates (e.g. appendfsync everysec and a crash).
    record = layer.record()
    older = type(record)(**{**record.__dict__, "version": 1})
    conn = a.store._redis
    conn.hset(f"{prefix}:layer:x", "record", encode_record(older))
    conn.hset(f"{prefix}:index", "x", f"{layer.incarnation}:1")
    assert train(layer, 9).state.version == 2  # adopted the store's version 1, then applied
    b._apply_index(*b.store.index())  # b's copy (3) is ahead of the store (2): take the store's
    assert b.get("x").version.version == 2
    for key, value in layer.state_dict()[0].items():
        assert torch.equal(b.get("x").state_dict()[0][key], value)


def test_an_emptied_store_empties_the_replicas(redis, prefix):
    r = registry(redis, prefix)
    r._apply_index(*r.store.index())
    r.create("x", BN)
    r.store._redis.flushdb()  # every key of every prefix: this test's Redis only holds test data
    r._apply_index(*r.store.index())  # a new epoch
    with pytest.raises(LayerNotFound):
        r.get("x")


def test_a_damaged_record_affects_its_layer_only(redis, prefix):
    r = registry(redis, prefix)
    r.create("good", BN)
    bad = registry(redis, prefix).create("bad", BN)
    r.store._redis.hset(f"{prefix}:layer:bad", "record", b"NSR1garbage")
    r._apply_index(*r.store.index())
    r.store.check_fresh()  # still serving
    assert train(r.get("good")).state.version == 1
    with pytest.raises(LayerUnreadable, match="damaged"):
        r.get("bad")
    assert bad.incarnation > 0
