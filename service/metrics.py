"""Prometheus metrics, on a registry the server owns (SPEC's names, plus what operators need)."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

# Sub-millisecond to tens of seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# A request's stages last tens of microseconds to milliseconds.
STAGE_BUCKETS = (0.000025, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01,
                 0.02, 0.05, 0.1, 0.25, 1.0, 10.0)
# A served request's stages, in order (each from the end of the one before; see
# tapserve_request_stage_seconds and service.dataplane.InferCall).
STAGES = ("decode", "check", "queue", "handoff", "compute", "return", "resume", "encode")

# The label value for a model or endpoint name nobody serves: unknown names in requests
# must not create new time series.
UNKNOWN = "_unknown"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # What the default registry would have exported: process_resident_memory_bytes,
        # process_cpu_seconds_total, process_open_fds (Linux), python_info.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "tapserve_requests", "Inference requests by status code and front door.",
            ["model", "endpoint", "code", "protocol"], registry=r)
        self.request_duration = Histogram(
            "tapserve_request_duration_seconds", "Inference request latency, end to end.",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram(
            "tapserve_queue_duration_seconds", "Time a request waited for its batch to start.",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_duration = Histogram(
            "tapserve_compute_duration_seconds", "Time to compute one batch.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.explain_compute_duration = Histogram(
            "tapserve_explain_compute_duration_seconds", "Time to compute one batch of an "
            "explain endpoint (also counted in tapserve_compute_duration_seconds).",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_stage = Histogram(
            "tapserve_request_stage_seconds", "Where a successful request's time went, stage "
            "by stage: decode (from the handler's start: the name resolved, the tensors "
            "decoded), check (against the endpoint), queue (until its batch formed), handoff "
            "(until a compute thread took the batch), compute, return (until the event loop "
            "took the result back), resume (until the request's task ran again), encode "
            "(its response).", ["model", "stage"], buckets=STAGE_BUCKETS, registry=r)
        self._stages: dict[str, tuple[Histogram, ...]] = {}
        self.batch_size = Histogram(
            "tapserve_batch_size", "Rows per executed batch.",
            ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.deduplicated_rows = Counter(
            "tapserve_deduplicated_rows", "Rows of executed batches not computed: copies "
            "of a byte-identical row of the same batch, computed once.", ["model"], registry=r)
        self.queue_depth = Gauge(
            "tapserve_queue_depth", "Rows waiting to be batched.", ["model", "version"],
            registry=r)
        self.model_ready = Gauge(
            "tapserve_model_ready", "1 while a model version serves, 0 while it loads or after "
            "it failed to; gone once unloaded.", ["model", "version"], registry=r)
        self.model_load = Gauge(
            "tapserve_model_load_duration_seconds", "Seconds the last load and warm-up took.",
            ["model", "version"], registry=r)
        self.model_load_failures = Counter(
            "tapserve_model_load_failures", "Loads that failed (a broken file or config.yaml).",
            ["model"], registry=r)
        self.repository_failures = Counter(
            "tapserve_repository_read_failures", "Failed reads of an object-store model "
            "repository: a listing of the bucket, or a download of one version or file.",
            ["repository"], registry=r)
        self.repository_reachable = Gauge(
            "tapserve_repository_reachable", "1 while the last listing of an object-store "
            "model repository succeeded, 0 while it fails (absent for a folder).",
            ["repository"], registry=r)
        self.grpc_requests = Counter(
            "tapserve_grpc_requests", "Every gRPC call by method and status code.",
            ["method", "code"], registry=r)
        self.gpu_memory = Gauge(
            "tapserve_gpu_memory_bytes", "Bytes the backend (TensorFlow or JAX) holds on each "
            "GPU.",
            ["device"], registry=r)

    def forget_version(self, model: str, version: int, keep_queue_depth: bool = False) -> None:
        """A version left: its series go (the queue depth once it drained, if kept), so a
        dashboard lists only versions that exist."""
        for gauge in (self.model_ready, self.model_load) + (
                () if keep_queue_depth else (self.queue_depth,)):
            gauge.remove(model, str(version))

    def forget_model(self, model: str) -> None:
        """A model left the repository: every series labelled with it goes."""
        self._stages.pop(model, None)
        for metric in (self.requests, self.request_duration, self.queue_duration,
                       self.request_stage,
                       self.compute_duration, self.explain_compute_duration,
                       self.batch_size, self.deduplicated_rows,
                       self.model_ready, self.model_load, self.model_load_failures):
            metric.remove_by_labels({"model": model})

    def stages(self, model: str) -> tuple[Histogram, ...]:
        """The model's stage histograms in STAGES' order, looked up once: each request
        observes all of them."""
        children = self._stages.get(model)
        if children is None:
            children = self._stages[model] = tuple(
                self.request_stage.labels(model, stage) for stage in STAGES)
        return children

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serve GET /metrics on its own thread; returns the HTTP server."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
