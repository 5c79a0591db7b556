"""OpenTelemetry traces (--otlp-endpoint): everything OpenTelemetry lives here.

A request is a span ("infer", joined to the caller's trace by a W3C `traceparent` in gRPC
metadata or an HTTP header) with children "queue", "compute" and "response"; each batch
is a span ("batch") linked to the request spans it served. The children are recorded
after the fact, from the times the batcher keeps anyway, so no span object travels with
the request. Spans leave on a background thread (BatchSpanProcessor) and are flushed when
the server stops.

Off (the default), `Tracing.request` hands out one shared do-nothing object and the
OpenTelemetry packages are never imported: the server runs without the `tracing` extra.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from service.errors import ConfigError, TapserveError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Link, Span, SpanContext, Tracer

    from service.types import InferResponse

log = logging.getLogger(__name__)

INSTALL = "pip install tapserve[tracing]"
W3C = ("traceparent", "tracestate")  # the headers (or metadata) a caller's context comes in
TRACE_PATH = "/v1/traces"  # OTLP/HTTP's path for traces, added to a bare collector URL
# How long the drain waits for the collector to take the last spans: one that does not
# answer must not hold the exit up (the exporter retries for 10 s a batch).
FLUSH_S = 5.0
# The OpenTelemetry loggers that speak per export: a collector that is down said 4 lines
# every 5 s; at most one a minute gets through, with a count of the rest.
EXPORT_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                  "opentelemetry.sdk._shared_internal")
QUIET_S = 60.0
# The request being served by the running task, for the batcher to pick up at submit.
_current: ContextVar[RequestTrace | None] = ContextVar("tapserve_trace", default=None)


class CallMetadata(Protocol):
    """A gRPC call (grpc.aio's ServicerContext), read only for its metadata."""

    def invocation_metadata(self) -> Any: ...


# Where a caller's trace context is read: HTTP headers, or a gRPC call's metadata.
Carrier = Mapping[str, str] | CallMetadata


class Traced(Protocol):
    """What the batcher holds per queued piece of a request."""

    @property
    def trace(self) -> RequestTrace | None: ...

    @property
    def enqueued(self) -> float: ...

    @property
    def started(self) -> float | None: ...

    @property
    def rows(self) -> int: ...


def current() -> RequestTrace | None:
    """The trace of the request the running task serves (None when tracing is off)."""
    return _current.get()


class Tracing:
    """Off: every method is free. See `setup` for on."""

    enabled = False

    def request(self, door: str, name: str, carrier: Carrier) -> RequestTrace:
        """The trace of one inference request through `door`, used as `with`; `name` is
        the model name the client sent (`model.endpoint` for KServe)."""
        return NO_TRACE

    def shutdown(self) -> None:
        """Flush the spans not yet sent (blocking: call off the event loop)."""


class RequestTrace:
    """One request's spans (this base class: none, for tracing off)."""

    __slots__ = ()

    def __enter__(self) -> RequestTrace:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        return None

    def answered(self, response: InferResponse) -> None:
        """The data plane answered: the version that served it is known, and the
        response span starts."""


NO_TRACE = RequestTrace()
NO_TRACING = Tracing()


def setup(endpoint: str | None, service_name: str = "tapserve") -> Tracing:
    """Tracing to an OTLP/HTTP collector at `endpoint` (None: off). Raises ConfigError if
    the `tracing` extra is not installed or the URL is not http(s)."""
    if not endpoint:
        return NO_TRACING
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--otlp-endpoint must be an http:// or https:// URL of an OTLP "
                          f"collector (e.g. http://localhost:4318), got {endpoint!r}")
    if parts.path in ("", "/"):
        endpoint = endpoint.rstrip("/") + TRACE_PATH
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        traced = OtlpTracing(OTLPSpanExporter(endpoint), service_name)
    except ImportError as exc:
        raise ConfigError(f"--otlp-endpoint needs the OpenTelemetry packages: "
                          f"{INSTALL} ({exc})") from None
    for name in EXPORT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OncePerInterval) for f in logger.filters):
            logger.addFilter(_OncePerInterval(QUIET_S))
    log.info("tracing: OpenTelemetry spans to %s", endpoint)
    return traced


class _OncePerInterval(logging.Filter):
    """Lets one record through per interval; the next one says how many were held back."""

    def __init__(self, interval: float) -> None:
        super().__init__()
        self.interval = interval
        self.last: float | None = None
        self.held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if self.last is not None and now - self.last < self.interval:
            self.held += 1
            return False
        if self.held:
            record.msg = f"{record.msg} ({self.held} such lines held back before this one)"
        self.last, self.held = now, 0
        return True


class OtlpTracing(Tracing):
    """On: spans to `exporter` (OTLP's, or a test's), sent by a BatchSpanProcessor."""

    enabled = True

    def __init__(self, exporter: SpanExporter, service_name: str = "tapserve") -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider: TracerProvider = TracerProvider(
            resource=Resource.create({"service.name": service_name}))
        self.exporter = exporter
        self.processor = BatchSpanProcessor(exporter)
        self.provider.add_span_processor(self.processor)
        self.tracer: Tracer = self.provider.get_tracer("tapserve")
        self.scope = InstrumentationScope("tapserve")
        self.propagator = TraceContextTextMapPropagator()
        # Spans are timed on the monotonic clock the batcher keeps; OTLP wants epoch ns.
        self.epoch_offset_ns = time.time_ns() - time.monotonic_ns()

    def ns(self, monotonic: float) -> int:
        return int(monotonic * 1e9) + self.epoch_offset_ns

    def request(self, door: str, name: str, carrier: Carrier) -> RequestTrace:
        return _Recording(self, door, name, carrier)

    def record(self, name: str, parent: SpanContext | None, started: float, ended: float,
               links: Sequence[Link] = (), attributes: Mapping[str, str | int] | None = None,
               error: BaseException | None = None) -> SpanContext:
        """A span whose times are already known, handed straight to the span processor,
        sampled as its parent was (none: a trace of its own). Six times cheaper than the
        SDK's start_span and end, which check samplers, limits and locks."""
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

        ids = self.provider.id_generator
        context = SpanContext(
            parent.trace_id if parent else ids.generate_trace_id(), ids.generate_span_id(),
            False, parent.trace_flags if parent else TraceFlags(TraceFlags.SAMPLED),
            parent.trace_state if parent else None)
        status = Status(StatusCode.ERROR, str(error)[:200]) if error else Status()
        self.processor.on_end(ReadableSpan(
            name, context, parent, self.provider.resource, attributes, links=links,
            status=status, start_time=self.ns(started), end_time=self.ns(ended),
            instrumentation_scope=self.scope))
        return context

    def parent(self, carrier: Carrier) -> Any:
        """The caller's context from its traceparent (and tracestate), if it sent one."""
        found: dict[str, str]
        if isinstance(carrier, Mapping):  # HTTP headers: case-insensitive
            found = {k: v for k in W3C if (v := carrier.get(k)) is not None}
        else:  # a grpc.aio ServicerContext: metadata keys are lower case
            metadata: Iterable[tuple[str, str | bytes]] = carrier.invocation_metadata() or ()
            found = {k: v for k, v in metadata if k in W3C and isinstance(v, str)}
        return self.propagator.extract(found) if found else None

    def shutdown(self, timeout: float = FLUSH_S) -> None:
        # The BatchSpanProcessor sends what it holds first; its thread is a daemon, and the
        # SDK's flush has no timeout of its own (opentelemetry-python#4568).
        stopping = threading.Thread(target=self.provider.shutdown, daemon=True)
        stopping.start()
        stopping.join(timeout)
        if stopping.is_alive():
            log.warning("tracing: the collector did not take the last spans within %g s; "
                        "they are dropped", timeout)
            self.exporter.shutdown()  # ends the exporter's retries


class _Recording(RequestTrace):
    __slots__ = ("_tracing", "_span", "_started", "_answered", "_served", "_pieces", "_token",
                 "model")

    def __init__(self, tracing: OtlpTracing, door: str, name: str, carrier: Carrier) -> None:
        from opentelemetry.trace import SpanKind

        self._tracing = tracing
        self._started = time.monotonic()
        self._answered: float | None = None
        self._served: dict[str, str | int] = {}  # the version that answered, once it did
        self._pieces: list[tuple[float, float, float, float, SpanContext]] = []
        self.model, _, endpoint = name.partition(".")
        attributes = {"tapserve.door": door, "tapserve.model": self.model}
        if endpoint:
            attributes["tapserve.endpoint"] = endpoint
        self._span: Span = tracing.tracer.start_span(
            "infer", tracing.parent(carrier), SpanKind.SERVER, attributes,
            start_time=tracing.ns(self._started))

    @property
    def context(self) -> SpanContext:
        return self._span.get_span_context()

    @property
    def recording(self) -> bool:
        return self._span.is_recording()

    def __enter__(self) -> RequestTrace:
        self._token = _current.set(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        _current.reset(self._token)
        self.finish(error)

    def answered(self, response: InferResponse) -> None:
        self._answered = time.monotonic()
        self._served = {"tapserve.model": response.model,
                        "tapserve.endpoint": response.endpoint,
                        "tapserve.version": response.version}

    def computed(self, enqueued: float, dequeued: float, started: float, ended: float,
                 batch: SpanContext) -> None:
        """One piece of the request (most have one) waited from `enqueued` until its first
        batch started at `dequeued`, and was computed by `batch` from `started` to `ended`
        (a batch that failed is tried again in halves: then a piece has several)."""
        self._pieces.append((enqueued, dequeued, started, ended, batch))

    def finish(self, error: BaseException | None) -> None:
        from opentelemetry.trace import Link, Status, StatusCode

        ended = time.monotonic()
        tracing, span = self._tracing, self._span
        code = status_of(error)
        span.set_attributes({**self._served, "tapserve.status": code})  # one call: each costs
        if code != "OK":
            span.set_status(Status(StatusCode.ERROR, str(error)[:200] or code))
        if span.is_recording():
            parent = span.get_span_context()
            for enqueued, dequeued in dict.fromkeys((p[0], p[1]) for p in self._pieces):
                tracing.record("queue", parent, enqueued, dequeued)
            for _, _, started, computed, batch in self._pieces:
                tracing.record("compute", parent, started, computed, [Link(batch)])
            if self._answered is not None:
                tracing.record("response", parent, self._answered, ended)
        span.end(tracing.ns(ended))


def status_of(error: BaseException | None) -> str:
    """The status a request ended with, as the metrics label it (google.rpc.Code)."""
    if error is None:
        return "OK"
    if isinstance(error, TapserveError):
        return error.code
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "INTERNAL"


def record_batch(works: Sequence[Traced], started: float,
                 error: BaseException | None = None) -> None:
    """The batcher computed `works` as one batch from `started` until now: a "batch" span
    linked to each request it served, and a compute piece for each request. Free when no
    request is traced."""
    traced = [(w, w.trace) for w in works
              if isinstance(w.trace, _Recording) and w.trace.recording]
    if not traced:
        return
    from opentelemetry.trace import Link

    ended = time.monotonic()
    first = traced[0][1]
    batch = first._tracing.record(
        "batch", None, started, ended, [Link(trace.context) for _, trace in traced],
        {"tapserve.model": first.model, "tapserve.batch.requests": len(works),
         "tapserve.batch.rows": sum(w.rows for w in works)}, error)
    for w, trace in traced:
        trace.computed(w.enqueued, w.started or started, started, ended, batch)
