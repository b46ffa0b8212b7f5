"""Retries: safe because train requests carry idempotency ids.

- The acceptance test restarts the server (same --state-dir, same port) while a client
  keeps sending train requests: every call eventually succeeds through the SDK's retries,
  and the layer's num_batches_tracked equals the number of successful calls -- nothing
  is lost and nothing is applied twice, also across a SIGKILL.
- Deterministic "lost answer" tests: an interceptor lets the request reach the server and
  then reports UNAVAILABLE / DEADLINE_EXCEEDED to the SDK, which retries: a train request
  is replayed (not re-applied), create_layer / delete_layer reconcile instead of raising
  a spurious ALREADY_EXISTS / NOT_FOUND.
- Bounds: attempts, the overall deadline, and no retries for other codes.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

import grpc
import grpc.aio
import numpy as np
import pytest
import torch

from conftest import make_client
from normserve.client import AsyncClient, Client, RetryPolicy
from normserve.client import errors as E
from serverproc import ServerProcess

pytestmark = pytest.mark.e2e

# Patient enough to ride out a server restart (~2-5 s here), bounded all the same.
PATIENT = RetryPolicy(max_attempts=60, initial_backoff=0.05, max_backoff=0.5, jitter=0.5)
# Reconnect quickly once the server is back (gRPC's own reconnect backoff starts at 1 s).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


def batch(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.0, 2.0, (8, 3)).astype(np.float32)


# -- acceptance: restarts mid-run ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_train_requests_survive_server_restarts_exactly_once(tmp_path, kind):
    n_calls, restart_after = 30, (8, 18)
    first = ServerProcess(state_dir=str(tmp_path)).start()
    servers = [first]
    port = first.port
    done = threading.Event()
    progress = [0]
    restart_error: list[BaseException] = []

    def restarter():
        try:
            for i, (threshold, sig) in enumerate(zip(restart_after, (signal.SIGTERM, signal.SIGKILL))):
                deadline = time.monotonic() + 60
                while progress[0] < threshold and not done.is_set():
                    assert time.monotonic() < deadline, "client made no progress"
                    time.sleep(0.01)
                if done.is_set():
                    return
                old = servers[-1]
                if sig == signal.SIGKILL:
                    old.kill()
                else:
                    old.stop()  # SIGTERM: refuses new calls (UNAVAILABLE), finishes in-flight ones
                servers.append(ServerProcess("--port", str(port), state_dir=str(tmp_path)).start())
                assert servers[-1].port == port
        except BaseException as e:  # noqa: BLE001 - reported by the test body
            restart_error.append(e)

    results = []
    try:
        with make_client(kind, first.target, timeout=60, retry=PATIENT, options=FAST_RECONNECT) as c:
            c.create_layer("bn", "BatchNorm1d", num_features=3, momentum=None)
            thread = threading.Thread(target=restarter, daemon=True)
            thread.start()
            local = torch.nn.BatchNorm1d(3, momentum=None)
            for i in range(n_calls):
                x = batch(i)
                results.append(c.normalize_result("bn", x, "train"))
                with torch.no_grad():
                    local(torch.from_numpy(x))
                progress[0] = i + 1
                time.sleep(0.02)  # keep calls going while the server is down
            done.set()
            thread.join(120)
            assert not restart_error, restart_error
            assert len(servers) == 3, "the server was not restarted twice"
            info = c.get_layer("bn")
            # Every call succeeded, each was applied exactly once.
            assert info.state.num_batches_tracked == n_calls == len(results)
            assert [r.state.num_batches_tracked for r in results] == list(range(1, n_calls + 1))
            state = c.get_state("bn", as_torch=True)
            torch.testing.assert_close(state, local.state_dict(), rtol=1e-5, atol=1e-5)
    finally:
        done.set()
        for s in servers:
            s.kill()
            s.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ready_waits_for_a_server_to_come_up(tmp_path):
    port = _free_port()
    later: list[ServerProcess] = []
    starter = threading.Timer(0.5, lambda: later.append(ServerProcess("--port", str(port), state_dir=str(tmp_path)).start()))
    try:
        with Client(f"127.0.0.1:{port}", options=FAST_RECONNECT) as c:
            assert c.ready(timeout=1) is False  # nothing listens yet: not ready, no exception
            starter.start()
            assert c.ready(wait=60, timeout=2) is True
            assert c.health() == "SERVING"
    finally:
        starter.cancel()
        starter.join()
        for s in later:
            s.stop()


# -- deterministic lost answers (interceptors) -------------------------------------------------------
class _Lost(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "answer lost (test interceptor)"


class LoseAnswers(grpc.UnaryUnaryClientInterceptor):
    """Sync: for the first `times` calls of `method`, deliver the request, then report
    `code` instead of the answer (or, with forward=False, don't deliver it at all)."""

    def __init__(self, method: str, code=grpc.StatusCode.UNAVAILABLE, times: int = 1, forward: bool = True):
        self.method, self.code, self.left, self.forward = method, code, times, forward
        self.seen: list[object] = []

    def intercept_unary_unary(self, continuation, details, request):
        if details.method.endswith("/" + self.method):
            self.seen.append(request)
            if self.left > 0:
                self.left -= 1
                if self.forward:
                    continuation(details, request).result()  # the server applies it
                raise _Lost(self.code)
        return continuation(details, request)


class AsyncLoseAnswers(grpc.aio.UnaryUnaryClientInterceptor):
    """The grpc.aio twin of LoseAnswers."""

    def __init__(self, method: str, code=grpc.StatusCode.UNAVAILABLE, times: int = 1, forward: bool = True):
        self.method, self.code, self.left, self.forward = method, code, times, forward
        self.seen: list[object] = []

    async def intercept_unary_unary(self, continuation, details, request):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.endswith("/" + self.method):
            self.seen.append(request)
            if self.left > 0:
                self.left -= 1
                if self.forward:
                    await (await continuation(details, request))
                raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="answer lost")
        return await continuation(details, request)


QUICK = RetryPolicy(initial_backoff=0.01, max_backoff=0.05)


def lossy(kind: str, target: str, *args, **kwargs):
    """(client, interceptor) for `kind`."""
    interceptor = (LoseAnswers if kind == "sync" else AsyncLoseAnswers)(*args, **kwargs)
    return make_client(kind, target, timeout=30, retry=QUICK, interceptors=[interceptor]), interceptor


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_lost_train_answer_is_replayed_not_reapplied(server, name, kind, code):
    c, lose = lossy(kind, server.target, "Normalize", code=code, times=2)
    with c:
        c.create_layer(name, "BatchNorm1d", num_features=3, momentum=None)
        x = batch(1)
        result = c.normalize_result(name, x, "train")
        assert result.replayed is True
        assert result.state.num_batches_tracked == 1 and result.state.version == 1
        assert len(lose.seen) == 3
        assert len({r.request_id for r in lose.seen}) == 1, "a retry must reuse the request id"
        assert c.get_layer(name).state.num_batches_tracked == 1
        local = torch.nn.BatchNorm1d(3, momentum=None)
        expected = local(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(result.output, expected, rtol=1e-5, atol=1e-5)
        # The next call is a new request: applied.
        assert c.normalize_result(name, x, "train").state.num_batches_tracked == 2


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_lost_create_answer_is_not_a_spurious_already_exists(server, name, kind):
    c, lose = lossy(kind, server.target, "CreateLayer")
    with c:
        info = c.create_layer(name, "BatchNorm2d", num_features=4, eps=1e-3)
        assert len(lose.seen) == 2  # the first attempt created it; the retry found it
        assert info.name == name and info.kind == "BatchNorm2d" and info.args["eps"] == 1e-3
        assert c.get_layer(name) == info


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_retried_create_still_refuses_a_different_existing_layer(server, name, kind):
    c, lose = lossy(kind, server.target, "CreateLayer", forward=False)
    with c:
        lose.left = 0
        c.create_layer(name, "BatchNorm2d", num_features=4)  # someone else's layer
        lose.left = 1  # our create's first attempt never arrives; the retry finds the name taken
        with pytest.raises(E.AlreadyExistsError) as info:
            c.create_layer(name, "BatchNorm2d", num_features=5)
        assert info.value.attempts == 2
        assert c.get_layer(name).args["num_features"] == 4


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_lost_delete_answer_is_not_a_spurious_not_found(server, name, kind):
    c, lose = lossy(kind, server.target, "DeleteLayer")
    with c:
        c.create_layer(name, "LayerNorm", normalized_shape=[4])
        c.delete_layer(name)
        assert len(lose.seen) == 2
        with pytest.raises(E.NotFoundError):
            c.get_layer(name)
        # Without a lost answer, deleting a missing layer is still NOT_FOUND.
        with pytest.raises(E.NotFoundError) as info:
            c.delete_layer(name)
        assert info.value.attempts == 1


def test_other_codes_are_not_retried(server, name):
    c, lose = lossy("sync", server.target, "GetLayer", code=grpc.StatusCode.INTERNAL, forward=False)
    with c:
        with pytest.raises(E.InternalError) as info:
            c.get_layer(name)
        assert info.value.attempts == 1 and len(lose.seen) == 1


# -- bounds ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_retries_stop_at_max_attempts(kind):
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.01)
    with make_client(kind, "127.0.0.1:1", timeout=30, retry=policy) as c:
        with pytest.raises(E.UnavailableError) as info:
            c.get_layer("x")
    assert info.value.attempts == 3 and "after 3 attempts" in str(info.value)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_retries_stop_at_the_call_deadline(kind):
    policy = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.05, jitter=0)
    with make_client(kind, "127.0.0.1:1", retry=policy) as c:
        start = time.monotonic()
        with pytest.raises(E.UnavailableError) as info:
            c.normalize("x", batch(0), "train", timeout=0.6)
        elapsed = time.monotonic() - start
    assert 1 < info.value.attempts < 1000
    assert elapsed < 1.5, elapsed


def test_retry_none_means_one_attempt():
    with Client("127.0.0.1:1", timeout=5, retry=None) as c:
        with pytest.raises(E.UnavailableError) as info:
            c.list_layers()
    assert info.value.attempts == 1


def test_async_client_streams_are_not_retried(server, name):
    """A stream's input iterator can't be replayed: a failed stream raises at once."""

    async def main():
        async with AsyncClient("127.0.0.1:1", retry=PATIENT) as c:
            start = time.monotonic()
            with pytest.raises(E.UnavailableError):
                async for _ in c.normalize_stream(name, [batch(0)], "train", timeout=10):
                    pass
            return time.monotonic() - start

    assert asyncio.run(main()) < 5
