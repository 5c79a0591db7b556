"""The core every protocol calls: readiness, metadata, inference and the model repository."""

from __future__ import annotations

import asyncio
import logging
import time
from importlib.metadata import version as package_version
from types import TracebackType

from service.batcher import Timeline
from service.errors import SHUTTING_DOWN, NotFound, NotReady, TapserveError, clip
from service.metrics import UNKNOWN, Metrics
from service.model import Endpoint, LoadedModel
from service.registry import ModelRegistry
from service.statistics import VersionStatistics
from service.types import EndpointMetadata, InferRequest, InferResponse, Target

log = logging.getLogger(__name__)

# Characters of each client string a log line carries.
LOGGED = 200
EXTENSIONS = ["model_repository", "statistics", "binary_tensor_data"]


class DataPlane:
    """Protocol-independent: request → model version → response, with metrics."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics,
                 strict_readiness: bool = True) -> None:
        self.registry = registry
        self.metrics = metrics
        self.strict_readiness = strict_readiness
        self._drain = asyncio.Event()  # binds to the loop that first waits on it

    @property
    def draining(self) -> bool:
        """Set once, when the server starts to drain: new requests are refused."""
        return self._drain.is_set()

    @draining.setter
    def draining(self, value: bool) -> None:
        if value:
            self._drain.set()
        else:
            self._drain.clear()

    async def until_draining(self) -> None:
        """Return once the server drains (streams stop reading then)."""
        await self._drain.wait()

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.registry.ready(self.strict_readiness) and not self.draining

    def not_ready(self) -> list[tuple[str | None, str]]:
        """Why the server is not ready (empty when it is): (the model it is about, or
        None; a few words), what readiness probes are told."""
        why: list[tuple[str | None, str]] = [(None, "the server is draining")] \
            if self.draining else []
        return why + self.registry.not_ready(self.strict_readiness)

    def model_ready(self, model: str, endpoint: str | None, version: str | None) -> bool:
        """Whether that endpoint (of that version) answers now; NotFound if it is unknown,
        naming only what the client sent: readiness needs no token, so its errors must not
        list the server's models, endpoints, versions or labels (metadata calls do)."""
        try:
            self.registry.get(model, version).endpoint(endpoint)
        except NotReady:
            return False
        except NotFound:
            asked = clip(model) + "".join(f", {what} {clip(value)}" for what, value in (
                ("endpoint", endpoint), ("version", version)) if value is not None)
            raise NotFound(f"no model {asked} is served here") from None
        return not self.draining

    def server_metadata(self) -> tuple[str, str, list[str]]:
        return "tapserve", package_version("tapserve"), EXTENSIONS

    def model_metadata(self, model: str, endpoint: str | None,
                       version: str | None) -> EndpointMetadata:
        served = self.registry.get(model, version)
        return served.metadata(endpoint, self.registry.serving_versions(model))

    def model_endpoints(self, model: str, version: str | None
                        ) -> tuple[int, str, list[EndpointMetadata]]:
        """(version, default endpoint, every endpoint's metadata) of the version that
        answers for (model, version)."""
        served = self.registry.get(model, version)
        versions = self.registry.serving_versions(model)
        return served.version, served.default_endpoint, [
            served.metadata(name, versions) for name in served.endpoints]

    def model_status(self, model: str, version: str | None = None
                     ) -> list[tuple[int, str, str]]:
        """(version, state, reason) of every version of `model` the server knows, or of
        the one `version` (a number or a label) names."""
        statuses = [(int(v), state, reason)
                    for name, v, state, reason in self.registry.index() if name == model and v]
        if statuses and version is not None:
            number = self.registry.version_number(model, version)
            statuses = [s for s in statuses if s[0] == number]
            if not statuses:
                raise NotFound(f"model {model!r} has no version {number}")
        if not statuses:
            if model not in self.registry.models:
                self.registry.get(model)  # raises NotFound (or NotReady), saying why
            raise NotReady(f"model {model!r} has no version loaded or loading: "
                           f"{self.registry.models[model].error or 'not loaded'}")
        return statuses

    def call(self, protocol: str, model: str, endpoint: str | None = None,
             request_id: str = "") -> InferCall:
        """One inference request through door `protocol` (see service.types.Call)."""
        return InferCall(self, protocol, model, endpoint, request_id)

    def refused(self, protocol: str, model: str, endpoint: str | None,
                error: TapserveError) -> None:
        """Count and log a request refused before its door read it (no token)."""
        InferCall(self, protocol, model, endpoint).finish(error)

    def model_statistics(self, model: str, version: str | None
                         ) -> list[tuple[str, int, VersionStatistics]]:
        """(model, version, statistics) of the versions that serve: of every model for
        model "", of one model, or of one version of it."""
        if model and version is not None:
            served = self.registry.get(model, version)
            return [(model, served.version, served.stats)]
        names = [model] if model else sorted(self.registry.models)
        if model:
            self.registry.get(model)  # NotFound (or NotReady) for a model that serves nothing
        return [(name, v, self.registry.get(name, str(v)).stats)
                for name in names for v in self.registry.serving_versions(name)]

    # The model repository (Triton's extension)

    def repository_index(self, ready_only: bool) -> list[tuple[str, str, str, str]]:
        """(model, version, state, reason) entries; `ready_only` keeps the READY ones."""
        entries = self.registry.index()
        return [e for e in entries if e[2] == "READY"] if ready_only else entries

    async def load_model(self, name: str) -> None:
        await self.registry.load(name)

    async def unload_model(self, name: str) -> None:
        await self.registry.unload(name)


class InferCall:
    """One inference request through the data plane (service.types.Call): resolved once,
    and its outcome, a refusal before it was decoded included, counted in the metrics and
    its version's statistics and (a failure) logged, once, when its `with` block ends."""

    __slots__ = ("_plane", "protocol", "model", "endpoint", "request_id", "started",
                 "_served", "_resolving", "_computing", "_rows", "_queued", "_decoded",
                 "_timeline", "_done")

    def __init__(self, plane: DataPlane, protocol: str, model: str, endpoint: str | None,
                 request_id: str = "") -> None:
        self._plane = plane
        self.protocol = protocol
        self.model = model  # the names as the client sent them, until `resolve` parses them
        self.endpoint = endpoint
        self.request_id = request_id
        self.started = time.monotonic()
        self._served: tuple[LoadedModel, Endpoint] | None = None
        self._resolving = False  # resolve was tried: a failure is not retried for labels
        self._computing = False  # inside the version's infer: its statistics count it
        self._rows = 0
        self._queued = 0.0
        self._decoded = 0.0  # when its tensors were decoded (infer began)
        self._timeline: Timeline | None = None  # when it passed the batcher's stages
        self._done = False

    def resolve(self, model: str, endpoint: str | None, version: str | None) -> Target:
        self.model, self.endpoint = model, endpoint
        if self._plane.draining:
            raise NotReady(SHUTTING_DOWN)
        self._resolving = True
        served = self._plane.registry.get(model, version)
        ep = served.endpoint(endpoint)
        self._served = (served, ep)  # a refusal from here on counts under its endpoint
        inputs, max_rows = ep.inputs_by_name, served.policy.max_queue_size
        if ep.explanation is None:  # every input is sent
            return Target(served.name, served.version, ep.name, inputs, max_rows)
        return Target(served.name, served.version, ep.name, inputs, max_rows,
                      {s.name: s for s in ep.inputs if s.name not in inputs})

    async def infer(self, request: InferRequest) -> InferResponse:
        if self._served is None:
            raise RuntimeError("InferCall.infer before resolve")
        served, ep = self._served
        self._decoded = time.monotonic()
        self._computing = True
        outputs, self._timeline = await served.infer(ep, request.inputs, request.outputs,
                                                     request.deadline, request.json)
        self._queued = self._timeline.queued
        self._plane.metrics.queue_duration.labels(served.name, ep.name).observe(self._queued)
        self._rows = len(next(iter(request.inputs.values())))
        return InferResponse(served.name, ep.name, served.version, outputs, request.id)

    def __enter__(self) -> InferCall:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.finish(error)

    def finish(self, error: BaseException | None) -> None:
        """Count the outcome (once); log a domain error."""
        if self._done:
            return
        self._done = True
        now = time.monotonic()
        seconds = now - self.started
        served = self._served[0] if self._served else None
        if error is None:
            code = "OK"
            if served is not None and self._computing:
                served.stats.succeeded(self._rows, seconds, self._queued)
            if served is not None and self._timeline is not None:
                self._observe_stages(served.name, self._timeline, now)
        elif isinstance(error, TapserveError):
            code = error.code
            if served is not None:  # refused before decoding or after: the version's failure
                served.stats.failed(seconds)
            self._log(error, seconds)
        else:  # the server's fault (logged where it is answered) or the client went away
            code = "CANCELLED" if isinstance(error, asyncio.CancelledError) else "INTERNAL"
        model, endpoint = self._labels(seconds if isinstance(error, TapserveError) else None)
        metrics = self._plane.metrics
        metrics.requests.labels(model, endpoint, code, self.protocol).inc()
        metrics.request_duration.labels(model, endpoint).observe(seconds)

    def _observe_stages(self, model: str, t: Timeline, now: float) -> None:
        """Each stage's seconds, from the end of the one before (metrics.STAGES' order)."""
        marks = (self.started, self._decoded, t.enqueued, t.started, t.began, t.ended,
                 t.returned, t.resumed, now)
        for histogram, begin, end in zip(self._plane.metrics.stages(model), marks[:-1], marks[1:],
                                         strict=True):
            histogram.observe(max(0.0, end - begin))

    def _log(self, error: TapserveError, seconds: float) -> None:
        # Client strings, cut: a log line must stay a line's length (logs.py escapes them).
        fields = {"model": self.model[:LOGGED], "endpoint": (self.endpoint or "")[:LOGGED],
                  "request_id": self.request_id[:LOGGED], "status": error.code,
                  "latency_s": round(seconds, 6)}
        log.info("request failed: %s (%s)", error,
                 " ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)

    def _labels(self, failed: float | None) -> tuple[str, str]:
        """(model, endpoint) metric labels: only names the server knows, so unknown names
        add no time series. A request refused before it was resolved (no token, a bad
        name) counts under its endpoint when its names find one, and in that version's
        failures (`failed` seconds) as a refusal after resolving does."""
        if self._served is not None:
            return self._served[0].name, self._served[1].name
        registry = self._plane.registry
        if self.model not in registry.models:  # never a path from a client string
            return UNKNOWN, UNKNOWN
        if self._resolving:
            return self.model, UNKNOWN
        try:
            served = registry.get(self.model)
            label = served.endpoint(self.endpoint).name
        except TapserveError:
            return self.model, UNKNOWN
        if failed is not None:
            served.stats.failed(failed)
        return self.model, label
