"""The core every protocol calls: readiness, metadata and inference over the registry."""

from __future__ import annotations

import asyncio
import logging
import time
from importlib.metadata import version as package_version

from service.errors import NotReady, TapserveError
from service.metrics import UNKNOWN, Metrics
from service.registry import READY, ModelRegistry
from service.types import EndpointMetadata, InferRequest, InferResponse

log = logging.getLogger(__name__)


class DataPlane:
    """Protocol-independent: request → model → batcher → response, with metrics."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self.draining = False

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.registry.settled and not self.draining

    def model_ready(self, model: str, endpoint: str | None, version: int | None) -> bool:
        if model not in self.registry.models:
            self.registry.get(model)  # raises NotFound, listing the models
        if self.registry.models[model].state != READY:
            return False
        served = self.registry.get(model, version)
        served.model.endpoint(endpoint)  # raises NotFound for an unknown endpoint
        return not self.draining

    def server_metadata(self) -> tuple[str, str, list[str]]:
        return "tapserve", package_version("tapserve"), []

    def model_metadata(self, model: str, endpoint: str | None,
                       version: int | None) -> EndpointMetadata:
        return self.registry.get(model, version).model.metadata(endpoint)

    async def infer(self, request: InferRequest) -> InferResponse:
        started = time.monotonic()
        endpoint = UNKNOWN
        try:
            if self.draining:
                raise NotReady("the server is shutting down; retry on another replica")
            served = self.registry.get(request.model, request.version)
            model = served.model
            ep = model.endpoint(request.endpoint)
            endpoint = ep.name  # errors below count under it
            prepared = model.prepare(ep, request.inputs, request.outputs)
            outputs, queued = await served.batcher.submit(
                prepared.endpoint.source, prepared.feeds, prepared.outputs, request.deadline)
            self.metrics.queue_duration.labels(request.model, endpoint).observe(queued)
        except TapserveError as exc:
            self.rejected(request.model, request.endpoint, request.id, exc, started, endpoint)
            raise
        except BaseException as exc:
            code = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "INTERNAL"
            self._count(request.model, endpoint, code, started)
            raise
        self._count(request.model, endpoint, "OK", started)
        return InferResponse(model.name, endpoint, model.version, outputs, request.id)

    def rejected(self, model: str, endpoint: str | None, request_id: str,
                 error: TapserveError, started: float | None = None,
                 endpoint_label: str = UNKNOWN) -> None:
        """Count and log a failed request, also one refused before it reached `infer`."""
        started = time.monotonic() if started is None else started
        fields = {"model": model, "endpoint": endpoint or "", "request_id": request_id,
                  "status": error.code, "latency_s": round(time.monotonic() - started, 6)}
        log.info("request failed: %s (%s)", error,
                 " ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)
        self._count(model, endpoint_label, error.code, started)

    def _count(self, model: str, endpoint: str, code: str, started: float) -> None:
        # Label values only from names the server knows: bounded time series.
        model = model if model in self.registry.models else UNKNOWN
        self.metrics.requests.labels(model, endpoint, code).inc()
        self.metrics.request_duration.labels(model, endpoint).observe(time.monotonic() - started)
