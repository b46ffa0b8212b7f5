"""Pure SDK logic, no server: retry policy and attempt bookkeeping, the hand-encoded
health messages, channel options, spec comparison and input encoding."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from normserve.client import AsyncClient, Client, RetryPolicy, _core as core, _shm
from normserve.client import codec, wire
from normserve.client._proto import normserve_pb2 as pb
from normserve.client._retry import Attempts
from normserve.client.errors import InvalidArgumentError, NotFoundError, UnavailableError, from_status


# -- RetryPolicy -------------------------------------------------------------------------------
def test_default_policy_retries_unavailable_and_deadline_only():
    p = RetryPolicy()
    assert p.retry_codes == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert p.max_attempts >= 2


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_attempts=0),
        dict(max_attempts=1.5),
        dict(initial_backoff=-1),
        dict(initial_backoff=5, max_backoff=1),
        dict(multiplier=0.5),
        dict(jitter=1.5),
        dict(attempt_timeout=0),
        dict(retry_codes={grpc.StatusCode.INTERNAL}),
        dict(retry_codes={grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE}),
    ],
)
def test_policy_validates(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_backoff_grows_exponentially_up_to_the_cap_with_bounded_jitter():
    p = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.0)
    assert [round(p.backoff(n), 6) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    j = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.5)
    assert j.backoff(3, rand=lambda: 0.0) == pytest.approx(0.4)
    assert j.backoff(3, rand=lambda: 1.0) == pytest.approx(0.2)
    assert all(0.2 <= j.backoff(3) <= 0.4 for _ in range(200))


def test_attempts_are_bounded():
    a = Attempts(RetryPolicy(max_attempts=3, initial_backoff=0.0, max_backoff=0.0), None)
    err = UnavailableError("down")
    delays = []
    while True:
        a.start()
        d = a.next_delay(err)
        if d is None:
            break
        delays.append(d)
    assert a.number == 3 and len(delays) == 2
    assert a.give_up(err).attempts == 3 and "after 3 attempts" in str(err)


def test_non_retryable_codes_are_not_retried():
    a = Attempts(RetryPolicy(), None)
    a.start()
    for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED,
                 grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED):
        assert a.next_delay(from_status(code, "x")) is None


def test_no_policy_means_one_attempt():
    a = Attempts(None, None)
    a.start()
    assert a.next_delay(UnavailableError("down")) is None


def test_overall_deadline_bounds_attempts_and_backoff():
    p = RetryPolicy(max_attempts=100, initial_backoff=0.3, max_backoff=0.3, jitter=0.0, attempt_timeout=10)
    a = Attempts(p, timeout=0.5)
    first = a.start()
    assert first is not None and first <= 0.5  # the attempt gets at most what is left
    assert a.next_delay(UnavailableError("down")) == pytest.approx(0.3)
    time.sleep(0.3)
    a.start()
    # Another 0.3 s backoff would end past the deadline: give up now.
    assert a.next_delay(UnavailableError("down")) is None


def test_attempt_timeout_is_the_per_attempt_deadline():
    a = Attempts(RetryPolicy(attempt_timeout=0.25), timeout=None)
    assert a.start() == 0.25
    b = Attempts(RetryPolicy(attempt_timeout=5), timeout=1)
    assert b.start() <= 1


# -- health messages (hand-encoded; must match grpc_health's) ------------------------------------
@pytest.mark.parametrize("service", ["", "normserve.v1.NormService", "x" * 127, "y" * 128, "z" * 20000, "名前"])
def test_health_request_matches_grpc_health(service):
    assert core.health_request(service) == health_pb2.HealthCheckRequest(service=service).SerializeToString()


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_health_status_decodes_grpc_health(status):
    raw = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    assert core.health_status(raw) == health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def test_health_status_skips_unknown_fields_and_rejects_garbage():
    raw = b"\x12\x03abc" + b"\x19" + b"\0" * 8 + b"\x25" + b"\0" * 4 + b"\x08\x01" + b"\x20\x96\x01"
    assert core.health_status(raw) == "SERVING"
    assert core.health_status(b"\x08\x07") == "STATUS_7"
    for bad in (b"\x08", b"\x12\x05ab", b"\x0b", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"):
        with pytest.raises(InvalidArgumentError):
            core.health_status(bad)


# -- channel configuration ---------------------------------------------------------------------------
def test_channel_options():
    opts = dict(core.channel_options(max_message_bytes=1000, keepalive_time=30, keepalive_timeout=5,
                                     keepalive_without_calls=True, options=[("grpc.max_send_message_length", 7)]))
    assert opts["grpc.max_receive_message_length"] == 1000
    assert opts["grpc.max_send_message_length"] == 7  # explicit options win
    assert opts["grpc.keepalive_time_ms"] == 30000 and opts["grpc.keepalive_timeout_ms"] == 5000
    assert opts["grpc.keepalive_permit_without_calls"] == 1
    assert opts["grpc.primary_user_agent"].startswith("normserve-python/")
    plain = dict(core.channel_options(max_message_bytes=10, keepalive_time=None, keepalive_timeout=None,
                                      keepalive_without_calls=False, options=()))
    assert "grpc.keepalive_time_ms" not in plain
    for bad in (dict(max_message_bytes=0), dict(keepalive_time=0), dict(keepalive_timeout=-1)):
        args = dict(max_message_bytes=10, keepalive_time=None, keepalive_timeout=None, keepalive_without_calls=False, options=())
        with pytest.raises(ValueError):
            core.channel_options(**{**args, **bad})


def test_compression_and_credentials_arguments():
    assert core.compression("gzip") is grpc.Compression.Gzip
    assert core.compression("Deflate") is grpc.Compression.Deflate
    assert core.compression(grpc.Compression.Gzip) is grpc.Compression.Gzip
    assert core.compression(None) is None
    with pytest.raises(ValueError, match="gzip"):
        core.compression("brotli")
    assert core.channel_credentials(None) is None and core.channel_credentials(False) is None
    assert isinstance(core.channel_credentials(True), grpc.ChannelCredentials)
    with pytest.raises(TypeError):
        core.channel_credentials("yes")
    with pytest.raises(ValueError, match="both"):
        core.tls_credentials(cert=b"x")


# -- create-layer reconciliation ----------------------------------------------------------------------
def spec(kind, **kwargs):
    return codec.kwargs_to_spec(kind, kwargs)


@pytest.mark.parametrize(
    "requested, existing, same",
    [
        (spec("BatchNorm2d", num_features=3), spec("BatchNorm2d", num_features=3, eps=1e-5, momentum=0.1, affine=True,
                                                   track_running_stats=True, bias=True, dtype="float32"), True),
        (spec("BatchNorm2d", num_features=3), spec("BatchNorm2d", num_features=3, eps=1e-3), False),
        (spec("BatchNorm2d", num_features=3), spec("BatchNorm1d", num_features=3), False),
        (spec("BatchNorm2d", num_features=3, momentum=None), spec("BatchNorm2d", num_features=3), False),
        (spec("LayerNorm", normalized_shape=4), spec("LayerNorm", normalized_shape=[4], elementwise_affine=True), True),
        (spec("RMSNorm", normalized_shape=[4]), spec("RMSNorm", normalized_shape=[4], eps=1e-6), False),
        (spec("GroupNorm", num_groups=2, num_channels=4, dtype="float64"), spec("GroupNorm", num_groups=2, num_channels=4), False),
    ],
)
def test_same_spec(requested, existing, same):
    assert core.same_spec(requested, existing) is same


def test_create_reconciles_only_already_exists_and_delete_only_not_found():
    call = core.create_layer("bn", "BatchNorm2d", None, {"num_features": 3})
    assert call.reconcile is not None
    assert call.reconcile(UnavailableError("x")) is None
    follow = call.reconcile(from_status(grpc.StatusCode.ALREADY_EXISTS, "taken"))
    assert isinstance(follow, core.Call) and follow.method == "GetLayer"
    delete = core.delete_layer("bn")
    assert delete.reconcile(NotFoundError("gone")) == core.Done(None)
    assert delete.reconcile(UnavailableError("x")) is None


# -- inputs --------------------------------------------------------------------------------------------
def test_train_requests_get_an_idempotency_id_and_eval_requests_none():
    x = np.ones((2, 3), np.float32)
    train = core.normalize("bn", x, "train", "")
    assert len(train.request.request_id) == 32
    assert core.normalize("bn", x, "eval", "").request.request_id == ""
    assert core.normalize("bn", x, "train", "mine").request.request_id == "mine"
    assert core.health("").retry is False and train.retry is True


@pytest.mark.parametrize("x", [np.ones((2, 3), np.int64), [[1, 2], [3, 4]], np.ones(3, np.bool_), "abc",
                               [[1.0, 2.0], [3.0]]])
def test_normalize_rejects_non_float_inputs_locally(x):
    with pytest.raises(InvalidArgumentError, match="dtype|encode"):
        core.normalize("bn", x, "eval", "")


@pytest.mark.parametrize("rows", [4, 64], ids=["in the message", "beside the message"])
def test_numpy_inputs_of_any_layout_are_sent_as_little_endian_c_order(rows):
    base = np.arange(rows * 128, dtype=np.float64).reshape(rows, 128)
    for x in (base[:, ::2], base.T, np.asfortranarray(base), base.astype(">f8"), base[::-1]):
        t = pb.Tensor()
        data = core.encode_input(x, t)
        # Small tensors go into the message; large ones travel beside it (wire.Framed).
        assert (len(data) > 0) == (x.nbytes >= wire.MIN_FRAMED_BYTES) and (len(t.data) > 0) != (len(data) > 0)
        decoded = codec.to_numpy(t, data=data or None)
        np.testing.assert_array_equal(decoded, x)
        assert decoded.dtype == np.dtype("<f8")


def test_a_stream_answer_sent_as_bytes_beside_the_message_is_read_for_a_shared_memory_request_too():
    """A request through a segment whose output the server sent back as bytes (no room
    asked for it, or an older server): the bytes travelled beside the stream message."""
    expected = np.arange(wire.MIN_FRAMED_BYTES, dtype=np.float32).reshape(-1, 64)
    message = pb.NormalizeStreamResponse(sequence=0)
    data = codec.encode_head(expected, message.response.output)
    assert data  # large enough to travel beside the message
    response = wire.parser(pb.NormalizeStreamResponse, wire.STREAM_RESPONSE_DATA)(
        wire.frame(message, wire.STREAM_RESPONSE_DATA, data).SerializeToString()
    )
    segment = _shm.Segment(1 << 20)
    try:
        for seg in (segment, None):
            np.testing.assert_array_equal(core.stream_result(response, None, seg).output, expected)
    finally:
        segment.destroy()


def _holding_program(events):
    """A program that holds something (a segment) across its call, and gives it back on
    any exception, as core.shared_request does."""
    try:
        yield core.Call("Normalize", pb.NormalizeRequest(), lambda r: r)
    except BaseException:
        events.append("given back")
        raise


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_call_interrupted_mid_program_closes_the_program_at_once(kind):
    """Cancelled (or Ctrl-C) during a program's RPC: the program gives back what it holds
    then, not whenever the garbage collector finalizes it."""
    events: list[str] = []
    program = _holding_program(events)
    if kind == "sync":
        client = Client("127.0.0.1:1")

        def interrupted(*_):
            raise KeyboardInterrupt

        client._run = interrupted
        with pytest.raises(KeyboardInterrupt):
            client._drive(program, None, None)
        client.close()
    else:

        async def main():
            client = AsyncClient("127.0.0.1:1")

            async def cancelled(*_):
                raise asyncio.CancelledError

            client._run = cancelled
            with pytest.raises(asyncio.CancelledError):
                await client._drive(program, None, None)
            await client.close()

        asyncio.run(main())
    assert events == ["given back"]
