"""The lifecycle: keep the model table (service/routing.py) in step with the repository.

`sync` does it for one model: load what the version policy wants, swap it in once it
loaded and warmed up, retire what the policy dropped or what left the disk. A load that
fails never replaces what serves. A retired version leaves routing at once, finishes the
requests it holds, then is freed, and every metric series of it goes.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from service.errors import ConfigError, TapserveError
from service.loading import model_source
from service.metrics import Metrics
from service.model import LoadedModel
from service.repository import ModelOnDisk, ModelSource, scan
from service.routing import UNAVAILABLE, ModelEntry, VersionSlot

log = logging.getLogger(__name__)

# An absolute path not under the repository: a library's file, a system file.
_ABSOLUTE = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"]+/)*[^\s/'\":,;)\]]*")
REASON_CHARS = 500
# Unloads within this many seconds of one another share one garbage collection.
COLLECT_AFTER_S = 0.5


class Loads(Protocol):
    def load(self, source: ModelSource) -> LoadedModel: ...


def public_reason(error: str, repository: Path) -> str:
    """A load error as clients may read it (the repository index, GetModelStatus, a failed
    RepositoryModelLoad): paths relative to the model repository, other absolute paths
    hidden, one line, cut short. The full error goes to the server's log."""
    for root in {str(repository.resolve()), str(repository.absolute())}:
        error = error.replace(root.rstrip("/") + "/", "")
    error = " ".join(_ABSOLUTE.sub("<path>", error).split())
    return error if len(error) <= REASON_CHARS else error[:REASON_CHARS - 1] + "…"


def _load_key(disk: ModelOnDisk, version: int) -> str:
    assert disk.config is not None
    text = disk.versions[version].stamp + disk.config.load_key()
    return hashlib.sha256(text.encode()).hexdigest()


class Collector:
    """Frees unloaded versions' reference cycles (TensorFlow's functions, Keras' layers).

    TensorFlow and Keras hold hundreds of thousands of objects from import on; a full
    collection walks them all, holding the GIL for about a second, pausing every request.
    So what exists once the start-up load is done is frozen out of the cycle collector
    (`freeze`), and collections walk only what came later: a version loaded after that
    is freed by a cheap collection. Freeing a frozen one (loaded at start-up) takes a full
    one: everything is thawed, collected, frozen again. Unloads close together share one
    collection, on the loader thread."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self._executor = executor
        self.freezes = 0  # a version loaded when this was n is frozen once it passes n
        self._full = False  # a collection is wanted, and must thaw what is frozen
        self._wanted = False
        self._pending: asyncio.Task[None] | None = None

    def freeze(self) -> None:
        gc.freeze()
        self.freezes += 1

    def cancel(self) -> None:
        """The server stops: what is left is freed with the process."""
        if self._pending:
            self._pending.cancel()

    def request(self, full: bool) -> None:
        """Collect soon; `full`: a frozen version was let go."""
        self._full |= full
        self._wanted = True
        if self._pending is None or self._pending.done():
            self._pending = asyncio.create_task(self._collect(), name="collect")

    async def _collect(self) -> None:
        while self._wanted:  # again if an unload came while the last one ran
            await asyncio.sleep(COLLECT_AFTER_S)
            full, self._full, self._wanted = self._full, False, False
            seconds = await asyncio.get_running_loop().run_in_executor(
                self._executor, _collect, full)
            if full:  # every version loaded so far is frozen now
                self.freezes += 1
            log.debug("garbage collection (%s) took %.3fs", "full" if full else "young",
                      seconds)


def _collect(full: bool) -> float:
    started = time.perf_counter()
    if full:
        gc.unfreeze()
    gc.collect()
    if full:
        gc.freeze()
    return time.perf_counter() - started


class Lifecycle:
    def __init__(self, repository: Path, models: dict[str, ModelEntry], loader: Loads,
                 metrics: Metrics, drain_grace: float,
                 on_change: Callable[[], Awaitable[None]] | None = None) -> None:
        self.repository = repository
        self.models = models
        self.loader = loader
        self.metrics = metrics
        self.drain_grace = drain_grace
        self.closing = False
        self._on_change = on_change
        self._tasks: set[asyncio.Task[object]] = set()  # drains, and API calls that must finish
        # One loader thread: loads happen one at a time, never on the event loop.
        self._loader = ThreadPoolExecutor(1, "loader")
        self.collector = Collector(self._loader)
        self._loaded_at: dict[int, int] = {}  # id(model) -> collector.freezes at its load

    async def sync(self, entry: ModelEntry, quiet: float) -> list[str]:
        """Bring one model in step with its folder. Returns the errors of the loads it
        tried."""
        async with entry.lock:
            try:
                errors = await self._sync(entry, quiet)
            finally:
                entry.synced = True
        await self.changed()
        return errors

    async def _sync(self, entry: ModelEntry, quiet: float) -> list[str]:
        disk = await asyncio.to_thread(scan, self.repository, entry.name)
        if disk is None:
            log.info("model %s: its folder is gone; unloading it", entry.name)
            for v in entry.serving():
                self.retire(entry, v, "its folder was removed")
            for v in [v for v, s in entry.versions.items() if s.state == UNAVAILABLE]:
                self._forget(entry, v)
            self.models.pop(entry.name, None)
            self.metrics.forget_model(entry.name)
            return []
        if disk.config is None:
            if entry.config_failed != disk.config_stamp or quiet == 0:
                entry.config_failed = disk.config_stamp
                self._failed(entry, None, disk.config_error)
            reason = public_reason(disk.config_error, self.repository)
            if not entry.serving():
                entry.error, entry.category = reason, "its config.yaml is invalid"
            return [reason]  # the config in force keeps serving
        entry.config_failed, entry.config_labels = "", dict(disk.config.labels)
        settled = disk.settled(quiet)
        keys = {v: _load_key(disk, v) for v in disk.versions}
        slots = entry.versions
        candidates = {v for v in settled if slots.get(v, VersionSlot(v)).failed_key != keys[v]}
        candidates |= {v for v in entry.serving() if v in disk.versions}
        target = disk.config.select(candidates)
        errors = []
        for v in sorted(target, reverse=True):  # the highest first: "" routes to it
            slot = slots.setdefault(v, VersionSlot(v))
            if v in settled and keys[v] not in (slot.serving_key, slot.failed_key):
                await self._load(entry, slot, disk, keys[v])
                if slot.error:
                    errors.append(f"version {v}: {slot.error}")
        # What leaves: versions whose folder is gone, and, once the target serves, the rest.
        target_serves = any(slots[v].serving for v in target if v in slots)
        for v in entry.serving():
            if v not in disk.versions:
                self.retire(entry, v, "its folder was removed")
            elif v not in target and target_serves:
                self.retire(entry, v, "the version policy no longer selects it")
        for v in [v for v, s in slots.items() if v not in disk.versions and s.state == UNAVAILABLE]:
            self._forget(entry, v)
        entry.error = "" if entry.serving() else self._why_nothing(entry, disk, target)
        entry.category = entry.error  # when no version failed, a sentence with no path
        return errors

    def _why_nothing(self, entry: ModelEntry, disk: ModelOnDisk, target: set[int]) -> str:
        errors = [f"version {v}: {s.error}" for v, s in sorted(entry.versions.items()) if s.error]
        if errors:
            return "; ".join(errors)
        if not disk.versions:
            return "no version folder (a positive integer) in its folder"
        if not target:
            return (f"its version policy selects none of the versions on disk "
                    f"{sorted(disk.versions)}")
        return "its new version folders are still being written"

    async def _load(self, entry: ModelEntry, slot: VersionSlot, disk: ModelOnDisk,
                    key: str) -> None:
        assert disk.config is not None
        name, version = entry.name, slot.version
        if not slot.serving:
            self.metrics.model_ready.labels(name, str(version)).set(0)
        slot.loading = True
        await self.changed()
        started = time.monotonic()
        log.info("loading model %s version %d", name, version)
        try:
            on_disk = disk.versions[version]
            if on_disk.error:  # a file it holds cannot be read: said once, in one line
                raise ConfigError(on_disk.error,
                                  category="a file in its version folder cannot be read")
            source = model_source(name, version, on_disk.folder, disk.config)
            model = await asyncio.get_running_loop().run_in_executor(
                self._loader, self.loader.load, source)
        except Exception as exc:  # a model file can break in any way: keep serving the rest
            if not isinstance(exc, TapserveError):
                log.exception("model %s version %d failed to load", name, version)
            full = str(exc) if isinstance(exc, TapserveError) else f"{type(exc).__name__}: {exc}"
            slot.failed_key, slot.error = key, public_reason(full, self.repository)
            slot.category = getattr(exc, "category", "the model could not be loaded")
            self._failed(entry, version, full)
            return
        finally:
            slot.loading = False
        if self.closing:
            model.release()
            return
        model.start(on_batch=lambda rows, seconds: self._on_batch(name, rows, seconds),
                    on_depth=self.metrics.queue_depth.labels(name, str(version)).set,
                    on_dedup=self.metrics.deduplicated_rows.labels(name).inc,
                    on_explain=lambda endpoint, seconds: self.metrics.explain_compute_duration
                    .labels(name, endpoint).observe(seconds))
        self._loaded_at[id(model)] = self.collector.freezes
        replaced, slot.serving, slot.serving_key = slot.serving, model, key
        slot.failed_key, slot.error, slot.category = "", "", ""
        seconds = time.monotonic() - started
        self.metrics.model_ready.labels(name, str(version)).set(1)
        self.metrics.model_load.labels(name, str(version)).set(seconds)
        log.info("model %s version %d ready in %.1fs: endpoints %s (default %s)", name, version,
                 seconds, ", ".join(model.endpoints), model.default_endpoint)
        if replaced:  # the same version, reloaded: the new one already answers
            self._drain(replaced, f"model {name} version {version} (replaced)")

    def retire(self, entry: ModelEntry, version: int, why: str) -> asyncio.Task[object]:
        """Take a version out of routing now; it finishes its requests, then is freed."""
        slot = entry.versions[version]
        model, slot.serving, slot.serving_key = slot.serving, None, ""
        assert model is not None
        slot.unloading = True
        self.metrics.forget_version(entry.name, version, keep_queue_depth=True)
        log.info("model %s version %d: unloading (%s)", entry.name, version, why)

        def done(_: asyncio.Task[object]) -> None:
            slot.unloading = False
            if not slot.serving and not slot.loading and entry.versions.get(version) is slot:
                del entry.versions[version]
        task = self._drain(model, f"model {entry.name} version {version}")
        task.add_done_callback(done)
        return task

    async def unload(self, entry: ModelEntry) -> None:
        """Stop serving a model (the repository API); returns once its requests finished."""
        async with entry.lock:
            entry.wanted, entry.error = False, "unloaded"
            drains = [self.retire(entry, v, "unloaded through the repository API")
                      for v in entry.serving()]
            for v in [v for v, s in entry.versions.items() if not (s.serving or s.unloading)]:
                self._forget(entry, v)
        await self.changed()
        if drains:
            await asyncio.wait(drains)

    def _forget(self, entry: ModelEntry, version: int) -> None:
        """A version that serves nothing leaves the table, and its series the metrics."""
        del entry.versions[version]
        self.metrics.forget_version(entry.name, version)

    def _drain(self, model: LoadedModel, what: str) -> asyncio.Task[object]:
        async def drain() -> None:
            await model.close(self.drain_grace)
            entry = self.models.get(model.name)
            slot = entry.versions.get(model.version) if entry else None
            if not (slot and slot.serving):  # no newer load of it sets the gauge now
                self.metrics.queue_depth.remove(model.name, str(model.version))
            loaded_at = self._loaded_at.pop(id(model), 0)
            self.collector.request(full=self.collector.freezes > loaded_at)
            log.info("%s unloaded", what)
        return self.keep(drain(), f"drain {what}")

    def keep(self, work: Awaitable[object], name: str) -> asyncio.Task[object]:
        """A task that runs to its end whoever stops waiting for it (a client's deadline
        cancels its call, not the unload it asked for)."""
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Retrieved here: no one may be waiting for it any more.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    def _failed(self, entry: ModelEntry, version: int | None, error: str) -> None:
        self.metrics.model_load_failures.labels(entry.name).inc()
        what = f"model {entry.name}" + (f" version {version}" if version else " config.yaml")
        keeps = f"; still serving versions {entry.serving()}" if entry.serving() else ""
        log.error("%s failed to load: %s%s", what, error, keeps)

    def _on_batch(self, name: str, rows: int, seconds: float) -> None:
        self.metrics.batch_size.labels(name).observe(rows)
        self.metrics.compute_duration.labels(name).observe(seconds)

    async def changed(self) -> None:
        if self._on_change:
            await self._on_change()

    async def close(self, grace: float) -> None:
        """Let every version finish its queued work (within `grace` seconds), then free."""
        self.closing = True
        for entry in self.models.values():
            for slot in entry.versions.values():
                if slot.serving:
                    model, slot.serving = slot.serving, None
                    self.keep(model.close(grace), f"close {model.name} {model.version}")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace + 5)
        self.collector.cancel()
        self._loader.shutdown(wait=False)
