"""The process's registry of models: the one object the server and the data plane hold.

It composes routing (service/routing.py: which version answers a name or a label, each
version's state, readiness) and the lifecycle (service/lifecycle.py: sync, load, swap,
drain, unload) over one model table. The modes differ only in who calls `sync`: the poll
loop (poll), the repository API (explicit), or start-up alone (none).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from service.errors import ConfigError, LoadFailed, NotFound, Unsupported
from service.lifecycle import Lifecycle, Loads, public_reason
from service.metrics import Metrics
from service.model import LoadedModel
from service.repository import model_names
from service.routing import (
    EXPLICIT,
    LOADING,
    NONE,
    POLL,
    READY,
    UNAVAILABLE,
    UNLOADING,
    WHERE_WHY,
    ModelEntry,
    Routing,
)

__all__ = ["EXPLICIT", "LOADING", "NONE", "POLL", "READY", "UNAVAILABLE", "UNLOADING",
           "WHERE_WHY", "ModelRegistry", "public_reason"]

log = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self, repository: Path, mode: str, loader: Loads, metrics: Metrics,
                 drain_grace: float, on_change: Callable[[], Awaitable[None]] | None = None,
                 refresh: Callable[[float], Awaitable[object]] | None = None) -> None:
        self.repository = repository
        self._refresh = refresh  # brings a mirrored repository (service/storage.py) up to date
        self.mode = mode
        self.settled = False  # the start-up load is done
        self._models: dict[str, ModelEntry] = {}
        self._warned: set[str] = set()  # folder names model_names warned about
        self._routing = Routing(self._models, mode, lambda n: (repository / n).is_dir())
        self._lifecycle = Lifecycle(repository, self._models, loader, metrics, drain_grace,
                                    on_change)

    # What serves (routing)

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The version that answers a request for (name, version or label); None: the
        highest that serves. Raises NotFound or NotReady, saying why."""
        return self._routing.get(name, version)

    def version_number(self, name: str, version: str) -> int:
        """The version number a version string (a number or a label) of `name` stands for."""
        return self._routing.version_number(name, version)

    def serving_versions(self, name: str) -> tuple[int, ...]:
        return self._routing.serving_versions(name)

    def ready(self, strict: bool) -> bool:
        """Start-up is done and (strict) every model the server should serve serves."""
        return self.settled and self._routing.ready(strict)

    def not_ready(self, strict: bool) -> list[tuple[str | None, str]]:
        """Why `ready(strict)` is false: (the model it is about, or None; a few words)."""
        why: list[tuple[str | None, str]] = (
            [] if self.settled else [(None, "the start-up load is running")])
        return why + list(self._routing.not_serving() if strict else [])

    def index(self) -> list[tuple[str, str, str, str]]:
        """(model, version, state, reason) for every version known, and every model folder
        of the repository ("" for a model with no version known)."""
        try:
            on_disk = model_names(self.repository, self._warned)
        except ConfigError:
            on_disk = []
        return self._routing.index(on_disk)

    def names(self) -> list[str]:
        """The models the server knows (serving, loading, failed or unloaded), sorted."""
        return self._routing.names()

    def reason(self, name: str) -> str:
        """Why a known model serves nothing ("" when it serves or is unknown)."""
        return self._routing.reason(name)

    @property
    def models(self) -> Mapping[str, ModelEntry]:
        """The model table, read-only (names(), reason() and serving_versions() say what
        callers need without it)."""
        return MappingProxyType(self._models)

    # Keeping in step with the repository (lifecycle)

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
            self._models[name] = ModelEntry(name)
        await self._lifecycle.changed()
        for name in names:
            await self._sync_logged(name, quiet=0)
        # What start-up made stays: later collections need not walk it (see Collector).
        self._lifecycle.collector.freeze()
        self.settled = True
        await self._lifecycle.changed()
        log.info("start-up load done: %s", ", ".join(
            f"{e.name} {e.serving() or e.error}" for e in self._models.values()) or "no models")

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
            for name in sorted(names | set(self._models)):
                await self._sync_logged(name, quiet=interval)

    async def _sync_logged(self, name: str, quiet: float) -> None:
        try:
            await self.sync(name, quiet)
        except Exception:  # one model's trouble must not stop the others' loading
            log.exception("model %s: sync failed", name)

    async def load(self, name: str) -> None:
        """Repository API: load (or reload) a model and wait until it serves. Once asked,
        the load completes even if the caller stops waiting."""
        self._explicit_only("load")
        if self._refresh:
            await self._refresh(0)
        if name not in model_names(self.repository, self._warned):
            raise NotFound(f"no model {name!r} in the model repository")
        await asyncio.shield(self._lifecycle.keep(self._load(name), f"load {name}"))

    async def _load(self, name: str) -> None:
        entry = self._models.setdefault(name, ModelEntry(name))
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
        """Repository API: stop serving a model; returns once its requests finished. Once
        accepted, the unload completes even if the caller stops waiting."""
        self._explicit_only("unload")
        entry = self._models.get(name)
        if entry is None or not entry.wanted:
            raise NotFound(f"model {name!r} is not loaded")
        await asyncio.shield(self._lifecycle.keep(self._lifecycle.unload(entry),
                                                       f"unload {name}"))

    def _explicit_only(self, what: str) -> None:
        if self.mode != EXPLICIT:
            # Triton's own words and code for the same refusal.
            raise Unsupported(f"explicit model {what} is not allowed: the server runs with "
                              f"--model-control-mode {self.mode}; use explicit")

    async def sync(self, name: str, quiet: float) -> list[str]:
        """Bring one model in step with its folder (see Lifecycle.sync)."""
        entry = self._models.setdefault(name, ModelEntry(name, wanted=self.mode != EXPLICIT))
        if not entry.wanted:
            return []
        return await self._lifecycle.sync(entry, quiet)

    async def close(self, grace: float) -> None:
        """Let every version finish its queued work (within `grace` seconds), then free."""
        await self._lifecycle.close(grace)
