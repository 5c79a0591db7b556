"""The cross-backend proof (issue 19, SPEC "Backends"): the user-shaped test models (zoo:
multi-output, shared layers, nested backbones, an autoencoder cut at its code) and the
example models, served by `tapserve serve --backend jax`, answer what Keras computes on
TensorFlow in this process, through every door with its stock client: KServe v2 gRPC and
HTTP (tritonclient), TF Serving gRPC (tensorflow-serving-api's stubs) and REST (a plain
POST). Explanations equal tf.GradientTape's. A SavedModel and a string lookup model in the
same repository are refused at load, naming the backend they need; the rest serve.

Runs in the main venv (TensorFlow and jax), on its TensorFlow run: this process's Keras
must be TensorFlow's, the server's JAX."""

from __future__ import annotations

import importlib.util
import json
import urllib.request
from pathlib import Path
from typing import Any

import explaining
import keras
import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
import zoo
from backends import HAS_TFS_CLIENT
from ports import free_port
from stock import ServerProcess, infer
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

pytestmark = pytest.mark.skipif(
    not HAS_TFS_CLIENT or importlib.util.find_spec("jax") is None
    or keras.backend.backend() != "tensorflow",
    reason="compares a --backend jax server to Keras on TensorFlow here: needs tensorflow, "
           "tensorflow-serving-api and jax (the main venv) and TAPSERVE_BACKEND=tensorflow")

if HAS_TFS_CLIENT:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

# (model, endpoint ("" for a model without config.yaml), the outputs asked: taps included).
CASES = [
    ("autoencoder", "autoencoder", ["recon", "enc_conv", "code"]),
    ("autoencoder", "encoder", ["code"]),
    ("autoencoder", "decoder", ["recon", "dec_dense"]),  # cut: fed "code"
    ("two_heads", "full", ["label", "score", "merged", "a_hidden"]),  # dict outputs
    ("two_heads", "branches", ["branch_a", "branch_b"]),
    ("two_heads", "head", ["label"]),  # cut at a merge point: fed "merged"
    ("siamese", "similarity", ["similarity", "shared", "shared:1"]),  # one layer, two calls
    ("siamese", "embed_left", ["shared:0"]),
    ("siamese", "embed_right", ["shared:1"]),
    ("nested", "logits", ["logits", "backbone/b1", "backbone/block/inner"]),
    ("nested", "inner", ["backbone/block/inner"]),
    ("nested", "from_b1", ["logits"]),  # cut inside the nested Sequential
    ("multi_dtype", "both", ["cls", "reg", "embed"]),  # int64 tokens and float32 features
    ("multi_dtype", "cls", ["cls"]),
    ("sequential", "", ["out", "dense_1"]),
    ("legacy_h5", "", ["out", "hidden"]),
    ("digits_autoencoder", "autoencoder", ["recon", "code"]),
    ("digits_autoencoder", "encoder", ["code"]),
    ("digits_autoencoder", "decoder", ["recon"]),
    ("digits_classifier", "classify", ["digit"]),
    ("digits_classifier", "features", ["features"]),
    ("digits_classifier", "full", ["digit", "recon"]),
]
DOORS = ["kserve_grpc", "kserve_http", "tfserving_grpc", "tfserving_rest"]
TF_ONLY = ["string_input", "exported"]  # a StringLookup model, a SavedModel


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, write_examples) -> Path:
    repo = tmp_path_factory.mktemp("backends")
    write_examples(repo)
    for name in {model for model, _, _ in CASES} - {"digits_autoencoder", "digits_classifier"}:
        zoo.write_model(name, repo)
    explaining.write(repo)
    zoo.write_model("string_input", repo)
    keras.models.load_model(repo / "autoencoder" / "1" / "model.keras").export(
        repo / "exported" / "1", verbose=False)
    return repo


@pytest.fixture(scope="module")
def server(start_process, repository: Path) -> ServerProcess:
    port = free_port()
    # Refused models keep a strictly ready server unready: this one serves the rest.
    server = start_process(repository, "--backend", "jax", "--http-port", str(port),
                           "--no-strict-readiness")
    server.http = f"127.0.0.1:{port}"
    return server


def load(repository: Path, name: str) -> keras.Model:
    return keras.models.load_model(next((repository / name / "1").glob("model.*")))


def tap(model: keras.Model, name: str, args: list[np.ndarray]) -> np.ndarray:
    """Keras' value of the tap `name` (SPEC "Tap names": an output name, a layer,
    `<layer>:<k>` its k-th call, `<outer>/<inner>` inside a nested model) when `model` is
    called on `args` (in model.inputs order)."""
    if isinstance(model, keras.Sequential):  # its graph, built or loaded
        model = model._functional
    outer, _, inner = name.partition("/")
    if inner:  # the nested model's own input, from the outer graph, then inside it
        nested = model.get_layer(outer)
        fed = keras.Model(model.inputs, nested._inbound_nodes[0].input_tensors)(args)
        return tap(nested, inner, fed if isinstance(fed, list) else [fed])
    if isinstance(model.output, dict) and name in model.output:
        tensor = model.output[name]
    else:
        layer, _, k = name.partition(":")
        tensor = model.get_layer(layer)._inbound_nodes[int(k or 0)].outputs[0]
    return np.asarray(keras.Model(model.inputs, tensor)(args))


def case(repository: Path, model_name: str, endpoint: str, outputs: list[str], rows: int = 3
         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(what the endpoint is fed, what Keras on TensorFlow answers). A cut endpoint is fed
    its cut taps' values from a forward pass of the whole model: then it must answer what
    that pass computed further on."""
    model = load(repository, model_name)
    sample = zoo.sample_inputs(model, batch=rows, seed=len(model_name) + len(endpoint))
    args = [sample[n] for n in zoo.input_names(model)]
    config_file = repository / model_name / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
    inputs = (config or {}).get("endpoints", {}).get(endpoint, {}).get("inputs")
    feeds = {n: sample[n] if n in sample else tap(model, n, args)
             for n in inputs or zoo.input_names(model)}
    return feeds, {o: tap(model, o, args) for o in outputs}


def ask(server: ServerProcess, door: str, model: str, endpoint: str,
        feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """The outputs, asked through `door` with its stock client."""
    name = f"{model}.{endpoint}" if endpoint else model
    if door == "kserve_grpc":
        with server.client() as client:
            result = infer(client, name, feeds, outputs)
        return {o: result.as_numpy(o) for o in outputs}
    if door == "kserve_http":
        inputs = []
        for n, array in feeds.items():
            tensor = httpclient.InferInput(n, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        with httpclient.InferenceServerClient(server.http) as client:
            result = client.infer(name, inputs, outputs=[
                httpclient.InferRequestedOutput(o) for o in outputs])
        return {o: result.as_numpy(o) for o in outputs}
    if door == "tfserving_grpc":
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = endpoint
        for n, array in feeds.items():
            request.inputs[n].CopyFrom(tf.make_tensor_proto(array))
        request.output_filter.extend(outputs)
        with grpc.insecure_channel(server.url) as channel:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                request, timeout=30)
        return {o: tf.make_ndarray(response.outputs[o]) for o in outputs}
    body = {"signature_name": endpoint, "output_filter": outputs,
            "inputs": {n: a.tolist() for n, a in feeds.items()}}
    answer = post(server, f"/v1/models/{model}:predict", body)["outputs"]
    return {o: np.asarray(answer[o] if len(outputs) > 1 else answer) for o in outputs}


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"http://{server.http}{path}",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize(("model", "endpoint", "outputs"), CASES,
                         ids=[f"{m}.{e}" if e else m for m, e, _ in CASES])
def test_jax_answers_equal_keras_on_tensorflow(server: ServerProcess, repository: Path,
                                               door: str, model: str, endpoint: str,
                                               outputs: list[str]) -> None:
    feeds, want = case(repository, model, endpoint, outputs)
    got = ask(server, door, model, endpoint, feeds, outputs)
    for name in outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5,
                                   err_msg=f"{door} {model}.{endpoint}: {name}")


@pytest.mark.parametrize("with_target", [False, True])
def test_jax_explanations_equal_tensorflows_gradients(server: ServerProcess, repository: Path,
                                                      with_target: bool) -> None:
    """gradient, Grad-CAM, integrated gradients: the jax server's against tf.GradientTape
    on the same saved model here (tests/explaining.py)."""
    model = load(repository, explaining.MODEL)
    with server.client() as client:
        for endpoint, spec in sorted(explaining.ENDPOINTS.items()):
            feeds = explaining.inputs(3, seed=len(endpoint))
            target = None
            if with_target:  # not the argmax: a target that were ignored shows
                argmax = np.argmax(np.asarray(model(feeds)[spec["output"]]), axis=-1)
                target = ((argmax + 1) % explaining.CLASSES[spec["output"]]).astype(np.int64)
            want = explaining.reference(model, endpoint, feeds, target)
            sent = feeds if target is None else {**feeds, "target": target}
            got = infer(client, f"{explaining.MODEL}.{endpoint}", sent).as_numpy("attribution")
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=endpoint)


def test_tensorflow_only_models_are_refused_and_the_others_serve(server: ServerProcess
                                                                  ) -> None:
    with server.client() as client:
        index = client.get_model_repository_index(as_json=True)["models"]
        for name in TF_ONLY:
            rows = [r for r in index if r["name"] == name and r.get("version") == "1"]
            assert [r["state"] for r in rows] == ["UNAVAILABLE"], index
            assert "tensorflow" in rows[0]["reason"], rows
            assert not client.is_model_ready(name)
        with pytest.raises(InferenceServerException) as err:
            infer(client, "string_input", {"text": np.array([b"red"], dtype=object)})
        assert err.value.status() == "StatusCode.UNAVAILABLE", err.value
        assert "tensorflow" in err.value.message(), err.value.message()
        served = {m for m, _, _ in CASES} | {explaining.MODEL}
        assert all(client.is_model_ready(m) for m in served)


def test_the_jax_server_loads_no_tensorflow(server: ServerProcess) -> None:
    """SPEC: a JAX deployment needs no TensorFlow, all doors included. TensorFlow is
    installed here, so it is the server's own imports that must leave it out (with a
    SavedModel and a StringLookup model in its repository, refused)."""
    x = {"x": np.ones((1, 16), np.float32)}
    for door in DOORS:
        ask(server, door, "two_heads", "full", x, ["label"])
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "jaxlib" in maps
    assert "tensorflow" not in maps, sorted({line.split()[-1] for line in maps.splitlines()
                                              if "tensorflow" in line})
