"""End to end: the process around the models. SIGTERM drains under load, the env twins of
the flags, JSON logs, bounded metric labels, and `tapserve inspect`."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import keras
import numpy as np
import pytest
import zoo
from backends import BACKEND, HAS_TF, frontend_only, tf_models
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ports import free_port
from scrape import wait_for
from stock import TAPSERVE, ServerProcess, infer
from tritonclient.utils import InferenceServerException

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING



@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    zoo.write_model("autoencoder", repo)
    # One request holds its batch open 1.5 s, and with it the drain.
    zoo.write_model("autoencoder", repo, folder="slow", config={
        "batching": {"max_queue_delay_ms": 1500, "max_batch_size": 64, "eager": False}})
    return repo


# SIGTERM


@frontend_only
def test_sigterm_under_load_finishes_what_it_accepted(
        start_process, repository: Path, autoencoder: keras.Model) -> None:
    """Every client is either served right or told UNAVAILABLE by the data plane.

    Regression: the drain used to stop gRPC first, which closed the port at once and
    cancelled the calls gRPC had received but not yet handed to a handler: under load a
    few clients got CANCELLED (which clients do not retry) instead of UNAVAILABLE."""
    server = start_process(repository, "--drain-grace-seconds", "20")
    rng = np.random.default_rng(0)
    feeds = [rng.random((1 + i % 3, 8, 8, 1), dtype=np.float32) for i in range(16)]
    expected = [np.asarray(autoencoder(x)) for x in feeds]
    stop = threading.Event()
    results: list[dict[str, Any]] = [{"ok": 0, "wrong": 0, "errors": []} for _ in range(8)]

    def load(mine: dict[str, Any]) -> None:
        with server.client() as client:
            for i in range(10_000):
                x, want = feeds[i % len(feeds)], expected[i % len(feeds)]
                try:
                    got = infer(client, "autoencoder", {"image": x}).as_numpy("recon")
                except InferenceServerException as exc:
                    if exc.status() == "StatusCode.UNAVAILABLE":  # refused: not accepted
                        mine["refused"] = exc.message()
                    else:
                        mine["errors"].append(f"{exc.status()}: {exc.message()}")
                    return
                close = got.shape == want.shape and np.allclose(got, want, atol=1e-5)
                mine["ok" if close else "wrong"] += 1
                if stop.is_set():
                    return
            mine["errors"].append("never refused")

    slow: dict[str, Any] = {}

    def long_request() -> None:
        x = feeds[0]
        with server.client() as client:
            slow["recon"] = infer(client, "slow", {"image": x}).as_numpy("recon")

    channel = grpc.insecure_channel(server.url)
    health = health_pb2_grpc.HealthStub(channel)

    def health_status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status

    assert health_status() == SERVING
    loaders = [threading.Thread(target=load, args=(r,)) for r in results]
    holder = threading.Thread(target=long_request)
    try:
        for t in loaders:
            t.start()
        wait_for(lambda: all(r["ok"] >= 3 for r in results), "every client to be served")
        holder.start()
        wait_for(lambda: server.metric("tapserve_queue_depth", model="slow") == 1,
                 "the long request to be queued")
        server.process.terminate()  # SIGTERM
        # Health says NOT_SERVING at once, while the long request still holds the drain.
        wait_for(lambda: health_status() == NOT_SERVING, "NOT_SERVING", timeout=1.0)
        assert holder.is_alive()
    except BaseException:
        stop.set()  # let the clients go if the test fails before they are refused
        raise
    finally:
        channel.close()
        for t in loaders:
            t.join(60)
        holder.join(60)
    assert server.terminate() == 0
    for i, r in enumerate(results):
        assert not r["errors"], f"client {i}: {r['errors']}"
        assert r["wrong"] == 0, f"client {i}: {r['wrong']} answers with wrong numbers"
        assert "shutting down" in r.get("refused", ""), f"client {i}: {r.get('refused')}"
    np.testing.assert_allclose(slow["recon"], expected[0], atol=1e-5)
    log = server.output()
    assert "draining (grace 20.0s)" in log and log.rstrip().endswith("stopped"), log


# One server configured by the env twins of the flags, logging JSON.


@pytest.fixture(scope="module")
def env_ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture(scope="module")
def env_server(start_process, repository: Path, env_ports: tuple[int, int]) -> ServerProcess:
    """No --model-repository, --grpc-port or --metrics-port: TAPSERVE_* say them."""
    return start_process(None, "--log-format", "json",
                         TAPSERVE_MODEL_REPOSITORY=str(repository),
                         TAPSERVE_GRPC_PORT=str(env_ports[0]),
                         TAPSERVE_METRICS_PORT=str(env_ports[1]),
                         TAPSERVE_HTTP_PORT=str(free_port()),
                         TAPSERVE_HOST="127.0.0.1", TAPSERVE_INTER_OP_THREADS="3")


@frontend_only
def test_env_twins_set_repository_and_ports(env_server: ServerProcess, env_ports,
                                            autoencoder: keras.Model) -> None:
    assert (env_server.grpc_port, env_server.metrics_port) == env_ports
    x = np.random.default_rng(1).random((2, 8, 8, 1), dtype=np.float32)
    with env_server.client() as client:
        got = infer(client, "autoencoder", {"image": x}).as_numpy("recon")
    np.testing.assert_allclose(got, np.asarray(autoencoder(x)), atol=1e-5)
    assert env_server.metric("tapserve_model_ready", model="autoencoder") == 1
    # The threading TensorFlow got is in the start-up log, here from the env twin.
    assert re.search(r"TensorFlow threads: intra-op \d+, inter-op 3\b", env_server.output())


def log_lines(server: ServerProcess) -> list[str]:
    """Log lines from start-up on (TensorFlow's C++ prelude comes before it)."""
    lines = server.output().splitlines()
    start = next(i for i, line in enumerate(lines) if "serving gRPC on" in line)
    return [line for line in lines[start:] if line.strip()]


@frontend_only
def test_json_logs_one_object_a_line_and_only_failures(env_server: ServerProcess) -> None:
    x = np.zeros((1, 8, 8, 1), np.float32)
    with env_server.client() as client:
        with pytest.raises(InferenceServerException):
            infer(client, "autoencoder.nope", {"image": x}, request_id="bad-request-1")
        seen = len(wait_for(lambda: [line for line in log_lines(env_server)
                                     if "bad-request-1" in line],
                            "the failed request's log line"))
        before = len(log_lines(env_server))
        infer(client, "autoencoder", {"image": x}, request_id="good-request-1")
        # A later failure marks the point the good one's line would have come before.
        with pytest.raises(InferenceServerException):
            infer(client, "nope", {"image": x}, request_id="marker-1")
        wait_for(lambda: any("marker-1" in line for line in log_lines(env_server)),
                 "the marker's log line")
    assert seen == 1
    lines = log_lines(env_server)
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) and {"time", "level", "message"} <= r.keys()
               for r in records)
    failed = next(r for r in records if r.get("request_id") == "bad-request-1")
    assert failed["model"] == "autoencoder" and failed["endpoint"] == "nope"
    assert failed["status"] == "NOT_FOUND" and failed["level"] == "INFO"
    assert isinstance(failed["latency_s"], float) and 0 <= failed["latency_s"] < 5
    assert "no endpoint 'nope'" in failed["message"]
    # The good request wrote nothing: the only line after it is the marker's.
    assert [r.get("request_id") for r in records[before:]] == ["marker-1"]


@frontend_only
def test_unknown_names_add_no_metric_series(env_server: ServerProcess) -> None:
    x = np.zeros((1, 8, 8, 1), np.float32)

    def count(model: str, endpoint: str) -> float:
        return env_server.metric("tapserve_requests_total", model=model, endpoint=endpoint,
                                 code="NOT_FOUND") or 0

    unknown, endpoints = count("_unknown", "_unknown"), count("autoencoder", "_unknown")
    with env_server.client() as client:
        for i in range(50):
            for name in (f"ghost{i}", f"autoencoder.ghost{i}"):
                with pytest.raises(InferenceServerException) as err:
                    infer(client, name, {"image": x})
                assert err.value.status() == "StatusCode.NOT_FOUND"
            with pytest.raises(InferenceServerException):
                client.get_model_metadata(f"ghost{i}")
    assert count("_unknown", "_unknown") == unknown + 50
    assert count("autoencoder", "_unknown") == endpoints + 50
    text = urllib.request.urlopen(env_server.metrics_url, timeout=10).read().decode()
    assert "ghost" not in text


# tapserve inspect


@pytest.fixture(scope="module")
def inspected(tmp_path_factory: pytest.TempPathFactory,
              repository: Path) -> dict[str, subprocess.CompletedProcess]:
    """`tapserve inspect` on several paths, run side by side (each imports TensorFlow)."""
    repo = tmp_path_factory.mktemp("inspect")
    paths = {
        "siamese": zoo.write_model("siamese", repo),  # the model file
        "nested": zoo.write_model("nested", repo).parent.parent,  # the model folder
        "missing": repo / "no_such_model",
    }
    if BACKEND == "tensorflow" and HAS_TF:  # a SavedModel: TensorFlow's
        paths["saved_model"] = repo / "exported" / "1"
        keras.models.load_model(repository / "autoencoder" / "1" / "model.keras").export(
            paths["saved_model"], verbose=False)
    running = {name: subprocess.Popen([str(TAPSERVE), "inspect", str(path)], text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, path in paths.items()}
    done = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


def row(*cells: str) -> re.Pattern:
    """One table row of the report: the cells in order, separated by spaces."""
    return re.compile(r"^\s+" + r"\s+".join(map(re.escape, cells)) + r"\s*$", re.M)


def taps(report: str) -> list[str]:
    """The tap table's rows, checked against the count in its heading."""
    head, _, table = report.partition("\ntaps (")
    count, _, rows = table.partition("):\n")
    rows = rows.splitlines()[1:]  # below the column names
    assert head and len(rows) == int(count), report
    return rows


def test_inspect_a_model_file_lists_io_taps_and_config_endpoints(inspected) -> None:
    result = inspected["siamese"]
    assert result.returncode == 0, result.stderr
    report = result.stdout
    for endpoint in ("siamese.similarity (default)", "siamese.embed_left", "siamese.embed_right"):
        assert f"endpoint {endpoint}" in report, report
    for cells in [("input", "left", "float32", "[-1, 12]"),
                  ("input", "right", "float32", "[-1, 12]"),
                  ("output", "similarity", "float32", "[-1, 1]"),
                  ("output", "shared:0", "float32", "[-1, 8]"),
                  ("output", "shared:1", "float32", "[-1, 8]")]:
        assert row(*cells).search(report), (cells, report)
    for tap in ("left", "right", "shared", "shared:0", "shared:1", "diff", "similarity"):
        assert re.search(rf"^\s+{re.escape(tap)}\s+\w+\s+float32\s+\[-1, \d+\]$", report,
                         re.M), (tap, report)
    assert len(taps(report)) == 8  # right, left, shared, shared:0, shared:1, diff, abs, sim


def test_inspect_a_nested_model_folder_names_taps_by_path(inspected) -> None:
    result = inspected["nested"]
    assert result.returncode == 0, result.stderr
    report = result.stdout
    for cells in [("backbone/b1", "Dense", "float32", "[-1, 8]"),
                  ("backbone/block/inner", "Dense", "float32", "[-1, 8]"),
                  ("backbone/block/inner_proj", "Dense", "float32", "[-1, 6]"),
                  ("backbone", "Sequential", "float32", "[-1, 6]"),
                  ("logits", "Dense", "float32", "[-1, 3]")]:
        assert row(*cells).search(report), (cells, report)
    for endpoint in ("nested.logits (default)", "nested.inner", "nested.from_b1"):
        assert f"endpoint {endpoint}" in report, report
    assert row("input", "backbone/b1", "float32", "[-1, 8]").search(report)


@tf_models
def test_inspect_a_saved_model_lists_signatures_and_no_taps(inspected) -> None:
    result = inspected["saved_model"]
    assert result.returncode == 0, result.stderr
    report = result.stdout
    assert "endpoint exported.serving_default (default)" in report, report
    assert row("input", "image", "float32", "[-1, 8, 8, 1]").search(report), report
    assert "taps: none" in report and "no layer graph" in report


@frontend_only
def test_inspect_a_bad_path_fails_with_a_reason(inspected) -> None:
    result = inspected["missing"]
    assert result.returncode != 0
    assert result.stdout == ""
    assert "no_such_model does not exist" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def start_failure(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TAPSERVE), "serve", "--host", "127.0.0.1",
                           "--metrics-port", "0", "--http-port", "0", *flags],
                          capture_output=True, text=True, timeout=60, check=False)


@frontend_only
def test_a_missing_repository_is_a_clear_start_failure(tmp_path: Path) -> None:
    done = start_failure("--model-repository", str(tmp_path / "nope"), "--grpc-port", "0")
    assert done.returncode == 2
    assert "cannot start: model repository" in done.stderr and "Traceback" not in done.stderr


@frontend_only
def test_a_taken_port_is_a_clear_start_failure(repository: Path) -> None:
    # Regression: gRPC's SO_REUSEPORT let a second server share a taken port silently.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a gRPC server does
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = start_failure("--model-repository", str(repository), "--grpc-port", str(port))
    assert done.returncode == 2
    assert f"cannot bind gRPC to 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
