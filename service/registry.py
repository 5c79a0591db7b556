"""The process's registry of models: which versions serve, and the lifecycle that keeps
them in step with the model repository.

A version serves only once it has loaded and warmed up. A load that fails never
replaces what serves. A version the policy drops leaves the routing at once, finishes
the requests it holds, then is freed. `sync` does all of it for one model; the modes
differ only in who calls it: the poll loop (poll), the repository API (explicit), or
start-up alone (none).
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
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import ConfigError, LoadFailed, NotFound, NotReady, TapserveError, Unsupported
from service.loading import Loader
from service.metrics import Metrics
from service.model import LoadedModel
from service.repository import ModelOnDisk, model_names, scan

log = logging.getLogger(__name__)

# Where a client told that a model failed to load is sent for the details.
WHERE_WHY = "the repository index and the server's log say why"
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
POLL, EXPLICIT, NONE = "poll", "explicit", "none"


@dataclass
class VersionSlot:
    """One version number of one model: what serves it, what is loading, what failed."""

    version: int
    serving: LoadedModel | None = None
    serving_key: str = ""  # the files and config it was loaded from
    loading: bool = False
    failed_key: str = ""  # a load of these files and config failed: not retried as is
    error: str = ""  # why, as the repository index shows it (public_reason)
    category: str = ""  # why, in a few words, as a request to it is told
    unloading: bool = False

    @property
    def state(self) -> str:
        if self.serving:
            return READY
        return LOADING if self.loading else UNLOADING if self.unloading else UNAVAILABLE


@dataclass
class ModelEntry:
    name: str
    wanted: bool = True  # the server is configured to serve it (strict readiness)
    config_labels: dict[str, int] = field(default_factory=dict)
    config_failed: str = ""  # the config.yaml contents that did not parse, counted once
    error: str = ""  # why the model serves nothing, when it does not (public_reason)
    category: str = ""  # that, in a few words, when no version's category says it
    versions: dict[int, VersionSlot] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    synced: bool = False

    def serving(self) -> list[int]:
        return sorted(v for v, s in self.versions.items() if s.serving)


def _load_key(disk: ModelOnDisk, version: int) -> str:
    assert disk.config is not None
    text = disk.versions[version].stamp + disk.config.load_key()
    return hashlib.sha256(text.encode()).hexdigest()


# An absolute path not under the repository: a library's file, a system file.
_ABSOLUTE = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"]+/)*[^\s/'\":,;)\]]*")
REASON_CHARS = 500


def public_reason(error: str, repository: Path) -> str:
    """A load error as clients may read it (the repository index, GetModelStatus, a failed
    RepositoryModelLoad): paths relative to the model repository, other absolute paths
    hidden, one line, cut short. The full error goes to the server's log."""
    for root in {str(repository.resolve()), str(repository.absolute())}:
        error = error.replace(root.rstrip("/") + "/", "")
    error = " ".join(_ABSOLUTE.sub("<path>", error).split())
    return error if len(error) <= REASON_CHARS else error[:REASON_CHARS - 1] + "…"


def _collect() -> None:
    """Free an unloaded version's reference cycles.

    Loaded models stay frozen out of the cycle collector (gc.freeze after each load):
    TensorFlow and Keras hold millions of objects, and every full collection would walk
    them all, pausing requests ~150 ms (a REST request's JSON lists alone trigger them).
    An unload thaws them for one full collection, so what it let go is freed."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ModelRegistry:
    def __init__(self, repository: Path, mode: str, loader: Loader, metrics: Metrics,
                 drain_grace: float, on_change: Callable[[], Awaitable[None]] | None = None,
                 refresh: Callable[[float], Awaitable[object]] | None = None) -> None:
        self.repository = repository
        self._refresh = refresh  # brings a mirrored repository (service/storage.py) up to date
        self.mode = mode
        self.loader = loader
        self.metrics = metrics
        self.drain_grace = drain_grace
        self.models: dict[str, ModelEntry] = {}
        self.settled = False  # the start-up load is done
        self._on_change = on_change
        self._closing = False
        self._warned: set[str] = set()  # folder names model_names warned about
        self._drains: set[asyncio.Task] = set()
        # One loader thread: loads happen one at a time, never on the event loop.
        self._loader = ThreadPoolExecutor(1, "loader")

    # What serves

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The version that answers a request for (name, version or label); None: the
        highest that serves. Raises NotFound or NotReady, saying why."""
        entry = self.models.get(name)
        if entry is None and self.mode == EXPLICIT and (self.repository / name).is_dir():
            raise NotReady(f"model {name!r} is not loaded; load it through the repository API")
        if entry is None:
            known = ", ".join(n for n, e in self.models.items() if e.wanted) or "none"
            raise NotFound(f"no model {name!r}; models: {known}")
        if version is None:
            serving = entry.serving()
            if serving:
                return entry.versions[serving[-1]].serving  # type: ignore[return-value]
            if not entry.wanted:
                raise NotReady(f"model {name!r} is not loaded; load it through the "
                               "repository API")
            if not entry.synced or any(s.loading for s in entry.versions.values()):
                raise NotReady(f"model {name!r} is still loading")
            failed = [s.category for _, s in sorted(entry.versions.items()) if s.error]
            raise NotReady(f"model {name!r} cannot serve: "
                           f"{failed[-1] if failed else entry.category or 'it failed to load'}"
                           f"; {WHERE_WHY}")
        number = self._version_number(entry, version)
        slot = entry.versions.get(number)
        if slot and slot.serving:
            return slot.serving
        if slot and slot.loading:
            raise NotReady(f"model {name!r} version {number} is still loading")
        if slot and slot.unloading:
            raise NotReady(f"model {name!r} version {number} is unloading")
        if slot and slot.error:  # the reason's details are the operator's, not the client's
            raise NotReady(f"model {name!r} version {number} failed to load: {slot.category}"
                           f"; {WHERE_WHY}")
        serving = entry.serving()
        raise NotFound(f"model {name!r} serves " + (
            f"version{'s' if len(serving) > 1 else ''} {', '.join(map(str, serving))}"
            if serving else "no version now") + f", not {number}")

    def version_number(self, name: str, version: str) -> int:
        """The version number a version string (a number or a label) of `name` stands for."""
        return self._version_number(self.models[name], version)

    def _version_number(self, entry: ModelEntry, version: str) -> int:
        if version.isdigit():
            return int(version)
        if version in entry.config_labels:
            return entry.config_labels[version]
        raise NotFound(f"model {entry.name!r} has no version or label {version!r}; versions "
                       f"{entry.serving() or 'none'}, labels "
                       f"{sorted(entry.config_labels) or 'none'}")

    def serving_versions(self, name: str) -> tuple[int, ...]:
        entry = self.models.get(name)
        return tuple(entry.serving()) if entry else ()

    def ready(self, strict: bool) -> bool:
        """Start-up is done and (strict) every model the server should serve serves."""
        return self.settled and (not strict or all(
            e.serving() for e in self.models.values() if e.wanted))

    def index(self) -> list[tuple[str, str, str, str]]:
        """(model, version, state, reason) for every version known, and every model folder
        of the repository ("" for a model with no version known)."""
        rows = []
        try:
            on_disk = set(model_names(self.repository, self._warned))
        except ConfigError:
            on_disk = set()
        for name in sorted(on_disk | set(self.models)):
            entry = self.models.get(name)
            if entry is None or not entry.versions:
                reason = (entry.error if entry and entry.wanted and entry.synced
                          else "" if entry and entry.wanted else "not loaded")
                state = LOADING if entry and entry.wanted and not entry.synced else UNAVAILABLE
                rows.append((name, "", state, reason))
                continue
            for v, slot in sorted(entry.versions.items()):
                reason = slot.error if slot.serving is None else (
                    f"serving; a reload failed: {slot.error}" if slot.error else "")
                rows.append((name, str(v), slot.state, reason))
        return rows

    # Keeping in step with the repository

    async def start(self, load: list[str]) -> None:
        """The start-up load: every model (poll, none), or those named (explicit; '*': all)."""
        names = model_names(self.repository, self._warned)  # a missing repository fails here
        if self.mode == EXPLICIT:
            names = names if "*" in load else [n for n in load if n in names]
            missing = sorted(set(load) - set(names) - {"*"})
            if missing:
                log.error("--load-model names models the repository lacks: %s", missing)
        if not names:
            log.warning("NO MODELS: the model repository %s holds no model folder to load "
                        "(<model>/<version>/model.keras); the server serves nothing",
                        self.repository)
        for name in names:
            self.models[name] = ModelEntry(name)
        await self._changed()
        for name in names:
            await self.sync(name, quiet=0)
        self.settled = True
        await self._changed()
        log.info("start-up load done: %s", ", ".join(
            f"{e.name} {e.serving() or e.error}" for e in self.models.values()) or "no models")

    async def poll(self, interval: float) -> None:
        """Poll mode: re-read the repository every `interval` seconds, forever."""
        while True:
            await asyncio.sleep(interval)
            if self._refresh:
                await self._refresh(interval)
            try:
                names = set(model_names(self.repository, self._warned))
            except ConfigError as exc:
                log.error("cannot read the model repository (keeping what serves): %s", exc)
                continue
            for name in sorted(names | set(self.models)):
                try:
                    await self.sync(name, quiet=interval)
                except Exception:  # one model's trouble must not stop the others' polling
                    log.exception("model %s: sync failed", name)

    async def load(self, name: str) -> None:
        """Repository API: load (or reload) a model and wait until it serves."""
        self._explicit_only("load")
        if self._refresh:
            await self._refresh(0)
        if name not in model_names(self.repository, self._warned):
            raise NotFound(f"no model {name!r} in the model repository")
        entry = self.models.setdefault(name, ModelEntry(name))
        entry.wanted = True
        for slot in entry.versions.values():
            slot.failed_key = ""  # asked again: try again, even files that failed before
        errors = await self.sync(name, quiet=0)
        if errors or not entry.serving():
            keeps = (f" (versions {entry.serving()} keep serving as they were)"
                     if entry.serving() else "")
            raise LoadFailed(f"failed to load model {name!r}: "
                             f"{'; '.join(errors) or entry.error}{keeps}")

    async def unload(self, name: str) -> None:
        """Repository API: stop serving a model; returns once its requests finished."""
        self._explicit_only("unload")
        entry = self.models.get(name)
        if entry is None or not entry.wanted:
            raise NotFound(f"model {name!r} is not loaded")
        async with entry.lock:
            entry.wanted, entry.error = False, "unloaded"
            drains = [self._retire(entry, v, "unloaded through the repository API")
                      for v in entry.serving()]
            entry.versions = {v: s for v, s in entry.versions.items() if s.serving or s.unloading}
        await self._changed()
        await asyncio.gather(*drains)

    def _explicit_only(self, what: str) -> None:
        if self.mode != EXPLICIT:
            # Triton's own words and code for the same refusal.
            raise Unsupported(f"explicit model {what} is not allowed: the server runs with "
                              f"--model-control-mode {self.mode}; use explicit")

    async def sync(self, name: str, quiet: float) -> list[str]:
        """Bring one model in step with its folder: load what the policy wants, swap it in
        once ready, retire what the policy dropped or what left the disk. Returns the
        errors of the loads it tried."""
        entry = self.models.setdefault(name, ModelEntry(name, wanted=self.mode != EXPLICIT))
        if not entry.wanted:
            return []
        async with entry.lock:
            try:
                errors = await self._sync(entry, quiet)
            finally:
                entry.synced = True
        await self._changed()
        return errors

    async def _sync(self, entry: ModelEntry, quiet: float) -> list[str]:
        disk = await asyncio.to_thread(scan, self.repository, entry.name)
        if disk is None:
            log.info("model %s: its folder is gone; unloading it", entry.name)
            for v in entry.serving():
                self._retire(entry, v, "its folder was removed")
            self.models.pop(entry.name, None)
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
                self._retire(entry, v, "its folder was removed")
            elif v not in target and target_serves:
                self._retire(entry, v, "the version policy no longer selects it")
        for v in [v for v, s in slots.items() if v not in disk.versions and s.state == UNAVAILABLE]:
            del slots[v]
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
        await self._changed()
        started = time.monotonic()
        log.info("loading model %s version %d", name, version)
        try:
            source = disk.source(version, disk.config)
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
        if self._closing:
            model.release()
            return
        model.start(on_batch=lambda rows, seconds: self._on_batch(name, rows, seconds),
                    on_depth=self.metrics.queue_depth.labels(name, str(version)).set,
                    on_dedup=self.metrics.deduplicated_rows.labels(name).inc,
                    on_explain=lambda endpoint, seconds: self.metrics.explain_compute_duration
                    .labels(name, endpoint).observe(seconds))
        gc.freeze()  # see _collect
        replaced, slot.serving, slot.serving_key = slot.serving, model, key
        slot.failed_key, slot.error, slot.category = "", "", ""
        seconds = time.monotonic() - started
        self.metrics.model_ready.labels(name, str(version)).set(1)
        self.metrics.model_load.labels(name, str(version)).set(seconds)
        log.info("model %s version %d ready in %.1fs: endpoints %s (default %s)", name, version,
                 seconds, ", ".join(model.endpoints), model.default_endpoint)
        if replaced:  # the same version, reloaded: the new one already answers
            self._drain(replaced, f"model {name} version {version} (replaced)")

    def _retire(self, entry: ModelEntry, version: int, why: str) -> asyncio.Task:
        """Take a version out of routing now; it finishes its requests, then is freed."""
        slot = entry.versions[version]
        model, slot.serving, slot.serving_key = slot.serving, None, ""
        assert model is not None
        slot.unloading = True
        self.metrics.model_ready.remove(entry.name, str(version))
        log.info("model %s version %d: unloading (%s)", entry.name, version, why)

        def done(_: asyncio.Task) -> None:
            slot.unloading = False
            if not slot.serving and not slot.loading and entry.versions.get(version) is slot:
                del entry.versions[version]
        task = self._drain(model, f"model {entry.name} version {version}")
        task.add_done_callback(done)
        return task

    def _drain(self, model: LoadedModel, what: str) -> asyncio.Task:
        async def drain() -> None:
            await model.close(self.drain_grace)
            entry = self.models.get(model.name)
            slot = entry.versions.get(model.version) if entry else None
            if not (slot and slot.serving):  # no newer load of it sets the gauge now
                self.metrics.queue_depth.remove(model.name, str(model.version))
            # TensorFlow's functions and Keras' layers hold reference cycles: free them now.
            await asyncio.get_running_loop().run_in_executor(self._loader, _collect)
            log.info("%s unloaded", what)
        task = asyncio.create_task(drain(), name=f"drain {what}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return task

    def _failed(self, entry: ModelEntry, version: int | None, error: str) -> None:
        self.metrics.model_load_failures.labels(entry.name).inc()
        what = f"model {entry.name}" + (f" version {version}" if version else " config.yaml")
        keeps = f"; still serving versions {entry.serving()}" if entry.serving() else ""
        log.error("%s failed to load: %s%s", what, error, keeps)

    def _on_batch(self, name: str, rows: int, seconds: float) -> None:
        self.metrics.batch_size.labels(name).observe(rows)
        self.metrics.compute_duration.labels(name).observe(seconds)

    async def _changed(self) -> None:
        if self._on_change:
            await self._on_change()

    async def close(self, grace: float) -> None:
        """Let every version finish its queued work (within `grace` seconds), then free."""
        self._closing = True
        for entry in self.models.values():
            for slot in entry.versions.values():
                if slot.serving:
                    model, slot.serving = slot.serving, None
                    self._drains.add(asyncio.create_task(model.close(grace)))
        if self._drains:
            await asyncio.wait(list(self._drains), timeout=grace + 5)
        self._loader.shutdown(wait=False)
