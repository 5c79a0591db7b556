"""End to end: model versions that change while `tapserve serve` runs, through the stock
tritonclient. Each test model answers with its own version number, so every answer proves
which version computed it."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml
from backends import frontend_only
from scrape import wait_for
from stock import ServerProcess, infer
from tritonclient.utils import InferenceServerException

POLL = 0.5  # --repository-poll-secs in these tests


def until(condition: Callable[[], Any], timeout: float = 30) -> Any:
    """Wait for the server to catch up (the failing line says with what)."""
    return wait_for(condition, "the condition on the calling line", timeout)


def versioned_model(version: int) -> keras.Model:
    """x (4,) -> "hidden" -> "which": every row answers `version` (x's values add 0)."""
    x = keras.Input(shape=(4,), name="x")
    hidden = keras.layers.Dense(3, name="hidden")(x)
    which = keras.layers.Dense(1, name="which")(hidden)
    model = keras.Model(x, which)
    model.get_layer("hidden").set_weights([np.zeros((4, 3)), np.ones(3)])
    model.get_layer("which").set_weights([np.zeros((3, 1)), np.full(1, float(version))])
    return model


def add_version(model_dir: Path, version: int, content: bytes | None = None) -> None:
    """Write a version as operators are told to: under a temporary name, then renamed
    into place, so the server never sees it half-written. `content` replaces the model
    file (e.g. garbage)."""
    staging = model_dir / f".staging-{version}"
    staging.mkdir(parents=True)
    if content is None:
        versioned_model(version).save(staging / "model.keras")
    else:
        (staging / "model.keras").write_bytes(content)
    staging.rename(model_dir / str(version))


def write_config(model_dir: Path, config: dict[str, Any]) -> None:
    staged = model_dir / ".config.yaml.new"
    staged.write_text(yaml.safe_dump(config))
    staged.rename(model_dir / "config.yaml")


def ask(server: ServerProcess, model: str = "m", version: str = "") -> float:
    with server.client() as client:
        result = infer(client, model, {"x": np.ones((1, 4), np.float32)}, model_version=version)
        return float(result.as_numpy("which")[0, 0])


def index(server: ServerProcess) -> dict[tuple[str, str], tuple[str, str]]:
    with server.client() as client:
        rows = client.get_model_repository_index(as_json=True).get("models", [])
    return {(r["name"], r.get("version", "")): (r.get("state", ""), r.get("reason", ""))
            for r in rows}


def failures(server: ServerProcess, model: str = "m") -> float:
    return server.metric("tapserve_model_load_failures_total", model=model) or 0.0


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    add_version(tmp_path / "m", 1)
    return tmp_path


@pytest.fixture
def polling(start_process, repository: Path) -> ServerProcess:
    return start_process(repository, "--repository-poll-secs", str(POLL))


def test_a_new_version_rolls_out_under_load_without_one_failed_request(
        polling: ServerProcess, repository: Path) -> None:
    stop = threading.Event()
    seen: list[list[tuple[float, float]]] = [[] for _ in range(4)]
    errors: list[str] = []

    def load(mine: list[tuple[float, float]]) -> None:
        with polling.client() as client:
            while not stop.is_set():
                try:
                    got = infer(client, "m", {"x": np.ones((2, 4), np.float32)})
                except InferenceServerException as exc:
                    errors.append(f"{exc.status()}: {exc.message()}")
                    continue
                mine.append((time.monotonic(), float(got.as_numpy("which")[0, 0])))

    threads = [threading.Thread(target=load, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        placed = time.monotonic()
        add_version(repository / "m", 2)
        until(lambda: any(v == 2 for mine in seen for _, v in mine[-1:]), timeout=60)
        time.sleep(1.0)  # keep the load on while version 1 drains and unloads
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    load_seconds = polling.metric("tapserve_model_load_duration_seconds", model="m",
                                  version="2")
    first_new = min(t for mine in seen for t, v in mine if v == 2)
    # Noticed within two intervals, then loaded and warmed up before it answers.
    assert first_new - placed <= 2 * POLL + load_seconds + 1.0
    for mine in seen:  # a client that met version 2 never went back to version 1
        answers = [v for _, v in mine]
        assert set(answers) <= {1.0, 2.0}
        assert 1.0 not in answers[answers.index(2.0):]
    until(lambda: ("m", "1") not in index(polling), timeout=30)
    assert index(polling)[("m", "2")] == ("READY", "")
    assert polling.metric("tapserve_model_ready", model="m", version="1") is None
    assert polling.metric("tapserve_model_ready", model="m", version="2") == 1
    assert "model m version 1 unloaded" in polling.output()


def test_broken_version_config_or_half_written_folder_never_replaces_what_serves(
        polling: ServerProcess, repository: Path) -> None:
    model_dir = repository / "m"
    before = failures(polling)
    # A broken model file.
    add_version(model_dir, 2, content=b"not a keras file")
    until(lambda: index(polling).get(("m", "2"), ("",))[0] == "UNAVAILABLE", timeout=30)
    state, reason = index(polling)[("m", "2")]
    assert "model.keras is not a valid .keras file" in reason  # not Keras' "not found"
    assert str(repository) not in reason
    assert ask(polling) == 1.0
    assert failures(polling) == before + 1
    with polling.client() as client:
        assert not client.is_model_ready("m", "2")
        assert client.is_model_ready("m") and client.is_server_ready()
        with pytest.raises(InferenceServerException, match="version 2 failed to load"):
            infer(client, "m", {"x": np.ones((1, 4), np.float32)}, model_version="2")
    time.sleep(3 * POLL)
    assert failures(polling) == before + 1  # the same broken files are not retried

    # A config.yaml that does not parse, then one naming a layer the model lacks.
    write_config(model_dir, {"endpoints": {"x": {"inputs": ["x"]}}, "typo": 1})
    until(lambda: failures(polling) == before + 2, timeout=30)
    assert ask(polling) == 1.0
    # A new config is a new load of every version: the broken version 2 too.
    write_config(model_dir, {"endpoints": {"tap": {"inputs": ["x"], "outputs": ["gone"]}}})
    until(lambda: "model m version 1 failed to load" in polling.output(), timeout=30)
    assert failures(polling) == before + 4
    assert ask(polling) == 1.0
    log = polling.output()
    assert "config.yaml failed to load" in log and "typo" in log
    assert "endpoint 'tap'" in log and "'gone'" in log
    assert "still serving versions [1]" in log
    write_config(model_dir, {})

    # A version folder still being written: its file keeps changing, so it waits.
    folder = model_dir / "3"
    folder.mkdir()
    part = folder / "model.keras"
    for _ in range(int(4 * POLL / 0.1)):
        with part.open("ab") as out:
            out.write(b"\0" * 100)
        time.sleep(0.1)
    assert ("m", "3") not in index(polling)
    assert ask(polling) == 1.0
    versioned_model(3).save(folder / "model.tmp.keras")
    os.replace(folder / "model.tmp.keras", part)
    until(lambda: ask(polling) == 3.0, timeout=60)
    assert index(polling)[("m", "3")] == ("READY", "")


@frontend_only
def test_version_policies_and_labels(polling: ServerProcess, repository: Path) -> None:
    model_dir = repository / "m"
    for v in (2, 3):
        add_version(model_dir, v)
    until(lambda: ask(polling) == 3.0, timeout=60)
    until(lambda: set(index(polling)) == {("m", "3")}, timeout=30)  # latest 1

    write_config(model_dir, {"version_policy": {"latest": 2},
                             "labels": {"stable": 2, "canary": 3}})
    until(lambda: index(polling).get(("m", "2"), ("",))[0] == "READY", timeout=60)
    assert ask(polling) == 3.0  # "" is the highest
    assert ask(polling, version="2") == 2.0
    assert ask(polling, version="stable") == 2.0 and ask(polling, version="canary") == 3.0
    with polling.client() as client:
        assert client.is_model_ready("m", "canary")
        assert client.get_model_metadata("m", as_json=True)["versions"] == ["2", "3"]
        with pytest.raises(InferenceServerException, match="no version or label 'beta'"):
            infer(client, "m", {"x": np.ones((1, 4), np.float32)}, model_version="beta")
        with pytest.raises(InferenceServerException, match=r"serves versions 2, 3, not 1"):
            infer(client, "m", {"x": np.ones((1, 4), np.float32)}, model_version="1")

    write_config(model_dir, {"version_policy": {"specific": [1, 3]}})
    until(lambda: set(index(polling)) == {("m", "1"), ("m", "3")}, timeout=60)
    assert ask(polling, version="1") == 1.0

    write_config(model_dir, {"version_policy": "all"})
    until(lambda: set(index(polling)) == {("m", "1"), ("m", "2"), ("m", "3")}, timeout=60)
    until(lambda: all(s == "READY" for s, _ in index(polling).values()), timeout=60)

    # The short form, and a label moved to another version: no reload needed.
    write_config(model_dir, {"version": 2, "labels": {"canary": 2}})
    until(lambda: set(index(polling)) == {("m", "2")}, timeout=60)
    assert ask(polling, version="canary") == 2.0


@frontend_only
def test_removing_a_model_folder_drains_and_unloads_it(
        polling: ServerProcess, repository: Path) -> None:
    add_version(repository / "other", 7)
    until(lambda: index(polling).get(("other", "7"), ("",))[0] == "READY", timeout=60)
    assert ask(polling, "other") == 7.0
    shutil.rmtree(repository / "other")
    until(lambda: ("other", "7") not in index(polling), timeout=30)
    with polling.client() as client, pytest.raises(InferenceServerException) as err:
        infer(client, "other", {"x": np.ones((1, 4), np.float32)})
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert ask(polling) == 1.0
    assert "model other version 7 unloaded" in polling.output()
    # Defect 5: every series of a removed model goes (a dashboard lists what exists).
    for name in ("tapserve_model_ready", "tapserve_model_load_duration_seconds",
                 "tapserve_requests_total", "tapserve_queue_depth"):
        assert polling.metric(name, model="other") is None, name
    add_version(repository / "broken", 1, content=b"not a keras file")
    until(lambda: polling.metric("tapserve_model_ready", model="broken") == 0, timeout=30)
    shutil.rmtree(repository / "broken")
    until(lambda: polling.metric("tapserve_model_ready", model="broken") is None, timeout=30)
    assert polling.metric("tapserve_model_load_failures_total", model="broken") is None
    with polling.client() as client:  # poll mode: the API refuses, saying why (as Triton)
        with pytest.raises(InferenceServerException, match="model-control-mode poll") as err:
            client.load_model("m")
        assert err.value.status() == "StatusCode.UNIMPLEMENTED"


@frontend_only
def test_a_dangling_symlink_in_a_version_folder_stops_neither_start_up_nor_polls(
        start_process, repository: Path) -> None:
    """Issue 18.3: an editor's lock file (a symlink to nowhere) in a version folder sent
    the repository scan into endless recursion: never ready, nothing logged; in poll mode
    a traceback every poll. Now it is no problem, and a model file that is such a link
    fails its version only, said once, in one line."""
    (repository / "m" / "1" / ".#model.keras").symlink_to("user@host.4242:1700000000")
    add_version(repository / "other", 3)
    server = start_process(repository, "--repository-poll-secs", str(POLL))  # waits: ready
    assert ask(server) == 1.0 and ask(server, "other") == 3.0
    add_version(repository / "m", 2)
    (repository / "m" / "2" / ".#model.keras").symlink_to("user@host.4242:1700000001")
    until(lambda: ask(server) == 2.0, timeout=60)
    broken = repository / "other" / "4"
    broken.mkdir()
    (broken / "model.keras").symlink_to(repository / "gone.keras")
    until(lambda: index(server).get(("other", "4"), ("",))[0] == "UNAVAILABLE", timeout=30)
    time.sleep(4 * POLL)
    assert ask(server, "other") == 3.0
    with server.client() as client:
        assert client.is_server_ready()
    log = server.output()
    assert "Traceback" not in log and "RecursionError" not in log
    assert log.count("model other version 4 failed to load") == 1


@frontend_only
def test_explicit_mode_loads_and_unloads_through_tritonclient(
        start_process, repository: Path) -> None:
    add_version(repository / "other", 5)
    server = start_process(repository, "--model-control-mode", "explicit",
                           "--load-model", "m")
    with server.client() as client:
        assert index(server) == {("m", "1"): ("READY", ""), ("other", ""): (
            "UNAVAILABLE", "not loaded")}
        with pytest.raises(InferenceServerException, match="not loaded"):
            infer(client, "other", {"x": np.ones((1, 4), np.float32)})
        client.load_model("other")
        assert ask(server, "other") == 5.0
        assert client.is_server_ready()
        client.unload_model("m")
        assert not client.is_model_ready("m")
        assert index(server)[("m", "")] == ("UNAVAILABLE", "not loaded")
        assert client.is_server_ready()  # an unloaded model is not one it should serve
        with pytest.raises(InferenceServerException, match="no model 'ghost'"):
            client.load_model("ghost")
        # A new version appears: explicit mode ignores it until told to load.
        add_version(repository / "other", 6)
        time.sleep(1.0)
        assert ask(server, "other") == 5.0
        client.load_model("other")
        assert ask(server, "other") == 6.0
        (repository / "other" / "config.yaml").write_text("endpoints: [")
        with pytest.raises(InferenceServerException, match="config.yaml"):
            client.load_model("other")
        assert ask(server, "other") == 6.0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_twenty_load_unload_cycles_give_their_memory_back(
        start_process, tmp_path: Path) -> None:
    import zoo

    zoo.write_model("autoencoder", tmp_path)
    server = start_process(tmp_path, "--model-control-mode", "explicit")
    image = {"image": np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32)}
    rss = []
    with server.client() as client:
        for _ in range(20):
            client.load_model("autoencoder")
            for name in ("autoencoder", "autoencoder.encoder", "autoencoder.decoder"):
                meta = client.get_model_metadata(name, as_json=True)
                feeds = image if meta["inputs"][0]["name"] == "image" else {
                    "code": np.ones((4, 4), np.float32)}
                infer(client, name, feeds, outputs=["enc_conv"] if name == "autoencoder" else None)
            client.unload_model("autoencoder")
            rss.append(rss_bytes(server.process.pid))
    print(f"resident memory after each cycle (MiB): {[round(r / 2**20) for r in rss]}")
    assert rss[-1] <= 1.10 * rss[0], [round(r / 2**20) for r in rss]
