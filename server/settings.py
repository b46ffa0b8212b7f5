"""Server settings: defaults, overridden by NORMSERVE_* environment variables, overridden
by command-line flags. Passed to the server explicitly; nothing reads them globally."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

# Big enough for a (32, 3, 224, 224) float32 batch (~19 MB) with room to spare.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# gRPC takes message sizes as C ints; thread counts beyond these only exhaust the host.
_UPPER_BOUNDS = {
    "max_message_bytes": 2**31 - 1,
    "max_tensor_elements": 2**40,
    "max_tensor_rank": 8,
    "max_layers": 10**7,
    "max_workers": 4096,
    "max_layer_state_bytes": 2**30,
    "max_concurrent_rpcs": 2**20,
}


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_tensor_elements: int = 1 << 25
    max_tensor_rank: int = 8
    max_layers: int = 10_000
    max_workers: int = 32
    max_streams: int = 0
    max_layer_state_bytes: int = 32 * 1024 * 1024
    grace_seconds: float = 10.0
    drain_seconds: float = 0.0
    torch_threads: int = 1
    metrics_max_labelled_layers: int = 100
    log_level: str = "INFO"
    log_format: str = "text"
    state_dir: str = ""
    durability: str = "always"
    flush_interval_seconds: float = 1.0
    idempotency_window: int = 1024
    store: str = ""
    store_prefix: str = "normserve"
    store_refresh_seconds: float = 0.5
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tokens_file: str = ""
    max_concurrent_rpcs: int = 256
    stream_idle_seconds: float = 300.0
    device: str = "auto"
    batching: str = "off"
    batch_max_size: int = 64
    batch_max_delay_ms: float = 0.0
    max_shm_regions: int = 256
    max_shm_bytes: int = 4 * 1024**3
    shm_lease_seconds: float = 60.0

    HELP = {
        "host": "address to listen on for gRPC (use 0.0.0.0 or :: to listen on all interfaces)",
        "port": "gRPC port; 0 picks a free port (the bound port is logged)",
        "metrics_host": "address of the Prometheus /metrics HTTP server",
        "metrics_port": "Prometheus /metrics port; 0 picks a free port, -1 disables",
        "max_message_bytes": "largest gRPC message accepted or sent",
        "max_tensor_elements": "largest tensor (elements) accepted",
        "max_tensor_rank": "most dims of an input tensor (1-8)",
        "max_layers": "most layers the server keeps",
        "max_workers": "gRPC worker threads (each open stream holds one)",
        "max_streams": "open NormalizeStream(Packed) calls at once, more get RESOURCE_EXHAUSTED (0: half of "
        "max_workers); below max_workers so unary calls always find a thread",
        "max_layer_state_bytes": "largest state one layer may have (capped at half of max_message_bytes "
        "so GetState/LoadState fit in a message)",
        "grace_seconds": "on SIGTERM/SIGINT, time in-flight requests get to finish",
        "drain_seconds": "on SIGTERM/SIGINT, time health reports NOT_SERVING while still serving, "
        "before new calls are refused (lets load balancers drain)",
        "torch_threads": "torch intra-op threads (0 keeps torch's default)",
        "metrics_max_labelled_layers": "cap on layers that get per-layer metric series",
        "log_level": "DEBUG, INFO, WARNING or ERROR (DEBUG logs one line per request)",
        "log_format": "text, or json for one JSON object per line",
        "state_dir": "where layer state is kept (empty: $XDG_DATA_HOME/normserve or "
        "~/.local/share/normserve; ':memory:' keeps nothing)",
        "durability": "always: a change is acknowledged once fsync'd (concurrent changes share "
        "fsyncs); interval: fsync every flush interval; none: never fsync",
        "flush_interval_seconds": "fsync period when durability is interval (the loss window on a crash)",
        "idempotency_window": "train request ids remembered per layer (retries of these are not re-applied)",
        "store": "where layer state lives: empty for the embedded store in state_dir, or a shared "
        "store for several replicas: redis://[user:password@]host:port/db (rediss:// for TLS, "
        "unix:///path.sock)",
        "store_prefix": "shared store: key prefix; replicas with the same store and prefix share layers",
        "store_refresh_seconds": "shared store: index re-read period; an eval reflects every change "
        "acknowledged more than 2x this earlier (usually milliseconds, through notifications)",
        "tls_cert": "PEM certificate chain: serve TLS (with tls_key)",
        "tls_key": "PEM private key for tls_cert",
        "tls_client_ca": "PEM CA bundle: require client certificates signed by it (mutual TLS)",
        "tokens_file": "JSON file of bearer tokens (SHA-256 digests) and roles; enables authentication; "
        "re-read on SIGHUP",
        "max_concurrent_rpcs": "calls in progress at once, streams included (more get RESOURCE_EXHAUSTED)",
        "stream_idle_seconds": "a stream that sends nothing for this long is cancelled (0: never)",
        "device": "where layers compute: cpu, cuda, cuda:N, or auto (cuda when available)",
        "batching": "on: concurrent eval requests on one layer may run in one forward (outputs are "
        "exactly those of solo runs; train is never batched); off: every request runs alone",
        "batch_max_size": "most samples (sum of dim 0) in one batched eval forward",
        "batch_max_delay_ms": "how long a batch formed while the layer was busy may wait for more "
        "requests (0: only those already queued; a request at an idle layer never waits)",
        "max_shm_regions": "most shared-memory regions registered at once (0 disables shared memory)",
        "max_shm_bytes": "most bytes of shared memory mapped at once, all regions together",
        "shm_lease_seconds": "longest lease of a shared-memory region: it is unmapped this long after its "
        "last registration or use (how soon a vanished client's regions are released)",
    }

    @property
    def stream_limit(self) -> int:
        return self.max_streams or self.max_workers // 2

    @property
    def layer_state_limit(self) -> int:
        return min(self.max_layer_state_bytes, self.max_message_bytes // 2)

    @property
    def resolved_state_dir(self) -> str:
        """The state directory, with the XDG default applied (':memory:' passes through)."""
        if self.state_dir:
            return self.state_dir
        data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        return os.path.join(data_home, "normserve")

    @classmethod
    def env_name(cls, field: str) -> str:
        return "NORMSERVE_" + field.upper()

    @classmethod
    def load(cls, overrides: Optional[Mapping[str, Any]] = None, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        """Defaults < environment < overrides (None values in overrides are ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is not None:
                try:
                    values[f.name] = type(f.default)(raw)
                except ValueError:
                    raise ValueError(f"{cls.env_name(f.name)}={raw!r} is not a valid {type(f.default).__name__}") from None
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("port", "metrics_port"):
            if not -1 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535] (or -1 to disable metrics)")
        if self.port < 0:
            raise ValueError("port must be in [0, 65535]")
        for name, top in _UPPER_BOUNDS.items():
            if not 1 <= getattr(self, name) <= top:
                raise ValueError(f"{name} must be in [1, {top}], got {getattr(self, name)}")
        if self.max_streams < 0 or (self.max_streams and self.max_streams >= self.max_workers):
            raise ValueError(f"max_streams must be in [0, max_workers={self.max_workers}), got {self.max_streams}")
        for name in ("grace_seconds", "drain_seconds"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("torch_threads", "metrics_max_labelled_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.torch_threads > 256:
            raise ValueError(f"torch_threads must be at most 256, got {self.torch_threads}")
        if self.durability not in ("always", "interval", "none"):
            raise ValueError(f"durability must be always, interval or none, got {self.durability!r}")
        if not math.isfinite(self.flush_interval_seconds) or self.flush_interval_seconds <= 0:
            raise ValueError(f"flush_interval_seconds must be a finite number > 0, got {self.flush_interval_seconds}")
        if self.store and not re.match(r"(redis|rediss|unix)://", self.store):
            scheme = self.store.partition(":")[0][:20]  # never echo the URL: it may hold a password
            raise ValueError(
                f"store must be empty (embedded) or a redis://, rediss:// or unix:// URL, got one starting {scheme!r}"
            )
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", self.store_prefix):
            raise ValueError(f"store_prefix must be 1-64 letters, digits or . _ : -, got {self.store_prefix!r}")
        if not math.isfinite(self.store_refresh_seconds) or not 0.01 <= self.store_refresh_seconds <= 60:
            raise ValueError(f"store_refresh_seconds must be in [0.01, 60], got {self.store_refresh_seconds}")
        if self.idempotency_window < 0:
            raise ValueError("idempotency_window must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.max_concurrent_rpcs <= self.stream_limit:
            raise ValueError(f"max_concurrent_rpcs ({self.max_concurrent_rpcs}) must exceed the stream limit ({self.stream_limit})")
        if not math.isfinite(self.stream_idle_seconds) or self.stream_idle_seconds < 0:
            raise ValueError(f"stream_idle_seconds must be a finite number >= 0, got {self.stream_idle_seconds}")
        if not 0 <= self.max_shm_regions <= 1 << 16:
            raise ValueError(f"max_shm_regions must be in [0, {1 << 16}] (0 disables shared memory), got {self.max_shm_regions}")
        if not 1 <= self.max_shm_bytes <= 1 << 48:
            raise ValueError(f"max_shm_bytes must be in [1, {1 << 48}], got {self.max_shm_bytes}")
        if not math.isfinite(self.shm_lease_seconds) or not 0 < self.shm_lease_seconds <= 86400:
            raise ValueError(f"shm_lease_seconds must be in (0, 86400], got {self.shm_lease_seconds}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.batching not in ("on", "off"):
            raise ValueError(f"batching must be on or off, got {self.batching!r}")
        if not 1 <= self.batch_max_size <= 1 << 20:
            raise ValueError(f"batch_max_size must be in [1, {1 << 20}], got {self.batch_max_size}")
        if not math.isfinite(self.batch_max_delay_ms) or not 0 <= self.batch_max_delay_ms <= 1000:
            raise ValueError(f"batch_max_delay_ms must be a number in [0, 1000], got {self.batch_max_delay_ms}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)
