"""Tensor bytes in and out of protobuf messages without protobuf copying them.

A bytes field costs a copy to set, one or two to serialize, one to parse and one more each
time it is read. For a 19 MB tensor those copies are most of the server's own work. So
the hot messages (NormalizeRequest, NormalizeResponse, NormalizeStreamResponse) travel as
`Framed`: the message without its tensor's `data`, plus the bytes beside it.

- Sending, `splice` appends the bytes as one more occurrence of the enclosing message
  fields (protobuf merges repeated occurrences of a message field, so the receiver sees
  one tensor with its data): one copy, into the outgoing buffer.
- Receiving, `split` finds the data field in the raw message and returns the message's
  other bytes (parsed by protobuf as usual) and a memoryview of the data: no copy.

Anything `split` is not sure about (the field more than once, groups, a malformed length)
is left to protobuf's own parser, so the result never differs from FromString's.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from ._proto import normserve_pb2 as pb

Buffer = Union[bytes, memoryview]


def _number(message: Any, field: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[field].number)


_DATA = _number(pb.Tensor, "data")
# Field paths from a message to its tensor's bytes.
REQUEST_DATA = (_number(pb.NormalizeRequest, "input"), _DATA)
RESPONSE_DATA = (_number(pb.NormalizeResponse, "output"), _DATA)
STREAM_RESPONSE_DATA = (_number(pb.NormalizeStreamResponse, "response"), *RESPONSE_DATA)

_LEN = 2  # wire type of length-delimited fields
# Below this many bytes protobuf's copies cost less than framing (small W1-like requests).
MIN_FRAMED_BYTES = 32 * 1024


class Framed:
    """A message whose tensor bytes travel beside it. Reads of the message's fields pass
    through (`framed.layer`); `payload` holds the bytes at `path`."""

    __slots__ = ("message", "path", "payload")

    def __init__(self, message: Any, path: Sequence[int], payload: Buffer):
        self.message = message
        self.path = path
        self.payload = payload

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf method's name
        return splice(self.message.SerializeToString(), self.path, self.payload)

    def __repr__(self) -> str:
        return f"Framed({self.message!r}, payload={memoryview(self.payload).nbytes} bytes)"


def payload(message: Any) -> Optional[Buffer]:
    """The tensor bytes that travel beside `message`, or None for a plain message."""
    return message.payload if isinstance(message, Framed) else None


def serialize(message: Any) -> bytes:
    """A gRPC serializer for plain and Framed messages."""
    data: bytes = message.SerializeToString()
    return data


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def splice(head: bytes, path: Sequence[int], data: Buffer) -> bytes:
    """`head` (a serialized message) with `data` as the bytes field at `path`."""
    length = memoryview(data).nbytes
    prefixes = []
    for number in reversed(path):
        prefix = _varint(number << 3 | _LEN) + _varint(length)
        prefixes.append(prefix)
        length += len(prefix)
    return b"".join([head, *reversed(prefixes), data])


class _Unsupported(Exception):
    """A shape of message `split` leaves to protobuf."""


def _read_varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Unsupported
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _strip(view: memoryview, start: int, end: int, path: Sequence[int]) -> Optional[tuple[bytes, memoryview]]:
    """The bytes [start, end) without the field at `path`, and that field's bytes; None
    when the field is absent."""
    number = path[0]
    hit: Optional[tuple[int, int, int, Optional[tuple[bytes, memoryview]]]] = None
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(view, pos, end)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(view, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == _LEN:
            length, body = _read_varint(view, pos, end)
            pos = body + length
            if pos <= end and field == number:
                inner = None if len(path) == 1 else _strip(view, body, pos, path[1:])
                if len(path) == 1 or inner is not None:
                    if hit is not None:
                        raise _Unsupported  # twice: protobuf's merge rules decide
                    hit = (field_start, body, pos, inner)
        else:
            raise _Unsupported  # groups, or not protobuf at all
        if field == number and wire_type != _LEN or field == 0:
            raise _Unsupported
    if pos != end:
        raise _Unsupported
    if hit is None:
        return None
    field_start, body, field_end, inner = hit
    if inner is None:
        return b"".join([view[start:field_start], view[field_end:end]]), view[body:field_end]
    rest, data = inner
    return b"".join([view[start:field_start], _varint(number << 3 | _LEN), _varint(len(rest)), rest, view[field_end:end]]), data


def split(raw: bytes, path: Sequence[int]) -> Optional[tuple[bytes, memoryview]]:
    """(`raw` without the bytes field at `path`, a view of that field's bytes), or None
    when the field is absent or the message has a shape this leaves to protobuf."""
    view = memoryview(raw)
    try:
        return _strip(view, 0, len(view), path)
    except _Unsupported:
        return None


def parser(message_class: Any, path: Sequence[int]) -> Callable[[bytes], Any]:
    """A gRPC deserializer: a Framed message (or a plain one, see `split`); raises what
    message_class.FromString raises."""

    def parse(raw: bytes) -> Any:
        parts = split(raw, path) if len(raw) >= MIN_FRAMED_BYTES else None
        if parts is None:
            return message_class.FromString(raw)
        rest, data = parts
        return Framed(message_class.FromString(rest), path, data)

    return parse
