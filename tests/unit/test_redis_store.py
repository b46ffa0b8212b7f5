"""RedisStore against a real redis-server: the scripts' compare-and-set, id and
incarnation rules, notifications, and what an unreachable store does."""

from __future__ import annotations

import itertools
import queue
import socket

import pytest
import torch

from normserve.server.engine import LayerExists, LayerNotFound, LimitExceeded, RedisStore, StoreUnavailable
from normserve.server.engine.shared import DELETED, AlreadyApplied, StaleState, Superseded
from normserve.server.engine.store import LayerRecord

_prefixes = itertools.count()


@pytest.fixture
def store(redis):
    s = RedisStore(redis.url, prefix=f"unit{next(_prefixes)}", refresh_seconds=0.05)
    yield s
    s.close()


def record(name: str, version: int, value: float = 0.0) -> LayerRecord:
    state = {"running_mean": torch.full((2,), value), "num_batches_tracked": torch.tensor(version)}
    return LayerRecord(name=name, kind="BatchNorm1d", args={"num_features": 2}, version=version, state=state)


def test_create_gives_each_creation_its_own_incarnation(store):
    a = store.create(record("a", 0), max_layers=2)
    b = store.create(record("b", 0), max_layers=2)
    assert b > a
    with pytest.raises(LayerExists):
        store.create(record("a", 0), max_layers=2)
    with pytest.raises(LimitExceeded, match="max_layers=2"):
        store.create(record("c", 0), max_layers=2)
    index, top, epoch = store.index()
    assert (index, top) == ({"a": (a, 0), "b": (b, 0)}, b)
    assert store.index()[2] == epoch  # the same store: the same epoch
    inc, rec = store.fetch("a")
    assert inc == a and rec.version == 0 and torch.equal(rec.state["running_mean"], torch.zeros(2))
    assert store.fetch("nope") is None


def test_commit_is_a_compare_and_set_on_the_version(store):
    inc = store.create(record("l", 0), max_layers=10)
    store.commit(record("l", 1, 1.0), inc, base_version=0, request_id="r1", window=10)
    with pytest.raises(StaleState) as stale:
        store.commit(record("l", 1, 9.0), inc, base_version=0, request_id="r2", window=10)
    assert stale.value.record.version == 1  # the current record comes back with the refusal
    assert torch.equal(stale.value.record.state["running_mean"], torch.ones(2))
    with pytest.raises(AlreadyApplied) as done:
        store.commit(record("l", 2, 2.0), inc, base_version=1, request_id="r1", window=10)
    assert (done.value.version, done.value.num_batches_tracked) == (1, 1)
    assert store.index()[0]["l"] == (inc, 1)


def test_request_ids_are_kept_for_the_window_only(store):
    inc = store.create(record("l", 0), max_layers=10)
    for v in range(1, 5):
        store.commit(record("l", v), inc, base_version=v - 1, request_id=f"r{v}", window=3)
    with pytest.raises(AlreadyApplied):
        store.commit(record("l", 5), inc, base_version=4, request_id="r2", window=3)
    store.commit(record("l", 5), inc, base_version=4, request_id="r1", window=3)  # forgotten: applies


def test_a_deleted_or_recreated_layer_refuses_commits_of_the_old_one(store):
    inc = store.create(record("l", 0), max_layers=10)
    store.delete("l", inc)
    with pytest.raises(LayerNotFound):
        store.delete("l", inc)
    with pytest.raises(LayerNotFound):
        store.commit(record("l", 1), inc, base_version=0, request_id="", window=10)
    again = store.create(record("l", 0), max_layers=10)
    with pytest.raises(Superseded):  # same name, same version, another layer: retry on it
        store.commit(record("l", 1), inc, base_version=0, request_id="", window=10)
    store.commit(record("l", 1), again, base_version=0, request_id="", window=10)


def test_watch_reports_changes_and_index_reads(store):
    changes: queue.Queue = queue.Queue()
    indexes: queue.Queue = queue.Queue()
    store.watch(lambda *c: changes.put(c), lambda index, top, epoch: indexes.put(index))
    first = indexes.get(timeout=5)
    assert first == {}
    inc = store.create(record("w", 0), max_layers=10)
    store.commit(record("w", 1), inc, base_version=0, request_id="", window=10)
    store.delete("w", inc)
    seen = set()
    while (("w", inc, DELETED)) not in seen:
        seen.add(changes.get(timeout=5))
    store.check_fresh()  # index reads every 0.05 s keep it fresh


def test_an_unreachable_store_is_unavailable_and_goes_stale(store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    away = RedisStore(f"redis://127.0.0.1:{port}/0", refresh_seconds=0.05)
    try:
        with pytest.raises(StoreUnavailable, match="unavailable"):
            away.create(record("x", 0), max_layers=10)
        with pytest.raises(StoreUnavailable, match="not reached"):
            away.check_fresh()
    finally:
        away.close()
