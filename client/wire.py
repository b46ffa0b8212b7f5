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

Anything `split` is not sure about (the field more than once, groups, a malformed or
over-long varint, another member of a oneof on the path, more than a few dozen fields) is
left to protobuf's own parser, so the result never differs from FromString's and the scan,
which runs before authentication, stays cheap whatever the bytes.
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
# The scan gives up (protobuf parses instead) past this many fields in one message: the
# messages it is for have a handful, and a Python loop over millions would be a DoS.
_MAX_FIELDS = 64
# Below this many bytes protobuf's copies cost less than framing (small W1-like requests).
MIN_FRAMED_BYTES = 32 * 1024


class Framed:
    """A message whose tensor bytes travel beside it. Reads of the message's fields pass
    through (`framed.layer`); `payload` holds the bytes at `path`.

    The payload may view the caller's array: it is serialized once, on first use, and a
    retry sends those same bytes."""

    __slots__ = ("message", "path", "payload", "_serialized")

    def __init__(self, message: Any, path: Sequence[int], payload: Buffer):
        self.message = message
        self.path = path
        self.payload = payload
        self._serialized: Optional[bytes] = None

    def __getattr__(self, name: str) -> Any:
        if name in Framed.__slots__:  # not set yet (e.g. copy.copy): no recursion
            raise AttributeError(name)
        return getattr(self.message, name)

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf method's name
        if self._serialized is None:
            self._serialized = splice(self.message.SerializeToString(), self.path, self.payload)
        return self._serialized

    def __repr__(self) -> str:
        return f"Framed({self.message!r}, payload={memoryview(self.payload).nbytes} bytes)"


def frame(message: Any, path: Sequence[int], data: Buffer) -> Any:
    """`message` with `data` to travel beside it, or `message` itself when `data` is empty
    (its bytes, if any, are in it). Serialized now: the data may view a caller's array,
    which is read when the call is made, not when gRPC gets to it."""
    if not data:
        return message
    framed = Framed(message, path, data)
    framed.SerializeToString()  # kept: gRPC's serializer and any retry send these bytes
    return framed


def plain(message: Any) -> Any:
    """`message` as a plain protobuf message. A Framed one is parsed from the bytes it
    serialized when it was made: its payload may view a caller's array changed since."""
    if not isinstance(message, Framed):
        return message
    return type(message.message).FromString(message.SerializeToString())


def count_field(raw: bytes, number: int, stop_after: int) -> Optional[int]:
    """How many times top-level field `number` occurs in `raw` (counting stops past
    `stop_after`), without parsing the rest; None where `raw` isn't plainly protobuf."""
    view, pos, end, count = memoryview(raw), 0, len(raw), 0
    try:
        while pos < end and count <= stop_after:
            key, _, pos = _field(view, pos, end)
            count += key == number << 3 | _LEN
    except _Unsupported:
        return None
    return count if pos <= end else None


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


def _read_varint(view: memoryview, pos: int, end: int, max_bytes: int) -> tuple[int, int]:
    value = shift = 0
    for pos in range(pos, min(end, pos + max_bytes)):
        byte = view[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos + 1
        shift += 7
    raise _Unsupported  # truncated, or longer than protobuf accepts here


def _field(view: memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """(key, where its value's bytes start, where the field ends) of the field at `pos`."""
    key, pos = _read_varint(view, pos, end, 5)  # upb refuses longer tags
    wire_type = key & 7
    if wire_type == 0:
        return key, pos, _read_varint(view, pos, end, 10)[1]
    if wire_type == 1:
        return key, pos, pos + 8
    if wire_type == 5:
        return key, pos, pos + 4
    if wire_type == _LEN:
        length, body = _read_varint(view, pos, end, 5)  # upb refuses longer lengths
        return key, body, body + length
    raise _Unsupported  # groups, or not protobuf at all


def _strip(
    view: memoryview, start: int, end: int, path: Sequence[int], others: Sequence[frozenset[int]]
) -> Optional[tuple[bytes, memoryview]]:
    """The bytes [start, end) without the field at `path`, and that field's bytes; None
    when the field is absent. `others[i]`: the other members of the oneof holding path[i]
    (when one is present, which member wins is protobuf's business)."""
    number, excluded = path[0], others[0]
    hit: Optional[tuple[int, int, int, Optional[tuple[bytes, memoryview]]]] = None
    pos = start
    for _ in range(_MAX_FIELDS):
        if pos >= end:
            break
        field_start = pos
        key, body, pos = _field(view, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0 or field in excluded or key >= 1 << 32:
            raise _Unsupported
        if wire_type == _LEN and field == number and pos <= end:
            inner = None if len(path) == 1 else _strip(view, body, pos, path[1:], others[1:])
            if len(path) == 1 or inner is not None:
                if hit is not None:
                    raise _Unsupported  # twice: protobuf's merge rules decide
                hit = (field_start, body, pos, inner)
        if field == number and wire_type != _LEN:
            raise _Unsupported
    if pos != end:
        raise _Unsupported  # past the end, or more fields than _MAX_FIELDS
    if hit is None:
        return None
    field_start, body, field_end, inner = hit
    if inner is None:
        return b"".join([view[start:field_start], view[field_end:end]]), view[body:field_end]
    rest, data = inner
    return b"".join([view[start:field_start], _varint(number << 3 | _LEN), _varint(len(rest)), rest, view[field_end:end]]), data


def oneof_others(message_class: Any, path: Sequence[int]) -> tuple[frozenset[int], ...]:
    """For each field on `path`, the numbers of the other members of its oneof (if any)."""
    others = []
    descriptor = message_class.DESCRIPTOR
    for number in path:
        field = descriptor.fields_by_number[number]
        oneof = field.containing_oneof
        others.append(frozenset(f.number for f in oneof.fields if f.number != number) if oneof else frozenset())
        descriptor = field.message_type
    return tuple(others)


def split(
    raw: bytes, path: Sequence[int], others: Optional[Sequence[frozenset[int]]] = None
) -> Optional[tuple[bytes, memoryview]]:
    """(`raw` without the bytes field at `path`, a view of that field's bytes), or None
    when the field is absent or the message has a shape this leaves to protobuf (`others`:
    see oneof_others)."""
    view = memoryview(raw)
    try:
        return _strip(view, 0, len(view), path, others or (frozenset(),) * len(path))
    except _Unsupported:
        return None


def parser(message_class: Any, path: Sequence[int]) -> Callable[[bytes], Any]:
    """A gRPC deserializer: a Framed message (or a plain one, see `split`); raises what
    message_class.FromString raises."""
    others = oneof_others(message_class, path)

    def parse(raw: bytes) -> Any:
        parts = split(raw, path, others) if len(raw) >= MIN_FRAMED_BYTES else None
        if parts is None:
            return message_class.FromString(raw)
        rest, data = parts
        return Framed(message_class.FromString(rest), path, data)

    return parse
