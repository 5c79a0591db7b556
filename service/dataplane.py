"""The core every protocol calls: readiness, metadata, inference and the model repository."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from importlib.metadata import version as package_version

from service.errors import SHUTTING_DOWN, NotFound, NotReady, TapserveError, clip
from service.metrics import UNKNOWN, Metrics
from service.registry import ModelRegistry
from service.statistics import VersionStatistics
from service.types import EndpointMetadata, InferRequest, InferResponse, TensorSpec

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
        rows = [(int(v), state, reason) for name, v, state, reason in self.registry.index()
                if name == model and v]
        if rows and version is not None:
            number = self.registry.version_number(model, version)
            rows = [r for r in rows if r[0] == number]
            if not rows:
                raise NotFound(f"model {model!r} has no version {number}")
        if not rows:
            if model not in self.registry.models:
                self.registry.get(model)  # raises NotFound (or NotReady), saying why
            raise NotReady(f"model {model!r} has no version loaded or loading: "
                           f"{self.registry.models[model].error or 'not loaded'}")
        return rows

    def input_specs(self, model: str, endpoint: str | None, version: str | None
                    ) -> Mapping[str, TensorSpec]:
        """The endpoint's inputs by name, so a request's datatypes are checked before its
        tensors are decoded; raises NotFound or NotReady as `infer` would."""
        if self.draining:
            raise NotReady(SHUTTING_DOWN)
        return self.registry.get(model, version).endpoint(endpoint).inputs_by_name

    def max_rows(self, model: str, version: str | None) -> int:
        """The most rows one request to that version may carry (its queue's size), so a
        declared shape past it is refused before it is decoded."""
        return self.registry.get(model, version).policy.max_queue_size

    async def infer(self, request: InferRequest) -> InferResponse:
        started = time.monotonic()
        endpoint = UNKNOWN
        model = None
        try:
            if self.draining:
                raise NotReady(SHUTTING_DOWN)
            model = self.registry.get(request.model, request.version)
            ep = model.endpoint(request.endpoint)
            endpoint = ep.name  # errors below count under it
            outputs, queued = await model.infer(ep, request.inputs, request.outputs,
                                                request.deadline, request.json)
            self.metrics.queue_duration.labels(request.model, endpoint).observe(queued)
        except TapserveError as exc:
            if model is not None:
                model.stats.failed(time.monotonic() - started)
            self.rejected(request, exc, started, endpoint)
            raise
        except BaseException as exc:
            code = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "INTERNAL"
            self._count(request, endpoint, code, started)
            raise
        self._count(request, endpoint, "OK", started)
        rows = len(next(iter(request.inputs.values())))
        model.stats.succeeded(rows, time.monotonic() - started, queued)
        return InferResponse(model.name, endpoint, model.version, outputs, request.id)

    def rejected(self, request: InferRequest, error: TapserveError,
                 started: float | None = None, endpoint_label: str | None = None) -> None:
        """Count and log a failed request, also one refused before it reached `infer`
        (then `request` holds what could be read of it, with no inputs)."""
        started = time.monotonic() if started is None else started
        if endpoint_label is None:  # refused before `infer`: counted as `infer` counts
            endpoint_label = self._endpoint_label(request, started)
        # Client strings, cut: a log line must stay a line's length (logs.py escapes them).
        fields = {"model": request.model[:LOGGED], "endpoint": (request.endpoint or "")[:LOGGED],
                  "request_id": request.id[:LOGGED], "status": error.code,
                  "latency_s": round(time.monotonic() - started, 6)}
        log.info("request failed: %s (%s)", error,
                 " ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)
        self._count(request, endpoint_label, error.code, started)

    def _endpoint_label(self, request: InferRequest, started: float) -> str:
        """The endpoint a request refused before `infer` was for, when its names are
        known, so its refusal counts under it, and in its version's failures (inputs
        are checked before they are decoded, as `infer` would check them after)."""
        if request.model not in self.registry.models:  # never a path from a client string
            return UNKNOWN
        try:
            served = self.registry.get(request.model, request.version)
            label = served.endpoint(request.endpoint).name
        except TapserveError:
            return UNKNOWN
        served.stats.failed(time.monotonic() - started)
        return label

    def _count(self, request: InferRequest, endpoint: str, code: str, started: float) -> None:
        # Label values only from names the server knows: bounded time series.
        model = request.model if request.model in self.registry.models else UNKNOWN
        self.metrics.requests.labels(model, endpoint, code, request.protocol).inc()
        self.metrics.request_duration.labels(model, endpoint).observe(time.monotonic() - started)

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
        """(model, version, state, reason) rows; `ready_only` keeps the READY ones."""
        rows = self.registry.index()
        return [r for r in rows if r[2] == "READY"] if ready_only else rows

    async def load_model(self, name: str) -> None:
        await self.registry.load(name)

    async def unload_model(self, name: str) -> None:
        await self.registry.unload(name)
