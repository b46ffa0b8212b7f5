"""Operating the server: health, reflection, /metrics, graceful shutdown, configuration and
entry points -- all against real server processes over real sockets on loopback.

Exact-count metric assertions use their own server process (and deltas between scrapes)
so traffic from other tests can't interfere.
"""

from __future__ import annotations

import math
import os
import pathlib
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Iterator, Optional

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from normserve.client import Client, codec
from normserve.client import errors as E
from normserve.client._proto import normserve_pb2 as pb
from normserve.client._proto import normserve_pb2_grpc as pb_grpc
from serverproc import ServerProcess

pytestmark = pytest.mark.e2e

NORM_SERVICE = "normserve.v1.NormService"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
NORM_METHODS = {
    "CreateLayer", "GetLayer", "ListLayers", "DeleteLayer", "ResetRunningStats",
    "GetState", "LoadState", "Normalize", "NormalizeStream", "NormalizeStreamPacked",
    "RegisterSharedMemory", "UnregisterSharedMemory", "ListSharedMemory",
}
RPC_TIMEOUT = 30
W3_SHAPE = (32, 3, 224, 224)


# -- helpers -------------------------------------------------------------------------------
class Scrape:
    """One parsed /metrics exposition."""

    def __init__(self, url: str):
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            self.content_type = response.headers.get("Content-Type", "")
            self.text = response.read().decode()
        self.families = list(text_string_to_metric_families(self.text))
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), s.value) for f in self.families for s in f.samples
        ]

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (l, v) for n, l, v in self.samples if n == name and all(l.get(k) == want for k, want in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0 when none)."""
        return sum(v for _, v in self.find(name, **labels))

    def has(self, name: str, **labels: str) -> bool:
        return bool(self.find(name, **labels))


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


class RawStream:
    """A NormalizeStream call driven message by message (the SDK sends as fast as it can)."""

    def __init__(self, target: str, timeout: float = RPC_TIMEOUT):
        self.channel = grpc.insecure_channel(target)
        self._queue: "queue.Queue[Optional[pb.NormalizeRequest]]" = queue.Queue()
        self.call = pb_grpc.NormServiceStub(self.channel).NormalizeStream(self._requests(), timeout=timeout)

    def _requests(self) -> Iterator[pb.NormalizeRequest]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            yield item

    def send(self, layer: str, x: np.ndarray, mode: int = pb.MODE_TRAIN) -> None:
        self._queue.put(pb.NormalizeRequest(layer=layer, mode=mode, input=codec.encode(x)))

    def recv(self) -> pb.NormalizeStreamResponse:
        return next(self.call)  # bounded by the call's deadline

    def close(self) -> grpc.StatusCode:
        self._queue.put(None)
        rest = list(self.call)
        assert rest == [], f"unexpected extra responses: {rest}"
        code = self.call.code()
        self.channel.close()
        return code

    def abort(self) -> None:
        self.call.cancel()
        self._queue.put(None)
        self.channel.close()


def health_check(target: str, service: str = "", timeout: float = 10) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status


def batch(shape=(4, 3, 5, 5), seed=0, loc=0.0, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) + loc).astype(dtype)


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# -- health --------------------------------------------------------------------------------
@pytest.mark.parametrize("service", ["", NORM_SERVICE])
def test_health_serving(server, service):
    assert health_check(server.target, service) == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service_is_not_found(server):
    with pytest.raises(grpc.RpcError) as e:
        health_check(server.target, "normserve.v1.NoSuchService")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_reports_serving(server):
    with grpc.insecure_channel(server.target) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=NORM_SERVICE), timeout=10)
        try:
            assert next(call).status == health_pb2.HealthCheckResponse.SERVING
        finally:
            call.cancel()


# -- reflection ----------------------------------------------------------------------------
def test_reflection_lists_services(server):
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {NORM_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE} <= services, services


def test_reflection_resolves_norm_service(server):
    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(db)
        service = pool.FindServiceByName(NORM_SERVICE)
        methods = {m.name: m for m in service.methods}
        assert set(methods) == NORM_METHODS
        assert methods["Normalize"].input_type.full_name == "normserve.v1.NormalizeRequest"
        assert methods["Normalize"].output_type.full_name == "normserve.v1.NormalizeResponse"
        streaming = {}
        for method_name in ("Normalize", "NormalizeStream", "NormalizeStreamPacked"):
            proto = descriptor_pb2.MethodDescriptorProto()
            methods[method_name].CopyToProto(proto)
            streaming[method_name] = (proto.client_streaming, proto.server_streaming)
        assert streaming == {"Normalize": (False, False), "NormalizeStream": (True, True), "NormalizeStreamPacked": (True, True)}
        tensor = pool.FindMessageTypeByName("normserve.v1.Tensor")
        assert {"dtype", "shape", "data"} <= set(tensor.fields_by_name)

        # The file the server reflects is exactly the schema the SDK was generated from.
        served = db.FindFileContainingSymbol(NORM_SERVICE)
        local = descriptor_pb2.FileDescriptorProto()
        pb.DESCRIPTOR.CopyToProto(local)
        assert served.package == "normserve.v1"
        assert served == local

        health = pool.FindServiceByName(HEALTH_SERVICE)
        assert {"Check", "Watch"} <= {m.name for m in health.methods}


# -- /metrics (shared server: names and labels) -------------------------------------------
def test_metrics_exposition_after_traffic(server, client, name):
    client.create_layer(name, "BatchNorm2d", num_features=3)
    x = batch()
    client.normalize(name, x, "train")
    client.normalize(name, x, "eval")
    assert len(list(client.normalize_stream(name, [x, x], "train"))) == 2
    with pytest.raises(E.NotFoundError):
        client.normalize(name + "-missing", x, "train")
    with pytest.raises(E.InvalidArgumentError):
        client.normalize(name, batch((4, 2, 5, 5)), "train")

    m = Scrape(server.metrics_url)
    assert m.content_type.startswith("text/plain"), m.content_type
    names = {f.name for f in m.families}
    off_prefix = sorted(n for n in names if not n.startswith("normserve_"))
    assert not off_prefix, f"metrics without the normserve_ prefix: {off_prefix}"

    for labels in (
        dict(method="Normalize", mode="train", code="OK"),
        dict(method="Normalize", mode="eval", code="OK"),
        dict(method="Normalize", mode="train", code="NOT_FOUND"),
        dict(method="Normalize", mode="train", code="INVALID_ARGUMENT"),
        dict(method="NormalizeStreamPacked", mode="train", code="OK"),  # the SDK packs small batches
    ):
        assert m.has("normserve_request_duration_seconds_bucket", **labels), labels
        assert m.total("normserve_request_duration_seconds_count", **labels) >= 1, labels
        assert m.total("normserve_requests_total", **labels) >= 1, labels
    assert m.total("normserve_requests_total", method="NormalizeStreamPacked", mode="train", code="OK") >= 2
    assert m.has("normserve_compute_duration_seconds_bucket", kind="BatchNorm2d", mode="train")
    assert m.total("normserve_compute_duration_seconds_count", kind="BatchNorm2d", mode="eval") >= 1
    assert m.has("normserve_in_flight_requests", method="Normalize")
    assert m.total("normserve_tensor_bytes_total", direction="in") >= 4 * x.nbytes
    assert m.total("normserve_tensor_bytes_total", direction="out") >= 4 * x.nbytes
    assert m.total("normserve_stream_messages_total") >= 2
    assert m.total("normserve_layers", kind="BatchNorm2d") >= 1


def test_latency_histogram_buckets(server, client, name):
    client.create_layer(name, "LayerNorm", normalized_shape=[5])
    client.normalize(name, batch((2, 5)), "eval")
    m = Scrape(server.metrics_url)
    for metric, labels in (
        ("normserve_request_duration_seconds", dict(method="Normalize", mode="eval", code="OK")),
        ("normserve_compute_duration_seconds", dict(kind="LayerNorm", mode="eval")),
    ):
        buckets = sorted(
            ((float(l["le"]), v) for l, v in m.find(metric + "_bucket", **labels)), key=lambda b: b[0]
        )
        bounds = [b for b, _ in buckets if math.isfinite(b)]
        # DESIGN 6: buckets from ~50 us to ~10 s, in seconds.
        assert bounds[0] <= 1e-4, bounds
        assert 5 <= bounds[-1] <= 60, bounds
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), "histogram buckets must be cumulative"
        assert buckets[-1][0] == math.inf and buckets[-1][1] == m.total(metric + "_count", **labels)


# -- /metrics (own server: exact counts) --------------------------------------------------
LABEL_CAP = 2


@pytest.fixture(scope="module")
def metrics_server():
    with ServerProcess("--metrics-max-labelled-layers", str(LABEL_CAP)) as proc:
        yield proc


@pytest.fixture
def metrics_client(metrics_server):
    with Client(metrics_server.target, timeout=RPC_TIMEOUT) as c:
        yield c


def test_metrics_exact_counts(metrics_server, metrics_client):
    c, url = metrics_client, metrics_server.metrics_url
    bn, ln = "a0-bn", "m-ln"  # a0-bn sorts before every other layer but 0-drift: labelled
    x = batch()
    before = Scrape(url)

    c.create_layer(bn, "BatchNorm2d", num_features=3)
    c.create_layer(ln, "LayerNorm", normalized_shape=[5, 5])
    for seed in (1, 2):
        c.normalize(bn, batch(seed=seed), "train")
    c.normalize(bn, x, "eval")
    c.normalize(ln, x, "train")
    assert len(list(c.normalize_stream(bn, [batch(seed=s) for s in range(10, 15)], "train"))) == 5
    after = Scrape(url)

    ok = dict(code="OK")
    assert delta(before, after, "normserve_requests_total", method="Normalize", mode="train", **ok) == 3
    assert delta(before, after, "normserve_requests_total", method="Normalize", mode="eval", **ok) == 1
    assert delta(before, after, "normserve_requests_total", method="NormalizeStreamPacked", mode="train", **ok) == 5
    assert delta(before, after, "normserve_requests_total", method="CreateLayer", **ok) == 2
    for method, mode, n in (("Normalize", "train", 3), ("Normalize", "eval", 1), ("NormalizeStreamPacked", "train", 5)):
        labels = dict(method=method, mode=mode, code="OK")
        assert delta(before, after, "normserve_request_duration_seconds_count", **labels) == n
        assert delta(before, after, "normserve_request_duration_seconds_bucket", le="+Inf", **labels) == n
    assert delta(before, after, "normserve_compute_duration_seconds_count", kind="BatchNorm2d", mode="train") == 7
    assert delta(before, after, "normserve_compute_duration_seconds_count", kind="BatchNorm2d", mode="eval") == 1
    assert delta(before, after, "normserve_compute_duration_seconds_count", kind="LayerNorm", mode="train") == 1

    # 9 successful batches of 4*3*5*5 float32 in, the same shape and dtype out.
    assert delta(before, after, "normserve_tensor_bytes_total", direction="in") == 9 * x.nbytes
    assert delta(before, after, "normserve_tensor_bytes_total", direction="out") == 9 * x.nbytes
    assert delta(before, after, "normserve_stream_messages_total", direction="received") == 5
    assert delta(before, after, "normserve_stream_messages_total", direction="sent") == 5
    assert delta(before, after, "normserve_pack_requests_sum") == 5  # the SDK's stream of 5 small batches
    assert 1 <= delta(before, after, "normserve_pack_requests_count") <= 5
    assert delta(before, after, "normserve_pack_requests_bucket", le="+Inf") == delta(
        before, after, "normserve_pack_requests_count"
    )

    assert delta(before, after, "normserve_layers", kind="BatchNorm2d") == 1
    assert delta(before, after, "normserve_layers", kind="LayerNorm") == 1
    assert delta(before, after, "normserve_layers", kind="GroupNorm") == 0
    assert after.total("normserve_layers") == len(c.list_layers())

    tracked = c.get_layer(bn).state.num_batches_tracked
    assert tracked == 7
    assert after.total("normserve_layer_batches_tracked", layer=bn) == tracked
    for method in ("Normalize", "NormalizeStreamPacked", "CreateLayer"):
        assert after.has("normserve_in_flight_requests", method=method)
        assert after.total("normserve_in_flight_requests", method=method) == 0

    c.delete_layer(ln)
    assert delta(after, Scrape(url), "normserve_layers", kind="LayerNorm") == -1


def test_metrics_error_codes_counted(metrics_server, metrics_client):
    c, url = metrics_client, metrics_server.metrics_url
    layer = "a0-err"
    c.create_layer(layer, "BatchNorm2d", num_features=3)
    good, bad = batch(), batch((4, 2, 5, 5))
    before = Scrape(url)

    with pytest.raises(E.NotFoundError):
        c.normalize("no-such-layer", good, "train")
    with pytest.raises(E.InvalidArgumentError):
        c.normalize(layer, bad, "train")
    with pytest.raises(E.InvalidArgumentError):
        c.normalize(layer, bad, "eval")
    stream = RawStream(metrics_server.target)
    try:
        for x in (good, bad, good):
            stream.send(layer, x)
        results = [stream.recv().WhichOneof("result") for _ in range(3)]
        assert stream.close() == grpc.StatusCode.OK
    finally:
        stream.abort()
    assert results == ["response", "error", "response"]
    after = Scrape(url)

    n = lambda **labels: delta(before, after, "normserve_requests_total", **labels)  # noqa: E731
    assert n(method="Normalize", mode="train", code="NOT_FOUND") == 1
    assert n(method="Normalize", mode="train", code="INVALID_ARGUMENT") == 1
    assert n(method="Normalize", mode="eval", code="INVALID_ARGUMENT") == 1
    assert n(method="Normalize", code="OK") == 0
    assert n(method="NormalizeStream", mode="train", code="OK") == 2
    assert n(method="NormalizeStream", mode="train", code="INVALID_ARGUMENT") == 1
    assert delta(
        before, after, "normserve_request_duration_seconds_count", method="Normalize", mode="train", code="NOT_FOUND"
    ) == 1
    assert after.has("normserve_request_duration_seconds_bucket", method="Normalize", mode="train", code="NOT_FOUND")
    assert delta(before, after, "normserve_stream_messages_total", direction="received") == 3
    assert delta(before, after, "normserve_stream_messages_total", direction="sent") == 3
    assert delta(before, after, "normserve_compute_duration_seconds_count", kind="BatchNorm2d") == 2
    assert delta(before, after, "normserve_tensor_bytes_total", direction="out") == 2 * good.nbytes
    assert after.total("normserve_in_flight_requests") == 0
    assert c.get_layer(layer).state.num_batches_tracked == 2


@pytest.mark.parametrize("n", [1, 7])
def test_stream_counted_per_message(metrics_server, metrics_client, n):
    c, url = metrics_client, metrics_server.metrics_url
    layer = f"s-stream-{n}"
    c.create_layer(layer, "GroupNorm", num_groups=1, num_channels=3)
    before = Scrape(url)
    outs = list(c.normalize_stream(layer, [batch(seed=i) for i in range(n)], "eval"))
    assert len(outs) == n
    after = Scrape(url)
    labels = dict(method="NormalizeStreamPacked", mode="eval", code="OK")  # the SDK packs small batches
    assert delta(before, after, "normserve_requests_total", **labels) == n
    assert delta(before, after, "normserve_request_duration_seconds_count", **labels) == n
    assert delta(before, after, "normserve_stream_messages_total", direction="received") == n
    assert delta(before, after, "normserve_stream_messages_total", direction="sent") == n
    assert delta(before, after, "normserve_compute_duration_seconds_count", kind="GroupNorm", mode="eval") == n
    assert delta(before, after, "normserve_tensor_bytes_total", direction="in") == n * batch().nbytes


def test_stream_messages_counted_while_stream_open(metrics_server, metrics_client):
    """Messages are counted as they are handled, not when the stream ends."""
    c, url = metrics_client, metrics_server.metrics_url
    layer = "s-open"
    c.create_layer(layer, "BatchNorm1d", num_features=3)
    before = Scrape(url)
    stream = RawStream(metrics_server.target)
    try:
        for i in range(3):
            stream.send(layer, batch((8, 3), seed=i))
            assert stream.recv().HasField("response")
        mid = Scrape(url)
        assert delta(before, mid, "normserve_requests_total", method="NormalizeStream", code="OK") == 3
        assert delta(before, mid, "normserve_stream_messages_total", direction="received") == 3
        assert stream.close() == grpc.StatusCode.OK
    finally:
        stream.abort()


def test_per_layer_series_are_capped(metrics_server, metrics_client):
    c, url = metrics_client, metrics_server.metrics_url
    for suffix in ("a", "b", "c"):
        c.create_layer(f"z-cap-{suffix}", "BatchNorm1d", num_features=2)
    c.normalize("z-cap-a", batch((4, 2)), "train")
    m = Scrape(url)
    names = sorted(info.name for info in c.list_layers())
    assert len(names) > LABEL_CAP
    labelled = {l["layer"] for l, _ in m.find("normserve_layer_batches_tracked")}
    assert labelled == set(names[:LABEL_CAP]), "per-layer series: the first layers by name, up to the cap"
    for l, v in m.find("normserve_layer_batches_tracked"):
        assert v == c.get_layer(l["layer"]).state.num_batches_tracked


def test_per_layer_drift_summary(metrics_server, metrics_client):
    """DESIGN 6: per layer, batches tracked *and a drift summary of the running statistics*.
    Some per-layer series besides batches-tracked / state-version must follow the running
    statistics: it changes when training moves them far from their initial values."""
    c, url = metrics_client, metrics_server.metrics_url
    layer = "0-drift"  # sorts first: within the per-layer label cap
    c.create_layer(layer, "BatchNorm1d", num_features=2)
    bookkeeping = {"normserve_layer_batches_tracked", "normserve_layer_state_version"}

    def drift_series(m: Scrape) -> dict:
        return {
            (n, tuple(sorted(l.items()))): v
            for n, l, v in m.samples
            if l.get("layer") == layer and not any(n.startswith(b) for b in bookkeeping)
        }

    initial = drift_series(Scrape(url))
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = (rng.standard_normal((64, 2)) * [1.0, 4.0] + [5.0, -3.0]).astype(np.float32)
        c.normalize(layer, x, "train")
    trained = drift_series(Scrape(url))
    assert trained, f"no per-layer drift series for layer {layer!r} on /metrics"
    assert trained != initial, "per-layer drift series did not follow the running statistics"


# -- big batches ---------------------------------------------------------------------------
def test_w3_batch_fits_default_message_size(server, name):
    """A (32, 3, 224, 224) float32 batch (~19 MB) goes both ways with default options."""
    x = np.random.default_rng(3).standard_normal(W3_SHAPE, dtype=np.float32) * 0.2 + 0.5
    assert x.nbytes > 4 * 1024 * 1024  # well over gRPC's stock 4 MiB limit
    with Client(server.target) as c:
        c.create_layer(name, "BatchNorm2d", num_features=3)
        y = c.normalize(name, x, "train", timeout=120)
    assert y.shape == W3_SHAPE and y.dtype == np.float32
    ref = torch.nn.BatchNorm2d(3).train()
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    with Client(server.target) as c:
        assert c.get_layer(name).state.num_batches_tracked == 1
        ys = list(c.normalize_stream(name, [x], "eval", timeout=120))
    assert len(ys) == 1 and ys[0].shape == W3_SHAPE


# -- graceful shutdown ---------------------------------------------------------------------
def test_sigterm_graceful_shutdown():
    proc = ServerProcess("--grace-seconds", "10").start()
    stream: Optional[RawStream] = None
    watch_channel = grpc.insecure_channel(proc.target)
    try:
        with Client(proc.target, timeout=RPC_TIMEOUT) as c:
            c.create_layer("bn", "BatchNorm2d", num_features=3)
        watch = health_pb2_grpc.HealthStub(watch_channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        # A stream that is mid-way: one batch answered, the call still open.
        stream = RawStream(proc.target)
        stream.send("bn", batch(seed=1))
        first = stream.recv()
        assert first.HasField("response") and first.response.state.num_batches_tracked == 1

        proc.signal(signal.SIGTERM)
        started = time.monotonic()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert proc.wait_for_log(r"shutting down", timeout=10), proc.log()

        # New calls are refused (UNAVAILABLE) while the stream is still in flight.
        refused = None
        deadline = time.monotonic() + 8
        with Client(proc.target, timeout=3) as late:
            while time.monotonic() < deadline:
                try:
                    late.get_layer("bn")
                except E.UnavailableError as e:
                    refused = e
                    break
                time.sleep(0.05)
        assert refused is not None and refused.code == grpc.StatusCode.UNAVAILABLE
        try:
            status = health_check(proc.target, timeout=3)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.proc.poll() is None, "server exited with a request still in flight"

        # The in-flight stream finishes normally within the grace period.
        stream.send("bn", batch(seed=2))
        second = stream.recv()
        assert second.HasField("response"), second
        assert second.response.state.num_batches_tracked == 2
        assert stream.close() == grpc.StatusCode.OK
        stream = None

        # With nothing in flight the server stops without waiting out the whole grace.
        rc = proc.proc.wait(timeout=20)
        assert rc == 0, proc.log()
        assert time.monotonic() - started < 9, "shutdown waited out the grace period with nothing in flight"
        assert proc.wait_for_log(r"stopped", timeout=5), proc.log()
        assert "received SIGTERM" in proc.log()
    finally:
        if stream is not None:
            stream.abort()
        watch_channel.close()
        proc.kill()


def test_sigint_exits_zero_and_bounds_stuck_streams():
    """SIGINT shuts down like SIGTERM; a stream still open when the grace period ends is
    cut off, and the process still exits 0 soon after."""
    proc = ServerProcess("--grace-seconds", "1").start()
    stream: Optional[RawStream] = None
    try:
        with Client(proc.target, timeout=RPC_TIMEOUT) as c:
            c.create_layer("ln", "LayerNorm", normalized_shape=[5])
        stream = RawStream(proc.target)
        stream.send("ln", batch((2, 5)), pb.MODE_EVAL)
        assert stream.recv().HasField("response")
        started = time.monotonic()
        proc.signal(signal.SIGINT)
        with pytest.raises(grpc.RpcError) as e:
            stream.recv()  # never sends another message: the server must cut it off
        assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
        rc = proc.proc.wait(timeout=20)
        assert rc == 0, proc.log()
        assert time.monotonic() - started < 10
        assert "received SIGINT" in proc.log() and proc.wait_for_log("stopped", timeout=5), proc.log()
    finally:
        if stream is not None:
            stream.abort()
        proc.kill()


# -- configuration -------------------------------------------------------------------------
def test_env_vars_are_honoured():
    """NORMSERVE_* variables configure the server; `--metrics-port -1` turns /metrics off."""
    env = {"NORMSERVE_MAX_LAYERS": "1", "NORMSERVE_MAX_MESSAGE_BYTES": str(64 * 1024)}
    with ServerProcess("--metrics-port", "-1", env=env) as proc:
        assert proc.metrics_url is None and "metrics=off" in proc.log()
        with Client(proc.target, timeout=RPC_TIMEOUT) as c:
            c.create_layer("one", "LayerNorm", normalized_shape=[256])
            with pytest.raises(E.ResourceExhaustedError) as e:
                c.create_layer("two", "LayerNorm", normalized_shape=[256])
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1" in e.value.message
            assert [l.name for l in c.list_layers()] == ["one"]
            # 32 KiB of float32 fits the 64 KiB message limit from the environment; 128 KiB doesn't.
            assert c.normalize("one", batch((32, 256)), "eval").shape == (32, 256)
            with pytest.raises(E.ResourceExhaustedError):
                c.normalize("one", batch((128, 256)), "eval")


def test_cli_flag_overrides_env_var():
    with ServerProcess("--max-layers", "2", env={"NORMSERVE_MAX_LAYERS": "1"}) as proc:
        with Client(proc.target, timeout=RPC_TIMEOUT) as c:
            c.create_layer("one", "RMSNorm", normalized_shape=[2])
            c.create_layer("two", "RMSNorm", normalized_shape=[2])  # env alone would refuse this
            with pytest.raises(E.ResourceExhaustedError):
                c.create_layer("three", "RMSNorm", normalized_shape=[2])


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"NORMSERVE_MAX_WORKERS": "lots"}, "NORMSERVE_MAX_WORKERS"),
        ({"NORMSERVE_LOG_LEVEL": "chatty"}, "log_level"),
    ],
)
def test_invalid_env_value_exits_nonzero(env, needle):
    popen = subprocess.Popen(
        [sys.executable, "-m", "normserve", "serve", "--port", "0", "--metrics-port", "-1"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # A server that starts anyway would never exit on its own: bound the wait.
        out, err = popen.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, err = popen.communicate()
        pytest.fail(f"`normserve serve` with {env} did not exit:\n{err}")
    assert popen.returncode != 0
    assert needle in err, err
    assert "serving grpc=" not in err
    assert "Traceback" not in err, "a bad setting should give a message, not a traceback"


def _console_script() -> pathlib.Path:
    return pathlib.Path(sys.executable).with_name("normserve")


ENTRY_POINTS = {
    "console-script": lambda: [str(_console_script())],
    "python-m": lambda: [sys.executable, "-m", "normserve"],
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_entry_points_start_a_server(entry, tmp_path):
    cmd = ENTRY_POINTS[entry]() + ["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    cmd += ["--state-dir", str(tmp_path)]
    if entry == "console-script":
        assert _console_script().exists(), f"console script missing: {_console_script()}"
    popen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()
    pattern = re.compile(r"grpc=127\.0\.0\.1:(\d+) metrics=http://127\.0\.0\.1:(\d+)/metrics")

    def drain() -> None:
        assert popen.stderr is not None
        for line in popen.stderr:
            lines.append(line)
            if pattern.search(line):
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert ready.wait(60), "".join(lines)
        m = pattern.search("".join(lines))
        assert m, "bound ports not logged:\n" + "".join(lines)
        port, metrics_port = int(m[1]), int(m[2])
        assert port > 0 and metrics_port > 0 and port != metrics_port
        target = f"127.0.0.1:{port}"
        assert health_check(target) == health_pb2.HealthCheckResponse.SERVING
        with Client(target, timeout=RPC_TIMEOUT) as c:
            c.create_layer("x", "InstanceNorm1d", num_features=2)
            assert c.normalize("x", batch((3, 2, 4)), "train").shape == (3, 2, 4)
        assert "normserve_" in Scrape(f"http://127.0.0.1:{metrics_port}/metrics").text
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(timeout=20) == 0, "".join(lines)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()


@pytest.mark.skipif(not ipv6_loopback_available(), reason="IPv6 loopback (::1) is not available on this host")
def test_ipv6_loopback():
    with ServerProcess("--host", "::1") as proc:
        assert proc.target.startswith("[::1]:"), proc.target
        assert health_check(proc.target) == health_pb2.HealthCheckResponse.SERVING
        with Client(proc.target, timeout=RPC_TIMEOUT) as c:
            c.create_layer("v6", "BatchNorm1d", num_features=2)
            assert c.normalize("v6", batch((4, 2)), "train").shape == (4, 2)
            assert c.get_layer("v6").state.num_batches_tracked == 1
        # Bound to ::1 only: not reachable over IPv4.
        with pytest.raises(grpc.RpcError) as e:
            health_check(f"127.0.0.1:{proc.port}", timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
