"""End to end: `tapserve serve --model-repository s3://...` against a real S3 API server on
127.0.0.1 (moto's), through the stock tritonclient. Each test model answers with its own
version number, so every answer proves which version computed it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from backends import frontend_only
from buckets import GCS, S3, free_port
from scrape import wait_for
from stock import ServerProcess, infer, server_has

pytestmark = [frontend_only, pytest.mark.skipif(
    not (server_has("s3fs") and server_has("gcsfs")),
    reason="the tapserve under test lacks tapserve[s3,gcs] (the container image)")]

POLL = 0.5  # --repository-poll-secs in these tests
BROKEN = b"not a keras file"


def until(condition: Callable[[], Any], timeout: float = 60) -> Any:
    return wait_for(condition, "the condition on the calling line", timeout)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    server = S3()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], bytes]:
    """A saved model.keras whose every answer is `version`."""
    folder = tmp_path_factory.mktemp("models")
    made: dict[int, bytes] = {}

    def make(version: int) -> bytes:
        if version not in made:
            x = keras.Input(shape=(4,), name="x")
            which = keras.layers.Dense(1, name="which")(x)
            model = keras.Model(x, which)
            model.get_layer("which").set_weights([np.zeros((4, 1)), np.full(1, float(version))])
            model.save(folder / f"{version}.keras")
            made[version] = (folder / f"{version}.keras").read_bytes()
        return made[version]
    return make


def ask(server: ServerProcess, model: str = "m") -> float:
    with server.client() as client:
        return float(infer(client, model, {"x": np.ones((1, 4), np.float32)})
                     .as_numpy("which")[0, 0])


def index(server: ServerProcess) -> dict[tuple[str, str], tuple[str, str]]:
    with server.client() as client:
        rows = client.get_model_repository_index(as_json=True).get("models", [])
    return {(r["name"], r.get("version", "")): (r.get("state", ""), r.get("reason", ""))
            for r in rows}


def ready(server: ServerProcess) -> bool:
    with server.client() as client:
        return bool(client.is_server_ready())


def stop(server: ServerProcess) -> None:
    """SIGTERM; the local mirror of the bucket is gone once the server exits."""
    folder = Path(re.search(r"mirrored into (\S+)", server.output())[1])
    assert folder.is_dir()
    assert server.terminate() == 0
    assert not folder.exists()


def reachable(server: ServerProcess, url: str) -> float | None:
    return server.metric("tapserve_repository_reachable", repository=url)


def test_serves_a_bucket_and_follows_its_changes(start_process, s3: S3,
                                                 model_bytes: Callable[[int], bytes]) -> None:
    bucket = s3.bucket("follow")
    bucket.put("models/m/1/model.keras", model_bytes(1))
    url = "s3://follow/models"
    server = start_process(url, "--repository-poll-secs", str(POLL), **s3.env)
    assert ask(server) == 1.0
    assert reachable(server, url) == 1

    # A new version, uploaded while serving, takes over; the old one is unloaded.
    bucket.put("models/m/2/model.keras", model_bytes(2))
    until(lambda: ask(server) == 2.0)
    until(lambda: ("m", "1") not in index(server))

    # A broken one fails to load, is counted, and never replaces what serves.
    bucket.put("models/m/3/model.keras", BROKEN)
    until(lambda: server.metric("tapserve_model_load_failures_total", model="m"))
    state, reason = index(server)[("m", "3")]
    assert state == "UNAVAILABLE" and "not a valid .keras file" in reason, reason
    assert ask(server) == 2.0

    # Versions deleted from the bucket are unloaded as removed folders are: with 3 and 2
    # gone, the policy's latest is version 1 again.
    bucket.delete("models/m/3")
    bucket.delete("models/m/2")
    until(lambda: ask(server) == 1.0)
    until(lambda: set(index(server)) == {("m", "1")})
    # A version whose objects change in the bucket is downloaded again and reloaded.
    bucket.put("models/m/1/model.keras", model_bytes(5))
    until(lambda: ask(server) == 5.0)

    # A new model folder in the bucket is served; a removed one is no longer.
    bucket.put("models/other/1/model.keras", model_bytes(7))
    until(lambda: index(server).get(("other", "1")) == ("READY", ""))
    assert ask(server, "other") == 7.0
    bucket.delete("models/other/1")
    until(lambda: not any(name == "other" for name, _ in index(server)))

    assert server.metric("tapserve_repository_read_failures_total", repository=url) == 0
    log = server.output()
    assert s3.secret not in log
    assert "model repository: downloading m/2 (1 files)" in log
    stop(server)


def test_an_unreachable_bucket_at_start_and_mid_run(start_process, tmp_path: Path,
                                                    model_bytes: Callable[[int], bytes]
                                                    ) -> None:
    port = free_port()
    url = "s3://late/models"
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "key",
           "AWS_SECRET_ACCESS_KEY": "tapserve-unreachable-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    server = start_process(url, "--repository-poll-secs", str(POLL), ready=False, **env)
    # Ports bound, nothing to serve yet: not ready, and the metrics say why.
    until(lambda: (server.metric("tapserve_repository_read_failures_total",
                                 repository=url) or 0) >= 3)
    assert reachable(server, url) == 0
    assert not ready(server)
    assert server.output().count("cannot list s3://late/models") == 1  # once per streak

    s3 = S3(port)  # the bucket comes up: the start-up load happens
    try:
        s3.bucket("late").put("models/m/1/model.keras", model_bytes(1))
        server.wait_ready()  # perhaps on the empty bucket: m follows within a poll
        until(lambda: index(server).get(("m", "1")) == ("READY", ""))
        assert ask(server) == 1.0
        assert reachable(server, url) == 1
        assert "model repository: s3://late/models reads again" in server.output()
    finally:
        s3.stop()

    # It goes away mid-run: what serves keeps serving, and stays ready.
    until(lambda: reachable(server, url) == 0)
    assert ask(server) == 1.0
    assert ready(server)
    assert index(server)[("m", "1")] == ("READY", "")
    assert server.output().count("cannot list s3://late/models") == 2  # a second streak
    assert "tapserve-unreachable-secret" not in server.output()
    stop(server)


def test_explicit_mode_reads_the_bucket_when_asked_to_load(
        start_process, s3: S3, model_bytes: Callable[[int], bytes]) -> None:
    bucket = s3.bucket("explicit")
    bucket.put("models/m/1/model.keras", model_bytes(1))
    server = start_process("s3://explicit/models", "--model-control-mode", "explicit",
                           "--load-model", "m", **s3.env)
    assert ask(server) == 1.0
    bucket.put("models/m/2/model.keras", model_bytes(2))
    with server.client() as client:
        client.load_model("m")  # reads the bucket now, downloads version 2, loads it
    assert ask(server) == 2.0
    stop(server)


def test_serves_a_gcs_bucket(start_process, tmp_path: Path,
                             model_bytes: Callable[[int], bytes]) -> None:
    gcs = GCS()
    try:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": gcs.env["STORAGE_EMULATOR_HOST"]})
        bucket = client.create_bucket("tapserve-gcs")
        bucket.blob("models/m/1/model.keras").upload_from_string(model_bytes(1))
        url = "gs://tapserve-gcs/models"
        server = start_process(url, "--repository-poll-secs", str(POLL), **gcs.env)
        assert ask(server) == 1.0
        bucket.blob("models/m/2/model.keras").upload_from_string(model_bytes(2))
        until(lambda: ask(server) == 2.0)
        bucket.blob("models/m/2/model.keras").delete()
        until(lambda: ask(server) == 1.0)
        assert reachable(server, url) == 1
        stop(server)
    finally:
        gcs.stop()

