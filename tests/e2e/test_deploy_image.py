"""The container image, run with podman as a user runs it: read-only root filesystem,
non-root, no capabilities, gRPC moved by a flag; inference with the stock client,
/metrics, the HEALTHCHECK, JSON logs, and SIGTERM under load.

scripts/test-image.sh builds the image and runs this module with TAPSERVE_TEST_IMAGE set
(and CONTAINERS_CONF for the host), once per backend image (TAPSERVE_TEST_IMAGE_BACKEND:
tensorflow or jax); without it the module is skipped. The tests share one
container and run in order: the last one stops it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import scrape
import tritonclient.grpc as triton
import zoo
from scrape import wait_for
from stock import infer
from tritonclient.utils import InferenceServerException

IMAGE = os.environ.get("TAPSERVE_TEST_IMAGE")
IMAGE_BACKEND = os.environ.get("TAPSERVE_TEST_IMAGE_BACKEND", "tensorflow")
pytestmark = pytest.mark.skipif(not IMAGE, reason="scripts/test-image.sh runs these")

GRPC_PORT = 9001  # moved by a flag, while the image's TAPSERVE_GRPC_PORT says 8001
NAME = f"tapserve-test-{os.getpid()}"


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.returncode}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def models() -> Iterator[Path]:
    """A model repository UID 10001 can read (pytest's own temp folders are root's, 0700)."""
    repo = Path(tempfile.mkdtemp(prefix="tapserve-image-models-", dir="/var/tmp"))
    zoo.write_model("autoencoder", repo)
    # One request holds its batch open 3 s, and with it the drain.
    zoo.write_model("autoencoder", repo, folder="slow", config={
        "batching": {"max_queue_delay_ms": 3000, "max_batch_size": 64, "eager": False}})
    for path in [repo, *repo.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield repo
    shutil.rmtree(repo)


@pytest.fixture(scope="module")
def autoencoder(models: Path) -> keras.Model:
    return keras.models.load_model(models / "autoencoder" / "1" / "model.keras")


class Container:
    def __init__(self, models: Path) -> None:
        podman("run", "--detach", "--name", NAME,
               # As deploy/k8s runs it: read-only root, /tmp the one writable mount, the
               # image's non-root user, no capabilities, no privilege escalation.
               "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges",
               "--env", "TAPSERVE_LOG_FORMAT=json", "--env", "TF_CPP_MIN_LOG_LEVEL=0",
               "--volume", f"{models}:/models:ro",
               "--publish", f"127.0.0.1::{GRPC_PORT}", "--publish", "127.0.0.1::8002",
               IMAGE, "serve", "--grpc-port", str(GRPC_PORT), "--drain-grace-seconds", "20")
        self.url = self.published(GRPC_PORT)
        self.metrics_url = f"http://{self.published(8002)}/metrics"

    def published(self, port: int) -> str:
        return podman("port", NAME, f"{port}/tcp").stdout.strip().splitlines()[0]

    def logs(self) -> str:
        done = podman("logs", NAME, check=False)
        return done.stdout + done.stderr

    def running(self) -> bool:
        return podman("inspect", NAME, "--format", "{{.State.Running}}").stdout.strip() == "true"

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        with triton.InferenceServerClient(self.url) as client:
            while True:
                try:
                    if client.is_server_ready():
                        return
                except InferenceServerException:
                    pass  # not listening yet
                if not self.running() or time.monotonic() > deadline:
                    raise AssertionError(f"the container never became ready:\n{self.logs()}")
                time.sleep(0.5)

    def health(self) -> subprocess.CompletedProcess:
        return podman("healthcheck", "run", NAME, check=False, timeout=30)

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return podman("exec", NAME, *command, check=False)

    def metric(self, name: str, **labels: str) -> float | None:
        return scrape.metric(self.metrics_url, name, **labels)


@pytest.fixture(scope="module")
def container(models: Path) -> Iterator[Container]:
    podman("rm", "--force", NAME, check=False)
    running = Container(models)
    try:
        running.wait_ready()
        yield running
    finally:
        podman("rm", "--force", "--time", "0", NAME, check=False)


def test_image_is_lean_and_cpu_only() -> None:
    """One backend, its CPU build, trimmed: tensorflow-cpu without its C++ headers, or jax
    and jaxlib with no TensorFlow at all (issue 19's goal: 900 MB at most)."""
    size = int(podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout)
    assert size <= (0.9e9 if IMAGE_BACKEND == "jax" else 1.4e9), f"{size / 1e9:.2f} GB"
    script = ("import importlib.metadata as m, importlib.util as u, os, pathlib, re\n"
              "names = {re.sub(r'[-_.]+', '-', d.metadata['Name']).lower()\n"
              "         for d in m.distributions()}\n"
              "tf = u.find_spec('tensorflow')\n"
              "headers = tf is not None and (pathlib.Path(tf.origin).parent / 'include').exists()\n"
              "print(json.dumps([sorted(names), headers, os.environ['TAPSERVE_BACKEND']]))\n")
    done = podman("run", "--rm", "--entrypoint", "python", IMAGE, "-c",
                  "import json\n" + script)
    names, headers, backend = json.loads(done.stdout)
    assert backend == IMAGE_BACKEND, "the image tells the server its backend"
    if IMAGE_BACKEND == "jax":
        assert {"jax", "jaxlib"} <= set(names), names
        assert not [n for n in names if n.startswith(("tensorflow", "tf-"))], names
    else:
        assert "tensorflow-cpu" in names and "tensorflow" not in names, names
        assert "jax" not in names and "jaxlib" not in names, names
    assert not [n for n in names if n.startswith(("nvidia-", "jax-cuda"))], names
    assert not headers, "TensorFlow's C++ headers ship in the image"


def test_inference_metrics_and_healthcheck(container: Container,
                                           autoencoder: keras.Model) -> None:
    x = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
    with triton.InferenceServerClient(container.url) as client:
        got = infer(client, "autoencoder", {"image": x}).as_numpy("recon")
    np.testing.assert_allclose(got, np.asarray(autoencoder(x)), atol=1e-5)
    assert container.metric("tapserve_requests_total", model="autoencoder",
                            endpoint="autoencoder", code="OK") == 1
    assert container.metric("process_resident_memory_bytes") > 50e6
    # HEALTHCHECK: gRPC is on 9001 by the flag, the image's env still says 8001.
    health = container.health()
    assert health.returncode == 0, health.stdout + health.stderr
    inspect = podman("inspect", NAME, "--format", "{{.Config.Healthcheck.Test}}").stdout
    assert "/opt/tapserve/healthcheck.py" in inspect, "built without --format docker?"


def test_runs_as_non_root_on_a_read_only_root(container: Container) -> None:
    assert container.exec("id", "-u").stdout.strip() == "10001"
    denied = container.exec("touch", "/opt/venv/written")
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied
    assert container.exec("touch", "/tmp/written").returncode == 0
    settings = podman("inspect", NAME, "--format",
                      "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}}").stdout
    assert settings.startswith("true ")
    # The build mounts a proxy's CA for pip only (scripts/test-image.sh): none of it here.
    assert container.exec("sh", "-c", "test ! -s /etc/pip.conf").returncode == 0


def test_sigterm_under_load_answers_every_accepted_request(
        container: Container, autoencoder: keras.Model) -> None:
    """Every client is served right or refused UNAVAILABLE; the HEALTHCHECK says unhealthy
    while the drain lasts; the container exits 0; every log line was a JSON object."""
    rng = np.random.default_rng(1)
    feeds = [rng.random((1 + i % 3, 8, 8, 1), dtype=np.float32) for i in range(16)]
    expected = [np.asarray(autoencoder(x)) for x in feeds]
    results: list[dict[str, Any]] = [{"ok": 0, "wrong": 0, "errors": []} for _ in range(8)]
    stop = threading.Event()

    def load(mine: dict[str, Any]) -> None:
        with triton.InferenceServerClient(container.url) as client:
            for i in range(100_000):
                try:
                    got = infer(client, "autoencoder", {"image": feeds[i % 16]}).as_numpy("recon")
                except InferenceServerException as exc:
                    if exc.status() == "StatusCode.UNAVAILABLE":  # refused: not accepted
                        mine["refused"] = exc.message()
                    else:
                        mine["errors"].append(f"{exc.status()}: {exc.message()}")
                    return
                want = expected[i % 16]
                close = got.shape == want.shape and np.allclose(got, want, atol=1e-5)
                mine["ok" if close else "wrong"] += 1
                if stop.is_set():
                    return

    held: dict[str, Any] = {}

    def hold() -> None:
        with triton.InferenceServerClient(container.url) as client:
            held["recon"] = infer(client, "slow", {"image": feeds[0]}).as_numpy("recon")

    loaders = [threading.Thread(target=load, args=(r,)) for r in results]
    holder = threading.Thread(target=hold)
    try:
        for t in loaders:
            t.start()
        wait_for(lambda: all(r["ok"] >= 3 for r in results), "every client to be served", 60)
        holder.start()
        wait_for(lambda: container.metric("tapserve_queue_depth", model="slow") == 1,
                 "the held request to be queued")
        podman("kill", "--signal", "TERM", NAME)
        wait_for(lambda: "draining" in container.logs(), "the drain to start")
        health = container.health()
    finally:
        stop.set()
        for t in [*loaders, holder]:
            t.join(60)
    exit_code = podman("wait", NAME, timeout=60).stdout.strip()
    logs = container.logs()
    assert exit_code == "0", logs
    assert health.returncode != 0, health.stdout + health.stderr  # NOT_SERVING: unhealthy
    for i, r in enumerate(results):
        assert not r["errors"], f"client {i}: {r['errors']}"
        assert r["wrong"] == 0, f"client {i}: {r['wrong']} wrong answers"
    np.testing.assert_allclose(held["recon"], expected[0], atol=1e-5)
    records = [json.loads(line) for line in logs.splitlines() if line.strip()]
    assert all(isinstance(r, dict) and {"time", "level", "message"} <= r.keys()
               for r in records)
    # TensorFlow's no-GPU chatter is quieted; the server says it once, in its own words.
    assert not any("cuInit" in r["message"] for r in records), logs
    assert any("no GPU found" in r["message"] for r in records), logs
    assert any(r["message"] == "stopped" for r in records)
