"""Regression tests for the defects a hostile trial found (issue 10), each named for its
bug, through stock clients against a real `tapserve serve`."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import keras
import numpy as np
import pytest
import tritonclient.grpc as triton
import zoo
from backends import BACKEND, HAS_TF, frontend_only, tf_models
from ports import free_port
from scrape import wait_for
from stock import ServerProcess, infer
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

RESPONSE_LIMIT = 1024 * 1024  # --max-response-bytes of this file's server
GARBAGE = b"PK\x03\x04 this is no zip archive"
# The front doors' limits: the same on every backend. The SavedModels and string models
# here are TensorFlow-only: built and tested on the tensorflow backend only.
pytestmark = frontend_only
TF_MODELS = BACKEND == "tensorflow" and HAS_TF
if TF_MODELS:
    import tensorflow as tf
    from savedmodels import HOSTILE
else:
    HOSTILE = {}


def write_reader(folder: Path) -> None:
    """A SavedModel whose signature reads the files its input names (tf.io.read_file)."""
    class Reader(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="path")])
        def read(self, path: tf.Tensor) -> dict[str, tf.Tensor]:
            def read_file(p: tf.Tensor) -> tf.Tensor:  # warm-up sends "": no file
                return tf.cond(tf.strings.length(p) > 0, lambda: tf.io.read_file(p),
                               lambda: tf.constant(b""))
            return {"contents": tf.map_fn(read_file, path, fn_output_signature=tf.string)}

    reader = Reader()
    tf.saved_model.save(reader, str(folder / "1"), signatures={"serving_default": reader.read})


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("hostile")
    zoo.write_model("autoencoder", repo)
    zoo.write_model("autoencoder", repo, folder="small_queue",
                    config={"batching": {"max_queue_size": 4}})
    (repo / "garbage" / "1").mkdir(parents=True)
    (repo / "garbage" / "1" / "model.keras").write_bytes(GARBAGE)
    zoo.write_model("autoencoder", repo, folder="bad_config",
                    config="batching: {max_batch_size: 0}\nsecret_key: hunter2\n")
    if TF_MODELS:
        zoo.write_model("string_input", repo)
        zoo.write_model("string_input", repo, folder="wide_queue",  # takes millions of rows
                        config={"batching": {"max_queue_size": 10_000_000}})
        write_reader(repo / "reader")
        write_reader(repo / "reader_allowed")
        (repo / "reader_allowed" / "config.yaml").write_text("allow_file_ops: true\n")
        target = repo.parent / f"{repo.name}_target.csv"  # outside the repository
        target.write_text("the server's own line\n")
        for name, (write, _) in HOSTILE.items():
            write(repo / name / "1", target)
    for bad in ("bad name!", "trailing\n"):  # not model names: skipped, with a warning
        zoo.write_model("autoencoder", repo, with_config=False, folder=bad)
    return repo


@pytest.fixture(scope="module")
def server(start_process, repository: Path) -> ServerProcess:
    http = free_port()
    process = start_process(repository, "--http-port", str(http), "--max-response-bytes",
                            str(RESPONSE_LIMIT), "--no-strict-readiness")
    process.http = f"http://127.0.0.1:{http}"
    return process


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> service_pb2_grpc.GRPCInferenceServiceStub:
    channel = grpc.insecure_channel(server.url, options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def images(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).random((rows, 8, 8, 1), dtype=np.float32)


def assert_serves(client: triton.InferenceServerClient, autoencoder: keras.Model) -> None:
    x = images(3)
    got = infer(client, "autoencoder", {"image": x}).as_numpy("recon")
    np.testing.assert_allclose(got, np.asarray(autoencoder(x)), atol=1e-5)


def refused(call, *args, **kwargs) -> tuple[grpc.RpcError, float]:
    """The error a raw stub call ends in, and how long it took."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=60, **kwargs)
    return err.value, time.monotonic() - started


def health_while(work, server: ServerProcess) -> tuple[object, list[float]]:
    """Run `work()` on a thread; meanwhile time ServerLive calls. Returns work's result
    and every ServerLive latency seen (one at least)."""
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", work()))
    latencies = []
    with server.client() as client:
        thread.start()
        while thread.is_alive() or not latencies:
            started = time.monotonic()
            assert client.is_server_live(client_timeout=10)
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)
    thread.join()
    return result.get("value"), latencies


# 1. Small requests froze the event loop.

def test_60000_requested_outputs_are_refused_at_once_while_health_answers(
        server, stub, autoencoder) -> None:
    # Regression: the duplicate check was quadratic: 60,000 names froze the server 21 s.
    request = service_pb2.ModelInferRequest(model_name="autoencoder")
    request.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 1])
    request.raw_input_contents.append(images(1).tobytes())
    request.outputs.extend(service_pb2.ModelInferRequest.InferRequestedOutputTensor(
        name=f"out{i}") for i in range(60_000))
    (error, seconds), latencies = health_while(lambda: refused(stub.ModelInfer, request),
                                               server)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "asks for 60000 outputs; at most 1024" in error.details()
    assert seconds < 1.0, seconds
    assert max(latencies) < 0.5, latencies
    with server.client() as client:
        assert_serves(client, autoencoder)


def test_a_large_bytes_tensor_to_an_fp32_input_is_refused_on_its_datatype_at_once(
        server, stub, autoencoder) -> None:
    # Regression: 64 MiB of zero-length BYTES elements were split (9 s, +400 MB) before
    # the datatype was looked at. Here 16 MiB: 4,194,304 elements.
    request = service_pb2.ModelInferRequest(model_name="autoencoder")
    request.inputs.add(name="image", datatype="BYTES", shape=[65536, 8, 8, 1])
    request.raw_input_contents.append(bytes(16 * 1024 * 1024))
    error, seconds = refused(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "input 'image' must be float32, got string (BYTES); send FP32" in error.details()
    assert seconds < 1.0, seconds
    with server.client() as client:
        assert_serves(client, autoencoder)


@tf_models
def test_a_large_bytes_tensor_for_a_bytes_input_is_decoded_off_the_event_loop(
        server, stub) -> None:
    # The datatype is right and the queue takes the rows, so the elements must be split:
    # on a thread, not the loop.
    count = 2_000_000
    request = service_pb2.ModelInferRequest(model_name="wide_queue")
    request.inputs.add(name="text", datatype="BYTES", shape=[count])
    request.raw_input_contents.append(bytes(4 * count))  # every element empty
    (error, _), latencies = health_while(lambda: refused(stub.ModelInfer, request), server)
    # Decoded (the refusal counts its rows), then refused for its size, not by the decode.
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert f"for {count} rows, over the server's limit" in error.details()
    assert len(latencies) > 1 and max(latencies) < 0.5, latencies


def test_more_than_64_inputs_are_refused_with_the_limit(stub) -> None:
    request = service_pb2.ModelInferRequest(model_name="autoencoder")
    for i in range(65):
        request.inputs.add(name=f"in{i}", datatype="FP32", shape=[1])
        request.raw_input_contents.append(bytes(4))
    error, _ = refused(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "the request has 65 inputs; at most 64" in error.details()


# 2. No real size limits.

def test_one_request_larger_than_the_queue_is_refused_even_when_the_queue_is_empty(
        server, autoencoder) -> None:
    # Regression: max_queue_size was checked only when the queue was not empty.
    with server.client() as client:
        with pytest.raises(InferenceServerException) as err:
            infer(client, "small_queue", {"image": images(5)})
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED", err.value
        assert "(max_queue_size 4): send at most 4 rows" in err.value.message()
        got = infer(client, "small_queue", {"image": images(4)}).as_numpy("recon")
    np.testing.assert_allclose(got, np.asarray(autoencoder(images(4))), atol=1e-5)


def test_outputs_larger_than_the_response_limit_are_refused_before_compute(
        server, autoencoder) -> None:
    # Regression: a wide tap for many rows was computed in full (6.3 GB), then failed at
    # send. enc_conv is 8x8x4 float32 (1024 bytes a row), dec_pixels 64 float32 (256).
    batches = server.metric("tapserve_batch_size_count", model="autoencoder") or 0
    with server.client() as client:
        with pytest.raises(InferenceServerException) as err:
            infer(client, "autoencoder", {"image": images(1000)}, ["enc_conv", "dec_pixels"])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
        # 1,280,000 bytes of values and 1,170 of framing (names, shapes, the model's name)
        assert (f"about 1281170 bytes for 1000 rows, over the server's limit of "
                f"{RESPONSE_LIMIT} bytes per response: send at most 818 rows"
                in err.value.message()), err.value.message()
        assert (server.metric("tapserve_batch_size_count", model="autoencoder") or 0) == batches
        got = infer(client, "autoencoder", {"image": images(800)}, ["enc_conv", "dec_pixels"])
        assert got.as_numpy("enc_conv").shape == (800, 8, 8, 4)


def post_json(server: ServerProcess, path: str, document: dict) -> tuple[int, dict, bytes]:
    """POST a JSON document: the status, the headers and the body."""
    request = urllib.request.Request(f"{server.http}{path}", json.dumps(document).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_a_response_is_bounded_in_what_is_sent_not_in_raw_bytes(server) -> None:
    """A JSON answer takes up to 19 bytes a float32 where the check counted 4: a 33 KB
    request got an 832 MB body (3.2x the limit) and stalled every other HTTP client. 400
    rows of enc_conv (256 float32 each) are 409,600 raw bytes, ~1.9 MB as JSON."""
    batches = server.metric("tapserve_batch_size_count", model="autoencoder") or 0
    image = {"name": "image", "datatype": "FP32", "shape": [400, 8, 8, 1],
             "data": images(400).ravel().tolist()}
    status, _, body = post_json(server, "/v2/models/autoencoder/infer",
                                {"inputs": [image], "outputs": [{"name": "enc_conv"}]})
    assert status == 400, body[:200]
    assert "as JSON for 400 rows, over the server's limit" in json.loads(body)["error"]
    status, _, body = post_json(server, "/v1/models/autoencoder:predict", {
        "instances": images(400).tolist(), "output_filter": ["enc_conv"]})
    assert status == 400, body[:200]
    assert "as JSON for 400 rows" in json.loads(body)["error"]
    assert (server.metric("tapserve_batch_size_count", model="autoencoder") or 0) == batches
    # As binary data, the same answer fits.
    status, headers, body = post_json(server, "/v2/models/autoencoder/infer", {
        "inputs": [image], "outputs": [{"name": "enc_conv", "parameters": {"binary_data": True}}]})
    assert status == 200, body[:200]
    assert len(body) - int(headers["Inference-Header-Content-Length"]) == 400 * 1024


def test_a_grpc_answer_of_exactly_the_limit_is_refused_before_compute(stub, server) -> None:
    """1024 rows of enc_conv are exactly --max-response-bytes of values: the check let it
    through, it was computed, and gRPC's send limit refused it with the framing added."""
    batches = server.metric("tapserve_batch_size_count", model="autoencoder") or 0
    request = service_pb2.ModelInferRequest(model_name="autoencoder")
    request.inputs.add(name="image", datatype="FP32", shape=[1024, 8, 8, 1])
    request.raw_input_contents.append(images(1024).tobytes())
    request.outputs.add(name="enc_conv")
    error, _ = refused(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "over the server's limit" in error.details(), error.details()
    assert (server.metric("tapserve_batch_size_count", model="autoencoder") or 0) == batches


# 3. Leaks.

def test_a_failed_model_tells_clients_a_category_and_no_paths_or_config(
        server, repository: Path) -> None:
    with server.client() as client:
        for model, says in [("garbage", "its model file is not valid"),
                            ("bad_config", "its config.yaml is invalid")]:
            with pytest.raises(InferenceServerException) as err:
                infer(client, model, {"image": images(1)})
            message = err.value.message()
            assert err.value.status() == "StatusCode.UNAVAILABLE", err.value
            assert says in message and "the repository index" in message, message
            assert str(repository) not in message and "/" not in message, message
        index = {(r["name"], r.get("version", "")): r.get("reason", "")
                 for r in client.get_model_repository_index(as_json=True)["models"]}
    # The index says why, with paths relative to the repository and no config values.
    assert index[("garbage", "1")] == ("model.keras is not a valid .keras file (a zip "
                                       "archive saved by model.save): replace it"), index
    assert "batching.max_batch_size: Input should be greater than or equal to 1" in \
        index[("bad_config", "")], index
    shown = json.dumps(list(index.values()))
    assert "hunter2" not in shown and str(repository) not in shown
    # The operator's log has the full story.
    log = server.output()
    assert str(repository / "bad_config" / "config.yaml") in log


def test_client_strings_are_echoed_cut_short(server) -> None:
    with server.client() as client, pytest.raises(InferenceServerException) as err:
        infer(client, "a" * 100_000 + " b", {"image": images(1)})
    assert err.value.status() == "StatusCode.NOT_FOUND", err.value
    assert "no model 'aaaa" in err.value.message() and "…" in err.value.message()
    assert len(err.value.message()) < 400, len(err.value.message())


def test_a_request_id_with_a_newline_cannot_forge_a_log_line(server) -> None:
    forged = "FORGED ERROR service.server: all models deleted"
    with server.client() as client, pytest.raises(InferenceServerException):
        infer(client, "autoencoder", {"image": images(1)[..., 0]}, request_id=f"x\n{forged}")
    wait_for(lambda: "request_id=x\\nFORGED" in server.output(), "the escaped request id")
    assert not any(line.startswith("FORGED") for line in server.output().splitlines())


# 4. SavedModels with file ops.

@tf_models
def test_a_saved_model_that_reads_files_is_refused_unless_its_config_allows_it(
        server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"the server's own file")
    path = np.array([str(secret).encode()], dtype=object)
    with server.client() as client:
        with pytest.raises(InferenceServerException) as err:
            infer(client, "reader", {"path": path})
        assert err.value.status() == "StatusCode.UNAVAILABLE", err.value
        assert "refused: its graph runs ops outside the allow-list (allow_file_ops)" in \
            err.value.message()
        index = {(r["name"], r.get("version", "")): r.get("reason", "")
                 for r in client.get_model_repository_index(as_json=True)["models"]}
        assert "['ReadFile']" in index[("reader", "1")], index
        assert "allow_file_ops: true" in index[("reader", "1")], index
        # Opted in, the same graph serves: the op was real.
        got = infer(client, "reader_allowed", {"path": path}).as_numpy("contents")
    assert got.tolist() == [b"the server's own file"]


@tf_models
@pytest.mark.parametrize("name", sorted(HOSTILE) or ["none"])
def test_saved_models_reading_or_writing_files_beyond_a_deny_list_are_refused(
        server, repository: Path, autoencoder: keras.Model, name: str) -> None:
    """A CsvDataset returned a file's first line to clients, SaveV2 wrote files during
    warm-up, Dataset.cache loaded: the ops a SavedModel runs are now an allow-list."""
    op = HOSTILE[name][1]
    with server.client() as client:
        with pytest.raises(InferenceServerException) as err:
            infer(client, name, {"x": np.ones(2, np.float32)})
        assert err.value.status() == "StatusCode.UNAVAILABLE", err.value
        index = {r["name"]: r.get("reason", "") for r in
                 client.get_model_repository_index(as_json=True)["models"]}
        assert f"'{op}'" in index[name] and "allow-list" in index[name], index[name]
        assert_serves(client, autoencoder)
    assert not list(repository.parent.glob(f"{repository.name}_target.csv?*"))  # none written


# 5. Counting.

def test_a_request_refused_while_decoding_counts_under_its_endpoint(server) -> None:
    def count() -> float:
        return server.metric("tapserve_requests_total", model="autoencoder",
                             endpoint="encoder", code="INVALID_ARGUMENT",
                             protocol="kserve_grpc") or 0
    before = count()
    tensor = triton.InferInput("image", [1, 8, 8, 1], "FP32")
    tensor.set_data_from_numpy(images(1))
    tensor._raw_content = tensor._raw_content[:-4]  # a byte count the shape does not fit
    with server.client() as client, pytest.raises(InferenceServerException) as err:
        client.infer("autoencoder.encoder", [tensor])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
    wait_for(lambda: count() == before + 1, "the refusal counted under endpoint encoder")


@pytest.mark.parametrize("shape", [[0, 2**62, 8, 1], [2**62, 2**62], [1] * 40])
def test_a_shape_numpy_cannot_make_is_invalid_argument_not_internal(stub, shape) -> None:
    request = service_pb2.ModelInferRequest(model_name="autoencoder")
    request.inputs.add(name="image", datatype="FP32", shape=shape)
    request.raw_input_contents.append(b"")
    error, _ = refused(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "input 'image': shape" in error.details(), error.details()


def test_cancelled_clients_leave_no_error_in_the_log(server) -> None:
    x = images(64)
    start = len(server.output())
    with server.client() as client:
        for i in range(60):
            with contextlib.suppress(InferenceServerException):
                infer(client, "autoencoder", {"image": x}, client_timeout=0.001 * (i % 6))
        client.is_server_live()
    time.sleep(1)
    errors = [line for line in server.output()[start:].splitlines()
              if " ERROR " in line or line.startswith("Traceback")]
    assert not errors, errors


# 6. Repository edge cases.

def test_folders_that_are_not_model_names_are_skipped_with_a_warning(server) -> None:
    log = server.output()
    assert "skipping folder 'bad name!'" in log
    assert "skipping folder 'trailing\\n'" in log
    with server.client() as client:
        names = {r["name"] for r in client.get_model_repository_index(as_json=True)["models"]}
    assert "trailing\n" not in names and "bad name!" not in names
    assert {"autoencoder", "garbage"} <= names


def test_http_infer_refuses_a_bytes_tensor_to_an_fp32_input_on_its_datatype(server) -> None:
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 8, 8, 1],
                                   "data": ["a"] * 64}]}).encode()
    request = urllib.request.Request(f"{server.http}/v2/models/autoencoder/infer", body)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400
    assert "must be float32, got string (BYTES)" in json.loads(err.value.read())["error"]


# 7. Huge declared tensors (issue 18, item 6).

@tf_models
def test_a_declared_shape_past_the_queue_is_refused_before_its_bytes_are_split(
        server, stub) -> None:
    # Regression: 60 MiB of BYTES declaring 15.7 M rows was split for 17.9 s before the
    # row limit refused it. The rows are now checked against the declared shape: the
    # refusal names the queue's limit, whatever (here: too little) data came with it.
    request = service_pb2.ModelInferRequest(model_name="string_input")
    request.inputs.add(name="text", datatype="BYTES", shape=[15_728_640])
    request.raw_input_contents.append(bytes(64))
    error, _ = refused(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert ("the request has 15728640 rows, more than the model's queue holds "
            "(max_queue_size 1024)") in error.details(), error.details()


def test_a_declared_shape_the_endpoint_cannot_take_is_refused_before_decoding(stub) -> None:
    # The rank and fixed dimensions too: [1, 8, 8, 1] images, declared as [2, 64].
    request = service_pb2.ModelInferRequest(model_name="autoencoder")
    request.inputs.add(name="image", datatype="FP32", shape=[2, 64])
    request.raw_input_contents.append(bytes(4))
    error, _ = refused(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "input 'image' has shape [2, 64]; expected image (float32 [-1,8,8,1])" in \
        error.details(), error.details()


# 8. Client errors answered INTERNAL, UNKNOWN or 500 (issue 18, item 7).

NOT_PROTOBUF = b"\xff this is not a protobuf message"


def grpc_count(server: ServerProcess, method: str, code: str) -> float:
    return server.metric("tapserve_grpc_requests_total", method=method, code=code) or 0


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, body)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def errors_logged(server: ServerProcess, start: int) -> list[str]:
    return [line for line in server.output()[start:].splitlines()
            if " ERROR " in line or line.startswith("Traceback")]


@pytest.mark.parametrize("method", ["/inference.GRPCInferenceService/ModelInfer",
                                    "/inference.GRPCInferenceService/ModelReady",
                                    "/tensorflow.serving.PredictionService/Predict"])
def test_bytes_that_are_not_a_protobuf_message_are_invalid_argument(server, method) -> None:
    # Regression: gRPC's own UNKNOWN "Unexpected <class 'DecodeError'>", an ERROR
    # traceback each, and no count.
    start, before = len(server.output()), grpc_count(server, method, "INVALID_ARGUMENT")
    with grpc.insecure_channel(server.url) as channel:
        error, _ = refused(channel.unary_unary(method), NOT_PROTOBUF)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "the request is not a valid" in error.details(), error.details()
    wait_for(lambda: grpc_count(server, method, "INVALID_ARGUMENT") == before + 1,
             "the refusal counted")
    assert not errors_logged(server, start)


def test_a_stream_message_that_is_not_protobuf_fails_only_itself(server) -> None:
    # Regression: one such message ended the whole ModelStreamInfer INTERNAL.
    good = service_pb2.ModelInferRequest(model_name="autoencoder", id="good")
    good.inputs.add(name="image", datatype="FP32", shape=[1, 8, 8, 1])
    good.raw_input_contents.append(images(1).tobytes())
    start = len(server.output())
    with grpc.insecure_channel(server.url) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        answers = list(call(iter([good.SerializeToString(), NOT_PROTOBUF,
                                  good.SerializeToString()]), timeout=60))
    served = [a for a in answers if not a.error_message]
    failed = [a.error_message for a in answers if a.error_message]
    assert [a.infer_response.id for a in served] == ["good", "good"]
    assert len(failed) == 1 and "the request is not a valid" in failed[0], failed
    assert not errors_logged(server, start)


def test_a_version_of_5000_digits_is_not_found(stub) -> None:
    # Regression: Python's int() refuses 4,300+ digits: INTERNAL.
    error, _ = refused(stub.ModelReady, service_pb2.ModelReadyRequest(
        name="autoencoder", version="1" * 5000))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error
    assert "versions are positive integers" in error.details(), error.details()


def test_a_kserve_rest_id_that_is_not_a_string_is_400(server) -> None:
    # Regression: an "id" nested 1,000 deep was 500 (RecursionError in str()).
    inputs = json.dumps([{"name": "image", "datatype": "FP32", "shape": [1, 8, 8, 1],
                          "data": [0.0] * 64}])
    body = f'{{"id": {"[" * 1000}{"]" * 1000}, "inputs": {inputs}}}'.encode()
    start = len(server.output())
    status, answer = post(f"{server.http}/v2/models/autoencoder/infer", body)
    assert status == 400, answer
    assert "`id` must be a string" in answer["error"], answer
    assert not errors_logged(server, start)


@tf_models
def test_tfserving_rest_strings_nested_deeper_than_a_tensor_are_400(server) -> None:
    # Regression: string instances nested 500 deep were 500, with 150 KB of traceback.
    body = f'{{"instances": {"[" * 500}"red"{"]" * 500}}}'.encode()
    start = len(server.output())
    status, answer = post(f"{server.http}/v1/models/string_input:predict", body)
    assert status == 400, answer
    assert "nested deeper than" in answer["error"], answer
    assert not errors_logged(server, start)
    assert len(server.output()) - start < 2000  # one log line, not a traceback
