"""The server's shared-memory region manager (server/shm.py) without gRPC: keys, bounds,
limits, leases, and regions that stay mapped while a request uses them."""

from __future__ import annotations

import os

import pytest
import torch

from normserve.client._proto import normserve_pb2 as pb
from normserve.server.shm import (
    SharedMemoryManager,
    ShmDisabled,
    ShmExists,
    ShmInvalid,
    ShmLimitExceeded,
    ShmNotFound,
)

SIZE = 4096


@pytest.fixture
def shm_dir(tmp_path):
    for key in ("seg-a", "seg-b", "small"):
        (tmp_path / key).write_bytes(b"\0" * (64 if key == "small" else SIZE))
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "seg-a", tmp_path / "link")
    return tmp_path


@pytest.fixture
def manager(shm_dir):
    m = SharedMemoryManager(max_regions=2, max_bytes=2 * SIZE, lease_seconds=10.0, shm_dir=str(shm_dir))
    yield m
    m.close()


def tensor(region: str, offset: int, shape: list[int]) -> pb.Tensor:
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape)
    t.shared_memory.region, t.shared_memory.offset = region, offset
    t.shared_memory.byte_size = 4 * torch.Size(shape).numel()
    return t


@pytest.mark.parametrize(
    "key, error",
    [
        ("absent", ShmNotFound),
        ("link", ShmInvalid),  # symlinks are not followed
        ("dir", ShmInvalid),
        ("small", ShmInvalid),  # smaller than byte_size
        ("../seg-a", ShmInvalid),
        ("/seg-a/x", ShmInvalid),
        (".seg", ShmInvalid),
    ],
)
def test_bad_keys(manager, key, error):
    with pytest.raises(error):
        manager.register(None, "r", key, SIZE, 0)
    assert manager.region_count() == 0 and manager.mapped_bytes() == 0


def test_register_renew_limits_and_owners(manager):
    region = manager.register("alice", "r", "/seg-a", SIZE, 0)
    assert region.key == "seg-a" and region.lease_seconds == 10.0
    assert manager.register("alice", "r", "seg-a", SIZE, 3).lease_seconds == 3  # renewal, shorter lease
    with pytest.raises(ShmExists):
        manager.register("bob", "r", "seg-a", SIZE, 0)
    with pytest.raises(ShmNotFound):
        manager.unregister("bob", "r")
    assert [r.name for r in manager.list("alice")] == ["r"] and manager.list("bob") == []
    with pytest.raises(ShmLimitExceeded, match="max_shm_bytes"):
        manager.register("alice", "big", "seg-b", 3 * SIZE, 0)
    manager.register("alice", "r2", "seg-b", SIZE, 0)
    with pytest.raises(ShmLimitExceeded, match="max_shm_regions=2"):
        manager.register("alice", "r3", "seg-b", 64, 0)
    assert manager.mapped_bytes() == 2 * SIZE


def test_disabled(shm_dir):
    with pytest.raises(ShmDisabled, match="max_shm_regions=0"):
        SharedMemoryManager(0, SIZE, 10.0, shm_dir=str(shm_dir)).register(None, "r", "seg-a", SIZE, 0)


def test_a_region_in_use_is_unmapped_only_when_the_request_is_done(manager):
    manager.register(None, "r", "seg-a", SIZE, 0)
    request = manager.request(None)
    x = request.input(tensor("r", 0, [4]), 1 << 20, 8)
    place = request.output_place(pb.SharedMemoryRef(region="r", offset=64, byte_size=16), x)
    manager.unregister(None, "r")
    assert manager.region_count() == 0  # gone for new requests at once ...
    with pytest.raises(ShmNotFound):
        manager.request(None).input(tensor("r", 0, [4]), 1 << 20, 8)
    assert manager.mapped_bytes() == SIZE  # ... but still mapped for this one
    request.write(place, torch.arange(4, dtype=torch.float32), pb.Tensor())
    assert x.sum().item() == 0
    del x
    request.release()
    assert manager.mapped_bytes() == 0


def test_leases_expire_unless_in_use(manager):
    region = manager.register(None, "r", "seg-a", SIZE, 1.0)
    request = manager.request(None)
    request.input(tensor("r", 0, [4]), 1 << 20, 8)
    assert manager.expire(region.expires + 5) == 0  # in use: kept
    request.release()  # the release renews the lease
    assert manager.expire(region.expires - 0.5) == 0
    assert manager.expire(region.expires) == 1
    assert manager.region_count() == 0 and manager.mapped_bytes() == 0


@pytest.mark.parametrize(
    "offset, shape, match",
    [
        (SIZE - 12, [4], r"bytes \[4084, 4100\) are outside"),
        (2**64 - 8, [4], "overflows 64 bits"),
        (6, [4], "not a multiple of the dtype's itemsize 4"),
    ],
)
def test_input_places_are_checked(manager, offset, shape, match):
    manager.register(None, "r", "seg-a", SIZE, 0)
    request = manager.request(None)
    with pytest.raises(ShmInvalid, match=match):
        request.input(tensor("r", offset, shape), 1 << 20, 8)
    request.release()
    assert manager.list(None)[0].users == 0


def test_shutdown_unmaps_everything_and_refuses_new_regions(manager):
    manager.register(None, "r", "seg-a", SIZE, 0)
    request = manager.request(None)
    request.input(tensor("r", 0, [4]), 1 << 20, 8)
    manager.close()
    assert manager.region_count() == 0 and manager.mapped_bytes() == SIZE  # in use: after the request
    request.release()
    assert manager.mapped_bytes() == 0
    with pytest.raises(ShmDisabled, match="shutting down"):
        manager.register(None, "r2", "seg-b", SIZE, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a segment of another user needs root")
def test_another_users_segment_is_refused(manager, shm_dir):
    from normserve.server.shm import ShmForbidden

    os.chown(shm_dir / "seg-b", 65534, 65534)
    with pytest.raises(ShmForbidden, match="belongs to uid 65534"):
        manager.register(None, "r", "seg-b", SIZE, 0)
    assert manager.list(None) == []


def test_registering_again_after_the_segment_was_recreated_maps_the_new_one(manager, shm_dir):
    first = manager.register(None, "r", "seg-a", SIZE, 0)
    assert manager.register(None, "r", "seg-a", SIZE, 0) is first  # same segment: a renewal
    os.unlink(shm_dir / "seg-a")
    (shm_dir / "seg-a").write_bytes(b"\1" * SIZE)
    second = manager.register(None, "r", "seg-a", SIZE, 0)
    assert second is not first and first.dropped
    assert second.buffer[:4] == b"\1\1\1\1"


@pytest.mark.parametrize(
    "peer, local",
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:%5B::1%5D:5000", True),
        ("unix:/run/normserve.sock", True),
        ("ipv4:10.0.0.7:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
    ],
)
def test_shared_memory_is_for_local_peers_only(peer, local):
    from normserve.server.shm import ShmForbidden
    from normserve.server.transport.servicer import _check_local

    if local:
        _check_local(peer)
    else:
        with pytest.raises(ShmForbidden, match="same host|server's host"):
            _check_local(peer)
