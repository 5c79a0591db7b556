"""InferenceServicer + ErrorStatusInterceptor on a real grpc.aio server, called by the stock
tritonclient (in a subprocess) and by our own generated stub."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from echo_dataplane import ERRORS, SECRET, EchoDataPlane

from service.protocol.generated import grpc_predict_v2_pb2 as pb
from service.protocol.generated.grpc_predict_v2_pb2_grpc import (
    GRPCInferenceServiceStub,
    add_GRPCInferenceServiceServicer_to_server,
)
from service.protocol.kserve import InferenceServicer


@pytest.fixture(scope="module")
def server(serve: Callable[..., Any]) -> Iterator[tuple[str, EchoDataPlane]]:
    dataplane = EchoDataPlane()
    servicer = InferenceServicer(dataplane)
    with serve(lambda s: add_GRPCInferenceServiceServicer_to_server(servicer, s)) as port:
        yield f"127.0.0.1:{port}", dataplane


@pytest.fixture
def stub(server: tuple[str, EchoDataPlane]) -> Iterator[GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server[0]) as channel:
        yield GRPCInferenceServiceStub(channel)


# The stock client ----------------------------------------------------------------------


def test_health_and_metadata(stock_client: Callable[..., Any], server: tuple[str, Any]) -> None:
    plan = [
        {"op": "live"},
        {"op": "ready"},
        {"op": "model_ready", "name": "echo"},
        {"op": "model_ready", "name": "echo.twin", "version": "1"},
        {"op": "model_ready", "name": "warming"},
        {"op": "model_ready", "name": "nope"},
        {"op": "model_ready", "name": "echo", "version": "0"},
        {"op": "server_metadata"},
        {"op": "model_metadata", "name": "echo.twin"},
        {"op": "model_metadata", "name": "echo", "version": "2"},
    ]
    results = stock_client(plan, server[0])
    assert [r.get("value") for r in results[:5]] == [True, True, True, True, False]
    assert results[5]["error"]["code"] == "NOT_FOUND"
    assert results[6]["error"] == {
        "code": "NOT_FOUND", "message": "no version '0': versions are positive integers"
    }
    assert results[7]["value"] == {
        "name": "tapserve", "version": "0.1.0", "extensions": ["model_repository"]
    }
    assert results[8]["value"] == {
        "name": "echo.twin", "versions": ["1"], "platform": "test_echo",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
        "outputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    }
    assert results[9]["error"] == {
        "code": "NOT_FOUND", "message": "no model 'echo' endpoint None version '2'"
    }


INPUTS = [
    {"name": "f32", "datatype": "FP32", "shape": [2, 2], "data": [0.1, -2.5, 3e38, 0.0]},
    {"name": "i64", "datatype": "INT64", "shape": [3], "data": [-(2**63), 0, 2**63 - 1]},
    {"name": "txt", "datatype": "BYTES", "shape": [1, 3],
     "data": [b"".hex(), "héllo ✓".encode().hex(), b"\x00\xff".hex()]},
    {"name": "flag", "datatype": "BOOL", "shape": [2], "data": [True, False]},
    {"name": "half", "datatype": "FP16", "shape": [1, 2], "data": [1.5, -65504.0]},
    {"name": "u8", "datatype": "UINT8", "shape": [2], "data": [0, 255]},
]
NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "BOOL": np.bool_,
         "UINT8": np.uint8}


def _same_data(sent: dict[str, Any], got: dict[str, Any]) -> bool:
    if sent["datatype"] == "BYTES":
        return sent["data"] == got["data"]
    dtype = NUMPY[sent["datatype"]]
    return np.array_equal(np.array(sent["data"], dtype), np.array(got["data"], dtype))


def test_infer_round_trips_every_input_datatype(
    stock_client: Callable[..., Any], server: tuple[str, EchoDataPlane]
) -> None:
    call = {"op": "infer", "name": "echo.twin", "inputs": INPUTS, "id": "req-1", "timeout": 30}
    before = time.monotonic()
    [result] = stock_client([call], server[0])
    value = result["value"]
    assert (value["model_name"], value["model_version"], value["id"]) == ("echo.twin", "1", "req-1")
    assert [o["name"] for o in value["outputs"]] == [i["name"] for i in INPUTS]
    for sent, got in zip(INPUTS, value["outputs"], strict=True):
        assert (got["datatype"], got["shape"]) == (sent["datatype"], sent["shape"])
        assert _same_data(sent, got), sent["name"]
    request = server[1].requests[-1]
    assert server[1].resolved[-1] == ("echo", "twin", None)
    # the client's 30 s timeout arrives as a monotonic deadline
    assert request.deadline is not None
    assert before + 25 < request.deadline < time.monotonic() + 31


def test_no_client_deadline_means_none(
    stock_client: Callable[..., Any], server: tuple[str, EchoDataPlane]
) -> None:
    [result] = stock_client([{"op": "infer", "name": "echo", "inputs": INPUTS[:1]}], server[0])
    assert "value" in result
    assert server[1].requests[-1].deadline is None


def test_requested_outputs(stock_client: Callable[..., Any], server: tuple[str, Any]) -> None:
    plan = [
        {"op": "infer", "name": "echo", "version": "1", "inputs": INPUTS, "outputs": ["u8", "txt"]},
        {"op": "infer", "name": "echo", "inputs": INPUTS, "outputs": ["nope"]},
    ]
    selected, unknown = stock_client(plan, server[0])
    assert [o["name"] for o in selected["value"]["outputs"]] == ["u8", "txt"]
    assert unknown["error"] == {"code": "NOT_FOUND", "message": "no output 'nope'"}


@pytest.fixture(scope="module")
def error_results(
    stock_client: Callable[..., Any], server: tuple[str, Any]
) -> dict[str, dict[str, str]]:
    models = [*ERRORS, "boom"]
    plan = [{"op": "infer", "name": m, "inputs": INPUTS[:1]} for m in models]
    return {m: r["error"] for m, r in zip(models, stock_client(plan, server[0]), strict=True)}


@pytest.mark.parametrize("model", list(ERRORS))
def test_domain_errors_arrive_as_status(model: str, error_results: dict[str, Any]) -> None:
    error, code = ERRORS[model]
    assert error_results[model] == {"code": code, "message": str(error)}


def test_unexpected_error_is_internal_without_details(
    stub: GRPCInferenceServiceStub, error_results: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    assert error_results["boom"] == {"code": "INTERNAL", "message": "internal server error"}
    # The traceback goes to the server log, never to the client.
    request = pb.ModelInferRequest(model_name="boom")
    with (
        caplog.at_level(logging.ERROR, logger="service.protocol.status"),
        pytest.raises(grpc.RpcError) as info,
    ):
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in info.value.details()
    [record] = [r for r in caplog.records if r.name == "service.protocol.status"]
    assert "ModelInfer" in record.getMessage()
    assert record.exc_info is not None and SECRET in str(record.exc_info[1])


# Our generated stub, typed contents ----------------------------------------------------


def test_typed_contents_with_generated_stub(stub: GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="echo", id="typed")
    f32 = request.inputs.add(name="a", datatype="FP32", shape=[2, 2])
    f32.contents.fp32_contents.extend([1.0, 2.5, -3.0, 0.0])
    i8 = request.inputs.add(name="b", datatype="INT8", shape=[3])
    i8.contents.int_contents.extend([-128, 0, 127])
    text = request.inputs.add(name="c", datatype="BYTES", shape=[2])
    text.contents.bytes_contents.extend([b"", "ü".encode()])
    response = stub.ModelInfer(request, timeout=10)
    assert (response.model_name, response.model_version, response.id) == ("echo", "1", "typed")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("a", "FP32", [2, 2]), ("b", "INT8", [3]), ("c", "BYTES", [2])
    ]
    a, b, c = response.raw_output_contents
    np.testing.assert_array_equal(np.frombuffer(a, "<f4"), [1.0, 2.5, -3.0, 0.0])
    np.testing.assert_array_equal(np.frombuffer(b, "<i1"), [-128, 0, 127])
    assert c == b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00" + "ü".encode()


def test_bad_request_is_invalid_argument_naming_the_input(
    stub: GRPCInferenceServiceStub, server: tuple[str, EchoDataPlane]
) -> None:
    request = pb.ModelInferRequest(model_name="echo.twin", id="r-7")
    request.inputs.add(name="img", datatype="FP32", shape=[2, 3]).contents.fp32_contents.extend(
        [1.0] * 5
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "input 'img': shape [2, 3] needs 6 elements in contents.fp32_contents, got 5"
    )
    # Refused while decoding, before the core's infer: still counted and logged there.
    assert server[1].rejections[-1] == ("echo", "twin", "r-7", "InvalidInput")


def test_bad_model_name_is_not_found(stub: GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="echo.a.b"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
