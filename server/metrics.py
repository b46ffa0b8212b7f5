"""Prometheus metrics, on their own registry and HTTP port.

Names carry the `normserve_` prefix and base units. Request latency is a histogram by
method, mode and status code; stream messages are measured one by one (method
"NormalizeStream"). Per-layer series are capped at `max_labelled_layers` (first layers by
name) so cardinality stays bounded.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client import Gauge as PromGauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server

from .engine import KINDS, ForwardResult, Registry
from .metric_types import Collector, Counter, Gauge, Histogram

# ~50 us to 10 s.
LATENCY_BUCKETS = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DRIFT_BUCKETS = (0.01, 0.03, 0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0)

# Per layer, never per channel: cardinality stays bounded by the layer cap.
_DRIFT_STATS = {
    "running_mean_avg": "mean over channels of the running mean",
    "running_mean_l2": "L2 norm of the running mean",
    "running_var_avg": "mean over channels of the running variance",
}


class _LayerCollector:
    """Layer gauges computed at scrape time from the registry (never stale)."""

    def __init__(self, layers: Registry, max_labelled_layers: int):
        self._layers = layers
        self._cap = max_labelled_layers

    def collect(self) -> Iterable[GaugeMetricFamily]:
        layers = self._layers.list(fresh=False)
        by_kind = GaugeMetricFamily("normserve_layers", "Layers by kind", labels=["kind"])
        counts = {k: 0 for k in KINDS}
        for layer in layers:
            counts[layer.kind] += 1
        for kind, n in counts.items():
            by_kind.add_metric([kind], n)
        yield by_kind
        tracked = GaugeMetricFamily(
            "normserve_layer_batches_tracked",
            f"num_batches_tracked per layer (first {self._cap} layers by name)",
            labels=["layer", "kind"],
        )
        version = GaugeMetricFamily(
            "normserve_layer_state_version",
            f"State version per layer (first {self._cap} layers by name)",
            labels=["layer", "kind"],
        )
        drift = {
            stat: GaugeMetricFamily(
                f"normserve_layer_{stat}",
                f"Drift summary: {help_text} (first {self._cap} layers by name)",
                labels=["layer", "kind"],
            )
            for stat, help_text in _DRIFT_STATS.items()
        }
        for layer in layers[: self._cap]:
            labels = [layer.name, layer.kind]
            v = layer.version
            tracked.add_metric(labels, v.num_batches_tracked)
            version.add_metric(labels, v.version)
            if layer.has_running_stats:
                state, _ = layer.state_dict()
                mean = state["running_mean"].double()
                var = state["running_var"].double()
                drift["running_mean_avg"].add_metric(labels, float(mean.mean()))
                drift["running_mean_l2"].add_metric(labels, float(mean.norm()))
                drift["running_var_avg"].add_metric(labels, float(var.mean()))
        yield tracked
        yield version
        yield from drift.values()
        shared = self._layers.shared
        if shared is not None:
            yield GaugeMetricFamily(
                "normserve_store_sync_age_seconds",
                "Shared store: seconds since this replica last read the store's index "
                "(eval requests are refused above 2 x store_refresh_seconds)",
                value=shared.sync_age(),
            )
            yield CounterMetricFamily(
                "normserve_store_conflicts",
                "Shared store: commits refused because another replica changed the layer first "
                "(the update was recomputed on the newer state)",
                value=shared.conflicts,
            )


class Metrics:
    def __init__(self, layers: Registry, max_labelled_layers: int = 100):
        self.registry = CollectorRegistry()
        r = self.registry
        # The per-request metrics are the cheap kind (metric_types); scrape-time gauges
        # stay prometheus_client's.
        fast = Collector()
        self.request_duration = fast.add(Histogram(
            "normserve_request_duration_seconds",
            "Request latency (stream messages counted one by one)",
            ["method", "mode", "code"],
            LATENCY_BUCKETS,
        ))
        self.requests = fast.add(Counter(
            "normserve_requests", "Requests (stream messages one by one)", ["method", "mode", "code"]
        ))
        self.compute_duration = fast.add(Histogram(
            "normserve_compute_duration_seconds", "Time spent in the layer computation", ["kind", "mode"], LATENCY_BUCKETS
        ))
        self.in_flight = fast.add(Gauge("normserve_in_flight_requests", "Requests being handled", ["method"]))
        self.tensor_bytes = fast.add(Counter("normserve_tensor_bytes", "Tensor payload bytes", ["direction"]))
        self.stream_messages = fast.add(Counter(
            "normserve_stream_messages", "Stream requests received and answers sent (a pack counts its requests)", ["direction"]
        ))
        self.open_streams = fast.add(Gauge("normserve_open_streams", "Open NormalizeStream and NormalizeStreamPacked calls"))
        self.pack_requests = fast.add(Histogram(
            "normserve_pack_requests", "Requests per NormalizeStreamPacked message", [], BATCH_BUCKETS
        ))
        self.queue_duration = fast.add(Histogram(
            "normserve_queue_duration_seconds",
            "Time a request waited before its computation (train: for the layer's write lock)",
            ["kind", "mode"],
            LATENCY_BUCKETS,
        ))
        self.shm_bytes = fast.add(Counter(
            "normserve_shared_memory_bytes",
            "Tensor bytes read from (in) or written to (out) shared-memory regions",
            ["direction"],
        ))
        self.shm_regions = PromGauge("normserve_shared_memory_regions", "Registered shared-memory regions", registry=r)
        self.shm_mapped = PromGauge(
            "normserve_shared_memory_mapped_bytes", "Bytes of shared memory mapped, all regions together", registry=r
        )
        self.batch_size = fast.add(Histogram(
            "normserve_batch_size", "Samples per computed batch (the leading dimension)", ["mode"], BATCH_BUCKETS
        ))
        self.batch_queue_duration = fast.add(Histogram(
            "normserve_batch_queue_duration_seconds",
            "Time an eval request waited in its layer's batching queue before its forward started",
            ["kind"],
            LATENCY_BUCKETS,
        ))
        self.batch_requests = fast.add(Histogram(
            "normserve_batch_requests",
            "Eval requests computed together in one forward by dynamic batching",
            ["kind"],
            BATCH_BUCKETS,
        ))
        self.train_drift = fast.add(Histogram(
            "normserve_train_drift",
            "Distance of each train batch's mean from the running mean before the update, in running "
            f"standard deviations averaged over channels (first {max_labelled_layers} layers by first use, "
            "the rest as layer=\"_other\")",
            ["layer"],
            DRIFT_BUCKETS,
        ))
        r.register(fast)
        self._drift_layers: set[str] = set()
        self._max_labelled_layers = max_labelled_layers
        r.register(_LayerCollector(layers, max_labelled_layers))
        self._http: Optional[object] = None

    def observe_request(self, method: str, mode: str, code: str, seconds: float, request_id: str = "") -> None:
        # The request id rides along as an exemplar (OpenMetrics), so a slow bucket can be
        # traced to a request and its log line.
        exemplar = {"request_id": request_id} if request_id else None
        self.request_duration.labels(method, mode, code).observe(seconds, exemplar)
        self.requests.labels(method, mode, code).inc()

    def observe_compute(
        self, layer: str, kind: str, mode: str, x: Any, result: ForwardResult, seconds: float
    ) -> None:
        """Everything measured about one computed batch."""
        self.compute_duration.labels(kind, mode).observe(seconds)
        if mode == "train":
            self.queue_duration.labels(kind, mode).observe(result.queued_seconds)
        self.batch_size.labels(mode).observe(x.shape[0] if x.dim() > 1 else 1)
        self.tensor_bytes.labels("in").inc(x.nbytes)
        self.tensor_bytes.labels("out").inc(result.output.nbytes)
        if result.drift is not None:
            if layer not in self._drift_layers and len(self._drift_layers) < self._max_labelled_layers:
                self._drift_layers.add(layer)
            self.train_drift.labels(layer if layer in self._drift_layers else "_other").observe(result.drift)

    def observe_eval_batch(self, kind: str, requests: int, queued: Sequence[float]) -> None:
        """One forward of the eval batching queue (engine/batching.py) and its requests'
        queue times."""
        self.batch_requests.labels(kind).observe(requests)
        queue = self.batch_queue_duration.labels(kind)
        for seconds in queued:
            queue.observe(seconds)

    def watch_shared_memory(self, regions: Callable[[], int], mapped_bytes: Callable[[], int]) -> None:
        """Report the region manager's counts at scrape time."""
        self.shm_regions.set_function(regions)
        self.shm_mapped.set_function(mapped_bytes)

    def observe_shared_memory(self, bytes_in: int, bytes_out: int) -> None:
        if bytes_in:
            self.shm_bytes.labels("in").inc(bytes_in)
        if bytes_out:
            self.shm_bytes.labels("out").inc(bytes_out)

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server in a daemon thread; returns the bound port."""
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (httpd, thread)
        return httpd.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            httpd, _thread = self._http
            httpd.shutdown()
            httpd.server_close()
            self._http = None
