"""Same-host shared memory: clients' POSIX shared-memory segments, mapped as named regions.

A client on the server's host creates a segment (/dev/shm/<key>) and registers it under a
name (RegisterSharedMemory); Normalize requests then name places in it (region, offset,
byte_size) instead of carrying bytes. The input is read through a zero-copy view of the
mapping and the output is copied straight into it.

- The server only opens existing segments (no O_CREAT, no symlinks, regular files under
  /dev/shm only) and never resizes or unlinks them: the segment is the client's.
- A registration is a lease: `lease_seconds` after its last registration or use, a
  sweeper thread unmaps it, so the regions of a client that died (even by SIGKILL) are
  released within one lease (plus one sweep period).
- A region is never unmapped while a request uses it: requests hold a reference; an
  unregistered or expired region disappears at once for new requests and is unmapped when
  the last request using it is done.
- With authentication on, a region belongs to the token (principal name) that registered
  it; other tokens get NOT_FOUND for it.

Nothing here knows gRPC; the errors below are mapped to status codes by
transport.errors.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from normserve.client import codec
from normserve.client.wire import Buffer
from normserve.client._proto import normserve_pb2 as pb

log = logging.getLogger("normserve.shm")

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
_U64 = 1 << 64


class ShmError(Exception):
    """Base of every error this module raises on purpose; the message is for the caller."""


class ShmNotFound(ShmError):
    """No such region (for this caller), or no such segment on the server's host."""


class ShmExists(ShmError):
    """The region name is registered with another segment, size or owner."""


class ShmInvalid(ShmError):
    """A bad name, key, size, offset or alignment; the message says which."""


class ShmLimitExceeded(ShmError):
    """max_shm_regions or max_shm_bytes would be exceeded."""


class ShmForbidden(ShmError):
    """The caller may not map this segment (another user's, or not on the server's host)."""


class ShmDisabled(ShmError):
    """Shared memory is turned off on this server (max_shm_regions=0)."""


def _inode(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_dev, st.st_ino)


@dataclass(eq=False)
class Region:
    name: str
    key: str
    owner: Optional[str]
    byte_size: int
    lease_seconds: float
    buffer: mmap.mmap
    fd: int  # kept open to check at each use that the segment was not shrunk
    inode: tuple[int, int] = (0, 0)  # (st_dev, st_ino): a segment unlinked and created again is another one
    expires: float = 0.0
    users: int = 0
    dropped: bool = False

    def renew(self, now: float) -> None:
        self.expires = now + self.lease_seconds

    def check_place(self, offset: int, nbytes: int, itemsize: int, what: str) -> None:
        """[offset, offset + nbytes) must lie within the region, offset aligned to itemsize."""
        if offset + nbytes >= _U64:
            raise ShmInvalid(f"{what}: offset {offset} + byte_size {nbytes} overflows 64 bits")
        if offset + nbytes > self.byte_size:
            raise ShmInvalid(
                f"{what}: bytes [{offset}, {offset + nbytes}) are outside shared-memory region {self.name!r} "
                f"of {self.byte_size} bytes"
            )
        if offset % itemsize:
            raise ShmInvalid(f"{what}: offset {offset} is not a multiple of the dtype's itemsize {itemsize}")

    def check_size(self) -> None:
        """A segment truncated below the mapping would fault on access (SIGBUS): refuse."""
        size = os.fstat(self.fd).st_size
        if size < self.byte_size:
            raise ShmInvalid(
                f"shared-memory segment {self.key!r} of region {self.name!r} shrank to {size} bytes, below its "
                f"registered byte_size {self.byte_size}; register it again"
            )

    def unmap(self) -> None:
        self.buffer.close()
        os.close(self.fd)


@dataclass
class Place:
    """Where a request's output goes (checked before the layer runs)."""

    region: Region
    offset: int
    byte_size: int


@dataclass
class RequestRegions:
    """The regions one request uses; returned to the manager when the request ends."""

    manager: "SharedMemoryManager"
    owner: Optional[str]
    held: list[Region] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0

    def _acquire(self, name: str) -> Region:
        region = self.manager.acquire(self.owner, name)
        self.held.append(region)
        region.check_size()
        return region

    def input(self, t: pb.Tensor, max_elements: int, max_rank: int, data: Optional[Buffer] = None) -> torch.Tensor:
        """The input tensor, viewing the region (zero copy). `data`: bytes that travelled
        beside the message (wire.Framed), refused like t.data."""
        name, shape = codec.check(t, max_elements, data, max_rank=max_rank)
        ref = t.shared_memory
        region = self._acquire(ref.region)
        region.check_place(ref.offset, ref.byte_size, codec.ITEMSIZE[name], "input")
        self.bytes_in += ref.byte_size
        return codec.torch_view(region.buffer, name, shape, ref.offset)

    def output_place(self, ref: pb.SharedMemoryRef, x: torch.Tensor) -> Place:
        """Where the output goes, checked before anything is computed (an output that
        would not fit fails the request before it can change state)."""
        region = self._acquire(ref.region)
        region.check_place(ref.offset, ref.byte_size, x.element_size(), "output_shared_memory")
        need = x.numel() * x.element_size()
        if ref.byte_size < need:
            raise ShmInvalid(
                f"output_shared_memory: byte_size {ref.byte_size} is too small for the output "
                f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')} ({need} bytes)"
            )
        return Place(region, ref.offset, ref.byte_size)

    def write(self, place: Place, y: torch.Tensor, out: pb.Tensor) -> None:
        """Copy the output into its place and describe it in `out` (no data)."""
        name = codec.tensor_dtype_name(y)
        nbytes = y.numel() * y.element_size()
        place.region.check_place(place.offset, nbytes, y.element_size(), "output_shared_memory")
        if nbytes > place.byte_size:
            raise ShmInvalid(f"output_shared_memory: the output needs {nbytes} bytes, byte_size is {place.byte_size}")
        codec.torch_view(place.region.buffer, name, tuple(y.shape), place.offset).copy_(y)
        out.dtype = codec.DTYPE_ENUMS[name]
        out.shape[:] = y.shape
        out.shared_memory.region = place.region.name
        out.shared_memory.offset = place.offset
        out.shared_memory.byte_size = nbytes
        self.bytes_out += nbytes

    def release(self) -> None:
        for region in self.held:
            self.manager.release(region)
        self.held.clear()


class SharedMemoryManager:
    """The registered regions of one server, with their limits and leases."""

    def __init__(self, max_regions: int, max_bytes: int, lease_seconds: float, shm_dir: str = SHM_DIR):
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.lease_seconds = lease_seconds
        self.shm_dir = shm_dir
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()
        self._mapped = 0  # bytes of every mapping not yet unmapped (dropped ones in use too)
        self._closed = False
        self._sweeper: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return self.max_regions > 0

    def region_count(self) -> int:
        return len(self._regions)

    def mapped_bytes(self) -> int:
        return self._mapped

    # -- registration --------------------------------------------------------------------
    def register(self, owner: Optional[str], name: str, key: str, byte_size: int, lease_seconds: float) -> Region:
        if not self.enabled:
            raise ShmDisabled("shared memory is disabled on this server (max_shm_regions=0)")
        if not _NAME.fullmatch(name):
            raise ShmInvalid(f"invalid region name {name!r}: expected 1-128 characters of [A-Za-z0-9._:-]")
        key = key[1:] if key.startswith("/") else key
        if not _KEY.fullmatch(key):
            raise ShmInvalid(
                f"invalid shared-memory key {key!r}: expected a POSIX shared-memory name (optionally with a "
                "leading '/') of 1-200 characters of [A-Za-z0-9._-], not starting with '.'"
            )
        if byte_size <= 0:
            raise ShmInvalid("byte_size must be positive")
        if byte_size > self.max_bytes:
            raise ShmLimitExceeded(f"byte_size {byte_size} is over the limit max_shm_bytes={self.max_bytes}")
        if not math.isfinite(lease_seconds) or lease_seconds < 0:
            raise ShmInvalid(f"lease_seconds must be a finite number >= 0, got {lease_seconds}")
        lease = self.lease_seconds if lease_seconds == 0 else min(lease_seconds, self.lease_seconds)
        with self._lock:
            if self._closed:
                raise ShmDisabled("the server is shutting down")
            existing = self._regions.get(name)
            if existing is not None and existing.owner == owner and existing.key == key and existing.byte_size == byte_size:
                if existing.inode == _inode(os.path.join(self.shm_dir, key)):
                    existing.lease_seconds = lease
                    existing.renew(time.monotonic())
                    return existing
                self._drop(existing)  # the client made a new segment under the same key: map that one
                existing = None
            if existing is not None:
                raise ShmExists(
                    f"shared-memory region {name!r} is already registered (with another key, size or owner); "
                    "unregister it first or pick another name"
                )
            if len(self._regions) >= self.max_regions:
                raise ShmLimitExceeded(
                    f"{len(self._regions)} shared-memory regions are registered: the limit is "
                    f"max_shm_regions={self.max_regions}"
                )
            if self._mapped + byte_size > self.max_bytes:
                raise ShmLimitExceeded(
                    f"mapping {byte_size} more bytes would put shared memory at {self._mapped + byte_size} bytes, "
                    f"over the limit max_shm_bytes={self.max_bytes}"
                )
            buffer, fd = self._map(key, byte_size)
            st = os.fstat(fd)
            region = Region(name, key, owner, byte_size, lease, buffer, fd, (st.st_dev, st.st_ino))
            region.renew(time.monotonic())
            self._regions[name] = region
            self._mapped += byte_size
            self._start_sweeper()
        log.debug("registered shared-memory region %s (%s, %d bytes, lease %.0fs)", name, key, byte_size, lease)
        return region

    def _map(self, key: str, byte_size: int) -> tuple[mmap.mmap, int]:
        path = os.path.join(self.shm_dir, key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ShmNotFound(
                f"no shared-memory segment {path} on the server's host (shared memory works only when the "
                "client runs on the same host as the server)"
            ) from None
        except OSError as e:
            raise ShmInvalid(f"cannot open shared-memory segment {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ShmInvalid(f"{path} is not a shared-memory segment")
            if st.st_uid != os.geteuid():
                # The server opens the file on the caller's behalf: it must not become a way
                # into another user's memory (a root server would otherwise open anyone's).
                raise ShmForbidden(
                    f"shared-memory segment {path} belongs to uid {st.st_uid}; this server maps only "
                    f"segments of its own user (uid {os.geteuid()})"
                )
            if st.st_size < byte_size:
                raise ShmInvalid(f"shared-memory segment {path} has {st.st_size} bytes; byte_size asks for {byte_size}")
            return mmap.mmap(fd, byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE), fd
        except BaseException:
            os.close(fd)
            raise

    def unregister(self, owner: Optional[str], name: str) -> None:
        with self._lock:
            region = self._find(owner, name)
            self._drop(region)

    def list(self, owner: Optional[str], prefix: str = "") -> list[Region]:
        with self._lock:
            mine = (r for r in self._regions.values() if (owner is None or r.owner == owner) and r.name.startswith(prefix))
            return sorted(mine, key=lambda r: r.name)

    # -- use by requests -----------------------------------------------------------------
    def request(self, owner: Optional[str]) -> RequestRegions:
        return RequestRegions(self, owner)

    def acquire(self, owner: Optional[str], name: str) -> Region:
        with self._lock:
            region = self._find(owner, name)
            region.users += 1
            region.renew(time.monotonic())
            return region

    def release(self, region: Region) -> None:
        with self._lock:
            region.users -= 1
            region.renew(time.monotonic())
            if region.dropped and region.users == 0:
                self._unmap(region)

    def _find(self, owner: Optional[str], name: str) -> Region:
        region = self._regions.get(name)
        if region is None or (owner is not None and region.owner != owner):
            raise ShmNotFound(f"unknown shared-memory region {name!r} (not registered, unregistered or its lease expired)")
        return region

    # -- dropping --------------------------------------------------------------------------
    def _drop(self, region: Region) -> None:
        """Forget the region (lock held); unmap it now or when its last user is done."""
        del self._regions[region.name]
        region.dropped = True
        if region.users == 0:
            self._unmap(region)

    def _unmap(self, region: Region) -> None:
        region.unmap()
        self._mapped -= region.byte_size
        log.debug("unmapped shared-memory region %s", region.name)

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep, name="normserve-shm-leases", daemon=True)
            self._sweeper.start()

    def _sweep(self) -> None:
        period = min(1.0, self.lease_seconds / 4)
        while not self._closed:
            time.sleep(period)
            self.expire(time.monotonic())

    def expire(self, now: float) -> int:
        """Drop every region whose lease has run out (and that no request is using)."""
        with self._lock:
            expired = [r for r in self._regions.values() if r.users == 0 and r.expires <= now]
            for region in expired:
                self._drop(region)
        for region in expired:
            log.info("shared-memory region %s (%s) released: its lease of %.0fs expired", region.name, region.key, region.lease_seconds)
        return len(expired)

    def close(self) -> None:
        """Server shutdown: unmap every region (requests are over by now)."""
        with self._lock:
            self._closed = True
            for region in list(self._regions.values()):
                self._drop(region)

