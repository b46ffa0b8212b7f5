"""The client side of same-host shared memory (`Client(..., shared_memory=True)`).

The client creates POSIX shared-memory segments (multiprocessing.shared_memory), registers
each with the server as a region, writes a request's input into its segment and asks for
the output at a second place in the same segment; the result is copied out of it, so
results are the same objects (types, devices) as on the bytes path.

- One segment per call in flight: a call takes a free segment (or makes one, in whole MiB
  with 1/8 to spare, its pages reserved) and gives it back when its result has been read, so
  threads, asyncio tasks and retries never share bytes. A segment too small for a call is
  unregistered and replaced by a bigger one.
- Input and output never overlap: a retried request finds its input intact.
- Leases: the server drops a region `lease` seconds after its last use. A segment idle for
  over half its lease is registered again (which renews it) before it is used; a region
  the server no longer knows is registered again and the request retried once.
- When the server can't use shared memory (another host, an older server, the feature
  turned off, its limits reached) the call goes over gRPC bytes instead, with one
  RuntimeWarning per client for the lasting reasons.
- `close()` unregisters and unlinks every segment; segments of a client that is garbage
  collected or still open at interpreter exit are unlinked (the server's lease then
  releases its mappings).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from multiprocessing import shared_memory
from typing import Any, Optional

import numpy as np

from . import codec
from ._proto import normserve_pb2 as pb

_MIN_SEGMENT = 1 << 20
_ALIGN = 64  # the output's offset: aligned for every dtype (and cache lines)


def segment_size(nbytes: int) -> int:
    """Room for `nbytes` and 1/8 more (so slightly bigger batches fit), in whole MiB."""
    return max(_MIN_SEGMENT, -(-(nbytes + nbytes // 8) // _MIN_SEGMENT) * _MIN_SEGMENT)


def output_offset(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class Segment:
    """One client-owned segment, registered with the server as region `name`."""

    def __init__(self, size: int):
        self.shm = shared_memory.SharedMemory(create=True, size=size)
        try:
            # Reserve the pages now: a full /dev/shm fails here (OSError), not with a
            # SIGBUS when the segment is written (here or in the server).
            os.posix_fallocate(self.shm._fd, 0, size)  # type: ignore[attr-defined]
        except BaseException:
            self.destroy()
            raise
        self.size = size
        self.name = "normserve-" + uuid.uuid4().hex
        self.renew_at = 0.0  # monotonic time after which the registration must be renewed

    @property
    def key(self) -> str:
        return self.shm.name

    def renewed(self, lease_seconds: float) -> None:
        """The server renewed the lease (a registration or a use) just now."""
        self.renew_at = time.monotonic() + lease_seconds / 2

    def needs_registering(self) -> bool:
        return time.monotonic() >= self.renew_at

    def destroy(self) -> None:
        try:
            self.shm.close()
        except BufferError:  # a view still exists: the mapping goes with it
            pass
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


def destroy_all(segments: list[Segment]) -> None:
    for segment in segments:
        segment.destroy()
    segments.clear()


class SegmentPool:
    """The client's segments: free ones, and every one (for close / exit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Segment] = []
        self._all: list[Segment] = []
        self.lease_seconds = 0.0
        self.unavailable: Optional[str] = None  # why shared memory can't be used, once known
        self.warned = False
        # Unlink at exit (or when the client is collected) even without close().
        self._finalizer = weakref.finalize(self, destroy_all, self._all)

    def take(self, nbytes: int) -> tuple[Segment, list[Segment]]:
        """A segment of at least `nbytes` for one call, and segments to unregister (too
        small ones this call replaces)."""
        with self._lock:
            fits = [s for s in self._free if s.size >= nbytes]
            if fits:
                segment = min(fits, key=lambda s: s.size)
                self._free.remove(segment)
                return segment, []
            retired = self._free[:1]  # replace one too-small free segment, keep the pool small
            del self._free[:1]
        try:
            segment = Segment(segment_size(nbytes))  # outside the lock: it reserves pages
        except BaseException:
            with self._lock:
                self._free.extend(retired)  # kept after all (still in _all)
            raise
        with self._lock:
            for old in retired:
                self._all.remove(old)
            self._all.append(segment)
        return segment, retired

    def settle(self, segment: Segment, clean: bool) -> None:
        """A call is done with `segment`: reuse it, or (`clean` False: the server may still
        write into it, e.g. after a deadline) drop it."""
        if not clean:
            self.discard(segment)
            return
        with self._lock:
            if segment in self._all and segment not in self._free:
                self._free.append(segment)

    def discard(self, segment: Segment) -> None:
        """Forget a segment and unlink it (its registration, if any, ends with its lease)."""
        with self._lock:
            if segment in self._all:
                self._all.remove(segment)
            if segment in self._free:
                self._free.remove(segment)
        segment.destroy()

    def drain(self) -> list[Segment]:
        """Every segment, for close(): the caller unregisters, then destroys them."""
        with self._lock:
            segments = list(self._all)
            self._all.clear()
            self._free.clear()
        return segments


# -- tensors in a segment --------------------------------------------------------------------
def write_input(segment: Segment, x: Any, name: str, shape: tuple[int, ...]) -> None:
    """Copy x (numpy or torch, any strides, byte order or device) to the segment's start."""
    if codec.is_torch(x):
        codec.torch_view(segment.shm.buf, name, shape, 0).copy_(x.detach())
    else:
        np.copyto(codec.numpy_view(segment.shm.buf, name, shape, 0), x, casting="equiv")


def read_output(segment: Segment, t: pb.Tensor, device: Any) -> Any:
    """The output the server wrote into the segment, copied out (numpy, or torch on `device`)."""
    name, shape = codec.check(t)
    ref = t.shared_memory
    if ref.region != segment.name or ref.offset + ref.byte_size > segment.size or ref.offset % codec.ITEMSIZE[name]:
        raise codec.CodecError(
            f"the server placed the output at {ref.region!r} [{ref.offset}, {ref.offset + ref.byte_size}), "
            f"outside the request's segment {segment.name!r} of {segment.size} bytes"
        )
    view_of = codec.numpy_view if device is None else codec.torch_view
    return codec.copy_out(view_of(segment.shm.buf, name, shape, ref.offset), device)


def ref(segment: Segment, offset: int, nbytes: int) -> pb.SharedMemoryRef:
    return pb.SharedMemoryRef(region=segment.name, offset=offset, byte_size=nbytes)
