"""End to end: OpenTelemetry traces (--otlp-endpoint) to a bare OTLP/HTTP receiver this
test starts. Requests through KServe gRPC and HTTP and TF Serving gRPC and REST, each
carrying a W3C traceparent, come back as "infer" spans in the caller's trace with "queue",
"compute" and "response" children; a batch that served several requests is one "batch"
span linked to each of them. The server holds spans until it stops (a 10-minute export
delay), so every span the test sees was flushed by the SIGTERM drain."""

from __future__ import annotations

import gzip
import json
import os
import queue
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
import zoo
from backends import HAS_TFS_CLIENT, frontend_only, needs_tfs_client
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from ports import free_port
from stock import TAPSERVE, ServerProcess, infer, infer_inputs, server_has
from tritonclient.utils import InferenceServerException

if HAS_TFS_CLIENT:  # the stock TF Serving client: tensorflow's protos and tensors
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

pytestmark = [frontend_only, pytest.mark.skipif(
    not server_has("opentelemetry.sdk"),
    reason="the tapserve under test lacks tapserve[tracing] (the container image)")]

IMAGE = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
X = np.random.default_rng(1).random((1, 16), dtype=np.float32)
TOGETHER = 3  # requests sent at once to the model that waits 2 s for its batch to fill


def traceparent(n: int) -> tuple[str, str, str]:
    """A caller's (traceparent header, its trace id, its span id), sampled."""
    trace_id, span_id = f"{n:032x}", f"{n + 0xabc:016x}"
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


class Receiver:
    """A bare OTLP/HTTP trace receiver: keeps every span POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.paths: list[str] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                message = ExportTraceServiceRequest.FromString(body)
                with lock:
                    outer.paths.append(self.path)
                    outer.spans += [span for resource in message.resource_spans
                                    for scope in resource.scope_spans for span in scope.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attributes(span: Span) -> dict[str, object]:
    values = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, kind)
    return values


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("tracing_models")
    zoo.write_model("autoencoder", repo)
    # Waits for its batch to fill: requests sent together share one batch.
    zoo.save(zoo.ZOO["two_heads"](), repo / "gathered")
    (repo / "gathered" / "config.yaml").write_text(yaml.safe_dump({"batching": {
        "max_queue_delay_ms": 2000, "max_batch_size": 64, "eager": False}}))
    return repo


@pytest.fixture(scope="module")
def traced(start_process, repository: Path) -> dict[str, object]:
    """Every kind of call, each with its own traceparent, then SIGTERM: what the receiver
    got, and what each call sent."""
    receiver = Receiver()
    http_port = free_port()
    # The env twin of --otlp-endpoint; the SDK's export delay holds spans until the drain.
    server: ServerProcess = start_process(
        repository, "--http-port", str(http_port), TAPSERVE_OTLP_ENDPOINT=receiver.url,
        OTEL_BSP_SCHEDULE_DELAY="600000")
    sent: dict[str, tuple[str, str, str]] = {}
    with server.client() as client:
        sent["kserve_grpc"] = traceparent(1)
        infer(client, "autoencoder", {"image": IMAGE},
              headers={"traceparent": sent["kserve_grpc"][0]})
        sent["not_found"] = traceparent(2)
        with pytest.raises(InferenceServerException, match="no model"):
            infer(client, "nosuch", {"image": IMAGE},
                  headers={"traceparent": sent["not_found"][0]})

        # A stream's metadata holds one traceparent: each of its requests is a span under it.
        sent["stream"] = traceparent(6)
        answers: queue.Queue = queue.Queue()
        client.start_stream(lambda result, error: answers.put(error),
                            headers={"traceparent": sent["stream"][0]})
        for i in range(2):
            client.async_stream_infer("autoencoder", infer_inputs({"image": IMAGE}),
                                      request_id=str(i))
        assert [answers.get(timeout=30) for _ in range(2)] == [None, None]
        client.stop_stream()

        def together(i: int) -> None:
            with server.client() as own:
                infer(own, "gathered", {"x": X}, headers={"traceparent": sent[f"g{i}"][0]})

        for i in range(TOGETHER):
            sent[f"g{i}"] = traceparent(10 + i)
        with ThreadPoolExecutor(TOGETHER) as pool:
            list(pool.map(together, range(TOGETHER)))

    sent["kserve_http"] = traceparent(3)
    body = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 8, 8, 1],
                                   "data": IMAGE.ravel().tolist()}]}).encode()
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v2/models/autoencoder/infer", body,
            {"traceparent": sent["kserve_http"][0], "Content-Type": "application/json"})) as r:
        assert r.status == 200

    if HAS_TFS_CLIENT:
        sent["tfserving_grpc"] = traceparent(4)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "autoencoder"
        request.inputs["image"].CopyFrom(tf.make_tensor_proto(IMAGE))
        with grpc.insecure_channel(server.url) as channel:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                request, metadata=[("traceparent", sent["tfserving_grpc"][0])], timeout=30)

    sent["tfserving_http"] = traceparent(5)
    body = json.dumps({"instances": IMAGE.tolist()}).encode()
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/models/autoencoder:predict", body,
            {"traceparent": sent["tfserving_http"][0]})) as r:
        assert r.status == 200

    before = len(receiver.spans)
    assert server.terminate() == 0
    receiver.close()
    return {"receiver": receiver, "sent": sent, "before": before, "log": server.output()}


def request_span(traced: dict, key: str) -> Span:
    header, trace_id, span_id = traced["sent"][key]
    found = [s for s in traced["receiver"].spans
             if s.name == "infer" and s.trace_id.hex() == trace_id]
    assert len(found) == 1, f"{key}: {len(found)} infer spans in trace {trace_id}"
    assert found[0].parent_span_id.hex() == span_id  # a child of the caller's span
    return found[0]


def children(traced: dict, parent: Span) -> dict[str, Span]:
    kids = [s for s in traced["receiver"].spans if s.parent_span_id == parent.span_id]
    assert all(k.trace_id == parent.trace_id for k in kids)
    return {k.name: k for k in kids}


def test_spans_leave_when_the_server_stops(traced):
    assert traced["before"] == 0  # held by the export delay until the drain flushed them
    assert traced["receiver"].paths and set(traced["receiver"].paths) == {"/v1/traces"}
    assert "tracing: OpenTelemetry spans to" in traced["log"]


@pytest.mark.parametrize("door", ["kserve_grpc", "kserve_http", pytest.param(
    "tfserving_grpc", marks=needs_tfs_client), "tfserving_http"])
def test_a_request_is_a_span_in_the_callers_trace(traced, door: str):
    span = request_span(traced, door)
    assert span.kind == Span.SPAN_KIND_SERVER
    assert attributes(span) == {"tapserve.door": door, "tapserve.model": "autoencoder",
                                "tapserve.endpoint": "autoencoder", "tapserve.version": 1,
                                "tapserve.status": "OK"}
    kids = children(traced, span)
    assert sorted(kids) == ["compute", "queue", "response"]
    queue, compute, response = kids["queue"], kids["compute"], kids["response"]
    # One after the other, inside the request's span.
    assert span.start_time_unix_nano <= queue.start_time_unix_nano
    assert queue.end_time_unix_nano == compute.start_time_unix_nano
    assert compute.end_time_unix_nano <= response.start_time_unix_nano
    assert response.end_time_unix_nano == span.end_time_unix_nano


def test_the_batch_span_links_every_request_it_served(traced):
    spans = traced["receiver"].spans
    batches = {s.span_id: s for s in spans if s.name == "batch"}
    requests = [request_span(traced, f"g{i}") for i in range(TOGETHER)]
    (batch_id,) = {children(traced, r)["compute"].links[0].span_id for r in requests}
    batch = batches[batch_id]  # the one batch all three rode in
    assert {(link.trace_id, link.span_id) for link in batch.links} == {
        (r.trace_id, r.span_id) for r in requests}
    assert attributes(batch) == {"tapserve.model": "gathered",
                                 "tapserve.batch.requests": TOGETHER,
                                 "tapserve.batch.rows": TOGETHER}
    for r in requests:
        compute = children(traced, r)["compute"]
        assert (compute.start_time_unix_nano, compute.end_time_unix_nano) == (
            batch.start_time_unix_nano, batch.end_time_unix_nano)
    # Every request's compute span names its batch, and that batch links back to it.
    for door in ("kserve_grpc", "kserve_http", "tfserving_grpc", "tfserving_http"):
        if door not in traced["sent"]:  # tfserving_grpc, without the stock client
            continue
        r = request_span(traced, door)
        (link,) = children(traced, r)["compute"].links
        assert (r.trace_id, r.span_id) in {(k.trace_id, k.span_id)
                                           for k in batches[link.span_id].links}


def test_each_request_of_a_stream_is_a_span_under_its_caller(traced):
    header, trace_id, span_id = traced["sent"]["stream"]
    spans = [s for s in traced["receiver"].spans
             if s.name == "infer" and s.trace_id.hex() == trace_id]
    assert len(spans) == 2
    for span in spans:
        assert span.parent_span_id.hex() == span_id
        assert attributes(span)["tapserve.door"] == "kserve_grpc"
        assert sorted(children(traced, span)) == ["compute", "queue", "response"]


def test_a_refused_request_says_why(traced):
    span = request_span(traced, "not_found")
    assert attributes(span)["tapserve.status"] == "NOT_FOUND"
    assert attributes(span)["tapserve.model"] == "nosuch"
    assert span.status.code == span.status.STATUS_CODE_ERROR
    assert "no model" in span.status.message
    assert children(traced, span) == {}  # never queued, never computed


def test_a_collector_that_is_down_costs_a_line_a_minute_and_holds_no_drain(
        start_process, repository: Path):
    """Nothing listens at the endpoint: requests are served, the exporter's complaints
    come one a minute (they were 4 lines every 5 s), and the drain gives the last spans
    up after its 5 s instead of the exporter's 10 s of retries a batch."""
    server = start_process(repository, "--otlp-endpoint", f"http://127.0.0.1:{free_port()}",
                           OTEL_BSP_SCHEDULE_DELAY="200")
    with server.client() as client:
        for _ in range(3):
            infer(client, "autoencoder", {"image": IMAGE})
            time.sleep(1)  # several export attempts, each refused
    assert server.terminate() == 0
    log = server.output()
    assert "the collector did not take the last spans within 5 s; they are dropped" in log
    complaints = [line for line in log.splitlines() if "opentelemetry.exporter" in line]
    assert len(complaints) == 1, complaints


def test_without_the_extra_an_endpoint_refuses_to_start(tmp_path: Path, repository: Path):
    # A shadow package that fails to import, as if tapserve[tracing] were not installed.
    (tmp_path / "opentelemetry").mkdir()
    (tmp_path / "opentelemetry" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'opentelemetry'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [str(TAPSERVE), "serve", "--model-repository", str(repository), "--host", "127.0.0.1",
         "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
         "--otlp-endpoint", "http://127.0.0.1:4318"],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "pip install tapserve[tracing]" in done.stdout + done.stderr
