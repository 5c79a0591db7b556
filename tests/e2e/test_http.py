"""End to end: the HTTP port. KServe v2 REST through the stock `tritonclient.http` (binary
tensor data and JSON tensors), TF Serving REST as curl users send it (plain HTTP, JSON),
each answer equal to the gRPC door's (itself checked against Keras) or to Keras."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
import zoo
from backends import BACKEND, HAS_TFS_CLIENT, frontend_only, tf_models
from ports import free_port
from stock import ServerProcess, infer
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

MODELS = ["autoencoder", "two_heads", "siamese", "nested", "multi_dtype"]
if BACKEND == "tensorflow":  # a string lookup: the jax backend refuses it (test_serving)
    MODELS.append("string_input")
# Also served: "slow" (back-pressure), not in the every-endpoint tests.
EXAMPLES = ["digits_autoencoder", "digits_classifier"]  # models/build_examples.py
LIMIT = 1024 * 1024  # --max-request-bytes of this server


def endpoints(repository: Path, name: str) -> list[str]:
    """The KServe model names of every endpoint of a model, from its config.yaml."""
    config_file = repository / name / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
    return [f"{name}.{e}" for e in (config or {}).get("endpoints", {})] or [name]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, write_examples) -> Path:
    repo = tmp_path_factory.mktemp("http_models")
    write_examples(repo)
    for name in MODELS:
        zoo.write_model(name, repo)
    config = yaml.safe_load((repo / "autoencoder" / "config.yaml").read_text())
    config["labels"] = {"stable": 1}
    (repo / "autoencoder" / "config.yaml").write_text(yaml.safe_dump(config))
    # A queue that holds one 4-row request for 2 s and nothing more: back-pressure.
    zoo.write_model("two_heads", repo, folder="slow", config={"batching": {
        "max_queue_delay_ms": 2000, "max_batch_size": 64, "max_queue_size": 4,
        "eager": False}})
    return repo


@pytest.fixture(scope="module")
def server(start_process, repository: Path) -> ServerProcess:
    server = start_process(repository, "--http-port", str(free_port()),
                           "--max-request-bytes", str(LIMIT))
    server.http = f"127.0.0.1:{server.output().split('HTTP on 127.0.0.1:')[1].split()[0]}"
    return server


@pytest.fixture(scope="module")
def http(server: ServerProcess):
    with httpclient.InferenceServerClient(server.http) as client:
        yield client


def http_infer(client: httpclient.InferenceServerClient, model: str,
               feeds: dict[str, np.ndarray], outputs: list[str] | None = None,
               binary: bool = True, **kwargs: Any) -> httpclient.InferResult:
    inputs = []
    for name, array in feeds.items():
        tensor = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    requested = [httpclient.InferRequestedOutput(o, binary_data=binary)
                 for o in outputs] if outputs else None
    return client.infer(model, inputs, outputs=requested, **kwargs)


def call(server: ServerProcess, path: str, body: Any = None) -> tuple[int, Any]:
    """A plain HTTP request, as curl sends it: (status, JSON answer)."""
    data = None if body is None else (body if isinstance(body, bytes) else
                                      json.dumps(body).encode())
    request = urllib.request.Request(f"http://{server.http}{path}", data=data,
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("name", MODELS + EXAMPLES)
def test_every_endpoint_over_kserve_rest_equals_grpc(server: ServerProcess, http,
                                                     repository: Path, name: str,
                                                     binary: bool) -> None:
    with server.client() as grpc_client:
        for model_name in endpoints(repository, name):
            meta = http.get_model_metadata(model_name)
            twin = grpc_client.get_model_metadata(model_name, as_json=True)
            for key in ("inputs", "outputs"):  # gRPC's JSON writes int64 dims as strings
                twin[key] = [t | {"shape": [int(d) for d in t["shape"]]} for t in twin[key]]
            assert meta == twin
            feeds = sample(meta)
            got = http_infer(http, model_name, feeds, binary=binary)
            want = infer(grpc_client, model_name, feeds)
            for out in meta["outputs"]:
                np.testing.assert_allclose(got.as_numpy(out["name"]),
                                           want.as_numpy(out["name"]), atol=1e-5)


@pytest.mark.parametrize("name", MODELS + EXAMPLES)
def test_every_endpoint_over_tf_serving_rest_equals_grpc(server: ServerProcess, http,
                                                         repository: Path, name: str) -> None:
    with server.client() as grpc_client:
        for model_name in endpoints(repository, name):
            meta = http.get_model_metadata(model_name)
            feeds = sample(meta, seed=5)
            model, _, signature = model_name.partition(".")
            columns = {n: [v.decode() for v in a.ravel()] if a.dtype == object else a.tolist()
                       for n, a in feeds.items()}
            status, answer = call(server, f"/v1/models/{model}:predict",
                                  {"signature_name": signature, "inputs": columns})
            assert status == 200, answer
            want = infer(grpc_client, model_name, feeds)
            outputs = [o["name"] for o in meta["outputs"]]
            got = answer["outputs"] if len(outputs) > 1 else {outputs[0]: answer["outputs"]}
            for out in outputs:
                np.testing.assert_allclose(np.array(got[out], dtype=float),
                                           want.as_numpy(out).astype(float), atol=1e-5,
                                           err_msg=f"{model_name}:{out}")


def sample(meta: dict[str, Any], rows: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in meta["inputs"]:
        if spec["name"] == "target":  # an explanation's, optional: each row's argmax
            continue
        shape = (rows, *[int(d) for d in spec["shape"][1:]])
        if spec["datatype"] == "BYTES":
            feeds[spec["name"]] = np.array(rng.choice([w.encode() for w in zoo.VOCAB],
                                                      size=shape), dtype=object)
        elif spec["datatype"].startswith("INT"):
            feeds[spec["name"]] = rng.integers(0, zoo.TOKEN_VOCAB_SIZE, size=shape).astype(
                {"INT32": np.int32, "INT64": np.int64}[spec["datatype"]])
        else:
            feeds[spec["name"]] = rng.random(shape).astype(np.float32)
    return feeds


def test_taps_health_repository_and_errors_over_kserve_rest(server: ServerProcess, http,
                                                            repository: Path) -> None:
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready("autoencoder") and http.is_model_ready("autoencoder", "stable")
    assert "model_repository" in http.get_server_metadata()["extensions"]
    model = keras.models.load_model(repository / "autoencoder" / "1" / "model.keras")
    x = np.random.default_rng(1).random((2, 8, 8, 1), dtype=np.float32)
    got = http_infer(http, "autoencoder", {"image": x}, ["enc_conv", "recon"])
    probe = keras.Model(model.inputs, model.get_layer("enc_conv").output)
    np.testing.assert_allclose(got.as_numpy("enc_conv"), np.asarray(probe(x)), atol=1e-5)
    np.testing.assert_allclose(got.as_numpy("recon"), np.asarray(model(x)), atol=1e-5)
    index = http.get_model_repository_index()
    assert {"name": "autoencoder", "version": "1", "state": "READY", "reason": ""} in index
    with pytest.raises(InferenceServerException, match="model-control-mode poll"):
        http.load_model("autoencoder")
    for model_name, feeds, words in [
            ("ghost", {"image": x}, "no model 'ghost'"),
            ("autoencoder", {"image": x.astype(np.float64)}, "must be float32"),
            ("autoencoder", {"image": x[:, :, :, 0]}, "shape"),
            ("autoencoder.nope", {"image": x}, "no endpoint 'nope'")]:
        with pytest.raises(InferenceServerException, match=words):
            http_infer(http, model_name, feeds)
    status, answer = call(server, "/v2/models/ghost/infer", {"inputs": [
        {"name": "image", "datatype": "FP32", "shape": [1], "data": [0.5]}]})
    assert (status, answer) == (404, {"error": answer["error"]}) and "ghost" in answer["error"]
    status, answer = call(server, "/v2/models/autoencoder/infer", b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = call(server, "/v2/models/autoencoder/infer", b"x" * (LIMIT + 1))
    assert status == 413, answer
    # The server still answers normally after all that.
    assert http_infer(http, "autoencoder", {"image": x}).as_numpy("recon").shape == (2, 8, 8, 1)


def test_tf_serving_rest_rows_columns_taps(server: ServerProcess, repository: Path) -> None:
    model = keras.models.load_model(repository / "two_heads" / "1" / "model.keras")
    x = np.random.default_rng(2).random((3, 16), dtype=np.float32)
    want = {k: np.asarray(v) for k, v in model(x).items()}
    status, rows = call(server, "/v1/models/two_heads:predict", {"instances": x.tolist()})
    assert status == 200
    for i, row in enumerate(rows["predictions"]):
        for key in ("label", "score"):
            np.testing.assert_allclose(row[key], want[key][i], atol=1e-5)
    status, columns = call(server, "/v1/models/two_heads/versions/1:predict",
                           {"inputs": {"x": x.tolist()}, "output_filter": ["merged"]})
    assert status == 200, columns
    probe = keras.Model(model.inputs, model.get_layer("merged").output)
    np.testing.assert_allclose(columns["outputs"], np.asarray(probe(x)), atol=1e-5)
    # Endpoints as signatures; a label as a version.
    image = np.random.default_rng(3).random((1, 8, 8, 1), dtype=np.float32)
    status, code = call(server, "/v1/models/autoencoder/labels/stable:predict",
                        {"signature_name": "encoder", "instances": image.tolist()})
    assert status == 200
    with server.client() as grpc_client:
        np.testing.assert_allclose(code["predictions"], infer(
            grpc_client, "autoencoder.encoder", {"image": image}).as_numpy("code"), atol=1e-5)


@tf_models
def test_tf_serving_rest_strings_plain_and_base64(server: ServerProcess,
                                                  repository: Path) -> None:
    # Strings, plain and base64, into a StringLookup; one output: bare predictions.
    words = ["red", "blue", "never-seen"]
    status, text = call(server, "/v1/models/string_input:predict", {"instances": [
        words[0], words[1], {"b64": base64.b64encode(words[2].encode()).decode()}]})
    assert status == 200, text
    strings = keras.models.load_model(repository / "string_input" / "1" / "model.keras")
    np.testing.assert_allclose(text["predictions"],
                               np.asarray(strings(np.array(words, dtype=object))), atol=1e-5)


def test_tf_serving_rest_status_metadata_and_errors(server: ServerProcess) -> None:
    assert call(server, "/v1/models/autoencoder") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}}]})
    status, meta = call(server, "/v1/models/autoencoder/metadata")
    signatures = meta["metadata"]["signature_def"]["signature_def"]
    assert status == 200 and {"serving_default", "encoder", "decoder"} <= set(signatures)
    assert signatures["decoder"]["inputs"]["code"]["dtype"] == "DT_FLOAT"
    for path, body, code, words in [
            ("/v1/models/ghost:predict", {"instances": [[0]]}, 404, "ghost"),
            ("/v1/models/two_heads:predict", {"instances": [["a"]]}, 400, "float32"),
            ("/v1/models/two_heads:predict", {"rows": []}, 400, "instances"),
            ("/v1/models/two_heads:predict", {"instances": [[0.0] * 16],
                                              "output_filter": ["nope"]}, 404, "nope"),
            ("/v1/models/two_heads/versions/7:predict", {"instances": [[0.0] * 16]}, 404,
             "not 7"),
            ("/v1/models/siamese:predict", {"instances": [{"left": [0.0] * 12}]}, 400,
             "missing"),
            ("/v1/models/autoencoder:predict", {"signature_name": "nope",
                                                "instances": [[0]]}, 404, "nope")]:
        status, answer = call(server, path, body)
        assert status == code and words in answer["error"], (path, status, answer)


@frontend_only
def test_requests_are_counted_under_their_protocol(server: ServerProcess, http) -> None:
    def count(protocol: str) -> float:
        return server.metric("tapserve_requests_total", model="two_heads", endpoint="full",
                             code="OK", protocol=protocol) or 0

    before = {p: count(p) for p in ("kserve_http", "tfserving_http")}
    http_infer(http, "two_heads", {"x": np.zeros((1, 16), np.float32)})
    call(server, "/v1/models/two_heads:predict", {"instances": [[0.0] * 16]})
    assert count("kserve_http") == before["kserve_http"] + 1
    assert count("tfserving_http") == before["tfserving_http"] + 1


@frontend_only
def test_statistics_through_both_kserve_doors(server: ServerProcess, http) -> None:
    def stats(client: Any, **kwargs: Any) -> dict[str, Any]:
        (entry,) = client.get_inference_statistics("siamese", **kwargs)["model_stats"]
        return entry

    with server.client() as grpc_client:
        before = stats(http)
        feeds = {"left": np.zeros((3, 12), np.float32), "right": np.ones((3, 12), np.float32)}
        for _ in range(2):
            http_infer(http, "siamese", feeds)
        with pytest.raises(InferenceServerException):
            http_infer(http, "siamese", {"left": feeds["left"]})
        after, twin = stats(http), stats(grpc_client, as_json=True)
    assert after["version"] == "1"
    assert after["inference_count"] == before["inference_count"] + 6  # rows
    success = after["inference_stats"]["success"]
    assert success["count"] == before["inference_stats"]["success"]["count"] + 2
    assert success["ns"] > before["inference_stats"]["success"]["ns"]
    assert after["inference_stats"]["fail"]["count"] == (
        before["inference_stats"]["fail"]["count"] + 1)
    assert after["inference_stats"]["queue"]["count"] == success["count"]
    assert after["execution_count"] >= before["execution_count"] + 1
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == (
        after["execution_count"])
    # The gRPC door reads the same numbers (its JSON writes uint64 as strings).
    assert int(twin["inference_count"]) == after["inference_count"]
    assert int(twin["inference_stats"]["success"]["count"]) == success["count"]


@frontend_only
def test_a_full_queue_is_429_over_http_and_resource_exhausted_over_tf_grpc(
        server: ServerProcess) -> None:
    import grpc

    rows = {"instances": np.zeros((4, 16)).tolist()}
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(call, server, "/v1/models/slow:predict", rows)  # fills the queue
        until_queued(server)
        status, answer = call(server, "/v1/models/slow:predict", {"instances": [[0.0] * 16]})
        assert status == 429 and "queue is full" in answer["error"]
        with httpclient.InferenceServerClient(server.http) as client, pytest.raises(
                InferenceServerException, match="queue is full"):
            http_infer(client, "slow", {"x": np.zeros((1, 16), np.float32)})
        if HAS_TFS_CLIENT:  # the stock TF Serving client needs tensorflow
            import tensorflow as tf
            from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

            request = predict_pb2.PredictRequest()
            request.model_spec.name = "slow"
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 16), np.float32)))
            with grpc.insecure_channel(server.url) as channel, pytest.raises(
                    grpc.RpcError) as err:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert held.result(30)[0] == 200  # the queued request is answered all the same


def until_queued(server: ServerProcess) -> None:
    deadline = time.monotonic() + 10
    while (server.metric("tapserve_queue_depth", model="slow") or 0) < 4:
        assert time.monotonic() < deadline, "the first request never queued"
        time.sleep(0.02)
