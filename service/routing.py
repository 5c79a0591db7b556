"""Routing: which loaded version answers a model name, a version number or a label, what
state each version is in, and whether the server is ready. Reads the model table the
lifecycle (service/lifecycle.py) keeps; changes nothing, touches no file."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from service.errors import NotFound, NotReady
from service.model import LoadedModel

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


class Routing:
    """Answers "who serves this?" from `models`, the table the lifecycle keeps.

    `loadable(name)`: explicit mode's test for a model folder the API could load, so a
    request for it hears "not loaded" rather than "no model"."""

    def __init__(self, models: dict[str, ModelEntry], mode: str,
                 loadable: Callable[[str], bool]) -> None:
        self.models = models
        self.mode = mode
        self._loadable = loadable

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        entry = self.models.get(name)
        if entry is None and self.mode == EXPLICIT and self._loadable(name):
            raise NotReady(f"model {name!r} is not loaded; load it through the repository API")
        if entry is None:
            known = ", ".join(n for n, e in self.models.items() if e.wanted) or "none"
            raise NotFound(f"no model {name!r}; models: {known}")
        if version is None:
            serving = entry.serving()
            latest = entry.versions[serving[-1]].serving if serving else None
            if latest is not None:  # serving() lists only versions that have one
                return latest
            if not entry.wanted:
                raise NotReady(f"model {name!r} is not loaded; load it through the "
                               "repository API")
            if not entry.synced or any(s.loading for s in entry.versions.values()):
                raise NotReady(f"model {name!r} is still loading")
            failed = [s.category for _, s in sorted(entry.versions.items()) if s.error]
            raise NotReady(f"model {name!r} cannot serve: "
                           f"{failed[-1] if failed else entry.category or 'it failed to load'}"
                           f"; {WHERE_WHY}")
        number = self._number(entry, version)
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
        serves = (f"version{'s' if len(serving) > 1 else ''} {', '.join(map(str, serving))}"
                  if serving else "no version now")
        if not version.isdigit():  # a label left behind by a policy change
            raise NotFound(f"label {version!r} of model {name!r} names version {number}, "
                           f"which is not served (it serves {serves}): the label in its "
                           "config.yaml needs to name a served version")
        raise NotFound(f"model {name!r} serves {serves}, not {number}")

    def version_number(self, name: str, version: str) -> int:
        entry = self.models.get(name)
        if entry is None:
            self.get(name)  # raises NotFound (or NotReady), saying why
            raise NotFound(f"no model {name!r}")
        return self._number(entry, version)

    def _number(self, entry: ModelEntry, version: str) -> int:
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
        """(Start-up being done:) every model the server should serve serves, if strict."""
        return not strict or not self.not_serving()

    def not_serving(self) -> list[tuple[str, str]]:
        """(model, its state in a few words) for each model the server should serve and
        does not (no paths or details: readiness is asked without a token)."""
        found = []
        for name, entry in sorted(self.models.items()):
            if not entry.wanted or entry.serving():
                continue
            if not entry.synced or any(s.loading for s in entry.versions.values()):
                found.append((name, "loading"))
                continue
            failed = [s.category for _, s in sorted(entry.versions.items()) if s.error]
            found.append((name, "cannot serve: " + (
                failed[-1] if failed else entry.category or "it failed to load")))
        return found

    def index(self, on_disk: Iterable[str]) -> list[tuple[str, str, str, str]]:
        """(model, version, state, reason) for every version known, and every model folder
        `on_disk` names ("" for a model with no version known)."""
        rows = []
        for name in sorted(set(on_disk) | set(self.models)):
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

    def names(self) -> list[str]:
        """The models the server knows (serving, loading, failed or unloaded), sorted."""
        return sorted(self.models)

    def reason(self, name: str) -> str:
        """Why a known model serves nothing ("" when it serves or nothing is known)."""
        entry = self.models.get(name)
        return (entry.error or ("" if entry.wanted else "not loaded")) if entry else ""
