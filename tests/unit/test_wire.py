"""wire: tensor bytes spliced into and split out of protobuf messages give exactly what
protobuf's own SerializeToString / FromString give, for any bytes at all."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normserve.client import wire
from normserve.client._proto import normserve_pb2 as pb

CASES = [
    (pb.NormalizeRequest, wire.REQUEST_DATA),
    (pb.NormalizeResponse, wire.RESPONSE_DATA),
    (pb.NormalizeStreamResponse, wire.STREAM_RESPONSE_DATA),
]
IDS = [cls.__name__ for cls, _ in CASES]


def _tensor_of(message, path):
    """The Tensor message on `path` (created if unset)."""
    for number in path[:-1]:
        field = message.DESCRIPTOR.fields_by_number[number]
        message = getattr(message, field.name)
    return message


@st.composite
def messages(draw, cls):
    """A message of `cls` with most fields set (data included), and its data."""
    data = draw(st.one_of(st.binary(max_size=64), st.integers(0, 70_000).map(lambda n: bytes(range(256)) * (n // 256))))
    shape = draw(st.lists(st.integers(0, 2**40), max_size=4))
    t = pb.Tensor(dtype=draw(st.integers(0, 5)), shape=shape, data=data)
    if draw(st.booleans()):
        t.shared_memory.region = draw(st.text(max_size=5))
    if cls is pb.NormalizeRequest:
        m = pb.NormalizeRequest(layer=draw(st.text(max_size=8)), mode=draw(st.integers(0, 2)), input=t,
                                request_id=draw(st.text(max_size=8)))
        if draw(st.booleans()):
            m.output_shared_memory.offset = draw(st.integers(0, 2**63))
        return m, data
    response = pb.NormalizeResponse(output=t, request_id=draw(st.text(max_size=8)), replayed=draw(st.booleans()))
    response.state.version = draw(st.integers(0, 2**63))
    if cls is pb.NormalizeResponse:
        return response, data
    return pb.NormalizeStreamResponse(sequence=draw(st.integers(0, 2**64 - 1)), response=response), data


@pytest.mark.parametrize("cls,path", CASES, ids=IDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_framed_serializes_to_what_protobuf_parses_as_the_whole_message(cls, path, data):
    message, payload = data.draw(messages(cls))
    head = cls()
    head.CopyFrom(message)
    _tensor_of(head, path).data = b""
    sent = wire.Framed(head, path, memoryview(payload)).SerializeToString()
    assert cls.FromString(sent) == message


@pytest.mark.parametrize("cls,path", CASES, ids=IDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_split_then_parse_gives_what_from_string_gives(cls, path, data):
    message, payload = data.draw(messages(cls))
    for raw in (message.SerializeToString(), wire.Framed(_without_data(message, path), path, payload).SerializeToString()):
        parts = wire.split(raw, path, wire.oneof_others(cls, path))
        if payload:
            assert parts is not None
        if parts is None:
            continue
        rest, view = parts
        assert view.obj is raw  # a view of the received bytes: no copy
        parsed = cls.FromString(rest)
        _tensor_of(parsed, path).data = bytes(view)
        assert parsed == message


def _without_data(message, path):
    head = type(message)()
    head.CopyFrom(message)
    _tensor_of(head, path).data = b""
    return head


@pytest.mark.parametrize("cls,path", CASES, ids=IDS)
def test_any_bytes_parse_exactly_as_from_string_or_fail_alike(cls, path):
    outcomes = {"left to protobuf": 0, "split, both refuse": 0, "split, both parse": 0}

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def run(data):
        valid = data.draw(messages(cls))[0].SerializeToString()
        at = data.draw(st.integers(0, len(valid)))
        raw = data.draw(st.one_of(
            st.binary(max_size=80),
            st.just(valid),
            # Another member of the oneof after the data (stream responses: error wins).
            st.just(valid + pb.NormalizeStreamResponse(error=pb.Error(code=5)).SerializeToString()),
            # Near misses are the risky ones: bytes inserted, dropped or replaced.
            st.binary(max_size=3).map(lambda b: valid[:at] + b + valid[at:]),
            st.integers(1, 4).map(lambda n: valid[:at] + valid[at + n:]),
            st.binary(min_size=1, max_size=2).map(lambda b: valid[:at] + b + valid[at + len(b):]),
        ))
        try:
            expected = cls.FromString(raw)
        except DecodeError:
            expected = None
        parts = wire.split(raw, path, wire.oneof_others(cls, path))
        if parts is None:
            outcomes["left to protobuf"] += 1  # the same by definition
            return
        rest, view = parts
        try:
            got = cls.FromString(rest)
        except DecodeError:
            assert expected is None, "split made a valid message undecodable"
            outcomes["split, both refuse"] += 1
            return
        assert expected is not None, "split made an undecodable message decodable"
        _tensor_of(got, path).data = bytes(view)
        assert got == expected
        outcomes["split, both parse"] += 1

    run()
    # Not vacuous: (of 400; ~70-150 seen, fewer for stream responses, whose oneof rivals
    # are always left to protobuf) a bound that chance can't miss.
    assert outcomes["split, both parse"] > 10, outcomes


@pytest.mark.parametrize("cls,path", CASES, ids=IDS)
def test_data_given_twice_is_left_to_protobuf_which_keeps_the_last(cls, path):
    first = wire.Framed(cls(), path, b"first").SerializeToString()
    raw = wire.splice(first, path, b"second")
    assert wire.split(raw, path, wire.oneof_others(cls, path)) is None
    parse = wire.parser(cls, path)
    padded = raw + wire.splice(b"", path, b"x" * wire.MIN_FRAMED_BYTES)  # over the framing threshold
    assert wire.split(padded, path) is None
    assert bytes(_tensor_of(parse(padded), path).data) == b"x" * wire.MIN_FRAMED_BYTES


def test_parser_frames_large_payloads_and_parses_small_ones_whole():
    parse = wire.parser(pb.NormalizeRequest, wire.REQUEST_DATA)
    small = pb.NormalizeRequest(layer="a", input=pb.Tensor(dtype=1, shape=[2], data=b"12345678"))
    assert isinstance(parse(small.SerializeToString()), pb.NormalizeRequest)
    big = pb.NormalizeRequest(layer="a", input=pb.Tensor(dtype=1, shape=[wire.MIN_FRAMED_BYTES], data=b"\1" * 4 * wire.MIN_FRAMED_BYTES))
    framed = parse(big.SerializeToString())
    assert isinstance(framed, wire.Framed)
    assert framed.layer == "a" and list(framed.input.shape) == [wire.MIN_FRAMED_BYTES] and framed.input.data == b""
    assert bytes(wire.payload(framed)) == big.input.data
    assert wire.payload(small) is None
    with pytest.raises(DecodeError):
        parse(b"\xff" * (wire.MIN_FRAMED_BYTES + 1))


def _varint(n: int, width: int = 0) -> bytes:
    """n as a varint, padded to `width` bytes with continuation bytes (over-long encoding)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte)
        if not n and len(out) >= width:
            break
    for i in range(len(out) - 1):
        out[i] |= 0x80
    return bytes(out)


@pytest.mark.parametrize("where", ["data length", "data tag", "input length", "input tag"])
def test_over_long_tags_and_lengths_are_refused_as_protobuf_refuses_them(where):
    """upb accepts at most 5 bytes for a tag or a length: so must split, or it would turn
    an undecodable request into a decodable one."""
    data = b"\0" * 40_000
    wide = lambda n, key: _varint(n, 7) if where == key else _varint(n)  # noqa: E731
    inner = wide(3 << 3 | 2, "data tag") + wide(len(data), "data length") + data
    raw = wide(3 << 3 | 2, "input tag") + wide(len(inner), "input length") + inner
    with pytest.raises(DecodeError):
        pb.NormalizeRequest.FromString(raw)
    assert wire.split(raw, wire.REQUEST_DATA) is None
    with pytest.raises(DecodeError):
        wire.parser(pb.NormalizeRequest, wire.REQUEST_DATA)(raw)


def test_another_member_of_the_oneof_leaves_the_choice_to_protobuf():
    """error after response{output{data}}: protobuf keeps the error; so does the parser."""
    data = b"\1" * wire.MIN_FRAMED_BYTES
    raw = wire.splice(pb.NormalizeStreamResponse(sequence=4).SerializeToString(), wire.STREAM_RESPONSE_DATA, data)
    raw += pb.NormalizeStreamResponse(error=pb.Error(code=5, message="gone")).SerializeToString()
    expected = pb.NormalizeStreamResponse.FromString(raw)
    assert expected.WhichOneof("result") == "error"
    parsed = wire.parser(pb.NormalizeStreamResponse, wire.STREAM_RESPONSE_DATA)(raw)
    assert not isinstance(parsed, wire.Framed) and parsed == expected


def test_messages_of_many_fields_are_left_to_protobuf():
    """The scan runs before authentication: past a few dozen fields it gives up rather
    than loop in Python over millions of them."""
    data = b"\0" * wire.MIN_FRAMED_BYTES
    head = pb.NormalizeRequest(layer="a").SerializeToString() + b"\x78\x00" * 1000  # unknown field 15
    raw = wire.splice(head, wire.REQUEST_DATA, data)
    assert wire.split(raw, wire.REQUEST_DATA) is None
    assert wire.parser(pb.NormalizeRequest, wire.REQUEST_DATA)(raw) == pb.NormalizeRequest.FromString(raw)


@pytest.mark.parametrize("cls,path", CASES, ids=IDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_parser_gives_what_from_string_gives(cls, path, data):
    message, payload = data.draw(messages(cls))
    raw = wire.Framed(_without_data(message, path), path, payload).SerializeToString()
    parsed = wire.parser(cls, path)(raw)
    if isinstance(parsed, wire.Framed):
        assert len(raw) >= wire.MIN_FRAMED_BYTES and wire.payload(parsed).obj is raw
        whole = type(message)()
        whole.CopyFrom(parsed.message)
        _tensor_of(whole, path).data = bytes(parsed.payload)
        parsed = whole
    assert parsed == message


def test_framed_reads_through_copies_and_serializes_once():
    import copy

    import numpy as np

    array = np.arange(wire.MIN_FRAMED_BYTES, dtype=np.float32)
    request = pb.NormalizeRequest(layer="bn", request_id="r-1")
    framed = wire.Framed(request, wire.REQUEST_DATA, array.data)
    assert framed.layer == "bn" and framed.request_id == "r-1" and framed.HasField("input") is False
    first = framed.SerializeToString()
    array[:] = -1  # the caller reuses its array: a retry must still send what was sent
    assert framed.SerializeToString() == first
    assert bytes(pb.NormalizeRequest.FromString(first).input.data) == np.arange(wire.MIN_FRAMED_BYTES, dtype=np.float32).tobytes()
    clone = copy.copy(framed)
    assert clone.layer == "bn" and clone.SerializeToString() == first
    with pytest.raises(AttributeError):
        framed.no_such_field


def test_count_field_counts_top_level_occurrences_and_stops_early():
    requests = [pb.NormalizeRequest(layer=f"l{i}", input=pb.Tensor(shape=[i])) for i in range(30)]
    raw = pb.NormalizePack(requests=requests).SerializeToString()
    assert wire.count_field(raw, 1, 100) == 30
    assert wire.count_field(raw, 1, 9) == 10  # stops one past the bound
    assert wire.count_field(raw, 2, 100) == 0
    assert wire.count_field(b"", 1, 5) == 0
    assert wire.count_field(raw[:-1], 1, 100) is None  # the last field runs past the end
    assert wire.count_field(b"\x0f\x00", 1, 5) is None  # wire type 7: not protobuf
