"""Layer state in Redis, shared by every replica that points at the same Redis and prefix.

Keys (P = the prefix, default "normserve"):
    P:index          hash  name -> "<incarnation>:<version>"   (the list of layers)
    P:layer:<name>   hash  inc -> incarnation, record -> the layer's full record
                           (the same CRC-checked encoding as the embedded store's log)
    P:ids:<name>     hash  train request id -> "<version>:<num_batches_tracked>"
    P:idq:<name>     list  those ids, oldest first (trimmed to the idempotency window)
    P:incarnations   counter, one number per layer creation
    P:epoch          random id set when the index is first read: a new one means the data
                     was lost (Redis emptied or replaced), and replicas reload everything
    P:changes        pub/sub channel: "<name>\\t<incarnation>\\t<version or -1>"

Every change is one Lua script, which Redis runs atomically: the version check, the id
check, the write and the notification can't interleave with another replica's. Redis is
the single writer, so updates are linearizable; acknowledged means "in Redis", and how
durable that is is Redis's configuration (appendonly yes + appendfsync always|everysec).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import LayerExists, LayerNotFound, LayerUnreadable, LimitExceeded, StoreUnavailable
from .shared import DELETED, AlreadyApplied, Index, SharedStore, StaleState, Superseded
from .store import LayerRecord, encode_record, read_records

log = logging.getLogger("normserve.store")

_CREATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return {'exists'} end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return {'limit'} end
local inc = redis.call('INCR', KEYS[5])
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('HSET', KEYS[2], 'inc', inc, 'record', ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], inc .. ':' .. ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[1] .. '\\t' .. inc .. '\\t' .. ARGV[4])
return {'ok', inc}
"""

_COMMIT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return {'gone'} end
local sep = string.find(cur, ':', 1, true)
local inc = string.sub(cur, 1, sep - 1)
if inc ~= ARGV[2] then return {'recreated'} end
if ARGV[5] ~= '' then
  local done = redis.call('HGET', KEYS[3], ARGV[5])
  if done then return {'applied', done} end
end
local version = tonumber(string.sub(cur, sep + 1))
if version ~= tonumber(ARGV[3]) then return {'stale', redis.call('HGET', KEYS[2], 'record')} end
version = version + 1
redis.call('HSET', KEYS[2], 'record', ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], inc .. ':' .. version)
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[5], version .. ':' .. ARGV[6])
  redis.call('RPUSH', KEYS[4], ARGV[5])
  while redis.call('LLEN', KEYS[4]) > tonumber(ARGV[7]) do
    redis.call('HDEL', KEYS[3], redis.call('LPOP', KEYS[4]))
  end
end
redis.call('PUBLISH', ARGV[8], ARGV[1] .. '\\t' .. inc .. '\\t' .. version)
return {'ok'}
"""

_DELETE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur or string.sub(cur, 1, string.find(cur, ':', 1, true) - 1) ~= ARGV[2] then return {'gone'} end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1] .. '\\t' .. ARGV[2] .. '\\t-1')
return {'ok'}
"""

_INDEX = """
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[3], epoch)
end
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2]) or '0', epoch}
"""


def redacted(url: str) -> str:
    """The URL without its password (in the user part or as a query argument)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" not in netloc and "password" not in parts.query.lower():
        return url
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    query = urlencode(
        [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)],
        safe="*",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _decode(data: Optional[bytes], name: str) -> LayerRecord:
    if data is None:  # e.g. evicted: run Redis with maxmemory-policy noeviction
        raise LayerUnreadable(f"layer {name!r}: its record is missing from Redis (evicted?)")
    report = read_records(data)
    if len(report.records) != 1:
        raise LayerUnreadable(f"layer {name!r}: its record in Redis is damaged: {report.damaged or 'empty'}")
    return report.records[0]


def _pair(value: bytes) -> tuple[int, int]:
    a, _, b = value.partition(b":")
    return int(a), int(b)


class RedisStore(SharedStore):
    def __init__(self, url: str, prefix: str = "normserve", refresh_seconds: float = 0.5):
        try:
            import redis
        except ImportError:
            raise RuntimeError("--store redis://... needs the redis package: pip install 'normserve[server]'") from None
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.url = redacted(url)  # for messages and logs
        self.refresh_seconds = refresh_seconds
        # Timeouts bound every call (a URL may set its own: ?socket_timeout=...).
        self._redis = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=30)
        self._index_key = f"{prefix}:index"
        self._top_key = f"{prefix}:incarnations"
        self._channel = f"{prefix}:changes"
        self._epoch_key = f"{prefix}:epoch"
        self._prefix = prefix
        self._create = self._redis.register_script(_CREATE)
        self._commit = self._redis.register_script(_COMMIT)
        self._delete = self._redis.register_script(_DELETE)
        self._index = self._redis.register_script(_INDEX)
        self._synced_at = -float("inf")
        self._count_lock = threading.Lock()
        self._closed = threading.Event()
        self._follower: Optional[threading.Thread] = None

    def _keys(self, name: str) -> list[str]:
        p = self._prefix
        return [self._index_key, f"{p}:layer:{name}", f"{p}:ids:{name}", f"{p}:idq:{name}"]

    def _call(self, script: Any, keys: list[str], args: list[Any], what: str) -> list[Any]:
        try:
            return list(script(keys=keys, args=args))
        except self._errors as e:
            raise StoreUnavailable(f"state store {self.url} unavailable during {what}: {e}") from None

    # -- changes -----------------------------------------------------------------------
    def create(self, record: LayerRecord, max_layers: int) -> int:
        args = [record.name, encode_record(record), max_layers, record.version, self._channel]
        reply = self._call(self._create, [*self._keys(record.name), self._top_key], args, "create")
        if reply[0] == b"exists":
            raise LayerExists(f"layer {record.name!r} already exists")
        if reply[0] == b"limit":
            raise LimitExceeded(f"too many layers: the limit is max_layers={max_layers} (across all replicas)")
        return int(reply[1])

    def commit(self, record: LayerRecord, incarnation: int, base_version: int, request_id: str, window: int) -> None:
        nbt = record.state.get("num_batches_tracked")
        args = [
            record.name, incarnation, base_version, encode_record(record), request_id,
            int(nbt) if nbt is not None else 0, window, self._channel,
        ]  # fmt: skip
        # A lost reply leaves the outcome unknown: the caller retries with the same id.
        reply = self._call(self._commit, self._keys(record.name), args, "commit (outcome unknown)")
        if reply[0] == b"ok":
            return
        if reply[0] == b"applied":
            raise AlreadyApplied(*_pair(reply[1]))
        if reply[0] == b"recreated":
            raise Superseded(
                f"layer {record.name!r} was deleted and created again on another replica while this "
                "request ran; nothing was applied, retry"
            )
        if reply[0] == b"stale":
            with self._count_lock:
                self.conflicts += 1
            raise StaleState(_decode(reply[1], record.name))
        raise LayerNotFound(f"layer {record.name!r} not found (deleted)")

    def delete(self, name: str, incarnation: int) -> None:
        reply = self._call(self._delete, self._keys(name), [name, incarnation, self._channel], "delete")
        if reply[0] != b"ok":
            raise LayerNotFound(f"layer {name!r} not found")

    # -- reading -----------------------------------------------------------------------
    def fetch(self, name: str) -> Optional[tuple[int, LayerRecord]]:
        try:
            inc, data = self._redis.hmget(self._keys(name)[1], ["inc", "record"])
        except self._errors as e:
            raise StoreUnavailable(f"state store {self.url} unavailable: {e}") from None
        if inc is None:
            return None
        return int(inc), _decode(data, name)

    def index(self) -> tuple[Index, int, str]:
        keys = [self._index_key, self._top_key, self._epoch_key]
        flat, top, epoch = self._call(self._index, keys, [uuid.uuid4().hex], "index read")
        it = iter(flat)
        return {name.decode(): _pair(value) for name, value in zip(it, it)}, int(top), epoch.decode()

    def recover(self) -> list[LayerRecord]:
        return []  # the registry reads the index and fetches what it needs

    def mark_synced(self, at: float) -> None:
        self._synced_at = max(self._synced_at, at)

    def sync_age(self) -> float:
        return time.monotonic() - self._synced_at

    def check_fresh(self) -> None:
        age = self.sync_age()
        if age > 2 * self.refresh_seconds:
            raise StoreUnavailable(
                f"state store {self.url} not reached for {age:.1f}s: this replica's copy may be stale "
                f"(bound: 2 x store_refresh_seconds = {2 * self.refresh_seconds:g}s)"
            )

    # -- following other replicas ------------------------------------------------------
    def watch(self, on_change: Callable[[str, int, int], None], on_index: Callable[[Index, int, str], None]) -> None:
        self._follower = threading.Thread(
            target=self._follow, args=(on_change, on_index), name="normserve-store-follower", daemon=True
        )
        self._follower.start()

    def _follow(self, on_change: Callable[[str, int, int], None], on_index: Callable[[Index, int, str], None]) -> None:
        pubsub = None
        next_index = 0.0
        failing = False
        while not self._closed.is_set():
            try:
                if pubsub is None:
                    # Subscribe first, then read the index: no change can fall between.
                    pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self._channel)
                    next_index = 0.0
                if time.monotonic() >= next_index:
                    started = time.monotonic()
                    on_index(*self.index())
                    self.mark_synced(started)
                    next_index = started + self.refresh_seconds
                    if failing:
                        log.info("state store %s reachable again", self.url)
                        failing = False
                # Drain what arrived; apply only each layer's newest notification.
                latest: dict[tuple[str, int], int] = {}
                message = pubsub.get_message(timeout=max(0.0, next_index - time.monotonic()))
                while message is not None:
                    try:
                        name, inc, version = message["data"].decode().split("\t")
                        key, v = (name, int(inc)), int(version)
                    except (ValueError, UnicodeDecodeError):
                        log.warning("ignoring a malformed notification on %s: %r", self._channel, message["data"][:100])
                    else:
                        latest[key] = DELETED if DELETED in (v, latest.get(key)) else max(v, latest.get(key, v))
                    message = pubsub.get_message(timeout=0)
                for (name, inc), version in latest.items():
                    on_change(name, inc, version)
            except (*self._errors, StoreUnavailable) as e:
                if not failing:
                    log.warning("state store %s unreachable (%s); retrying", self.url, e)
                    failing = True
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except self._errors:
                        pass
                pubsub = None
                self._closed.wait(min(0.2, self.refresh_seconds))
            except Exception:
                log.exception("following the state store failed; retrying")
                self._closed.wait(self.refresh_seconds)
        if pubsub is not None:
            pubsub.close()

    def close(self) -> None:
        self._closed.set()
        if self._follower is not None:
            self._follower.join(timeout=5)
        self._redis.close()
