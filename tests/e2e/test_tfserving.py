"""End to end: TensorFlow Serving's gRPC API with its stock client (tensorflow-serving-api's
stubs, tf.make_tensor_proto / tf.make_ndarray), on the same port as KServe v2: every
endpoint, cut and tap of the test models equal to Keras, and the error table."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import keras
import numpy as np
import pytest
import yaml
import zoo
from backends import BACKEND, HAS_TFS_CLIENT, needs_tfs_client
from stock import ServerProcess, infer

if HAS_TFS_CLIENT:  # the stock TF Serving client: tensorflow's protos and tensors
    import tensorflow as tf
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

pytestmark = needs_tfs_client
MODELS = ["autoencoder", "two_heads", "siamese", "nested", "multi_dtype", "sequential",
          "legacy_h5"]
if BACKEND == "tensorflow":  # a string lookup: the jax backend refuses it (test_serving)
    MODELS.append("string_input")
EXAMPLES = ["digits_autoencoder", "digits_classifier"]  # models/build_examples.py


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, write_examples) -> Path:
    repo = tmp_path_factory.mktemp("tfs_models")
    write_examples(repo)
    for name in MODELS:
        zoo.write_model(name, repo)
    (repo / "autoencoder" / "2").mkdir()
    shutil.copy(repo / "autoencoder" / "1" / "model.keras", repo / "autoencoder" / "2")
    config = yaml.safe_load((repo / "autoencoder" / "config.yaml").read_text())
    config.update(version_policy="all", labels={"stable": 1, "canary": 2})
    (repo / "autoencoder" / "config.yaml").write_text(yaml.safe_dump(config))
    return repo


@pytest.fixture(scope="module")
def server(start_process, repository: Path) -> ServerProcess:
    return start_process(repository)


@pytest.fixture(scope="module")
def channel(server: ServerProcess):
    with grpc.insecure_channel(server.url) as channel:
        yield channel


@pytest.fixture(scope="module")
def predict(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def call(model: str, feeds: dict[str, np.ndarray], signature: str = "",
             output_filter: list[str] | None = None, version: int | None = None,
             label: str = "", timeout: float = 30) -> dict[str, np.ndarray]:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = version
        if label:  # version and version_label are one oneof: set only the one asked
            request.model_spec.version_label = label
        for name, array in feeds.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
        request.output_filter.extend(output_filter or [])
        response = stub.Predict(request, timeout=timeout)
        return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

    return call


def reference(repository: Path, name: str) -> keras.Model:
    return keras.models.load_model(next((repository / name / "1").glob("model.*")))


def metadata(channel, model: str) -> dict:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    response = stub.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    return dict(signatures.signature_def)


def inputs_for(signature, rows: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, info in signature.inputs.items():
        if name == "target":  # an explanation's, optional: each row's argmax
            continue
        shape = (rows, *[d.size for d in info.tensor_shape.dim[1:]])
        dtype = tf.dtypes.as_dtype(info.dtype)
        if dtype == tf.string:
            feeds[name] = np.array(rng.choice([w.encode() for w in zoo.VOCAB], size=shape),
                                   dtype=object)
        elif dtype.is_integer:
            feeds[name] = rng.integers(0, zoo.TOKEN_VOCAB_SIZE, size=shape).astype(
                dtype.as_numpy_dtype)
        else:
            feeds[name] = rng.random(shape).astype(dtype.as_numpy_dtype)
    return feeds


@pytest.mark.parametrize("name", MODELS + EXAMPLES)
def test_every_endpoint_equals_the_kserve_door_and_keras(
        server: ServerProcess, repository: Path, channel, predict, name: str) -> None:
    signatures = metadata(channel, name)
    assert "serving_default" in signatures
    model = reference(repository, name)
    with server.client() as kserve:
        for signature_name, signature in signatures.items():
            feeds = inputs_for(signature)
            got = predict(name, feeds, signature=signature_name)
            assert set(got) == set(signature.outputs)
            endpoint = "" if signature_name == "serving_default" else f".{signature_name}"
            twin = infer(kserve, name + endpoint, feeds)
            for out, value in got.items():
                np.testing.assert_allclose(value, twin.as_numpy(out), atol=1e-5,
                                           err_msg=f"{name}:{signature_name}:{out}")
    # The default signature against Keras itself.
    feeds = inputs_for(signatures["serving_default"], seed=1)
    args = [feeds[n] for n in zoo.input_names(model)]
    want = model(args[0] if len(args) == 1 else args)
    got = predict(name, feeds)
    if isinstance(want, dict):  # the default endpoint may serve some of the outputs
        assert set(got) <= set(want)
        for key in got:
            np.testing.assert_allclose(got[key], np.asarray(want[key]), atol=1e-5)
    elif len(got) == 1:
        np.testing.assert_allclose(next(iter(got.values())), np.asarray(want), atol=1e-5)


def test_output_filter_names_taps_computed_as_far_as_needed(
        repository: Path, predict) -> None:
    model = reference(repository, "autoencoder")
    x = np.random.default_rng(2).random((4, 8, 8, 1), dtype=np.float32)
    got = predict("autoencoder", {"image": x}, output_filter=["enc_conv", "code"])
    assert set(got) == {"enc_conv", "code"}
    for layer in ("enc_conv", "code"):
        want = keras.Model(model.inputs, model.get_layer(layer).output)(x)
        np.testing.assert_allclose(got[layer], np.asarray(want), atol=1e-5)
    nested = reference(repository, "nested")
    x = np.random.default_rng(3).random((2, *nested.inputs[0].shape[1:])).astype(np.float32)
    got = predict("nested", {"x": x}, output_filter=["backbone/b1"])
    inner = nested.get_layer("backbone")
    probe = keras.Model(inner.inputs, inner.get_layer("b1").output)
    stem = keras.Model(nested.inputs, nested.get_layer("stem").output)
    np.testing.assert_allclose(got["backbone/b1"], np.asarray(probe(stem(x))), atol=1e-5)


def test_versions_and_labels(predict) -> None:
    x = np.random.default_rng(4).random((1, 8, 8, 1), dtype=np.float32)
    one = predict("autoencoder", {"image": x}, version=1)["recon"]
    np.testing.assert_allclose(predict("autoencoder", {"image": x}, label="canary")["recon"],
                               one, atol=1e-6)  # version 2 holds the same file
    with pytest.raises(grpc.RpcError) as err:
        predict("autoencoder", {"image": x}, version=9)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_status(channel) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "autoencoder"
    statuses = stub.GetModelStatus(request, timeout=30).model_version_status
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert [(s.version, s.state, s.status.error_code) for s in statuses] == [
        (1, available, 0), (2, available, 0)]
    request.model_spec.version_label = "canary"
    assert [s.version for s in stub.GetModelStatus(request).model_version_status] == [2]
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "ghost"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelStatus(request)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


IMAGE = np.zeros((1, 8, 8, 1), np.float32)
ERRORS = {
    "unknown model": (dict(model="ghost", feeds={"image": IMAGE}), "NOT_FOUND", "ghost"),
    "unknown signature": (dict(model="autoencoder", feeds={"image": IMAGE}, signature="nope"),
                          "NOT_FOUND", "encoder"),
    "unknown output": (dict(model="autoencoder", feeds={"image": IMAGE},
                            output_filter=["nope"]), "NOT_FOUND", "nope"),
    "wrong input name": (dict(model="autoencoder", feeds={"img": IMAGE}), "INVALID_ARGUMENT",
                         "image"),
    "wrong dtype": (dict(model="autoencoder", feeds={"image": IMAGE.astype(np.float64)}),
                    "INVALID_ARGUMENT", "float32"),
    "wrong shape": (dict(model="autoencoder", feeds={"image": np.zeros((1, 8, 8), np.float32)}),
                    "INVALID_ARGUMENT", "shape"),
    "missing input": (dict(model="siamese", feeds={"left": np.zeros((1, 12), np.float32)}),
                      "INVALID_ARGUMENT", "missing"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_carry_the_status_and_a_reason(predict, case: str) -> None:
    kwargs, code, words = ERRORS[case]
    with pytest.raises(grpc.RpcError) as err:
        predict(**kwargs)
    assert err.value.code() == grpc.StatusCode[code], err.value.details()
    assert words in err.value.details()
    assert predict("autoencoder", {"image": IMAGE})["recon"].shape == (1, 8, 8, 1)


def test_bad_tensor_bytes_and_unserved_methods(channel) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "autoencoder"
    tensor = tf.make_tensor_proto(IMAGE)
    tensor.tensor_content = tensor.tensor_content[:-4]
    request.inputs["image"].CopyFrom(tensor)
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "256 bytes" in err.value.details()
    from tensorflow_serving.apis import classification_pb2

    with pytest.raises(grpc.RpcError) as err:
        stub.Classify(classification_pb2.ClassificationRequest())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Predict" in err.value.details()


def test_requests_are_counted_under_their_protocol(server: ServerProcess, predict) -> None:
    labels = {"model": "two_heads", "endpoint": "full", "code": "OK",
              "protocol": "tfserving_grpc"}
    before = server.metric("tapserve_requests_total", **labels) or 0
    predict("two_heads", {"x": np.zeros((2, 16), np.float32)})
    assert server.metric("tapserve_requests_total", **labels) == before + 1
