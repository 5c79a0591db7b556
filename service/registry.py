"""The process's registry of models: load each one off the loop, track its state."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from service.batcher import Batcher, BatchPolicy
from service.errors import NotFound, NotReady, TapserveError
from service.metrics import Metrics
from service.model import LoadedModel, build_keras_model, build_saved_model
from service.repository import ModelSource, model_names, resolve
from service.settings import Settings

log = logging.getLogger(__name__)

LOADING, READY, FAILED = "LOADING", "READY", "FAILED"


@dataclass
class ServedModel:
    """A model's state, and once ready, its loaded version and its batcher."""

    name: str
    state: str = LOADING
    model: LoadedModel | None = None
    batcher: Batcher | None = None
    error: str = ""


class ModelRegistry:
    def __init__(self, settings: Settings, devices: list[str], metrics: Metrics) -> None:
        self.settings = settings
        self.devices = devices
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        # One loader thread: loads happen one at a time, never on the event loop.
        self._loader = ThreadPoolExecutor(1, "loader")

    @property
    def settled(self) -> bool:
        """Every model has either loaded or failed to."""
        return all(m.state != LOADING for m in self.models.values())

    def discover(self, repository: Path) -> list[str]:
        """Register every model folder as LOADING, so clients see it while it loads."""
        for name in model_names(repository):
            self.models.setdefault(name, ServedModel(name))
            self.metrics.model_ready.labels(name).set(0)
        return list(self.models)

    async def load(self, repository: Path, name: str) -> None:
        """Load, warm up, start batching; a broken model only fails itself."""
        served = self.models.setdefault(name, ServedModel(name))
        started = time.monotonic()
        log.info("loading model %s", name)
        try:
            source = resolve(repository, name)
            policy = self._policy(source)
            model = await asyncio.get_running_loop().run_in_executor(
                self._loader, self._build, source, policy)
        except TapserveError as exc:
            self._fail(served, str(exc))
            return
        except Exception as exc:  # a model file can break in any way: keep serving the rest
            log.exception("model %s failed to load", name)
            self._fail(served, f"{type(exc).__name__}: {exc}")
            return
        # One batch more than the compute threads: it waits in the runtime's executor, so a
        # thread that finishes starts the next batch at once, not after an event-loop turn.
        batcher = Batcher(
            model.runtime.run, policy, model.runtime.slots + 1,
            on_batch=lambda rows, seconds: self._on_batch(name, rows, seconds),
            on_depth=self.metrics.queue_depth.labels(name).set)
        batcher.start()
        served.model, served.batcher, served.state = model, batcher, READY
        seconds = time.monotonic() - started
        self.metrics.model_ready.labels(name).set(1)
        self.metrics.model_load.labels(name).set(seconds)
        log.info("model %s version %d ready in %.1fs: endpoints %s (default %s)", name,
                 model.version, seconds, ", ".join(model.endpoints), model.default_endpoint)

    def _build(self, source: ModelSource, policy: BatchPolicy) -> LoadedModel:
        if source.format == "saved_model":
            model = build_saved_model(source, self.devices, self._slots_per_device())
        else:
            model = build_keras_model(source, self.devices, self._slots_per_device(),
                                      self.settings.compiled_cache_size, policy.max_batch_size)
        model.warm_up(policy.shared_passes)
        return model

    def _slots_per_device(self) -> int:
        gpu = self.devices[0].startswith("/GPU")
        return self.settings.gpu_batches_in_flight if gpu else self.settings.cpu_batches_in_flight

    def _policy(self, source: ModelSource) -> BatchPolicy:
        b, s = source.config.batching, self.settings
        return BatchPolicy(
            max_batch_size=b.max_batch_size or s.max_batch_size,
            max_queue_delay_ms=(b.max_queue_delay_ms if b.max_queue_delay_ms is not None
                                else s.max_queue_delay_ms),
            max_queue_size=b.max_queue_size or s.max_queue_size,
            shared_passes=b.shared_passes)

    def _on_batch(self, name: str, rows: int, seconds: float) -> None:
        self.metrics.batch_size.labels(name).observe(rows)
        self.metrics.compute_duration.labels(name).observe(seconds)

    def _fail(self, served: ServedModel, error: str) -> None:
        served.state, served.error = FAILED, error
        self.metrics.model_ready.labels(served.name).set(0)
        log.error("model %s failed to load: %s", served.name, error)

    def get(self, name: str, version: int | None = None) -> ServedModel:
        """A ready model (at `version`, if given), or the error that says why not."""
        served = self.models.get(name)
        if served is None:
            raise NotFound(f"no model {name!r}; models: {', '.join(self.models) or 'none'}")
        if served.state == LOADING:
            raise NotReady(f"model {name!r} is still loading")
        if served.state == FAILED:
            raise NotReady(f"model {name!r} failed to load: {served.error}")
        if version is not None and version != served.model.version:
            raise NotFound(f"model {name!r} serves version {served.model.version}, "
                           f"not {version}")
        return served

    async def close(self, grace: float) -> None:
        """Let queued work finish (within `grace` seconds), then release threads."""
        batchers = [m.batcher for m in self.models.values() if m.batcher]
        await asyncio.gather(*(b.close(grace) for b in batchers))
        for m in self.models.values():
            if m.model:
                m.model.runtime.close()
        self._loader.shutdown(wait=False)
