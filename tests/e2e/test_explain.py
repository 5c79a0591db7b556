"""End to end: explain endpoints (SPEC "Explanations") through every front door with the
stock clients — KServe gRPC and HTTP (tritonclient), TF Serving gRPC (its signatures and
metadata) and REST (rows and columns) — equal to tf.GradientTape computed here
(tests/explaining.py), with and without `target`; and `tapserve inspect`."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import explaining
import grpc
import keras
import numpy as np
import pytest
import tritonclient.http as httpclient
from backends import HAS_TFS_CLIENT, needs_tfs_client
from ports import free_port
from stock import TAPSERVE, ServerProcess, infer
from tritonclient.utils import np_to_triton_dtype

if HAS_TFS_CLIENT:  # the stock TF Serving client: tensorflow's protos and tensors
    import tensorflow as tf
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

MODEL = explaining.MODEL
ENDPOINTS = sorted(explaining.ENDPOINTS)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, keras.Model]:
    repo = tmp_path_factory.mktemp("explain_models")
    return repo, explaining.write(repo)


@pytest.fixture(scope="module")
def model(repository: tuple[Path, keras.Model]) -> keras.Model:
    return repository[1]


@pytest.fixture(scope="module")
def server(start_process, repository: tuple[Path, keras.Model]) -> ServerProcess:
    port = free_port()
    server = start_process(repository[0], "--http-port", str(port))
    server.http = f"127.0.0.1:{port}"
    return server


def case(model: keras.Model, endpoint: str, with_target: bool, seed: int = 0
         ) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]:
    """(feeds, target or None, the reference attribution)."""
    feeds = explaining.inputs(3, seed=seed)
    target = None
    if with_target:  # not the argmax: a target that were ignored shows
        head = explaining.ENDPOINTS[endpoint]["output"]
        argmax = np.argmax(np.asarray(model(feeds)[head]), axis=-1)
        target = ((argmax + 1) % explaining.CLASSES[head]).astype(np.int32)
    return feeds, target, explaining.reference(model, endpoint, feeds, target)


def close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=what)


@pytest.mark.parametrize("with_target", [False, True])
def test_kserve_grpc_and_http(server: ServerProcess, model: keras.Model,
                              with_target: bool) -> None:
    with server.client() as grpc_client, httpclient.InferenceServerClient(server.http) as http:
        for endpoint in ENDPOINTS:
            feeds, target, want = case(model, endpoint, with_target, seed=len(endpoint))
            sent = feeds if target is None else {**feeds, "target": target}
            got = infer(grpc_client, f"{MODEL}.{endpoint}", sent).as_numpy("attribution")
            close(got, want, f"kserve grpc {endpoint}")
            for binary in (True, False):
                inputs = []
                for name, array in sent.items():
                    tensor = httpclient.InferInput(name, list(array.shape),
                                                   np_to_triton_dtype(array.dtype))
                    tensor.set_data_from_numpy(array, binary_data=binary)
                    inputs.append(tensor)
                answer = http.infer(f"{MODEL}.{endpoint}", inputs)
                close(answer.as_numpy("attribution"), want, f"kserve http {endpoint} {binary}")
        meta = http.get_model_metadata(f"{MODEL}.saliency")
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [
            ("image", "FP32"), ("meta", "FP32"), ("target", "INT64")]
        assert meta["outputs"] == [{"name": "attribution", "datatype": "FP32",
                                    "shape": [-1, 8, 8, 2]}]


@needs_tfs_client
def test_tf_serving_grpc_signatures(server: ServerProcess, model: keras.Model) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            metadata_field=["signature_def"])
        request.model_spec.name = MODEL
        signatures = get_model_metadata_pb2.SignatureDefMap()
        stub.GetModelMetadata(request, timeout=30).metadata["signature_def"].Unpack(signatures)
        cam = signatures.signature_def["cam"]
        assert set(cam.inputs) == {"image", "meta", "target"}
        assert cam.inputs["target"].dtype == tf.int64.as_datatype_enum
        assert list(cam.outputs) == ["attribution"]
        assert [d.size for d in cam.outputs["attribution"].tensor_shape.dim] == [-1, 4, 4]
        for endpoint in ENDPOINTS:
            for with_target in (False, True):
                feeds, target, want = case(model, endpoint, with_target, seed=7)
                predict = predict_pb2.PredictRequest()
                predict.model_spec.name = MODEL
                predict.model_spec.signature_name = endpoint
                for name, array in (feeds if target is None else
                                    {**feeds, "target": target}).items():
                    predict.inputs[name].CopyFrom(tf.make_tensor_proto(array))
                answer = stub.Predict(predict, timeout=30)
                close(tf.make_ndarray(answer.outputs["attribution"]), want,
                      f"tfserving grpc {endpoint} {with_target}")


def rest(server: ServerProcess, body: dict) -> dict:
    request = urllib.request.Request(f"http://{server.http}/v1/models/{MODEL}:predict",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_tf_serving_rest_rows_and_columns(server: ServerProcess, model: keras.Model) -> None:
    for endpoint in ("cam", "ig"):
        for with_target in (False, True):
            feeds, target, want = case(model, endpoint, with_target, seed=11)
            rows = [{"image": feeds["image"][i].tolist(), "meta": feeds["meta"][i].tolist()}
                    | ({} if target is None else {"target": int(target[i])})
                    for i in range(3)]
            answer = rest(server, {"signature_name": endpoint, "instances": rows})
            close(np.array(answer["predictions"], np.float32), want, f"rows {endpoint}")
            columns = {n: a.tolist() for n, a in feeds.items()}
            if target is not None:
                columns["target"] = target.tolist()
            answer = rest(server, {"signature_name": endpoint, "inputs": columns})
            close(np.array(answer["outputs"], np.float32), want, f"columns {endpoint}")


def test_tapserve_inspect_shows_explain_endpoints(repository: tuple[Path, keras.Model]
                                                  ) -> None:
    out = subprocess.run([str(TAPSERVE), "inspect", str(repository[0] / MODEL)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"endpoint {MODEL}.saliency: explains 'label' by gradient of input 'image'" in out
    assert f"endpoint {MODEL}.flat_cam: refused:" in out
    lines = out.splitlines()
    cam = lines.index(next(line for line in lines if line.startswith(f"endpoint {MODEL}.cam:")))
    assert lines[cam + 4].split() == ["input", "target", "int64", "[-1]"]
    assert lines[cam + 5].split() == ["output", "attribution", "float32", "[-1,", "4,", "4]"]
