"""Server-wide settings: flags, `TAPSERVE_*` environment variables and defaults, one model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.batcher import BatchPolicy
from service.storage import check_url, is_url

# The batching defaults are the batcher's own (BatchPolicy); config.yaml sets them per model.
BATCHING = BatchPolicy()


class Settings(BaseSettings):
    """Every field can be set as `--field-name` on `tapserve serve` or `TAPSERVE_FIELD_NAME`."""

    # hide_input_in_errors: a value may hold a secret (a credential pasted into a URL).
    model_config = SettingsConfigDict(env_prefix="TAPSERVE_", extra="ignore",
                                      hide_input_in_errors=True)

    model_repository: Path | str = Field(
        Path("models"), description="Folder of models to serve, or a bucket: s3://bucket/prefix "
        "or gs://bucket/prefix (credentials and endpoint from the provider's environment).")
    host: str = Field("0.0.0.0", description="Address the gRPC and metrics servers bind.")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0: any free port).")
    metrics_port: int = Field(8002, ge=0, le=65535, description="Prometheus /metrics port.")
    http_port: int = Field(
        8000, ge=0, le=65535, description="HTTP port: KServe v2 REST and TF Serving REST "
        "(0: no HTTP).")
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Larger requests are refused before they are "
        "read (gRPC RESOURCE_EXHAUSTED, HTTP 413).")
    health_port: int = Field(
        0, ge=0, le=65535, description="A plaintext port serving only grpc.health.v1, for "
        "Kubernetes' gRPC probes, which cannot speak TLS (0: none).")
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain: TLS on the gRPC and HTTP ports (re-read "
        "when it changes).")
    tls_key_file: Path | None = Field(
        None, description="PEM private key of --tls-cert-file (re-read when it changes).")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA certificates: clients must present a certificate they "
        "signed (mutual TLS; re-read when it changes).")
    auth_token_file: Path | None = Field(
        None, description="Bearer tokens, one a line (# comments): inference, metadata, "
        "statistics and repository calls must carry one (the repository API one of "
        "--admin-token-file, if set; re-read when they change).")
    admin_token_file: Path | None = Field(
        None, description="Bearer tokens for the repository API (load, unload, index), in "
        "the format of --auth-token-file: set, only these open it (re-read when it changes).")
    max_response_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="A request whose outputs would be larger is "
        "refused before it is computed (INVALID_ARGUMENT); also gRPC's send limit.")
    model_control_mode: Literal["poll", "explicit", "none"] = Field(
        "poll", description="poll: re-read the repository every interval and apply changes; "
        "explicit: load and unload only through the repository API and --load-model; "
        "none: load once at start.")
    repository_poll_secs: float = Field(
        5.0, gt=0, description="Poll mode: seconds between reads of the repository; a version "
        "folder whose files changed within it is not loaded yet.")
    load_model: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Explicit mode: models to load at start "
        "(repeatable; '*': all; the env twin takes a comma-separated list).")
    allow_model_code: bool = Field(
        False, description="Let models import the Python files their config.yaml `code:` names.")
    strict_readiness: bool = Field(
        True, description="Ready only while every model the server should serve has a version "
        "serving (off: ready once the start-up load is done).")
    drain_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests get to finish.")
    max_connection_age_secs: float = Field(
        300.0, ge=0, description="Close a client connection this old (after a grace), so "
        "long-lived clients re-resolve and reach new replicas (0: never).")
    max_connection_age_grace_secs: float = Field(
        30.0, ge=0, description="How long calls on an aged connection get to finish.")
    max_connection_idle_secs: float = Field(
        300.0, ge=0, description="Close a connection with no call for this long (0: never).")
    keepalive_secs: float = Field(
        60.0, gt=0, description="Ping clients idle this long; a client that does not answer "
        "within 20 s is dropped.")
    min_client_ping_secs: float = Field(
        10.0, ge=0, description="Clients pinging more often than this are disconnected "
        "(keepalive enforcement).")
    max_concurrent_streams: int = Field(
        100, ge=1, description="Concurrent calls one client connection may hold.")
    max_stream_in_flight: int = Field(
        100, ge=1, description="Requests one ModelStreamInfer stream may have read and not "
        "yet answered; past it the stream is not read (flow control holds the client).")
    max_connections: int = Field(
        1000, ge=0, description="Client connections the gRPC port accepts at once; more are "
        "closed at accept (0: no limit).")
    max_concurrent_rpcs: int = Field(
        1024, ge=0, description="gRPC calls the server holds at once, over all connections "
        "(health checks too, health Watch streams aside); more are refused with "
        "RESOURCE_EXHAUSTED, and health \"\" says NOT_SERVING while they are (0: no limit).")
    max_watch_streams: int = Field(
        1000, ge=0, description="grpc.health.v1 Watch streams each gRPC port holds at once, "
        "apart from --max-concurrent-rpcs; more are refused with RESOURCE_EXHAUSTED "
        "(0: no limit).")
    max_receiving_bytes: int = Field(
        1024 * 1024 * 1024, ge=0, description="Bytes of HTTP request bodies being received, "
        "over all connections: each body reserves its bytes as they arrive, and one whose "
        "next bytes do not fit is refused with 429 (0: no limit).")
    max_http_connections: int = Field(
        1000, ge=0, description="Client connections the HTTP port holds at once; more are "
        "answered 503 and closed (0: no limit).")
    http_header_timeout_secs: float = Field(
        10.0, ge=0, description="A new HTTP connection whose first request's headers have not "
        "all arrived this long after it opened is closed (0: no limit).")
    request_read_timeout_secs: float = Field(
        30.0, ge=0, description="An HTTP request body not fully received this long after the "
        "request started is refused (408) and its buffered bytes freed (0: no limit).")
    grpc_request_read_timeout_secs: float = Field(
        0.0, ge=0, description="The same for a gRPC request message (DEADLINE_EXCEEDED). Off "
        "by default: it serves unary calls as client-streaming, which costs 7-14% of "
        "1-row requests per second (0: off; calls are still capped by "
        "--max-concurrent-rpcs and end with --max-connection-age-secs).")
    otlp_endpoint: str | None = Field(
        None, description="OpenTelemetry collector URL (OTLP over HTTP, e.g. "
        "http://localhost:4318): a trace span per inference request, joined to the caller's "
        "traceparent (unset: no tracing; needs tapserve[tracing]).")
    backend: Literal["tensorflow", "jax"] = Field(
        "tensorflow", description="The Keras backend models run on: tensorflow, or jax "
        "(needs tapserve[jax]; refuses SavedModels and string models, see docs/backends.md). "
        "Process-wide: Keras reads it at its first import.")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="The event loop every front door runs on: uvloop (at 32 requests "
        "in flight it served 1.02-1.32x the requests per second of asyncio's loop, at "
        "0.76-0.98x the CPU per request), or asyncio's own; auto: uvloop where it is "
        "installed (not on Windows).")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe log lines written.")

    max_batch_size: int = Field(
        BATCHING.max_batch_size, ge=1,
        description="Default rows per batch; config.yaml may set it per model.")
    max_queue_delay_ms: float = Field(
        BATCHING.max_queue_delay_ms, ge=0,
        description="Default longest wait for a batch to fill after its first request.")
    eager_batching: bool = Field(
        BATCHING.eager,
        description="Default: a model with no batch computing starts one once as many "
        "requests wait as were in the server at once last time, rather than waiting for "
        "max_queue_delay_ms (config.yaml: batching.eager).")
    max_queue_size: int = Field(
        BATCHING.max_queue_size, ge=1,
        description="Rows a model may hold queued before RESOURCE_EXHAUSTED.")
    cpu_batches_in_flight: int = Field(
        2, ge=1, description="Batches computed at once per model on the CPU.")
    gpu_batches_in_flight: int = Field(
        1, ge=1, description="Batches computed at once per model on each GPU.")
    intra_op_threads: int | None = Field(
        None, ge=0, description="TensorFlow intra-op threads (0: TensorFlow's default; unset: "
        "the CPUs this process may use, shared by the batches in flight).")
    inter_op_threads: int | None = Field(
        None, ge=0, description="TensorFlow inter-op threads (0: TensorFlow's default; unset: "
        "the CPUs this process may use less one, left to the gRPC front end).")
    gpu_memory_limit_mb: int | None = Field(
        None, ge=1, description="Cap on the memory the backend takes on each GPU.")
    compiled_cache_size: int = Field(
        64, ge=1, description="Compiled (inputs, outputs) functions kept per model (on jax: "
        "executables, one per batch size of the ladder; warm-up's are kept beside them).")

    @model_validator(mode="after")
    def _tls_files_together(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both --tls-cert-file and --tls-key-file")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("--tls-client-ca-file (mutual TLS) needs --tls-cert-file and "
                             "--tls-key-file")
        return self

    @field_validator("model_repository", mode="after")
    @classmethod
    def _folder_or_url(cls, value: Path | str) -> Path | str:
        # A URL stays a str (a Path would fold its "//"); anything else is a folder.
        return check_url(value) if is_url(value) else Path(value)

    @field_validator("load_model", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a
    container's limit), which os.cpu_count() does not see."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def intra_op_threads(settings: Settings) -> int:
    """The intra-op threads to give TensorFlow: the setting, else a share of the CPUs for
    each batch in flight (1 on 2 cores, where that measured best for small batches)."""
    if settings.intra_op_threads is not None:
        return settings.intra_op_threads
    return max(1, available_cpus() // settings.cpu_batches_in_flight)


def inter_op_threads(settings: Settings) -> int:
    """The inter-op threads to give TensorFlow: the setting, else every CPU but one. The
    gRPC front end's event loop needs about one core under load; on 2 cores, TensorFlow
    taking both served 16% fewer 16-row conv requests per second (bench/RESULTS.md)."""
    if settings.inter_op_threads is not None:
        return settings.inter_op_threads
    return max(1, available_cpus() - 1)
