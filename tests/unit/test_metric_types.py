"""The server's lock-free metric types: exact under concurrent updates, and exposed
exactly like prometheus_client's own Counter, Gauge and Histogram."""

from __future__ import annotations

import random
import threading

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.parser import text_string_to_metric_families

from normserve.server import metric_types as mt

BOUNDS = (5e-5, 1e-4, 2.5e-4, 1e-3, 0.01, 0.5, 1.0, 10.0)


def _samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    text = prometheus_client.generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")  # prometheus_client's creation times; ours has none
    }


def _pair() -> tuple[CollectorRegistry, mt.Collector, CollectorRegistry]:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    collector = mt.Collector()
    ours.register(collector)
    return ours, collector, theirs


def test_exposition_matches_prometheus_client_for_the_same_updates():
    ours, fast, theirs = _pair()
    h = fast.add(mt.Histogram("t_seconds", "h", ["method", "code"], BOUNDS))
    c = fast.add(mt.Counter("t_requests", "c", ["method"]))
    g = fast.add(mt.Gauge("t_in_flight", "g", ["method"]))
    u = fast.add(mt.Gauge("t_open", "u"))
    uh = fast.add(mt.Histogram("t_pack", "uh", [], (1, 2, 4, 8)))
    ph = prometheus_client.Histogram("t_seconds", "h", ["method", "code"], buckets=BOUNDS, registry=theirs)
    pc = prometheus_client.Counter("t_requests", "c", ["method"], registry=theirs)
    pg = prometheus_client.Gauge("t_in_flight", "g", ["method"], registry=theirs)
    pu = prometheus_client.Gauge("t_open", "u", registry=theirs)
    puh = prometheus_client.Histogram("t_pack", "uh", buckets=(1, 2, 4, 8), registry=theirs)
    rng = random.Random(7)
    # Every bound itself (le is inclusive), values between and beyond them, and zero.
    values = list(BOUNDS) + [0.0, 20.0, 1e9, float("inf"), -1.0] + [rng.uniform(0, 12) for _ in range(300)]
    for v in values:
        labels = (rng.choice(["A", "B"]), rng.choice(["OK", "NOT_FOUND"]))
        h.labels(*labels).observe(v)
        ph.labels(*labels).observe(v)
        c.labels(labels[0]).inc(abs(v))
        pc.labels(labels[0]).inc(abs(v))
        g.labels(labels[0]).inc()
        pg.labels(labels[0]).inc()
        if v > 5:
            g.labels(labels[0]).dec(2)
            pg.labels(labels[0]).dec(2)
        n = rng.choice([0, 1, 2, 3, 8, 9, 64])  # an unlabelled histogram is its own series
        uh.observe(n)
        puh.observe(n)
    u.inc()
    u.inc()
    u.dec()
    pu.inc()
    pu.inc()
    pu.dec()
    assert _samples(ours) == _samples(theirs)
    assert _openmetrics(ours) == _openmetrics(theirs)


def _openmetrics(registry: CollectorRegistry) -> list[str]:
    return [line for line in openmetrics_latest(registry).decode().splitlines() if "_created" not in line]


def test_nan_goes_into_the_sum_and_no_bucket_like_prometheus_client():
    ours, fast, theirs = _pair()
    fast.add(mt.Histogram("t_nan", "h", [], BOUNDS)).labels().observe(float("nan"))
    prometheus_client.Histogram("t_nan", "h", buckets=BOUNDS, registry=theirs).observe(float("nan"))
    mine = {(s[0], s[1]): s[2] for s in _samples(ours)}
    other = {(s[0], s[1]): s[2] for s in _samples(theirs)}
    assert mine.keys() == other.keys()
    for key, value in other.items():
        assert (value != value and mine[key] != mine[key]) or mine[key] == value, key


def test_unlabelled_families_are_exposed_at_zero_from_the_start():
    ours, fast, theirs = _pair()
    fast.add(mt.Counter("t_c", "c"))
    fast.add(mt.Histogram("t_h", "h", [], (1.0,)))
    prometheus_client.Counter("t_c", "c", registry=theirs)
    prometheus_client.Histogram("t_h", "h", buckets=(1.0,), registry=theirs)
    assert _samples(ours) == _samples(theirs)


def test_label_values_are_strings_and_counters_only_go_up():
    c = mt.Counter("t_codes", "c", ["code"])
    c.labels(200).inc()
    c.labels("200").inc()
    assert c.labels("200") is c.labels(200) and c.labels("200").totals()[0] == 2
    registry, fast, _ = _pair()
    fast.add(c)
    assert ("t_codes_total", (("code", "200"),), 2.0) in _samples(registry)
    try:
        c.labels("200").inc(-1)
    except ValueError:
        pass
    else:
        raise AssertionError("a counter went down")
    try:
        mt.Histogram("t_h", "h", ["le"], (1.0,))
    except ValueError:
        pass
    else:
        raise AssertionError("a histogram label named le was accepted")


def test_concurrent_updates_from_many_threads_are_all_counted():
    registry, fast, _ = _pair()
    c = fast.add(mt.Counter("t_total_things", "c", ["k"]))
    g = fast.add(mt.Gauge("t_level", "g"))
    h = fast.add(mt.Histogram("t_size", "h", [], (1, 2, 4)))
    threads, per_thread = 8, 5000
    start = threading.Barrier(threads + 1)
    scrapes: list[float] = []

    def work(i: int) -> None:
        start.wait()
        for j in range(per_thread):
            c.labels("x").inc()
            g.inc()
            h.labels().observe(j % 5)
        for _ in range(per_thread):
            g.dec()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    while any(w.is_alive() for w in workers):  # scrapes while the counts move: never backwards
        scrapes.append(c.labels("x").totals()[0])
    for w in workers:
        w.join()
    assert scrapes == sorted(scrapes)
    assert c.labels("x").totals()[0] == threads * per_thread
    assert g.labels().totals()[0] == 0
    families = {f.name: f for f in text_string_to_metric_families(prometheus_client.generate_latest(registry).decode())}
    size = {(s.name, s.labels.get("le")): s.value for s in families["t_size"].samples}
    n = threads * per_thread
    assert size[("t_size_count", None)] == n
    assert size[("t_size_bucket", "1.0")] == n * 2 / 5  # values 0 and 1
    assert size[("t_size_bucket", "4.0")] == n
    assert size[("t_size_sum", None)] == threads * sum(j % 5 for j in range(per_thread))


def test_a_gauge_raised_on_one_thread_and_lowered_on_another_sums_to_zero():
    g = mt.Gauge("t_g", "g")
    g.inc(3)
    t = threading.Thread(target=g.dec, args=(3,))
    t.start()
    t.join()
    assert g.labels().totals()[0] == 0


def test_exemplars_are_exposed_on_the_bucket_they_fell_in():
    registry, fast, _ = _pair()
    h = fast.add(mt.Histogram("t_latency_seconds", "h", ["method"], BOUNDS))
    h.labels("Normalize").observe(3e-4, {"request_id": "req-1"})
    h.labels("Normalize").observe(0.2, None)
    text = openmetrics_latest(registry).decode()
    bucket = next(line for line in text.splitlines() if 'le="0.001"' in line)
    assert '# {request_id="req-1"} 0.0003' in bucket
    assert all("#" not in line for line in text.splitlines() if 'le="0.5"' in line)
    # Over OpenMetrics' 128 characters: dropped, and the exposition stays valid.
    h.labels("Normalize").observe(0.2, {"request_id": "x" * 200})
    text = openmetrics_latest(registry).decode()
    assert "x" * 200 not in text
    list(openmetrics_parser.text_string_to_metric_families(text))


def test_wrong_label_count_and_bad_buckets_are_refused():
    c = mt.Counter("t_c", "c", ["a", "b"])
    for bad in ((), ("x",), ("x", "y", "z")):
        try:
            c.labels(*bad)
        except ValueError as e:
            assert "takes labels" in str(e)
        else:
            raise AssertionError(f"labels{bad} accepted")
    for buckets in ((1, 1), (2, 1), (1, float("inf"))):
        try:
            mt.Histogram("t_h", "h", [], buckets)
        except ValueError:
            pass
        else:
            raise AssertionError(f"buckets {buckets} accepted")
