"""Durable layer state: an append-only log of full-state records plus periodic snapshots.

Every change of a layer appends one record holding that layer's complete state (spec,
state_dict tensors, version, recent request ids), so recovery only needs the newest valid
record per layer: a damaged record costs at most the updates it carried, never the
consistency of what came before it.

On disk (`state_dir`):
    snapshot-<gen>.nss   all layers at the moment generation <gen> began (atomic write)
    wal-<gen>.log        records appended since then
Recovery loads the newest valid snapshot and replays the logs of its generation and any
later one. The previous generation's files are kept until the next compaction, so a
damaged newest snapshot falls back to the previous one plus both logs.

Record framing: MAGIC | u32 payload length | u32 CRC-32 of payload | payload, where the
payload is u32 header length | JSON header | tensor bytes. A record whose CRC does not
match is reported and skipped; after a damaged length the reader resynchronizes on MAGIC.

Durability (`always` | `interval` | `none`): with `always` a writer waits until its record
is fsync'd; concurrent writers share one fsync (group commit). `interval` fsyncs in the
background every `interval_seconds`; `none` never fsyncs (the OS writes eventually).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

log = logging.getLogger("normserve.store")

MAGIC = b"NSR1"
_FRAME = struct.Struct("<4sII")
_U32 = struct.Struct("<I")
DURABILITY_MODES = ("always", "interval", "none")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class LayerRecord:
    """A layer's complete durable state; `deleted` marks a deletion."""

    name: str
    kind: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    # Idempotency ids -> (version, num_batches_tracked) they produced, oldest first: the
    # layer's whole recent window when `full_ids`, else only the ids this change added.
    request_ids: tuple[tuple[str, int, int], ...] = ()
    full_ids: bool = True
    deleted: bool = False


def encode_record(record: LayerRecord) -> bytes:
    tensors = []
    blobs = []
    offset = 0
    for key, t in record.state.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            t = t.detach().to("cpu").contiguous()
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t.detach()).numpy().tobytes()
        tensors.append([key, _DTYPE_NAMES[t.dtype], list(t.shape), offset, len(raw)])
        blobs.append(raw)
        offset += len(raw)
    header = {
        "name": record.name,
        "kind": record.kind,
        "args": {k: list(v) if isinstance(v, tuple) else v for k, v in record.args.items()},
        "version": record.version,
        "tensors": tensors,
        "request_ids": [list(r) for r in record.request_ids],
        "full_ids": record.full_ids,
        "deleted": record.deleted,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    payload = b"".join([_U32.pack(len(head)), head, *blobs])
    return _FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> LayerRecord:
    (head_len,) = _U32.unpack_from(payload, 0)
    header = json.loads(payload[4 : 4 + head_len])
    body = memoryview(payload)[4 + head_len :]
    state = {}
    for key, dtype, shape, offset, nbytes in header["tensors"]:
        raw = bytes(body[offset : offset + nbytes])
        if dtype == "bfloat16":
            t = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16)
        else:
            t = torch.frombuffer(bytearray(raw), dtype=_DTYPES[dtype]) if raw else torch.empty(0, dtype=_DTYPES[dtype])
        state[key] = t.reshape(shape)
    args = dict(header["args"])
    if "normalized_shape" in args:
        args["normalized_shape"] = tuple(args["normalized_shape"])
    return LayerRecord(
        name=header["name"],
        kind=header["kind"],
        args=args,
        version=header["version"],
        state=state,
        request_ids=tuple(tuple(r) for r in header["request_ids"]),  # type: ignore[misc]
        full_ids=header["full_ids"],
        deleted=header["deleted"],
    )


@dataclass
class ReadReport:
    """What reading one file found: good records, and damage (for the log)."""

    records: list[LayerRecord] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    truncated: bool = False


def read_records(data: bytes) -> ReadReport:
    report = ReadReport()
    pos = 0
    while pos < len(data):
        if len(data) - pos < _FRAME.size:
            report.truncated = True
            break
        magic, length, crc = _FRAME.unpack_from(data, pos)
        start, end = pos + _FRAME.size, pos + _FRAME.size + length
        if magic != MAGIC:
            report.damaged.append(f"bad frame at byte {pos}")
        elif end > len(data):
            # Either a torn final write or a damaged length: look for a later record first.
            nxt = data.find(MAGIC, pos + 1)
            if nxt < 0:
                report.truncated = True
                break
            report.damaged.append(f"bad length at byte {pos}")
        elif zlib.crc32(data[start:end]) != crc:
            report.damaged.append(f"checksum mismatch in record at byte {pos}")
        else:
            try:
                report.records.append(_decode_payload(data[start:end]))
                pos = end
                continue
            except (ValueError, KeyError, TypeError, RuntimeError, struct.error) as e:
                report.damaged.append(f"undecodable record at byte {pos}: {e}")
        nxt = data.find(MAGIC, pos + 1)
        if nxt < 0:
            break
        pos = nxt
    return report


class StateDirInUse(RuntimeError):
    """Another process holds the state directory."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes) -> None:
    """tmp file, fsync, rename over `path`, fsync the directory."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


class StateStore:
    """Where layer state goes when it changes. This base keeps nothing (in-memory only)."""

    shared = False  # True: the store, not this process, holds the truth (see shared.py)

    def recover(self) -> list[LayerRecord]:
        return []

    def append(self, record: LayerRecord) -> Any:
        """Add a record; returns a ticket for `wait_durable`. Callers publish a change in
        memory first, then append its record, one layer's records in version order (under
        that layer's write lock)."""
        return None

    def wait_durable(self, ticket: Any) -> None:
        """Block until the record behind `ticket` is as durable as the mode promises."""

    def bind(self, collect: Callable[[], Iterable[LayerRecord]]) -> None:
        """Give the store a way to read every live layer's record, for compaction."""

    def close(self) -> None:
        """Flush everything and release files."""


class DiskStore(StateStore):
    """The embedded default: snapshots + write-ahead log in a local directory."""

    def __init__(
        self,
        state_dir: str,
        durability: str = "always",
        interval_seconds: float = 1.0,
        checkpoint_bytes: int = 64 * 1024 * 1024,
        id_window: int = 1024,
    ):
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {', '.join(DURABILITY_MODES)}, got {durability!r}")
        self.state_dir = os.path.abspath(state_dir)
        self.durability = durability
        self.interval_seconds = interval_seconds
        self.checkpoint_bytes = checkpoint_bytes
        self.id_window = id_window
        os.makedirs(self.state_dir, exist_ok=True)
        # One server per directory: two writers would interleave their logs.
        self._lock_file = open(os.path.join(self.state_dir, "LOCK"), "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StateDirInUse(f"state directory {self.state_dir} is in use by another normserve process") from None
        self._collect: Optional[Callable[[], Iterable[LayerRecord]]] = None
        self._compacting = threading.Event()
        self._append_lock = threading.Lock()
        self._sync_cond = threading.Condition()
        self._syncing = False
        self._fd: Optional[int] = None
        self._gen = 0
        self._written = 0  # bytes appended to the current log (the tickets)
        self._synced = 0
        self._closed = threading.Event()
        self._flusher: Optional[threading.Thread] = None

    # -- files ---------------------------------------------------------------------------
    def _path(self, kind: str, gen: int) -> str:
        return os.path.join(self.state_dir, f"{kind}-{gen:08d}.{'nss' if kind == 'snapshot' else 'log'}")

    def _generations(self, kind: str) -> list[int]:
        pattern = re.compile(rf"{kind}-(\d{{8}})\.(nss|log)$")
        return sorted(int(m.group(1)) for n in os.listdir(self.state_dir) if (m := pattern.match(n)))

    def _read(self, path: str) -> ReadReport:
        with open(path, "rb") as f:
            report = read_records(f.read())
        name = os.path.basename(path)
        for problem in report.damaged:
            log.error("state file %s is damaged (%s): that record is skipped, earlier state is used", name, problem)
        if report.truncated:
            log.warning("state file %s ends in a truncated record (an unfinished write); it is ignored", name)
        return report

    # -- recovery ------------------------------------------------------------------------
    def recover(self) -> list[LayerRecord]:
        """The newest valid state of every layer; opens a fresh log generation."""
        snapshots = self._generations("snapshot")
        logs = self._generations("wal")
        base: Optional[int] = None
        latest: dict[str, LayerRecord] = {}
        for gen in reversed(snapshots):
            report = self._read(self._path("snapshot", gen))
            if report.damaged or report.truncated or not report.records or report.records[-1].name != "":
                path = self._path("snapshot", gen)
                os.replace(path, path + ".damaged")  # kept for inspection, never read again
                log.error("snapshot %d is damaged (kept as %s.damaged); using the one before it", gen, path)
                continue
            base = gen
            latest = {r.name: r for r in report.records[:-1]}  # the last record is the end marker
            break
        if base is None and snapshots:
            log.error("no valid snapshot; rebuilding from the logs that remain")
        for gen in logs:
            if base is not None and gen <= base:
                continue  # already folded into the snapshot
            for record in self._read(self._path("wal", gen)).records:
                known = latest.get(record.name)
                if known is None or record.deleted or known.deleted or record.full_ids:
                    latest[record.name] = record
                elif record.version >= known.version:
                    ids = (known.request_ids + record.request_ids)[-self.id_window :]
                    latest[record.name] = dataclasses.replace(record, request_ids=ids, full_ids=True)
        live = [r for r in latest.values() if not r.deleted]
        self._gen = max(snapshots + logs, default=0) + 1
        self._open_log()
        # Fold everything into a fresh snapshot so damaged files are not read again.
        self.checkpoint(lambda: live)
        log.info("recovered %d layer(s) from %s", len(live), self.state_dir)
        return live

    def _open_log(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self._path("wal", self._gen), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.state_dir)
        self._written = self._synced = 0
        if self.durability == "interval" and self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_periodically, name="normserve-flush", daemon=True)
            self._flusher.start()

    # -- writing -------------------------------------------------------------------------
    def append(self, record: LayerRecord) -> Any:
        data = encode_record(record)
        with self._append_lock:
            if self._fd is None:
                raise RuntimeError("state store is closed")
            os.write(self._fd, data)
            self._written += len(data)
            ticket = self._gen, self._written
            if self._written >= self.checkpoint_bytes and not self._compacting.is_set():
                self._compacting.set()
                threading.Thread(target=self._compact, name="normserve-compact", daemon=True).start()
            return ticket

    def wait_durable(self, ticket: Any) -> None:
        if self.durability != "always":
            return
        gen, position = ticket
        with self._sync_cond:
            while gen == self._gen and self._synced < position:
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                # Leader: one fsync covers every record written so far (group commit).
                self._syncing = True
                target, fd = self._written, self._fd
                self._sync_cond.release()
                try:
                    os.fsync(fd)  # type: ignore[arg-type]
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._synced = max(self._synced, target)
                    self._sync_cond.notify_all()

    def _flush_periodically(self) -> None:
        while not self._closed.wait(self.interval_seconds):
            self.sync()

    def sync(self) -> None:
        with self._sync_cond:
            if self._fd is not None and self._synced < self._written:
                os.fsync(self._fd)
                self._synced = self._written

    def bind(self, collect: Callable[[], Iterable[LayerRecord]]) -> None:
        self._collect = collect

    def _compact(self) -> None:
        try:
            if self._collect is not None:
                self.checkpoint(self._collect)
        except Exception:  # the log keeps everything; compaction is retried later
            log.exception("compacting the state log failed")
        finally:
            self._compacting.clear()

    def checkpoint(self, collect: Callable[[], Iterable[LayerRecord]]) -> None:
        """Write snapshot-<gen> (the state after log <gen>) and start log <gen>+1. The
        snapshot before it and the logs after that one are kept as the fallback; older
        files are dropped."""
        with self._append_lock, self._sync_cond:
            while self._syncing:
                self._sync_cond.wait()
            if self._fd is None:
                return  # closed meanwhile
            records = list(collect())
            snapshot = b"".join(encode_record(r) for r in records) + encode_record(LayerRecord(name=""))
            write_atomically(self._path("snapshot", self._gen), snapshot)
            self._gen += 1
            self._open_log()
        snapshots = self._generations("snapshot")
        if len(snapshots) >= 2:
            fallback = snapshots[-2]
            for gen in snapshots[:-2]:
                os.unlink(self._path("snapshot", gen))
            for gen in self._generations("wal"):
                if gen <= fallback:
                    os.unlink(self._path("wal", gen))

    def close(self) -> None:
        self._closed.set()
        with self._append_lock, self._sync_cond:
            while self._syncing:
                self._sync_cond.wait()
            if self._fd is not None:
                if self.durability != "none":
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
        self._lock_file.close()
