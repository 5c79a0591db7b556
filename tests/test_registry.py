"""The registry with a fake loader: swaps, failed loads, version policies, labels, drains,
unloads and metric series, in milliseconds, over a real repository folder on disk. What a
fake cannot show (Keras files, memory given back) is in tests/e2e/test_model_lifecycle.py.

A version folder's model.keras holds b"ok" (the fake loads it) or anything else (the fake
raises, as a broken file would)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.errors import LoadFailed, NotFound, NotReady
from service.metrics import Metrics
from service.registry import EXPLICIT, POLL, ModelRegistry
from service.repository import ModelSource, scan


class FakeModel:
    """What the registry needs of a LoadedModel; `gate` holds its drain open."""

    def __init__(self, source: ModelSource, gate: asyncio.Event | None) -> None:
        self.name, self.version, self.source = source.name, source.version, source
        self.endpoints = {"default": None}
        self.default_endpoint = "default"
        self.released = False
        self.gate = gate

    def start(self, on_batch: Any = None, on_depth: Callable[[int], None] | None = None,
              **callbacks: Any) -> None:
        if on_depth:
            on_depth(0)

    async def close(self, grace: float) -> None:
        if self.gate:
            await self.gate.wait()
        self.release()

    def release(self) -> None:
        self.released = True


class FakeLoader:
    def __init__(self) -> None:
        self.loaded: list[FakeModel] = []
        self.gate: asyncio.Event | None = None  # given to the models it loads from now on
        self.lock = threading.Lock()

    def load(self, source: ModelSource) -> FakeModel:
        content = source.path.read_bytes()
        if content != b"ok":
            raise ValueError(f"not a model: {content[:20]!r}")
        model = FakeModel(source, self.gate)
        with self.lock:
            self.loaded.append(model)
        return model


def write(repository: Path, name: str, version: int, content: bytes = b"ok") -> Path:
    folder = repository / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.keras").write_bytes(content)
    return folder


def configure(repository: Path, name: str, config: dict[str, Any]) -> None:
    (repository / name / "config.yaml").write_text(yaml.safe_dump(config))


async def until(condition: Callable[[], object], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.002)):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("the condition never held")


def series(metrics: Metrics, model: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample labelled with `model`."""
    return [(s.name, s.labels, s.value) for family in metrics.registry.collect()
            for s in family.samples if s.labels.get("model") == model]


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def make(tmp_path: Path, loader: FakeLoader, metrics: Metrics
               ) -> AsyncIterator[Callable[..., Any]]:
    made: list[ModelRegistry] = []

    async def start(mode: str = POLL, load: list[str] | None = None) -> ModelRegistry:
        made.append(ModelRegistry(tmp_path, mode, loader, metrics, drain_grace=1.0))
        await made[-1].start(load or [])
        return made[-1]
    yield start
    for registry in made:
        await registry.close(0)


async def test_a_new_version_serves_once_loaded_and_the_old_one_drains_then_is_freed(
        tmp_path: Path, loader: FakeLoader, make: Callable[..., Any]) -> None:
    write(tmp_path, "m", 1)
    registry = await make()
    first = registry.get("m")
    assert first.version == 1 and registry.ready(strict=True)
    loader.gate = asyncio.Event()
    write(tmp_path, "m", 2)
    first.gate = loader.gate  # version 1's drain waits for the gate
    await registry.sync("m", quiet=0)
    assert registry.get("m").version == 2 and registry.serving_versions("m") == (2,)
    with pytest.raises(NotReady, match="version 1 is unloading"):
        registry.get("m", "1")
    assert ("m", "1", "UNLOADING", "") in registry.index()
    loader.gate.set()
    await until(lambda: first.released)
    await until(lambda: ("m", "1", "UNLOADING", "") not in registry.index())
    with pytest.raises(NotFound, match="serves version 2, not 1"):
        registry.get("m", "1")


async def test_a_failed_load_never_replaces_what_serves_and_is_not_retried(
        tmp_path: Path, loader: FakeLoader, metrics: Metrics, make: Callable[..., Any]) -> None:
    write(tmp_path, "m", 1)
    registry = await make()
    write(tmp_path, "m", 2, b"garbage")
    await registry.sync("m", quiet=0)
    assert registry.get("m").version == 1
    assert [r for r in registry.index() if r[1] == "2"] == [
        ("m", "2", "UNAVAILABLE", "ValueError: not a model: b'garbage'")]
    with pytest.raises(NotReady, match="version 2 failed to load"):
        registry.get("m", "2")
    await registry.sync("m", quiet=0)
    assert len(loader.loaded) == 1  # the same broken files: no second try
    assert metrics.model_load_failures.labels("m")._value.get() == 1
    write(tmp_path, "m", 2)  # fixed: new files, a new try
    await registry.sync("m", quiet=0)
    assert registry.get("m").version == 2


async def test_version_policies_and_labels(tmp_path: Path, make: Callable[..., Any]) -> None:
    for v in (1, 2, 3):
        write(tmp_path, "m", v)
    configure(tmp_path, "m", {"version_policy": {"latest": 2}, "labels": {"stable": 2}})
    registry = await make()
    assert registry.serving_versions("m") == (2, 3)
    assert registry.get("m").version == 3 and registry.get("m", "stable").version == 2
    assert registry.version_number("m", "stable") == 2
    with pytest.raises(NotFound, match="no version or label 'beta'"):
        registry.get("m", "beta")
    configure(tmp_path, "m", {"version_policy": {"specific": [1]}, "labels": {"stable": 1}})
    await registry.sync("m", quiet=0)
    assert registry.serving_versions("m") == (1,)
    assert registry.get("m", "stable").version == 1
    # Regression: a label naming a version no longer served said only "serves 1, not 3".
    configure(tmp_path, "m", {"version_policy": {"specific": [1]}, "labels": {"canary": 3}})
    await registry.sync("m", quiet=0)
    with pytest.raises(NotFound, match=r"label 'canary' of model 'm' names version 3, which "
                       r"is not served \(it serves version 1\)"):
        registry.get("m", "canary")


async def test_a_version_folder_still_being_written_waits(
        tmp_path: Path, make: Callable[..., Any]) -> None:
    write(tmp_path, "m", 1)
    registry = await make()
    write(tmp_path, "m", 2)
    await registry.sync("m", quiet=60)  # written just now: not yet
    assert registry.serving_versions("m") == (1,)
    await registry.sync("m", quiet=0)
    assert registry.serving_versions("m") == (2,)


async def test_an_unload_whose_caller_gives_up_still_drains_and_frees_the_version(
        tmp_path: Path, loader: FakeLoader, make: Callable[..., Any]) -> None:
    """Issue 18.15: a client's 50 ms deadline cancelled the drain, and the version was
    never freed ("Task was destroyed but it is pending")."""
    write(tmp_path, "m", 1)
    loader.gate = asyncio.Event()
    registry = await make(EXPLICIT, ["m"])
    model = registry.get("m")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(registry.unload("m"), 0.05)
    with pytest.raises(NotReady, match="not loaded"):
        registry.get("m")
    loader.gate.set()
    await until(lambda: model.released)
    assert registry.index() == [("m", "", "UNAVAILABLE", "not loaded")]


async def test_a_load_whose_caller_gives_up_still_completes(
        tmp_path: Path, make: Callable[..., Any]) -> None:
    write(tmp_path, "m", 1)
    registry = await make(EXPLICIT)
    load = asyncio.ensure_future(registry.load("m"))
    await asyncio.sleep(0)
    load.cancel()
    await until(lambda: registry.serving_versions("m") == (1,))
    with pytest.raises(LoadFailed, match="failed to load model 'x': version 1: ValueError"):
        write(tmp_path, "x", 1, b"broken")
        await registry.load("x")


async def test_every_series_of_a_version_goes_with_it(
        tmp_path: Path, metrics: Metrics, make: Callable[..., Any]) -> None:
    """Defect 5: model_ready 0 of a failed model stayed after its folder was removed, and
    the load duration of unloaded versions stayed, so gone models stayed on dashboards."""
    write(tmp_path, "m", 1)
    write(tmp_path, "broken", 1, b"garbage")
    registry = await make()
    names = {name for name, labels, _ in series(metrics, "m")}
    assert {"tapserve_model_ready", "tapserve_model_load_duration_seconds",
            "tapserve_queue_depth"} <= names
    assert ("tapserve_model_ready", {"model": "broken", "version": "1"}, 0.0) in series(
        metrics, "broken")

    write(tmp_path, "m", 2)
    await registry.sync("m", quiet=0)
    await until(lambda: registry.index() == [("broken", "1", "UNAVAILABLE",
                                              "ValueError: not a model: b'garbage'"),
                                             ("m", "2", "READY", "")])
    assert {labels["version"] for _, labels, _ in series(metrics, "m")
            if "version" in labels} == {"2"}

    (tmp_path / "broken" / "1" / "model.keras").unlink()
    (tmp_path / "broken" / "1").rmdir()
    (tmp_path / "broken").rmdir()
    await registry.sync("broken", quiet=0)
    assert series(metrics, "broken") == []
    assert registry.index() == [("m", "2", "READY", "")]


async def test_a_removed_version_that_failed_leaves_no_series(
        tmp_path: Path, metrics: Metrics, make: Callable[..., Any]) -> None:
    write(tmp_path, "m", 1)
    registry = await make()
    write(tmp_path, "m", 2, b"garbage")
    await registry.sync("m", quiet=0)
    assert metrics.model_ready.labels("m", "2")._value.get() == 0
    (tmp_path / "m" / "2" / "model.keras").unlink()
    (tmp_path / "m" / "2").rmdir()
    await registry.sync("m", quiet=0)
    assert {labels["version"] for _, labels, _ in series(metrics, "m")
            if "version" in labels} == {"1"}


async def test_a_dangling_symlink_in_a_version_folder_is_no_problem(
        tmp_path: Path, make: Callable[..., Any]) -> None:
    """Issue 18.3: an editor's lock file (a symlink to nowhere) sent the scan into endless
    recursion: start-up died silently, polls logged a traceback each time."""
    folder = write(tmp_path, "m", 1)
    (folder / ".#model.keras").symlink_to("user@host.1234:1700000000")
    (folder / "loop").symlink_to(folder / "loop")
    write(tmp_path, "other", 1)
    assert scan(tmp_path, "m") is not None
    registry = await make()
    assert registry.ready(strict=True)
    assert registry.serving_versions("m") == (1,) == registry.serving_versions("other")
    stamp = scan(tmp_path, "m").versions[1].stamp  # type: ignore[union-attr]
    (folder / ".#model.keras").unlink()
    assert scan(tmp_path, "m").versions[1].stamp != stamp  # type: ignore[union-attr]


async def test_a_model_file_that_is_a_dangling_symlink_fails_its_version_only(
        tmp_path: Path, make: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    (folder / "model.keras").symlink_to(tmp_path / "gone.keras")
    write(tmp_path, "other", 1)
    registry = await make()
    assert registry.serving_versions("other") == (1,)
    assert [r[:3] for r in registry.index()] == [("m", "1", "UNAVAILABLE"),
                                                 ("other", "1", "READY")]
    await registry.sync("m", quiet=0)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage() and not errors[0].exc_info


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
async def test_a_file_that_cannot_be_read_fails_its_version_in_one_line(
        tmp_path: Path, make: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    folder = write(tmp_path, "m", 2)
    write(tmp_path, "m", 1)
    configure(tmp_path, "m", {"version_policy": "all"})
    (folder / "private").mkdir()
    (folder / "private" / "weights").write_bytes(b"x")
    (folder / "private").chmod(0)
    try:
        registry = await make()
        assert registry.serving_versions("m") == (1,)
        state, reason = [r[2:] for r in registry.index() if r[1] == "2"][0]
        assert state == "UNAVAILABLE" and "cannot read" in reason
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and not errors[0].exc_info
    finally:
        (folder / "private").chmod(0o755)


async def test_routing_names_and_reasons(tmp_path: Path, make: Callable[..., Any]) -> None:
    write(tmp_path, "m", 1)
    write(tmp_path, "other", 1)
    registry = await make(EXPLICIT, ["m"])
    assert registry.names() == ["m"] and registry.reason("m") == ""
    with pytest.raises(NotReady, match="not loaded; load it"):
        registry.get("other")
    with pytest.raises(NotFound, match="no model 'ghost'; models: m"):
        registry.get("ghost")
    await registry.unload("m")
    assert registry.reason("m") == "unloaded"
