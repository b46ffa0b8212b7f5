"""Assemble and run the server: gRPC (NormService, health, reflection) plus /metrics."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
import time
from concurrent import futures
from typing import Optional

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from normserve.client._proto import normserve_pb2 as pb

from . import logs
from .engine import (
    DiskStore,
    EvalBatching,
    RedisStore,
    Registry,
    SharedStore,
    StateDirInUse,
    StateStore,
    StoreUnavailable,
)
from .metrics import Metrics
from .settings import Settings
from .shm import SharedMemoryManager
from .transport.auth import Authorizer
from .transport.servicer import NormServicer, add_to_server

log = logging.getLogger("normserve")

MEMORY = ":memory:"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NormService"].full_name


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NormServer:
    """One server process's worth of state: registry, metrics, gRPC server."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = _state_store(settings)
        self.device = resolve_device(settings.device)
        self.layers = Registry(
            settings.max_layers, self.store, settings.idempotency_window, settings.layer_state_limit, self.device
        )
        self.metrics = Metrics(self.layers, settings.metrics_max_labelled_layers)
        self.health = health.HealthServicer()
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self._stopped = threading.Event()
        limit = settings.max_message_bytes
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="normserve-rpc"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Never share a port with another process (a stale server would steal calls).
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self.auth = Authorizer(settings.tokens_file)
        self.batching = (
            EvalBatching(settings.batch_max_size, settings.batch_max_delay_ms / 1e3, self.metrics.observe_eval_batch)
            if settings.batching == "on"
            else None
        )
        self.shm = SharedMemoryManager(settings.max_shm_regions, settings.max_shm_bytes, settings.shm_lease_seconds)
        self.metrics.watch_shared_memory(self.shm.region_count, self.shm.mapped_bytes)
        servicer = NormServicer(
            self.layers,
            self.metrics,
            self.auth,
            settings.max_tensor_elements,
            settings.stream_limit,
            settings.stream_idle_seconds,
            settings.max_tensor_rank,
            self.batching,
            self.shm,
        )
        add_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )

    def start(self) -> None:
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        restored = self.layers.recover()
        where = (
            f"shared store {self.store.url} (prefix {s.store_prefix!r}, staleness bound "
            f"{2 * s.store_refresh_seconds:g}s)"
            if s.store
            else "memory only"
            if s.resolved_state_dir == MEMORY
            else f"{s.resolved_state_dir}, durability={s.durability}"
        )
        log.info("state: %s; %d layer(s) restored; layers compute on %s", where, restored, self.device)
        if self.batching is None:
            log.info("eval batching: off")
        else:
            log.info("eval batching: on (at most %d samples per forward, max delay %g ms)",
                     s.batch_max_size, s.batch_max_delay_ms)
        address = host_port(s.host, s.port)
        credentials = _server_credentials(s)
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"could not bind gRPC to {host_port(s.host, s.port)}")
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(s.metrics_host, s.metrics_port)
        self._server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if isinstance(self.store, SharedStore):
            threading.Thread(
                target=self._follow_store_health, args=(self.store,), name="normserve-store-health", daemon=True
            ).start()
        metrics_at = (
            f"http://{host_port(s.metrics_host, self.metrics_port)}/metrics" if self.metrics_port is not None else "off"
        )
        security = ("mutual TLS" if s.tls_client_ca else "TLS" if s.tls_cert else "plaintext") + (
            ", bearer tokens" if self.auth.enabled else ", no authentication"
        )
        log.info("normserve serving grpc=%s metrics=%s (%s)", host_port(s.host, self.port), metrics_at, security)
        if not _is_loopback(s.host) and not (s.tls_cert and self.auth.enabled):
            log.warning(
                "LISTENING ON %s WITHOUT %s: anyone who can reach this address can read and change every "
                "layer. Set --tls-cert/--tls-key and --tokens-file.",
                s.host, " OR ".join(w for w, on in (("TLS", s.tls_cert), ("TOKENS", self.auth.enabled)) if not on),
            )

    def _follow_store_health(self, store: SharedStore) -> None:
        """The health of NormService follows the shared store: NOT_SERVING while this
        replica's copy is past the staleness bound (take it out of rotation: readiness),
        while "" stays SERVING (liveness: restarting the replica would not bring Redis back)."""
        serving = True
        while not self._stopped.wait(store.refresh_seconds / 2):
            fresh = store.sync_age() <= 2 * store.refresh_seconds
            if fresh != serving:
                serving = fresh
                status = health_pb2.HealthCheckResponse.SERVING if fresh else health_pb2.HealthCheckResponse.NOT_SERVING
                self.health.set(SERVICE_NAME, status)
                log.warning("%s health: %s (shared store %s)", SERVICE_NAME, "SERVING" if fresh else "NOT_SERVING",
                            "reachable" if fresh else "unreachable, copy past the staleness bound")

    def stop(self, grace: Optional[float] = None) -> None:
        """Graceful: health NOT_SERVING (still serving for `drain_seconds`, so load balancers
        can notice), then refuse new calls (UNAVAILABLE) and let in-flight ones finish within
        the grace period; finally flush the state store."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("shutting down (drain %.1fs, grace %.1fs)", self.settings.drain_seconds, grace)
        self.health.enter_graceful_shutdown()
        if self.settings.drain_seconds:
            time.sleep(self.settings.drain_seconds)
        self._server.stop(grace).wait()
        self.shm.close()  # no call is running: unmap every client's region
        self.store.close()  # everything acknowledged is on disk now
        self.metrics.stop_http()
        self._stopped.set()
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()


def _state_store(settings: Settings) -> StateStore:
    if settings.store:
        return RedisStore(settings.store, settings.store_prefix, settings.store_refresh_seconds)
    state_dir = settings.resolved_state_dir
    if state_dir == MEMORY:
        return StateStore()
    return DiskStore(state_dir, settings.durability, settings.flush_interval_seconds, id_window=settings.idempotency_window)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; an explicit cuda must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA device")
    return device


def _server_credentials(s: Settings) -> Optional[grpc.ServerCredentials]:
    if not s.tls_cert:
        return None

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    client_ca = read(s.tls_client_ca) if s.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(s.tls_key), read(s.tls_cert))], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; returns the exit status."""
    logs.configure(settings.log_level, settings.log_format)
    try:
        server = NormServer(settings)
        server.start()
    except (StateDirInUse, StoreUnavailable, OSError, RuntimeError, ValueError) as e:
        log.error("cannot start: %s", e)
        return 1
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # SIGHUP re-reads the tokens file; connections and calls are untouched.
    signal.signal(signal.SIGHUP, lambda _signum, _frame: server.auth.reload())
    while not stop_requested.wait(0.5):
        pass
    server.stop()
    return 0
