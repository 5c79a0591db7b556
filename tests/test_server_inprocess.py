"""A TapServer in this process (tests/harness.py), called through our generated stubs:
readiness while a model loads, model metadata, and the metrics the server exports."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import zoo
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import RunningServer
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families

from service import loading as loading_module
from service.metrics import STAGES
from service.protocol.generated import grpc_predict_v2_pb2 as pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INFERENCE = "/inference.GRPCInferenceService/"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    zoo.write_model("autoencoder", repo)
    return repo


@pytest.fixture(scope="module")
def server(start_server, repository: Path) -> RunningServer:
    return start_server(repository)


def sample(server: RunningServer, name: str, **labels: str) -> float | None:
    """One sample's value from GET /metrics; None when no sample has those labels."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def health(server: RunningServer, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def images(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).random((rows, 8, 8, 1), dtype=np.float32)


def test_a_model_still_loading_is_unavailable_until_loaded(
        repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loading, release = threading.Event(), threading.Event()
    build = loading_module.build_keras_model

    def held_build(*args: object, **kwargs: object) -> object:
        loading.set()  # the single loader thread is now inside this load...
        assert release.wait(60)  # ...and stays there until the test lets it go
        return build(*args, **kwargs)

    monkeypatch.setattr(loading_module, "build_keras_model", held_build)
    server = RunningServer(repository, wait_loaded=False)
    try:
        assert loading.wait(60)
        stub = server.stub
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name="autoencoder")).ready
        assert health(server) == NOT_SERVING
        assert health(server, "autoencoder") == NOT_SERVING
        assert sample(server, "tapserve_model_ready", model="autoencoder") == 0
        for call in (lambda: server.infer("autoencoder", {"image": images(1)}),
                     lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="autoencoder"))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "model 'autoencoder' is still loading" in err.value.details()
        release.set()
        server.call(server.server.loaded())
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="autoencoder")).ready
        assert health(server) == SERVING and health(server, "autoencoder") == SERVING
        assert server.infer("autoencoder", {"image": images(2)})["recon"].shape == (2, 8, 8, 1)
        assert sample(server, "tapserve_model_ready", model="autoencoder") == 1
    finally:
        release.set()
        server.stop(grace=1.0)


def test_model_metadata_of_endpoints(server: RunningServer) -> None:
    meta = server.stub.ModelMetadata(pb.ModelMetadataRequest(name="autoencoder.decoder"))
    assert meta.name == "autoencoder.decoder"
    assert list(meta.versions) == ["1"] and meta.platform == "tensorflow_keras"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("code", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("recon", "FP32", [-1, 8, 8, 1])]
    default = server.stub.ModelMetadata(pb.ModelMetadataRequest(name="autoencoder", version="1"))
    assert default.name == "autoencoder"
    assert [t.name for t in default.inputs] == ["image"]
    assert [t.name for t in default.outputs] == ["recon"]
    with pytest.raises(grpc.RpcError) as err:
        server.stub.ModelMetadata(pb.ModelMetadataRequest(name="autoencoder.nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "autoencoder, encoder, decoder" in err.value.details()


def grpc_calls(server: RunningServer, method: str, code: str) -> float:
    """tapserve_grpc_requests_total for one full method name and code (0 before any)."""
    return sample(server, "tapserve_grpc_requests_total", method=method, code=code) or 0


def test_grpc_calls_counted_by_method_and_code(server: RunningServer) -> None:
    def count(method: str, code: str) -> float:
        return grpc_calls(server, INFERENCE + method, code)

    before = {key: count(*key) for key in [("ModelMetadata", "OK"),
                                            ("ModelMetadata", "NOT_FOUND"),
                                            ("ServerLive", "OK")]}
    for _ in range(3):
        server.stub.ModelMetadata(pb.ModelMetadataRequest(name="autoencoder.encoder"))
    with pytest.raises(grpc.RpcError):
        server.stub.ModelMetadata(pb.ModelMetadataRequest(name="ghost"))
    for _ in range(2):
        server.stub.ServerLive(pb.ServerLiveRequest())
    assert count("ModelMetadata", "OK") == before["ModelMetadata", "OK"] + 3
    assert count("ModelMetadata", "NOT_FOUND") == before["ModelMetadata", "NOT_FOUND"] + 1
    assert count("ServerLive", "OK") == before["ServerLive", "OK"] + 2


def test_streams_are_counted_by_method_and_code_when_they_end(server: RunningServer) -> None:
    """ModelStreamInfer, health Watch and reflection count like unary calls, under the code
    they end with (and so move the drain's quiet-period clock, which hangs on the same
    hook)."""
    def count(method: str, code: str) -> float:
        return grpc_calls(server, method, code)

    stream = (INFERENCE + "ModelStreamInfer", "OK")
    watch = ("/grpc.health.v1.Health/Watch", "CANCELLED")
    reflect = ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "OK")
    before = {key: count(*key) for key in (stream, watch, reflect)}

    good = pb.ModelInferRequest(model_name="autoencoder", id="good")
    good.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 1])
    good.raw_input_contents.append(images(1).tobytes())
    answers = list(server.stub.ModelStreamInfer(
        iter([good, pb.ModelInferRequest(model_name="ghost", id="bad")]), timeout=30))
    assert sorted(bool(a.error_message) for a in answers) == [False, True]  # per request

    watching = health_pb2_grpc.HealthStub(server.channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert next(watching).status == health_pb2.HealthCheckResponse.SERVING
    watching.cancel()

    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    listed = list(reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
    assert "inference.GRPCInferenceService" in [
        s.name for s in listed[0].list_services_response.service]

    deadline = time.monotonic() + 10  # a cancelled stream ends on the server a bit later
    while count(*watch) == before[watch] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {key: count(*key) - before[key] for key in before} == dict.fromkeys(before, 1)


def test_a_request_s_stages_add_up_to_its_latency(server: RunningServer) -> None:
    """tapserve_request_stage_seconds splits each successful request's latency into
    STAGES, end to end: their sums add up to the request duration's, and a refused
    request observes no stage."""
    labels = {"model": "autoencoder", "endpoint": "autoencoder"}

    def totals() -> tuple[dict[str, tuple[float, float]], float, float]:
        stages = {stage: (sample(server, "tapserve_request_stage_seconds_count",
                                 model="autoencoder", stage=stage) or 0.0,
                          sample(server, "tapserve_request_stage_seconds_sum",
                                 model="autoencoder", stage=stage) or 0.0)
                  for stage in STAGES}
        return (stages, sample(server, "tapserve_request_duration_seconds_sum", **labels) or 0.0,
                sample(server, "tapserve_queue_duration_seconds_sum", **labels) or 0.0)

    (before, duration_before, queue_before) = totals()
    for rows in (1, 2, 3):
        server.infer("autoencoder", {"image": images(rows)})
    (after, duration_after, queue_after) = totals()
    assert {stage: after[stage][0] - before[stage][0] for stage in STAGES} == dict.fromkeys(
        STAGES, 3)
    spent = {stage: after[stage][1] - before[stage][1] for stage in STAGES}
    assert all(seconds >= 0 for seconds in spent.values()), spent
    assert spent["compute"] > 0
    assert sum(spent.values()) == pytest.approx(duration_after - duration_before, abs=1e-6)
    assert spent["queue"] == pytest.approx(queue_after - queue_before, abs=1e-6)

    with pytest.raises(grpc.RpcError):  # refused at the check: no stage observed
        server.infer("autoencoder", {"image": np.zeros((1, 4, 4, 1), np.float32)})
    refused, _, _ = totals()
    assert refused == after


def test_metrics_exist_with_model_and_endpoint_labels(server: RunningServer) -> None:
    server.infer("autoencoder", {"image": images(3)})
    server.infer("autoencoder.encoder", {"image": images(2)})
    for endpoint in ("autoencoder", "encoder"):
        labels = {"model": "autoencoder", "endpoint": endpoint}
        assert sample(server, "tapserve_requests_total", code="OK", **labels) >= 1
        assert sample(server, "tapserve_request_duration_seconds_count", **labels) >= 1
        assert sample(server, "tapserve_queue_duration_seconds_count", **labels) >= 1
    model = {"model": "autoencoder"}
    assert sample(server, "tapserve_compute_duration_seconds_count", **model) >= 1
    assert sample(server, "tapserve_batch_size_count", **model) >= 1
    assert sample(server, "tapserve_batch_size_sum", **model) >= 5
    assert sample(server, "tapserve_queue_depth", **model) == 0
    assert sample(server, "tapserve_model_ready", **model) == 1
    assert sample(server, "tapserve_model_load_duration_seconds", **model) > 0


def test_every_health_watcher_hears_the_drain_after_another_left(repository: Path) -> None:
    """Regression: grpcio-health-checking's aio servicer forgot a service's watchers once
    one Watch stream ended, so the others never saw NOT_SERVING at drain."""
    server = RunningServer(repository)
    watchers = grpc.insecure_channel(server.url)  # server.stop closes server.channel first
    try:
        stub = health_pb2_grpc.HealthStub(watchers)
        first = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        second = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        model = stub.Watch(health_pb2.HealthCheckRequest(service="autoencoder"))
        assert [next(w).status for w in (first, second, model)] == [SERVING] * 3
        first.cancel()
        time.sleep(0.3)  # its stream has ended on the server
        stopping = threading.Thread(target=server.stop, kwargs={"grace": 2.0})
        stopping.start()
        assert next(second).status == NOT_SERVING
        assert next(model).status == NOT_SERVING
        stopping.join(30)
    finally:
        watchers.close()
        server.stop(grace=1.0)


@pytest.mark.parametrize("which", ["grpc_port", "http_port", "metrics_port"])
def test_a_taken_port_is_named_in_the_error(which: str, tmp_path: Path) -> None:
    """Regression: a taken metrics port failed with a bare 'Address already in use'."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"grpc_port": 0, "http_port": 0, "metrics_port": 0, which: port}
        with pytest.raises(OSError, match=rf"cannot bind \w+ to 127\.0\.0\.1:{port}\b"):
            RunningServer(tmp_path, **ports)


@pytest.mark.parametrize("tokens", [False, True])
def test_http_readiness_names_the_model_that_does_not_serve(tokens: bool, tmp_path: Path) -> None:
    """Regression: a 503 from /v2/health/ready named no model. With tokens on it is still
    asked without one, so it counts them instead of naming them."""
    repo = tmp_path / "models"
    zoo.write_model("autoencoder", repo)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.keras").write_bytes(b"not a model")
    settings: dict[str, object] = {}
    if tokens:
        (tmp_path / "tokens").write_text("s3cret\n")
        settings["auth_token_file"] = tmp_path / "tokens"
    port = free_port()
    server = RunningServer(repo, http_port=port, **settings)
    try:
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10)
        assert answer.value.code == 503
        error = json.loads(answer.value.read())["error"]
        if tokens:
            assert error == ("the server is not ready: 1 model(s) loading or unable to serve "
                             "(the repository index names them)")
        else:
            assert error.startswith("the server is not ready: broken (cannot serve: "), error
            assert "autoencoder" not in error and str(repo) not in error
    finally:
        server.stop(grace=1.0)


def test_reflection_describes_every_service(server: RunningServer) -> None:
    """What `grpcurl list` and `grpcurl describe` do: every service is listed, and the
    files reflection sends for it (its own and all it imports) build its descriptors,
    TF Serving's included (they live in a pool of their own, beside TensorFlow's)."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)

    def ask(**request: str) -> reflection_pb2.ServerReflectionResponse:
        (answer,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=30)
        return answer

    listed = {s.name for s in ask(list_services="").list_services_response.service}
    assert listed == {"inference.GRPCInferenceService", "tensorflow.serving.PredictionService",
                      "tensorflow.serving.ModelService", "grpc.health.v1.Health",
                      "grpc.reflection.v1alpha.ServerReflection"}
    services = {}
    for name in listed:
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in ask(
            file_containing_symbol=name).file_descriptor_response.file_descriptor_proto]
        pool = descriptor_pool.DescriptorPool()
        added: set[str] = set()
        for _ in files:  # imports first, in whatever order they came
            for file in files:
                if file.name not in added and set(file.dependency) <= added:
                    pool.Add(file)
                    added.add(file.name)
        assert added == {f.name for f in files}, f"{name}: an import is missing"
        services[name] = pool.FindServiceByName(name)
    predict = services["tensorflow.serving.PredictionService"].methods_by_name["Predict"]
    tensor = predict.input_type.fields_by_name["inputs"].message_type.fields_by_name["value"]
    assert tensor.message_type.fields_by_name["tensor_content"].number == 4
    status = services["tensorflow.serving.ModelService"].methods_by_name["GetModelStatus"]
    assert status.output_type.full_name == "tensorflow.serving.GetModelStatusResponse"
    assert "ModelInfer" in services["inference.GRPCInferenceService"].methods_by_name
