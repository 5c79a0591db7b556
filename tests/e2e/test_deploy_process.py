"""End to end, what a deployment relies on beyond the API: pure JSON logs on stderr, the
container health probe (scripts/healthcheck.py) finding the port however it was set,
and client-side round-robin spreading one client's requests over two servers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import zoo
from backends import frontend_only
from ports import free_port
from scrape import wait_for
from stock import ServerProcess, infer
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[2]
HEALTHCHECK = ROOT / "scripts" / "healthcheck.py"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    zoo.write_model("autoencoder", repo)
    # One request holds its batch open 3 s, and with it the drain (NOT_SERVING meanwhile).
    zoo.write_model("autoencoder", repo, folder="slow", config={
        "batching": {"max_queue_delay_ms": 3000, "max_batch_size": 64, "eager": False}})
    return repo



def healthcheck(pid: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), "--pid", str(pid)],
                          capture_output=True, text=True, timeout=30)


def image(rows: int = 1) -> np.ndarray:
    return np.random.default_rng(rows).random((rows, 8, 8, 1), dtype=np.float32)


@frontend_only
def test_json_logs_and_the_health_probe_through_a_drain(start_process, tmp_path: Path,
                                                        repository: Path) -> None:
    """One server, started as the image is when a user moves the port with a flag: the
    env says 8001-ish (TAPSERVE_GRPC_PORT, as the image sets it), the flag says another.

    Regressions: the image's HEALTHCHECK read only TAPSERVE_GRPC_PORT, so `serve
    --grpc-port N` was unhealthy; and with TAPSERVE_LOG_FORMAT=json, TensorFlow's C++
    start-up lines (`failed call to cuInit`, oneDNN) reached stderr as plain text."""
    port, decoy = free_port(), free_port()
    server = start_process(
        None, "--model-repository", str(repository), "--host", "127.0.0.1",
        "--grpc-port", str(port), "--metrics-port", "0", "--drain-grace-seconds", "20",
        # Every C++ level, so there are native lines to relay (the default hides INFO).
        # DEBUG: the start-up chatter quieted at INFO (service/logs.NOISE) is relayed too.
        TAPSERVE_LOG_FORMAT="json", TAPSERVE_LOG_LEVEL="DEBUG", TAPSERVE_GRPC_PORT=str(decoy),
        TF_CPP_MIN_LOG_LEVEL="0")
    assert server.grpc_port == port

    probe = healthcheck(server.process.pid)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert f"127.0.0.1:{port}: SERVING" in probe.stdout
    assert str(decoy) not in probe.stdout

    with server.client() as client:
        infer(client, "autoencoder", {"image": image()})
        with pytest.raises(InferenceServerException):
            infer(client, "autoencoder.nope", {"image": image()}, request_id="json-bad-1")

    # Drain: a queued request holds it open; meanwhile the probe must say unhealthy.
    held: dict[str, object] = {}

    def hold() -> None:
        with server.client() as client:
            held["recon"] = infer(client, "slow", {"image": image(2)}).as_numpy("recon")

    holder = threading.Thread(target=hold)
    holder.start()
    wait_for(lambda: server.metric("tapserve_queue_depth", model="slow") == 2,
             "the held request to be queued")
    server.process.terminate()
    wait_for(lambda: "draining" in server.output(), "the drain to start")
    probe = healthcheck(server.process.pid)
    holder.join(30)
    assert server.terminate() == 0
    assert probe.returncode == 1, probe.stdout + probe.stderr
    assert f"127.0.0.1:{port}: NOT_SERVING" in probe.stdout
    assert held["recon"].shape == (2, 8, 8, 1)

    lines = [line for line in server.output().splitlines() if line.strip()]
    records = []
    for line in lines:
        record = json.loads(line)  # raises on the first line that is not JSON
        assert isinstance(record, dict) and {"time", "level", "message"} <= record.keys(), line
        records.append(record)
    native = [r for r in records if r.get("name") == "native"]
    assert native, "TensorFlow's C++ lines should be relayed as JSON, not silenced"
    assert all(r["source"] and r["level"] in {"INFO", "WARNING", "ERROR"} for r in native)
    assert any(r.get("request_id") == "json-bad-1" for r in records)
    assert any(r["message"] == "stopped" for r in records)


@frontend_only
def test_health_probe_says_unhealthy_while_a_model_is_broken(start_process,
                                                            tmp_path: Path) -> None:
    """Strict readiness: a model that failed to load keeps "" NOT_SERVING, and so the
    container unhealthy, although the process listens and answers."""
    zoo.write_model("autoencoder", tmp_path)
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.keras").write_bytes(b"not a model")
    server = start_process(tmp_path, ready=False)
    wait_for(lambda: server.metric("tapserve_model_load_failures_total", model="broken"),
             "the broken model's load to fail", timeout=120)
    wait_for(lambda: server.metric("tapserve_model_ready", model="autoencoder"),
             "the good model to serve", timeout=120)
    probe = healthcheck(server.process.pid)
    assert probe.returncode == 1, probe.stdout + probe.stderr
    assert f"{server.url}: NOT_SERVING" in probe.stdout


@frontend_only
def test_health_probe_without_a_server_is_unhealthy() -> None:
    # A process that listens on no TCP port: nothing to ask, so unhealthy.
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        probe = healthcheck(sleeper.pid)
        sleeper.kill()
    assert probe.returncode == 1
    assert "listens on no TCP port" in probe.stdout


@pytest.fixture(scope="module")
def servers(start_process, repository: Path) -> list[ServerProcess]:
    started = [start_process(repository, ready=False) for _ in range(2)]  # load side by side
    for server in started:
        server.wait_ready()
    return started


@frontend_only
def test_round_robin_spreads_one_client_over_two_servers(servers: list[ServerProcess]) -> None:
    """The client-side balancing of docs/kubernetes.md, with two servers standing for two
    pods behind a headless Service (there, `dns:///tapserve-headless.<ns>.svc.cluster.local:8001`)."""
    target = "ipv4:" + ",".join(server.url for server in servers)

    def served() -> list[float]:
        return [s.metric("tapserve_requests_total", model="autoencoder",
                         endpoint="autoencoder", code="OK") or 0 for s in servers]

    def send(client: triton.InferenceServerClient, n: int) -> None:
        for _ in range(n):
            infer(client, "autoencoder", {"image": image()})

    # The default policy (pick_first) keeps one connection: every request on one server.
    with triton.InferenceServerClient(target) as client:
        send(client, 10)
    assert sorted(served()) == [0, 10]

    before = served()
    with triton.InferenceServerClient(target, channel_args=[
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_send_message_length", triton.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", triton.MAX_GRPC_MESSAGE_SIZE)]) as client:
        send(client, 20)
    gained = [after - b for after, b in zip(served(), before, strict=True)]
    assert sum(gained) == 20 and all(g >= 5 for g in gained), gained


def test_start_up_says_no_gpu_once_without_tensorflow_chatter(
        servers: list[ServerProcess]) -> None:
    """Regression: every start on a CPU host printed TensorFlow's `failed call to cuInit:
    UNKNOWN ERROR (303)` and absl's notes, which read as a failure."""
    output = servers[0].output()
    assert output.count("no GPU found, models run on the CPU") == 1, output
    for chatter in ("cuInit", "absl::InitializeLog", "oneDNN custom operations"):
        assert chatter not in output, output


@frontend_only
def test_process_metrics_are_exported(servers: list[ServerProcess]) -> None:
    """Memory, CPU and file descriptors, for the dashboard (the owned registry once dropped
    prometheus-client's process collector)."""
    server = servers[0]
    assert server.metric("process_resident_memory_bytes") > 50e6  # TensorFlow alone is more
    assert server.metric("process_cpu_seconds_total") > 0
    assert server.metric("process_open_fds") > 3
    assert server.metric("process_max_fds") > 0
    assert server.metric("python_info") == 1
