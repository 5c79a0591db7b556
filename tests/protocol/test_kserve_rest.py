"""KServe v2 REST's conversions alone: JSON and binary tensor data straight to numpy (the
checks the gRPC door runs, service.protocol.convert), and answers straight from numpy."""

from __future__ import annotations

import re

import numpy as np
import orjson
import pytest

from service.errors import InvalidInput
from service.protocol import kserve_rest
from service.types import InferResponse, TensorSpec


def decode(document: dict[str, object], binary: bytes = b"",
           specs: dict[str, TensorSpec] | None = None) -> dict[str, np.ndarray]:
    body = orjson.dumps(document) + binary
    request, _ = kserve_rest.decode_request(body, str(len(body) - len(binary)) if binary
                                            else None, "m", None, None, specs)
    return request.inputs


def test_json_data_becomes_arrays_of_the_datatype() -> None:
    inputs = decode({"inputs": [
        {"name": "a", "datatype": "FP16", "shape": [2, 2], "data": [[1.5, -2], [0, 65504]]},
        {"name": "b", "datatype": "INT8", "shape": [3], "data": [-128, 0, 127]},
        {"name": "c", "datatype": "BOOL", "shape": [1, 2], "data": [True, False]},
        {"name": "d", "datatype": "BYTES", "shape": [2, 1], "data": ["", "héllo"]},
    ]})
    assert inputs["a"].dtype == np.float16 and inputs["a"].shape == (2, 2)
    np.testing.assert_array_equal(inputs["a"], [[1.5, -2], [0, 65504]])
    assert inputs["b"].dtype == np.int8 and inputs["b"].tolist() == [-128, 0, 127]
    assert inputs["c"].dtype == np.bool_ and inputs["c"].tolist() == [[True, False]]
    assert inputs["d"].dtype == object and inputs["d"].tolist() == [[b""], ["héllo".encode()]]


def test_binary_data_is_decoded_as_raw_contents() -> None:
    x = np.arange(6, dtype="<f4").reshape(2, 3)
    inputs = decode({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                                 "parameters": {"binary_data_size": x.nbytes}}]}, x.tobytes())
    np.testing.assert_array_equal(inputs["x"], x)


@pytest.mark.parametrize(("tensor", "message"), [
    ({"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}, "data is not INT8"),
    ({"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0]},
     "shape [2] needs 2 values, data has 1"),
    ({"name": "x", "datatype": "BYTES", "shape": [3], "data": ["a", "b"]},
     "shape [3] needs 3 BYTES elements, got 2"),
    ({"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]},
     "BYTES data must be strings"),
])
def test_json_data_that_does_not_fit_is_invalid_input(tensor: dict[str, object],
                                                      message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode({"inputs": [tensor]})


def test_every_header_is_checked_before_any_data() -> None:
    # The second input's datatype is wrong: refused before the first's data is read.
    spec = {"y": TensorSpec("y", "float32", (None,))}
    with pytest.raises(InvalidInput, match="input 'y' must be float32"):
        decode({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["no"]},
                           {"name": "y", "datatype": "INT64", "shape": [1], "data": [1]}]},
               specs=spec)


def test_answers_are_written_from_numpy() -> None:
    response = InferResponse("m", "e", 3, {
        "f": np.array([[0.5, 2.0]], np.float32), "s": np.array([b"ok", b"\xff"], object),
        "raw": np.array([1, 2], np.int16)}, "id-1")
    body, json_length = kserve_rest.encode_infer(response, "m.e", {"raw"})
    assert json_length is not None
    document = orjson.loads(body[:json_length])
    assert document == {"model_name": "m.e", "model_version": "3", "id": "id-1", "outputs": [
        {"name": "f", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 2.0]},
        {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["ok", "\\xff"]},
        {"name": "raw", "datatype": "INT16", "shape": [2],
         "parameters": {"binary_data_size": 4}}]}
    assert body[json_length:] == np.array([1, 2], "<i2").tobytes()
