"""Structure-aware fuzzing (hypothesis) of the three request decoders against a real
`tapserve serve`: KServe gRPC ModelInfer, TF Serving gRPC Predict, KServe HTTP JSON.

Each generated request starts as a valid one for the autoencoder (any endpoint, any taps)
and takes zero or more mutations (a wrong name, datatype, shape, byte count, duplicate,
garbage...). Every answer must be a client-error status or the right numbers: never
INTERNAL/UNKNOWN or HTTP 500, never a hang (each call has a 20 s deadline), never a crash;
afterwards a known request is answered correctly.

The default run is short; TAPSERVE_FUZZ_EXAMPLES=10000 (and TAPSERVE_FUZZ_SEED) for the
long one (docs/protocols.md, "Fuzzing").
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import keras
import numpy as np
import pytest
import zoo
from backends import HAS_TFS_CLIENT, frontend_only, needs_tfs_client
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from ports import free_port
from stock import ServerProcess, infer
from tritonclient.grpc import service_pb2, service_pb2_grpc

if HAS_TFS_CLIENT:  # the stock TF Serving client: tensorflow's protos and tensors
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

pytestmark = frontend_only  # the front doors only: the same on every backend
EXAMPLES = int(os.environ.get("TAPSERVE_FUZZ_EXAMPLES", "200"))
SEED = int(os.environ.get("TAPSERVE_FUZZ_SEED", "20261201"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=list(HealthCheck))
CALL_TIMEOUT = 20
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.RESOURCE_EXHAUSTED}
HTTP_CLIENT_ERRORS = {400, 404, 413, 429}

# Endpoint -> (input name, its row shape, the taps it may be asked for).
ENDPOINTS = {
    "autoencoder": ("image", (8, 8, 1), ["recon", "enc_conv", "code", "dec_pixels", "image"]),
    "encoder": ("image", (8, 8, 1), ["code", "enc_flat", "enc_dense"]),
    "decoder": ("code", (4,), ["recon", "dec_dense", "dec_pixels", "dec_reshape"]),
}
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "BF16", "fp32", ""]
NAMES = st.one_of(st.sampled_from(["image", "code", "recon", "enc_conv", "nope", "", "a.b",
                                   "autoencoder", "x" * 300]), st.text(max_size=12))
DIMS = st.one_of(st.integers(-2, 12), st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1]))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("fuzz")
    zoo.write_model("autoencoder", repo)  # endpoints autoencoder (default), encoder, decoder
    return repo


@pytest.fixture(scope="module")
def server(start_process, repository: Path) -> ServerProcess:
    http = free_port()
    process = start_process(repository, "--http-port", str(http))
    process.http = f"http://127.0.0.1:{http}"
    return process


@pytest.fixture(scope="module")
def oracle(repository: Path):
    """expected(endpoint, x, outputs) -> {name: array}: the taps computed by Keras itself."""
    model = keras.models.load_model(repository / "autoencoder" / "1" / "model.keras")
    # Every layer's output from the image; from a code, the code itself and what follows.
    from_image = keras.Model(model.input, {layer.name: layer.output for layer in model.layers})
    code = keras.Input((4,))
    taps, h = {"code": code}, code
    for name in ("dec_dense", "dec_pixels", "dec_reshape", "recon"):
        h = taps[name] = model.get_layer(name)(h)
    from_code = keras.Model(code, taps)

    def expected(endpoint: str, x: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        got = (from_code if endpoint == "decoder" else from_image)(x)
        return {n: np.asarray(got[n]) for n in outputs}
    return expected


def check_outputs(oracle, endpoint: str, x: np.ndarray, outputs: dict[str, np.ndarray]
                  ) -> None:
    want = oracle(endpoint, x, list(outputs))
    for name, array in outputs.items():
        np.testing.assert_allclose(array, want[name], atol=1e-4, err_msg=name)


@st.composite
def valid(draw) -> dict:
    """A valid request in protocol-free terms: endpoint, model name, input, outputs."""
    endpoint = draw(st.sampled_from(sorted(ENDPOINTS)))
    name, row, taps = ENDPOINTS[endpoint]
    rows = draw(st.integers(1, 5))
    x = draw(st.integers(0, 2**32 - 1).map(
        lambda s: np.random.default_rng(s).random((rows, *row), dtype=np.float32)))
    outputs = draw(st.lists(st.sampled_from(taps), unique=True, max_size=3))
    model = "autoencoder" if endpoint == "autoencoder" and draw(st.booleans()) \
        else f"autoencoder.{endpoint}"
    return {"endpoint": endpoint, "model": model, "input": name, "x": x, "outputs": outputs}


# Mutations: each takes a draw function and the protocol-free request's message, in place.

def kserve_message(request: dict) -> service_pb2.ModelInferRequest:
    msg = service_pb2.ModelInferRequest(model_name=request["model"])
    msg.inputs.add(name=request["input"], datatype="FP32", shape=request["x"].shape)
    msg.raw_input_contents.append(request["x"].tobytes())
    msg.outputs.extend(service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=o)
                       for o in request["outputs"])
    return msg


@st.composite
def kserve_requests(draw) -> tuple[dict, service_pb2.ModelInferRequest, bool]:
    request = draw(valid())
    msg = kserve_message(request)
    mutations = draw(st.lists(st.integers(0, 13), max_size=3))
    for m in mutations:
        tensor = msg.inputs[0] if msg.inputs else None
        if m == 0:
            msg.model_name = draw(st.one_of(NAMES, st.just("autoencoder.nope")))
        elif m == 1:
            msg.model_version = draw(st.sampled_from(["1", "2", "0", "x", "-1", "01", " "]))
        elif m == 2 and tensor:
            tensor.datatype = draw(st.sampled_from(DATATYPES))
        elif m == 3 and tensor:
            del tensor.shape[:]
            tensor.shape.extend(draw(st.lists(DIMS, max_size=6)))
        elif m == 4 and msg.raw_input_contents:
            raw = msg.raw_input_contents[0]
            msg.raw_input_contents[0] = raw[:draw(st.integers(0, len(raw)))] + draw(
                st.binary(max_size=16))
        elif m == 5:
            msg.raw_input_contents.append(draw(st.binary(max_size=32)))
        elif m == 6:
            msg.inputs.add(name=draw(NAMES), datatype=draw(st.sampled_from(DATATYPES)),
                           shape=draw(st.lists(DIMS, max_size=4)))
        elif m == 7:
            msg.outputs.add(name=draw(NAMES))
        elif m == 8 and msg.outputs:
            msg.outputs.add(name=msg.outputs[0].name)  # a duplicate
        elif m == 9 and tensor:
            tensor.name = draw(NAMES)
        elif m == 10 and tensor:  # typed contents instead of raw
            del msg.raw_input_contents[:]
            values = draw(st.lists(st.floats(width=32, allow_nan=True), max_size=70))
            tensor.contents.fp32_contents.extend(values)
        elif m == 11 and tensor:
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=4),
                                                                max_size=4)))
        elif m == 12:
            msg.id = draw(st.text(max_size=40))
        elif m == 13:
            del msg.inputs[:]
    return request, msg, not mutations


def grpc_answer(call: Any, msg: Any, untouched: bool, seen: dict[str, int]) -> Any:
    """The call's answer, or None when it was refused: with a client-error status, and
    only if the fuzzer changed the valid request. Tallies the codes in `seen`."""
    try:
        response = call(msg, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        seen[err.code().name] = seen.get(err.code().name, 0) + 1
        assert err.code() in CLIENT_ERRORS, (err.code(), err.details(), msg)
        assert not untouched, (err.details(), msg)
        return None
    seen["OK"] = seen.get("OK", 0) + 1
    return response


def test_fuzz_kserve_grpc_model_infer(server, oracle) -> None:
    channel = grpc.insecure_channel(server.url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    seen: dict[str, int] = {}

    @seed(SEED)
    @FUZZ
    @given(kserve_requests())
    def one(case) -> None:
        request, msg, untouched = case
        response = grpc_answer(stub.ModelInfer, msg, untouched, seen)
        if response is None:
            return
        outputs = {t.name: np.frombuffer(raw, np.float32).reshape(t.shape)
                   for t, raw in zip(response.outputs, response.raw_output_contents,
                                     strict=True)}
        x = np.frombuffer(msg.raw_input_contents[0], np.float32).reshape(msg.inputs[0].shape) \
            if msg.raw_input_contents else np.array(
                msg.inputs[0].contents.fp32_contents, np.float32).reshape(msg.inputs[0].shape)
        endpoint = msg.model_name.partition(".")[2] or "autoencoder"
        check_outputs(oracle, endpoint, x, outputs)

    one()
    print(f"kserve grpc: {EXAMPLES} examples, answers {seen}")
    assert_still_serves(server, oracle)


@st.composite
def predict_requests(draw) -> tuple[dict, predict_pb2.PredictRequest, bool]:
    request = draw(valid())
    msg = predict_pb2.PredictRequest()
    msg.model_spec.name = "autoencoder"
    msg.model_spec.signature_name = (request["endpoint"] if request["model"] != "autoencoder"
                                     else draw(st.sampled_from(["", "serving_default"])))
    msg.inputs[request["input"]].CopyFrom(tf.make_tensor_proto(request["x"]))
    msg.output_filter.extend(request["outputs"])
    mutations = draw(st.lists(st.integers(0, 10), max_size=3))
    for m in mutations:
        tensor = msg.inputs.get(request["input"])
        if m == 0:
            msg.model_spec.name = draw(NAMES)
        elif m == 1:
            msg.model_spec.signature_name = draw(NAMES)
        elif m == 2:
            msg.model_spec.version.value = draw(st.integers(-3, 3))
        elif m == 3:
            msg.model_spec.version_label = draw(st.text(max_size=8))
        elif m == 4 and tensor:
            tensor.dtype = draw(st.integers(0, 30))
        elif m == 5 and tensor:
            del tensor.tensor_shape.dim[:]
            for d in draw(st.lists(DIMS, max_size=6)):
                tensor.tensor_shape.dim.add(size=d)
        elif m == 6 and tensor:
            tensor.tensor_content = draw(st.binary(max_size=64))
        elif m == 7 and tensor:
            tensor.tensor_content = b""
            tensor.float_val.extend(draw(st.lists(st.floats(width=32), max_size=70)))
        elif m == 8:
            msg.inputs[draw(NAMES)].CopyFrom(tf.make_tensor_proto(
                draw(st.lists(st.integers(-5, 5), max_size=4))))
        elif m == 9:
            msg.output_filter.append(draw(NAMES))
        elif m == 10 and tensor:
            tensor.string_val.extend(draw(st.lists(st.binary(max_size=4), max_size=4)))
    return request, msg, not mutations


@needs_tfs_client
def test_fuzz_tfserving_grpc_predict(server, oracle) -> None:
    channel = grpc.insecure_channel(server.url)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    seen: dict[str, int] = {}

    @seed(SEED)
    @FUZZ
    @given(predict_requests())
    def one(case) -> None:
        request, msg, untouched = case
        response = grpc_answer(stub.Predict, msg, untouched, seen)
        if response is None:
            return
        (name, proto), = msg.inputs.items()
        x = tf.make_ndarray(proto)
        endpoint = msg.model_spec.signature_name
        endpoint = "autoencoder" if endpoint in ("", "serving_default") else endpoint
        check_outputs(oracle, endpoint, x, {n: tf.make_ndarray(t)
                                            for n, t in response.outputs.items()})

    one()
    print(f"tfserving grpc: {EXAMPLES} examples, answers {seen}")
    assert_still_serves(server, oracle)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
              st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20)


@st.composite
def http_bodies(draw) -> tuple[dict, str, bytes, bool]:
    request = draw(valid())
    document: dict = {"inputs": [{"name": request["input"], "datatype": "FP32",
                                  "shape": list(request["x"].shape),
                                  "data": request["x"].ravel().tolist()}]}
    if request["outputs"]:
        document["outputs"] = [{"name": o} for o in request["outputs"]]
    model = request["model"]
    mutations = draw(st.lists(st.integers(0, 9), max_size=3))
    for m in mutations:
        tensor = document["inputs"][0] if isinstance(document.get("inputs"), list) and \
            document["inputs"] and isinstance(document["inputs"][0], dict) else None
        if m == 0:
            model = draw(st.sampled_from(["nope", "autoencoder.nope", "a.b.c", "-", "x" * 300]))
        elif m == 1 and tensor:
            tensor["datatype"] = draw(st.one_of(st.sampled_from(DATATYPES), JSON_VALUES))
        elif m == 2 and tensor:
            tensor["shape"] = draw(st.one_of(st.lists(DIMS, max_size=6), JSON_VALUES))
        elif m == 3 and tensor:
            tensor["data"] = draw(JSON_VALUES)
        elif m == 4:
            document[draw(st.sampled_from(["inputs", "outputs", "parameters", "id"]))] = \
                draw(JSON_VALUES)
        elif m == 5 and tensor:
            tensor["parameters"] = draw(st.one_of(
                st.fixed_dictionaries({"binary_data_size": JSON_VALUES}), JSON_VALUES))
        elif m == 6:
            if isinstance(document.get("outputs"), list):
                document["outputs"].append(draw(st.one_of(
                    st.fixed_dictionaries({"name": NAMES}), JSON_VALUES)))
        elif m == 7 and tensor:
            tensor["name"] = draw(st.one_of(NAMES, JSON_VALUES))
        elif m == 8 and isinstance(document.get("inputs"), list):
            document["inputs"].append(draw(JSON_VALUES))
        elif m == 9:
            return request, model, draw(st.binary(max_size=64)), False
    return request, model, json.dumps(document).encode(), not mutations


def test_fuzz_kserve_http_json(server, oracle) -> None:
    seen: dict[str, int] = {}

    @seed(SEED)
    @FUZZ
    @given(http_bodies())
    def one(case) -> None:
        request, model, body, untouched = case
        post = urllib.request.Request(f"{server.http}/v2/models/{model}/infer", body)
        try:
            with urllib.request.urlopen(post, timeout=CALL_TIMEOUT) as answer:
                document = json.loads(answer.read())
        except urllib.error.HTTPError as err:
            seen[str(err.code)] = seen.get(str(err.code), 0) + 1
            text = err.read().decode()
            assert err.code in HTTP_CLIENT_ERRORS, (err.code, text, body[:300])
            assert "error" in json.loads(text)
            assert not untouched, (text, body[:300])
            return
        seen["200"] = seen.get("200", 0) + 1
        sent = json.loads(body)["inputs"][0]
        x = np.asarray(sent["data"], np.float32).reshape(sent["shape"])
        endpoint = model.partition(".")[2] or "autoencoder"
        check_outputs(oracle, endpoint, x, {
            t["name"]: np.asarray(t["data"], np.float32).reshape(t["shape"])
            for t in document["outputs"]})

    one()
    print(f"kserve http: {EXAMPLES} examples, answers {seen}")
    assert_still_serves(server, oracle)


def assert_still_serves(server: ServerProcess, oracle) -> None:
    assert server.process.poll() is None, "the server died"
    x = np.random.default_rng(1).random((3, 8, 8, 1), dtype=np.float32)
    with server.client() as client:
        got = infer(client, "autoencoder", {"image": x}, ["recon", "code"])
    check_outputs(oracle, "autoencoder", x, {"recon": got.as_numpy("recon"),
                                             "code": got.as_numpy("code")})
