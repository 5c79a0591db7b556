"""End to end: every model shape of the zoo, served and called with the stock tritonclient,
gives the numbers plain Keras gives (float32 within 1e-5)."""

from __future__ import annotations

from pathlib import Path

import grpc
import keras
import numpy as np
import pytest
import zoo
from backends import BACKEND, copy_tf_only_models, tf_models
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from stock import infer
from tritonclient.utils import InferenceServerException

# The jax backend refuses the string lookup model (and the SavedModel) at load.
TF_ONLY = {"string_input"} if BACKEND == "jax" else set()
SERVED = [name for name in zoo.ZOO if name != "lambda_layer" and name not in TF_ONLY]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    for name in SERVED:
        zoo.write_model(name, repo)
    if BACKEND == "jax":  # a string lookup model and a SavedModel, to be refused
        copy_tf_only_models(repo)
    else:  # a SavedModel export of the autoencoder: signatures only, no graph
        keras.models.load_model(repo / "autoencoder" / "1" / "model.keras").export(
            repo / "exported" / "1", verbose=False)
    # Lambda: refused by default, served where config allows it.
    zoo.write_model("lambda_layer", repo)
    zoo.write_model("lambda_layer", repo, folder="lambda_allowed", config="allow_lambda: true\n")
    # Broken neighbours must not stop the others.
    (repo / "garbage" / "1").mkdir(parents=True)
    (repo / "garbage" / "1" / "model.keras").write_bytes(b"not a model")
    zoo.write_model("autoencoder", repo, folder="bad_config", config={
        "endpoints": {"enc": {"inputs": ["image"], "outputs": ["no_such_layer"]}}})
    return repo


@pytest.fixture(scope="module")
def server(start_process, repository: Path):
    # Broken neighbours would keep a strictly ready server unready: this one is multi-tenant.
    return start_process(repository, "--no-strict-readiness")


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def reference(repository: Path, name: str) -> keras.Model:
    folder = repository / name / "1"
    path = next(folder.glob("model.*"))
    return keras.models.load_model(path, safe_mode=name != "lambda_allowed")


def keras_outputs(model: keras.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Plain Keras, in-process: outputs by name (dict keys, else output layer names)."""
    args = [feeds[n] for n in zoo.input_names(model)]
    result = model(args[0] if len(args) == 1 else args)
    if isinstance(result, dict):
        return {k: np.asarray(v) for k, v in result.items()}
    result = result if isinstance(result, list | tuple) else [result]
    names = model._functional.output_names if isinstance(model, keras.Sequential) else \
        model.output_names
    return {n: np.asarray(v) for n, v in zip(names, result, strict=True)}


def layer_output(model: keras.Model, layer: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    probe = keras.Model(model.inputs, model.get_layer(layer).output)
    args = [feeds[n] for n in zoo.input_names(model)]
    return np.asarray(probe(args[0] if len(args) == 1 else args))


@pytest.mark.parametrize("name", SERVED)
def test_default_endpoint_matches_keras(client, repository: Path, name: str) -> None:
    model = reference(repository, name)
    feeds = zoo.sample_inputs(model, batch=5, seed=1)
    expected = keras_outputs(model, feeds)
    result = infer(client, name, feeds)
    for out, want in expected.items():
        got = result.as_numpy(out)
        assert got is not None, f"{name}: output {out} missing"
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{name}:{out}")


def test_autoencoder_encoder_and_decoder_endpoints(client, repository: Path) -> None:
    model = reference(repository, "autoencoder")
    feeds = zoo.sample_inputs(model, batch=3)
    code = infer(client, "autoencoder.encoder", feeds).as_numpy("code")
    np.testing.assert_allclose(code, layer_output(model, "code", feeds), atol=1e-5)
    # The decoder is fed the code through a new input of its shape.
    recon = infer(client, "autoencoder.decoder", {"code": code}).as_numpy("recon")
    full = infer(client, "autoencoder", feeds).as_numpy("recon")
    np.testing.assert_allclose(recon, full, atol=1e-5)
    np.testing.assert_allclose(recon, keras_outputs(model, feeds)["recon"], atol=1e-5)


def test_decoder_accepts_codes_nobody_encoded(client, repository: Path) -> None:
    model = reference(repository, "autoencoder")
    code = np.random.default_rng(3).normal(size=(4, 4)).astype(np.float32)
    x = code
    for layer in ("dec_dense", "dec_pixels", "dec_reshape", "recon"):
        x = model.get_layer(layer)(x)
    got = infer(client, "autoencoder.decoder", {"code": code}).as_numpy("recon")
    np.testing.assert_allclose(got, np.asarray(x), atol=1e-5)


def test_taps_named_in_the_request(client, repository: Path) -> None:
    model = reference(repository, "two_heads")
    feeds = zoo.sample_inputs(model, batch=4)
    result = infer(client, "two_heads", feeds, outputs=["a_hidden", "merged", "label"])
    for tap in ("a_hidden", "merged"):
        np.testing.assert_allclose(result.as_numpy(tap), layer_output(model, tap, feeds),
                                   atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("label"), keras_outputs(model, feeds)["label"],
                               atol=1e-5)
    assert result.as_numpy("score") is None  # only what was asked for


def test_cut_at_a_merge_point(client, repository: Path) -> None:
    model = reference(repository, "two_heads")
    feeds = zoo.sample_inputs(model, batch=2)
    merged = layer_output(model, "merged", feeds)
    got = infer(client, "two_heads.head", {"merged": merged}).as_numpy("label")
    np.testing.assert_allclose(got, keras_outputs(model, feeds)["label"], atol=1e-5)


def test_siamese_each_call_of_the_shared_layer(client, repository: Path) -> None:
    model = reference(repository, "siamese")
    feeds = zoo.sample_inputs(model, batch=3)
    shared = model.get_layer("shared")
    left = infer(client, "siamese.embed_left", {"left": feeds["left"]}).as_numpy("shared:0")
    right = infer(client, "siamese.embed_right", {"right": feeds["right"]}).as_numpy("shared:1")
    np.testing.assert_allclose(left, np.asarray(shared(feeds["left"])), atol=1e-5)
    np.testing.assert_allclose(right, np.asarray(shared(feeds["right"])), atol=1e-5)
    both = infer(client, "siamese", feeds, outputs=["shared", "shared:1", "similarity"])
    np.testing.assert_allclose(both.as_numpy("shared"), left, atol=1e-5)
    np.testing.assert_allclose(both.as_numpy("shared:1"), right, atol=1e-5)


def test_nested_backbone_taps_and_cut(client, repository: Path) -> None:
    model = reference(repository, "nested")
    feeds = zoo.sample_inputs(model, batch=3)
    backbone = model.get_layer("backbone")
    stem = np.asarray(model.get_layer("stem")(feeds["x"]))
    b1 = np.asarray(backbone.get_layer("b1")(stem))
    block = backbone.get_layer("block")
    b2 = np.asarray(backbone.get_layer("b2")(b1))
    inner = np.asarray(block.get_layer("inner")(b2))
    got = infer(client, "nested", feeds, outputs=["backbone/b1", "backbone/block/inner"])
    np.testing.assert_allclose(got.as_numpy("backbone/b1"), b1, atol=1e-5)
    np.testing.assert_allclose(got.as_numpy("backbone/block/inner"), inner, atol=1e-5)
    np.testing.assert_allclose(
        infer(client, "nested.inner", feeds).as_numpy("backbone/block/inner"), inner, atol=1e-5)
    cut = infer(client, "nested.from_b1", {"backbone/b1": b1}).as_numpy("logits")
    np.testing.assert_allclose(cut, keras_outputs(model, feeds)["logits"], atol=1e-5)


@tf_models
def test_string_inputs_as_bytes(client, repository: Path) -> None:
    model = reference(repository, "string_input")
    feeds = {"text": np.array([b"red", b"blue", b"", b"magenta", b"nope"], dtype=object)}
    got = infer(client, "string_input", feeds, outputs=["out", "lookup"])
    np.testing.assert_allclose(got.as_numpy("out"), keras_outputs(model, feeds)["out"],
                               atol=1e-5)
    np.testing.assert_array_equal(got.as_numpy("lookup"), layer_output(model, "lookup", feeds))


@tf_models
def test_saved_model_signatures_are_endpoints(client, repository: Path) -> None:
    model = reference(repository, "autoencoder")
    meta = client.get_model_metadata("exported", as_json=True)
    assert meta["inputs"][0]["datatype"] == "FP32"
    feeds = {meta["inputs"][0]["name"]: zoo.sample_inputs(model, batch=2)["image"]}
    result = infer(client, "exported", feeds)
    out = meta["outputs"][0]["name"]
    np.testing.assert_allclose(result.as_numpy(out), keras_outputs(model, {
        "image": next(iter(feeds.values()))})["recon"], atol=1e-5)


@tf_models
def test_saved_model_taps_are_not_found_with_a_reason(client, repository: Path) -> None:
    meta = client.get_model_metadata("exported", as_json=True)
    feeds = {meta["inputs"][0]["name"]: np.zeros((1, 8, 8, 1), np.float32)}
    with pytest.raises(InferenceServerException) as err:
        infer(client, "exported", feeds, outputs=["code"])
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "SavedModel has no layer graph" in err.value.message()


def test_tensorflow_only_models_are_refused_on_jax_and_the_others_serve(
        client, repository: Path, backend: str) -> None:
    """SPEC "Backends": a SavedModel, and a model with a StringLookup, cannot run on JAX:
    refused at load, saying which backend they need; their neighbours serve."""
    if backend != "jax":
        pytest.skip("the tensorflow backend serves them (test_saved_model_*, test_string_*)")
    index = client.get_model_repository_index(as_json=True)["models"]
    for name, feeds in [("string_input", {"text": np.array([b"red"], dtype=object)}),
                        ("exported", {"x": np.ones((1, 4), np.float32)})]:
        rows = [r for r in index if r["name"] == name and r.get("version") == "1"]
        assert [r["state"] for r in rows] == ["UNAVAILABLE"], index
        assert "tensorflow" in rows[0]["reason"], rows
        assert not client.is_model_ready(name)
        with pytest.raises(InferenceServerException) as err:
            infer(client, name, feeds)
        assert err.value.status() == "StatusCode.UNAVAILABLE", err.value
        assert "tensorflow" in err.value.message(), err.value.message()
    model = reference(repository, "two_heads")
    feeds = zoo.sample_inputs(model, batch=2)
    np.testing.assert_allclose(infer(client, "two_heads", feeds).as_numpy("score"),
                               keras_outputs(model, feeds)["score"], atol=1e-5)
    assert client.is_model_ready("autoencoder")


def test_lambda_refused_unless_config_allows(client, repository: Path) -> None:
    with pytest.raises(InferenceServerException) as err:
        infer(client, "lambda_layer", {"x": np.zeros((1, 4), np.float32)})
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert "allow_lambda" in err.value.message()
    model = reference(repository, "lambda_allowed")
    feeds = zoo.sample_inputs(model, batch=2)
    got = infer(client, "lambda_allowed", feeds, outputs=["out", "double"])
    np.testing.assert_allclose(got.as_numpy("out"), keras_outputs(model, feeds)["out"],
                               atol=1e-5)
    np.testing.assert_allclose(got.as_numpy("double"), 2 * layer_output(model, "pre", feeds),
                               atol=1e-5)


def test_a_bad_config_names_what_is_missing_and_others_serve(client) -> None:
    with pytest.raises(InferenceServerException) as err:
        infer(client, "bad_config", {"image": np.zeros((1, 8, 8, 1), np.float32)})
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    # A request is told the category; the repository index (and the log) names the layer.
    assert "its config.yaml does not fit the model" in err.value.message()
    reason = {r["name"]: r.get("reason", "")
              for r in client.get_model_repository_index(as_json=True)["models"]}["bad_config"]
    assert "no_such_layer" in reason and "recon" in reason, reason
    assert not client.is_model_ready("garbage")
    assert client.is_model_ready("autoencoder")
    assert client.is_server_ready()


def test_metadata_of_a_cut_endpoint(client) -> None:
    meta = client.get_model_metadata("autoencoder.decoder", as_json=True)
    assert meta["inputs"] == [{"name": "code", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert meta["outputs"] == [{"name": "recon", "datatype": "FP32",
                                "shape": ["-1", "8", "8", "1"]}]
    assert client.is_model_ready("autoencoder.decoder")
    assert client.is_model_ready("autoencoder", "1")


def test_health_per_model_and_reflection(server) -> None:
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service="siamese")).status == serving
        garbage = health.Check(health_pb2.HealthCheckRequest(service="garbage")).status
        assert garbage == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_many_concurrent_requests_get_their_own_answers(server, repository: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = reference(repository, "autoencoder")
    batches = [zoo.sample_inputs(model, batch=1 + i % 3, seed=i) for i in range(48)]
    endpoints = ["autoencoder", "autoencoder.encoder"]

    def call(i: int) -> tuple[int, np.ndarray]:
        with server.client() as c:
            name = endpoints[i % 2]
            out = "recon" if name == "autoencoder" else "code"
            return i, infer(c, name, batches[i]).as_numpy(out)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(len(batches))))
    for i, got in results:
        feeds = batches[i]
        want = (keras_outputs(model, feeds)["recon"] if i % 2 == 0
                else layer_output(model, "code", feeds))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"request {i}")
