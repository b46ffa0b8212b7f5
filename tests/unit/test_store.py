"""The on-disk state store: framing, checksums, recovery, fallbacks, group commit."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from normserve.server.engine.store import DiskStore, LayerRecord, encode_record, read_records


def record(version: int, name: str = "bn", **kw) -> LayerRecord:
    state = {
        "running_mean": torch.full((3,), float(version)),
        "running_var": torch.full((3,), 1.0 + version),
        "num_batches_tracked": torch.tensor(version),
    }
    return LayerRecord(name, "BatchNorm2d", {"num_features": 3, "momentum": None}, version, state, **kw)


def files(d, suffix):
    return sorted(f for f in os.listdir(d) if f.endswith(suffix))


def reopen(d, **kw) -> tuple[DiskStore, dict[str, LayerRecord]]:
    store = DiskStore(str(d), **kw)
    return store, {r.name: r for r in store.recover()}


def test_record_round_trip_all_dtypes():
    state = {
        "a": torch.randn(4, dtype=torch.float32),
        "b": torch.randn(2, 2, dtype=torch.float64),
        "c": torch.randn(3).to(torch.float16),
        "d": torch.randn(3).to(torch.bfloat16),
        "n": torch.tensor(7),
    }
    rec = LayerRecord("x", "LayerNorm", {"normalized_shape": (2, 2), "eps": None}, 3, state, (("id1", 2, 0),))
    (back,) = read_records(encode_record(rec)).records
    assert back.name == "x" and back.version == 3 and back.args == rec.args
    assert back.request_ids == (("id1", 2, 0),)
    for key, t in state.items():
        assert back.state[key].dtype == t.dtype and torch.equal(back.state[key], t)


def test_latest_record_per_layer_survives_restart(tmp_path):
    store, _ = reopen(tmp_path)
    for v in range(5):
        store.wait_durable(store.append(record(v)))
    store.wait_durable(store.append(record(0, name="gone")))
    store.wait_durable(store.append(LayerRecord("gone", deleted=True)))
    store.close()
    store, layers = reopen(tmp_path)
    store.close()
    assert set(layers) == {"bn"}
    assert layers["bn"].version == 4 and torch.equal(layers["bn"].state["running_mean"], torch.full((3,), 4.0))


def test_truncated_log_drops_only_the_torn_record(tmp_path, caplog):
    store, _ = reopen(tmp_path)
    for v in range(3):
        store.wait_durable(store.append(record(v)))
    store.close()
    wal = tmp_path / files(tmp_path, ".log")[-1]
    wal.write_bytes(wal.read_bytes()[:-7])
    store, layers = reopen(tmp_path)
    store.close()
    assert layers["bn"].version == 1
    assert "truncated" in caplog.text


def test_bit_flip_in_log_skips_that_record(tmp_path, caplog):
    store, _ = reopen(tmp_path)
    for v in range(3):
        store.wait_durable(store.append(record(v)))
    store.close()
    wal = tmp_path / files(tmp_path, ".log")[-1]
    data = bytearray(wal.read_bytes())
    data[-5] ^= 0x10  # inside the last record's tensor bytes
    wal.write_bytes(bytes(data))
    store, layers = reopen(tmp_path)
    store.close()
    assert layers["bn"].version == 1  # the damaged record is never loaded as valid
    assert "checksum mismatch" in caplog.text


def test_damaged_snapshot_falls_back_to_previous_generation(tmp_path, caplog):
    store, _ = reopen(tmp_path)
    store.wait_durable(store.append(record(1)))
    store.close()
    store, _ = reopen(tmp_path)  # folds the log into a new snapshot
    store.wait_durable(store.append(record(2)))
    store.close()
    newest = tmp_path / files(tmp_path, ".nss")[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    store, layers = reopen(tmp_path)
    store.close()
    assert layers["bn"].version == 2
    assert "damaged" in caplog.text and files(tmp_path, ".damaged")


def test_truncated_snapshot_is_detected(tmp_path, caplog):
    store, _ = reopen(tmp_path)
    store.wait_durable(store.append(record(1)))
    store.close()
    store, _ = reopen(tmp_path)
    store.close()
    newest = tmp_path / files(tmp_path, ".nss")[-1]
    newest.write_bytes(newest.read_bytes()[:-3])
    store, layers = reopen(tmp_path)
    store.close()
    assert layers["bn"].version == 1
    assert "damaged" in caplog.text


def test_group_commit_shares_fsyncs(tmp_path, monkeypatch):
    store, _ = reopen(tmp_path, durability="always")
    calls = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    barrier = threading.Barrier(8)

    def writer(i):
        barrier.wait()
        for v in range(20):
            store.wait_durable(store.append(record(v, name=f"l{i}")))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    store.close()
    assert len(calls) < 160  # fewer fsyncs than acknowledged writes
    _, layers = reopen(tmp_path)
    assert all(layers[f"l{i}"].version == 19 for i in range(8))


@pytest.mark.parametrize("durability", ["interval", "none"])
def test_other_durability_modes_persist_on_clean_close(tmp_path, durability):
    store, _ = reopen(tmp_path, durability=durability, interval_seconds=0.05)
    store.wait_durable(store.append(record(3)))
    store.close()
    _, layers = reopen(tmp_path)
    assert layers["bn"].version == 3


def test_unknown_durability_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="durability"):
        DiskStore(str(tmp_path), durability="sometimes")
