"""The request pipeline (service/dataplane.py's InferCall): through every door, one request
resolves its model version once, served or refused, and is counted once."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest
import zoo
from harness import RunningServer
from ports import free_port

from service.model import LoadedModel
from service.protocol.generated import tf_framework_pb2 as framework_pb2
from service.protocol.generated import tf_serving_apis_pb2 as tfs_pb2
from service.protocol.generated import tf_serving_apis_pb2_grpc as tfs_grpc

MODEL = "autoencoder"  # its default endpoint has its name



@pytest.fixture(scope="module")
def server(start_server: Callable[..., RunningServer],
           tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    repository = tmp_path_factory.mktemp("models")
    zoo.write_model(MODEL, repository)
    return start_server(repository, http_port=free_port())


def image(rows: int = 1) -> np.ndarray:
    return np.random.default_rng(rows).random((rows, 8, 8, 1), dtype=np.float32)


def post(server: RunningServer, path: str, document: object) -> int:
    url = f"http://127.0.0.1:{server.settings.http_port}{path}"
    request = urllib.request.Request(url, data=json.dumps(document).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def kserve_http(server: RunningServer, datatype: str = "FP32") -> int:
    x = image()
    return post(server, f"/v2/models/{MODEL}/infer", {"inputs": [
        {"name": "image", "datatype": datatype, "shape": list(x.shape),
         "data": x.ravel().tolist()}]})


def tfserving_grpc(server: RunningServer, dtype: int = framework_pb2.DT_FLOAT) -> int:
    x = image()
    shape = framework_pb2.TensorShapeProto(
        dim=[framework_pb2.TensorShapeProto.Dim(size=d) for d in x.shape])
    request = tfs_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.inputs["image"].CopyFrom(framework_pb2.TensorProto(
        dtype=dtype, tensor_shape=shape, tensor_content=x.tobytes()))
    stub = tfs_grpc.PredictionServiceStub(server.channel)
    try:
        stub.Predict(request, timeout=30)
    except Exception:  # grpc.RpcError: the refusal is what is counted
        return 400
    return 200


def kserve_grpc(server: RunningServer) -> int:
    server.infer(MODEL, {"image": image()})
    return 200


DOORS: dict[str, Callable[[RunningServer], int]] = {
    "kserve_grpc": kserve_grpc,
    "kserve_http": kserve_http,
    "tfserving_grpc": tfserving_grpc,
    "tfserving_http": lambda s: post(s, f"/v1/models/{MODEL}:predict",
                                     {"instances": image().tolist()}),
    # Refused after resolving (a wrong datatype): still one resolution, none for the labels.
    "kserve_http refused": lambda s: kserve_http(s, "INT32"),
    "tfserving_grpc refused": lambda s: tfserving_grpc(s, framework_pb2.DT_INT32),
}


@pytest.mark.parametrize("door", list(DOORS))
def test_one_request_resolves_its_version_once(server: RunningServer, door: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    registry = server.server.registry
    resolved: list[tuple[str, str | None]] = []
    get = registry.get

    def counting_get(name: str, version: str | None = None) -> LoadedModel:
        resolved.append((name, version))
        return get(name, version)

    monkeypatch.setattr(registry, "get", counting_get)
    protocol, _, refused = door.partition(" ")
    code = "INVALID_ARGUMENT" if refused else "OK"
    before = server.metric("tapserve_requests_total", model=MODEL, endpoint=MODEL,
                           code=code, protocol=protocol)
    status = DOORS[door](server)
    assert status == (400 if refused else 200)
    assert resolved == [(MODEL, None)]
    # ... and counted once, under its endpoint.
    assert server.metric("tapserve_requests_total", model=MODEL, endpoint=MODEL,
                         code=code, protocol=protocol) == before + 1
