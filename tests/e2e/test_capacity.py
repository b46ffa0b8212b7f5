"""Capacity limits that keep the server responsive: open streams, layer state size, and
the drain period on shutdown."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serverproc import ServerProcess

from normserve.client import Client
from normserve.client._proto import normserve_pb2 as pb
from normserve.client._proto import normserve_pb2_grpc as pb_grpc
from normserve.client.errors import ResourceExhaustedError


def _idle_stream(channel: grpc.Channel, layer: str, started: threading.Event, release: threading.Event):
    """A NormalizeStream that sends one message, then stays open until `release`."""

    def requests():
        x = np.ones((2, 2), np.float32)
        yield pb.NormalizeRequest(layer=layer, mode=pb.MODE_EVAL, input=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=x.shape, data=x.tobytes()))
        release.wait(30)

    call = pb_grpc.NormServiceStub(channel).NormalizeStream(requests(), timeout=60)
    next(call)
    started.set()
    return call


def test_streams_beyond_the_limit_are_refused_and_unary_calls_keep_working():
    with ServerProcess("--max-workers", "4", "--max-streams", "2") as server:
        release = threading.Event()
        with grpc.insecure_channel(server.target) as channel, Client(server.target, timeout=10) as c:
            c.create_layer("bn", "BatchNorm1d", num_features=2)
            calls = []
            for _ in range(2):
                started = threading.Event()
                calls.append(_idle_stream(channel, "bn", started, release))
                assert started.wait(10)
            try:
                with pytest.raises(ResourceExhaustedError, match="max_streams=2"):
                    list(c.normalize_stream("bn", [np.ones((2, 2), np.float32)], timeout=10))
                # With both stream slots taken, unary calls and health checks still answer.
                for _ in range(5):
                    assert c.get_layer("bn").name == "bn"
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
            finally:
                release.set()
                for call in calls:
                    call.cancel()
            # A slot frees up once a stream ends.
            deadline = time.monotonic() + 10
            while True:
                try:
                    out = list(c.normalize_stream("bn", [np.ones((2, 2), np.float32)], timeout=10))
                    break
                except ResourceExhaustedError:
                    assert time.monotonic() < deadline, "stream slots were not released"
                    time.sleep(0.05)
            assert len(out) == 1


def test_layer_whose_state_exceeds_the_limit_is_refused(client, name):
    with pytest.raises(ResourceExhaustedError, match="max_layer_state_bytes"):
        client.create_layer(name, "LayerNorm", normalized_shape=[4096, 4096], dtype="float64")
    assert name not in [layer.name for layer in client.list_layers()]


def test_drain_keeps_serving_while_health_says_not_serving():
    server = ServerProcess("--drain-seconds", "3", "--grace-seconds", "5").start()
    try:
        with grpc.insecure_channel(server.target) as channel, Client(server.target, timeout=5) as c:
            c.create_layer("bn", "BatchNorm1d", num_features=2)
            health = health_pb2_grpc.HealthStub(channel)
            server.signal(15)
            deadline = time.monotonic() + 3
            while health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "health never turned NOT_SERVING"
                time.sleep(0.05)
            # Draining: NOT_SERVING, yet calls are still answered.
            assert c.get_layer("bn").name == "bn"
    finally:
        assert server.stop(timeout=30) == 0


def test_idle_streams_are_cancelled_and_free_their_slot():
    with ServerProcess("--max-workers", "4", "--max-streams", "1", "--stream-idle-seconds", "1") as server:
        release = threading.Event()
        with grpc.insecure_channel(server.target) as channel, Client(server.target, timeout=10) as c:
            c.create_layer("bn", "BatchNorm1d", num_features=2)
            started = threading.Event()
            call = _idle_stream(channel, "bn", started, release)
            assert started.wait(10)
            try:
                with pytest.raises(grpc.RpcError) as e:
                    next(call)  # blocks until the server gives up on the silent stream
                assert e.value.code() == grpc.StatusCode.CANCELLED
            finally:
                release.set()
            assert server.wait_for_log("idle for over 1s")
            out = list(c.normalize_stream("bn", [np.ones((2, 2), np.float32)], timeout=10))
            assert len(out) == 1  # the slot is free again


def test_tensor_rank_over_the_configured_limit_is_resource_exhausted():
    with ServerProcess("--max-tensor-rank", "3") as server, Client(server.target, timeout=10) as c:
        c.create_layer("bn", "BatchNorm2d", num_features=2)
        before = c.get_layer("bn").state
        with pytest.raises(ResourceExhaustedError, match="max_tensor_rank=3"):
            c.normalize("bn", np.ones((2, 2, 2, 2), np.float32), mode="train")
        assert c.get_layer("bn").state == before
        c.create_layer("bn1", "BatchNorm1d", num_features=2)
        assert c.normalize("bn1", np.ones((2, 2, 3), np.float32)).shape == (2, 2, 3)
