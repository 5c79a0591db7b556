"""The one place that builds and wires everything: settings → devices, metrics, registry,
data plane, gRPC services (inference, health, reflection), TLS and tokens, signals and
drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import backends, tracing
from service.auth import Access, Tokens
from service.dataplane import DataPlane
from service.errors import InvalidInput, Unauthenticated
from service.health import Health
from service.loading import Loader
from service.metrics import Metrics
from service.protocol import reflection
from service.protocol.call_limits import CallLimits
from service.protocol.convert import client_names
from service.protocol.generated import grpc_predict_v2_pb2 as pb
from service.protocol.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from service.protocol.generated import tf_serving_apis_pb2 as tfs_pb
from service.protocol.generated import tf_serving_apis_pb2_grpc as tfs_grpc
from service.protocol.grpc_auth import BearerTokenInterceptor
from service.protocol.http import build_app
from service.protocol.http_connections import GuardedSite
from service.protocol.kserve import PROTOCOL as KSERVE_GRPC
from service.protocol.kserve import InferenceServicer
from service.protocol.read_timeout import RequestReadTimeout
from service.protocol.status import ErrorStatusInterceptor
from service.protocol.tfserving import PROTOCOL as TFS_GRPC
from service.protocol.tfserving import ModelStatusServicer, PredictionServicer, endpoint_of
from service.registry import POLL, ModelRegistry
from service.repository import model_names
from service.settings import Settings, inter_op_threads, intra_op_threads
from service.storage import Mirror
from service.tls import CertificateFiles, HttpTls, grpc_credentials

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Stopping gRPC cancels every call its core holds that no handler has taken yet: the client
# gets CANCELLED, which it does not retry, and no handler logs it (grpc/grpc#41785). So the
# drain stops gRPC only once no call has come for QUIET_S, every client having heard
# UNAVAILABLE; at most QUIET_MAX_S, since a client that retries on this connection never
# goes quiet, and only a closed connection sends it to another replica.
QUIET_S = 0.25
QUIET_MAX_S = 2.0
# How often the token file and the HTTP port's certificate files are checked for changes
# (gRPC checks its certificate files itself, at each new connection).
WATCH_S = 1.0
# The least time between two log lines saying the gRPC port is at --max-concurrent-rpcs.
FULL_LOG_S = 60.0
# Refused inference calls count in tapserve_requests_total under their model: the method,
# the front door, and how to read (model, endpoint) from the request gRPC already parsed.
INFER_METHODS: dict[str, tuple[str, Callable[[Any], tuple[str, str | None]]]] = {
    "/inference.GRPCInferenceService/ModelInfer":
        (KSERVE_GRPC, lambda r: client_names(r.model_name)),
    "/tensorflow.serving.PredictionService/Predict":
        (TFS_GRPC, lambda r: (r.model_spec.name, endpoint_of(r.model_spec.signature_name))),
}

# Answers a request that does not parse in the stream, as it answers any failed request.
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


def connection_options(s: Settings) -> list[tuple[str, int]]:
    """gRPC's connection hygiene, from the settings (0 s: that limit off)."""
    ms = {"grpc.keepalive_time_ms": s.keepalive_secs,
          "grpc.max_connection_age_ms": s.max_connection_age_secs,
          "grpc.max_connection_age_grace_ms": s.max_connection_age_grace_secs,
          "grpc.max_connection_idle_ms": s.max_connection_idle_secs,
          "grpc.http2.min_ping_interval_without_data_ms": s.min_client_ping_secs}
    return [(key, int(seconds * 1000)) for key, seconds in ms.items() if seconds > 0] + [
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),  # clients may ping idle connections
        ("grpc.http2.max_ping_strikes", 2),  # then GOAWAY for pinging too often
        ("grpc.max_concurrent_streams", s.max_concurrent_streams)] + (
        [("grpc.max_allowed_incoming_connections", s.max_connections)]
        if s.max_connections else [])


class TapServer:
    """A running Tapserve: `start()` binds the ports and loads models in the background."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # A missing `tracing` extra refuses the start here, before any port or model.
        self.tracing = tracing.setup(settings.otlp_endpoint)
        self.metrics = Metrics()
        backends.select(settings.backend, settings.gpu_memory_limit_mb)  # a second server: checks
        self.devices = backends.configure(
            settings.backend, intra_op_threads(settings), inter_op_threads(settings),
            settings.gpu_memory_limit_mb)
        gpu_memory_in_use = backends.gpu_memory_reader(settings.backend)
        for device in gpu_memory_in_use():
            self.metrics.gpu_memory.labels(device).set_function(
                _gpu_memory_of(device, gpu_memory_in_use))
        # A bucket is served from a local mirror of it; a folder as it is.
        repository = settings.model_repository
        self.mirror = Mirror(repository, self.metrics) if isinstance(repository, str) else None
        self.registry = ModelRegistry(
            self.mirror.folder if self.mirror else Path(repository),
            settings.model_control_mode, Loader(settings, self.devices), self.metrics,
            settings.drain_grace_seconds, on_change=self._update_health,
            refresh=self.mirror.refresh if self.mirror else None)
        self.dataplane = DataPlane(self.registry, self.metrics, settings.strict_readiness)
        self.health = Health()
        self._limits = CallLimits(settings.max_concurrent_rpcs, settings.max_watch_streams,
                                  on_done=self._count_rpc, on_full=self._on_full)
        self.grpc_port = 0
        self.metrics_port = 0
        self._loading: asyncio.Task[None] | None = None
        self._polling: asyncio.Task[None] | None = None
        self._health: dict[str, int] = {}
        self._http: web.AppRunner | None = None
        self._health_server: grpc.aio.Server | None = None
        self._watching: asyncio.Task[None] | None = None
        self.access: Access | None = None
        self._http_tls: HttpTls | None = None
        self._last_call = 0.0  # monotonic time the last unary call ended
        self._full_logged = -FULL_LOG_S  # monotonic time the cap was last said to be full

    async def start(self) -> None:
        """Bind both ports and start loading; raises ConfigError or OSError (a port in use)
        before anything is left running."""
        s = self.settings
        if not self.mirror:
            model_names(Path(s.model_repository))  # a missing folder fails here, before any port
        # Unreadable or mismatched TLS or token files fail here too (ConfigError).
        grpc_tls = http_tls = None
        # Settings holds a certificate and a key together or neither.
        if s.tls_cert_file is not None and s.tls_key_file is not None:
            grpc_tls = CertificateFiles(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file,
                                        "gRPC")
            http_tls = CertificateFiles(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file,
                                        "HTTP")
            self._http_tls = HttpTls(http_tls)
        interceptors: list[grpc.aio.ServerInterceptor] = [
            self._limits, ErrorStatusInterceptor(
                on_done=self._count_rpc, on_undecodable=self._undecodable,
                answers_undecodable=frozenset({STREAM_INFER}))]
        if s.grpc_request_read_timeout_secs:
            interceptors.insert(1, RequestReadTimeout(s.grpc_request_read_timeout_secs,
                                                      on_done=self._count_rpc))
        if s.auth_token_file is not None or s.admin_token_file is not None:
            self.access = Access(
                Tokens(s.auth_token_file) if s.auth_token_file else None,
                Tokens(s.admin_token_file, "--admin-token-file") if s.admin_token_file else None)
            interceptors.append(BearerTokenInterceptor(self.access, self._refused))
        try:
            self._metrics_http = self.metrics.serve(s.host, s.metrics_port)
        except OSError as exc:  # the bare errno text names no port
            raise OSError(f"cannot bind metrics to {s.host}:{s.metrics_port}: "
                          f"{exc.strerror or exc}") from None
        self.metrics_port = self._metrics_http.server_port
        self.server = grpc.aio.server(
            interceptors=interceptors,  # CallLimits caps the calls, not grpc.aio
            options=[("grpc.max_receive_message_length", s.max_request_bytes),
                     ("grpc.max_send_message_length", s.max_response_bytes),
                     # A second server on a taken port must fail, not share it silently.
                     ("grpc.so_reuseport", 0), *connection_options(s)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane, s.max_stream_in_flight, self.tracing), self.server)
        tfs_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.dataplane, self.tracing), self.server)
        tfs_grpc.add_ModelServiceServicer_to_server(
            ModelStatusServicer(self.dataplane), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable(self.server, [
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            tfs_pb.DESCRIPTOR.services_by_name["PredictionService"],
            tfs_pb.DESCRIPTOR.services_by_name["ModelService"],
            health_pb2.DESCRIPTOR.services_by_name["Health"]])
        self.grpc_port = self._bind(self.server, "gRPC", s.grpc_port,
                                    grpc_credentials(grpc_tls) if grpc_tls else None)
        if s.health_port:
            self._health_server = grpc.aio.server(
                interceptors=[CallLimits(0, s.max_watch_streams)],
                options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self._bind(self._health_server, "the health port", s.health_port)
        if s.http_port:
            try:
                await self._start_http()
            except OSError as exc:
                if self._http is not None:  # set before anything binds
                    await self._http.cleanup()
                self._metrics_http.shutdown()
                raise OSError(f"cannot bind HTTP to {s.host}:{s.http_port}: {exc}") from None
        await self.server.start()
        if self._health_server:
            await self._health_server.start()
        self._publish_health()
        http = f"HTTP on {s.host}:{s.http_port}" if s.http_port else "HTTP off"
        health = f", gRPC health (plaintext) on {s.host}:{s.health_port}" if s.health_port else ""
        log.info("serving gRPC on %s:%d, metrics on %s:%d, %s%s", s.host, self.grpc_port,
                 s.host, self.metrics_port, http, health)
        if grpc_tls:
            log.info("TLS on the gRPC and HTTP ports (%s); metrics stay plaintext",
                     "client certificates required" if grpc_tls.mutual else "server only")
        if s.auth_token_file:
            log.info("bearer tokens from %s required, except for health and reflection%s",
                     s.auth_token_file, "" if s.admin_token_file else
                     " (any of them also opens the repository API: --admin-token-file)")
        if s.admin_token_file:
            log.info("the repository API requires bearer tokens from %s", s.admin_token_file)
        if self.access or self._http_tls:
            self._watching = asyncio.create_task(self._watch())
        self._loading = asyncio.create_task(self._load())

    def _bind(self, server: grpc.aio.Server, what: str, port: int,
              credentials: grpc.ServerCredentials | None = None) -> int:
        """Bind a gRPC server's port; OSError (with nothing left running) if it is taken."""
        address = f"{self.settings.host}:{port}"
        try:
            bound = (server.add_secure_port(address, credentials) if credentials
                     else server.add_insecure_port(address))
        except RuntimeError:
            bound = 0
        if not bound:
            self._metrics_http.shutdown()
            raise OSError(f"cannot bind {what} to {address} (in use?)")
        return bound

    async def _start_http(self) -> None:
        """KServe v2 REST and TF Serving REST, on this event loop, over the data plane."""
        s = self.settings
        app = build_app(self.dataplane, s.max_request_bytes, self.access,
                        s.max_receiving_bytes, s.request_read_timeout_secs, self.tracing)
        # Handlers finish within the drain; the runner's own wait is for stragglers only.
        self._http = web.AppRunner(app, access_log=None, shutdown_timeout=1.0,
                                   keepalive_timeout=s.max_connection_idle_secs or 75.0)
        await self._http.setup()
        await GuardedSite(self._http, s.host, s.http_port, s.max_http_connections,
                          s.http_header_timeout_secs,
                          ssl_context=self._http_tls.context if self._http_tls else None).start()

    async def _watch(self) -> None:
        """Re-read the token file and the HTTP port's certificate files when they change."""
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                if self.access:
                    self.access.refresh()
                if self._http_tls:
                    self._http_tls.refresh()
            except Exception:  # the watch must outlive one bad read
                log.exception("re-reading the token or certificate files failed")

    def _undecodable(self, method: str, error: InvalidInput) -> None:
        """An inference call whose bytes do not parse counts (and logs) under no model."""
        if method in INFER_METHODS:
            self.dataplane.refused(INFER_METHODS[method][0], "", None, error)

    def _refused(self, method: str, request: object, error: Unauthenticated) -> None:
        if method in INFER_METHODS:
            protocol, names = INFER_METHODS[method]
            model, endpoint = names(request)
            self.dataplane.refused(protocol, model, endpoint, error)

    async def _load(self) -> None:
        # A bucket is read whole once before the start-up load; until then (an unreachable
        # bucket) the server is not ready and retries every poll interval.
        while self.mirror and not await self.mirror.refresh(0):
            await asyncio.sleep(self.settings.repository_poll_secs)
        await self.registry.start(self.settings.load_model)
        if self.settings.model_control_mode == POLL:
            self._polling = asyncio.create_task(
                self.registry.poll(self.settings.repository_poll_secs))

    async def loaded(self) -> None:
        """Wait until the start-up load is done (every model loaded or failed)."""
        if self._loading:
            await self._loading

    async def _update_health(self) -> None:
        self._publish_health()

    def _on_full(self, full: bool) -> None:
        now = time.monotonic()
        if full and now - self._full_logged >= FULL_LOG_S:  # a flapping cap: one line a minute
            self._full_logged = now
            log.warning("the gRPC port holds --max-concurrent-rpcs calls and refuses more: "
                        "health \"\" says NOT_SERVING until a tenth of them have ended")
        self._publish_health()

    def _publish_health(self) -> None:
        """Health follows the registry: "" is the server's readiness, each model serves
        while one of its versions does. "" is also NOT_SERVING while the gRPC port is at
        --max-concurrent-rpcs, refusing every call: a probe must not keep such a replica
        in rotation."""
        if self.dataplane.draining:
            return  # enter_graceful_shutdown set every service NOT_SERVING for good
        ready = self.dataplane.ready() and not self._limits.full
        wanted = {"": SERVING if ready else NOT_SERVING}
        for name in self.registry.names():
            wanted[name] = SERVING if self.registry.serving_versions(name) else NOT_SERVING
        for name in set(self._health) - set(wanted):
            wanted[name] = NOT_SERVING  # a model removed from the repository
        for name, status in wanted.items():
            if self._health.get(name) != status:
                self._health[name] = status
                self.health.set(name, status)

    def _count_rpc(self, method: str, code: str) -> None:
        self._last_call = time.monotonic()
        self.metrics.grpc_requests.labels(method, code).inc()

    async def _quiet(self, deadline: float) -> None:
        """Until no call has ended for QUIET_S (see QUIET_S), QUIET_MAX_S or `deadline`."""
        until = min(deadline, time.monotonic() + QUIET_MAX_S)
        while (now := time.monotonic()) < until:
            idle = now - self._last_call
            if idle >= QUIET_S:
                return
            await asyncio.sleep(min(QUIET_S - idle, until - now))

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING and UNAVAILABLE for new requests, finish in-flight, stop."""
        grace = self.settings.drain_grace_seconds if grace is None else grace
        log.info("draining (grace %.1fs)", grace)
        self.dataplane.draining = True
        self.health.enter_graceful_shutdown()
        for task in (self._loading, self._polling, self._watching):
            if task and not task.done():
                task.cancel()
        # Finish the accepted work while gRPC still answers, so requests arriving meanwhile
        # get the data plane's UNAVAILABLE and health says NOT_SERVING. Stopping gRPC first
        # closes the port at once and cancels calls it received but had not yet handed to
        # a handler: their clients saw CANCELLED (no retry), not UNAVAILABLE.
        deadline = time.monotonic() + grace
        await self.registry.close(grace)
        if self.mirror:
            await self.mirror.close()
        await self._quiet(deadline)
        # What is left are answers on their way out and open health Watch streams, which
        # never end by themselves: a short grace, not the whole remainder.
        await self.server.stop(min(1.0, max(0.0, deadline - time.monotonic())))
        if self._health_server:
            await self._health_server.stop(0)
        if self._http:
            await self._http.cleanup()
        self._metrics_http.shutdown()
        await asyncio.to_thread(self.tracing.shutdown)  # send the spans still held
        log.info("stopped")


def _gpu_memory_of(device: str,
                   in_use: Callable[[], dict[str, int]]) -> Callable[[], float]:
    """The bytes of GPU memory `device` holds now, read when metrics are scraped."""
    return lambda: in_use().get(device, 0)


async def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    server = TapServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the drain
        loop.add_signal_handler(sig, log.info, "already draining")
    await server.stop()
