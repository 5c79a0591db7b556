from __future__ import annotations

import gc
import struct

import numpy as np
import pytest

from service.errors import InvalidInput, NotFound, Overloaded
from service.protocol.convert import (
    decode_infer_request,
    encode_infer_response,
    encode_model_metadata,
    parse_model_name,
    parse_version,
)
from service.protocol.generated import grpc_predict_v2_pb2 as pb
from service.protocol.repeated import CHUNK
from service.types import STRING, EndpointMetadata, InferResponse, TensorSpec


def _bytes_array(*items: bytes, shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array.reshape(shape or (len(items),))


# One sample per datatype, extremes included: the protocol's contract, written out by hand.
SAMPLES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
    "UINT16": np.array([[0, 7, 65535]], dtype=np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], dtype=np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1]], dtype=np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], dtype=np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
    "FP16": np.array([[-1.5, 0.0, 65504.0]], dtype=np.float16),
    "FP32": np.array([[-1.5, 0.1, 3.4e38]], dtype=np.float32),
    "FP64": np.array([[-1.5, 0.1, 1e308]], dtype=np.float64),
    "BYTES": _bytes_array(b"", "héllo ✓".encode(), b"\x00\xff", shape=(1, 3)),
}
TYPED_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}

RAW_DTYPES = {
    "BOOL": "|b1", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2",
    "FP32": "<f4", "FP64": "<f8",
}


def _serialize_bytes(array: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in array.ravel())


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return _serialize_bytes(array)
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def _raw_request(
    inputs: dict[str, tuple[str, np.ndarray]], **fields: object
) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m", **fields)
    for name, (datatype, array) in inputs.items():
        msg.inputs.add(name=name, datatype=datatype, shape=array.shape)
        msg.raw_input_contents.append(_raw(array, datatype))
    return msg


def _typed_request(name: str, datatype: str, array: np.ndarray) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name=name, datatype=datatype, shape=array.shape)
    getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(array.ravel().tolist())
    return msg


def _response_arrays(msg: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decode raw outputs by hand, independent of the code under test."""
    arrays = {}
    for out, raw in zip(msg.outputs, msg.raw_output_contents, strict=True):
        if out.datatype == "BYTES":
            items, offset = [], 0
            while offset < len(raw):
                (length,) = struct.unpack_from("<I", raw, offset)
                items.append(raw[offset + 4 : offset + 4 + length])
                offset += 4 + length
            arrays[out.name] = _bytes_array(*items, shape=tuple(out.shape))
        else:
            array = np.frombuffer(raw, dtype=RAW_DTYPES[out.datatype])
            arrays[out.name] = array.reshape(tuple(out.shape))
    return arrays


def _assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    if expected.dtype == object:
        assert actual.tolist() == expected.tolist()
        assert all(type(item) is bytes for item in actual.ravel())
    else:
        np.testing.assert_array_equal(actual, expected)


# Round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", [d for d in SAMPLES if d != "FP16"])
def test_typed_contents_round_trip(datatype: str) -> None:
    request = decode_infer_request(_typed_request("x", datatype, SAMPLES[datatype]))
    _assert_same(request.inputs["x"], SAMPLES[datatype])


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_raw_contents_round_trip(datatype: str) -> None:
    request = decode_infer_request(_raw_request({"x": (datatype, SAMPLES[datatype])}))
    _assert_same(request.inputs["x"], SAMPLES[datatype])


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_response_round_trip(datatype: str) -> None:
    resp = InferResponse(model="m", endpoint="e", version=3, outputs={"y": SAMPLES[datatype]})
    msg = encode_infer_response(resp, "m.e")
    assert [(o.name, o.datatype, list(o.shape)) for o in msg.outputs] == [
        ("y", datatype, [1, 3])
    ]
    assert not msg.outputs[0].HasField("contents")
    _assert_same(_response_arrays(msg)["y"], SAMPLES[datatype])
    # and back in through the request decoder, as a client would echo it
    echoed = _raw_request({"y": (datatype, _response_arrays(msg)["y"])})
    _assert_same(decode_infer_request(echoed).inputs["y"], SAMPLES[datatype])


def test_raw_bytes_layout_is_length_prefixed_little_endian() -> None:
    resp = InferResponse(model="m", endpoint="e", version=1,
                         outputs={"s": _bytes_array(b"hi", b"", "é".encode())})
    raw = encode_infer_response(resp, "m").raw_output_contents[0]
    assert raw == b"\x02\x00\x00\x00hi" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"


def test_raw_numbers_are_little_endian() -> None:
    big_endian = np.array([1, 256], dtype=">i4")
    resp = InferResponse(model="m", endpoint="e", version=1, outputs={"n": big_endian})
    assert encode_infer_response(resp, "m").raw_output_contents[0] == (
        b"\x01\x00\x00\x00\x00\x01\x00\x00"
    )


def test_str_outputs_are_sent_as_utf8_bytes() -> None:
    resp = InferResponse(model="m", endpoint="e", version=1,
                         outputs={"s": np.array(["a", "ü"], dtype=object),
                                  "u": np.array(["xy"])})
    arrays = _response_arrays(encode_infer_response(resp, "m"))
    assert arrays["s"].tolist() == [b"a", "ü".encode()]
    assert arrays["u"].tolist() == [b"xy"]


def test_unencodable_bytes_output_is_a_server_error() -> None:
    resp = InferResponse(model="m", endpoint="e", version=1,
                         outputs={"s": np.array([1, None], dtype=object)})
    with pytest.raises(TypeError):
        encode_infer_response(resp, "m")


def test_response_echoes_name_version_id_and_output_order() -> None:
    outputs = {"b": np.zeros(2, np.float32), "a": np.ones((), np.int64),
               "c": np.zeros((0, 4), np.float32)}
    resp = InferResponse(model="ae", endpoint="encoder", version=12, outputs=outputs, id="r-1")
    msg = encode_infer_response(resp, "ae.encoder")
    assert (msg.model_name, msg.model_version, msg.id) == ("ae.encoder", "12", "r-1")
    assert [o.name for o in msg.outputs] == ["b", "a", "c"]
    assert [list(o.shape) for o in msg.outputs] == [[2], [], [0, 4]]
    assert list(msg.raw_output_contents) == [bytes(8), b"\x01" + bytes(7), b""]


def test_request_fields_are_carried() -> None:
    msg = _raw_request({"x": ("FP32", SAMPLES["FP32"])}, id="req-7", model_version="4")
    msg.model_name = "ae.encoder"
    msg.outputs.add(name="code")
    msg.outputs.add(name="dense_1")
    request = decode_infer_request(msg, deadline=123.5)
    assert (request.model, request.endpoint, request.version) == ("ae", "encoder", "4")
    assert request.outputs == ["code", "dense_1"]
    assert (request.id, request.deadline) == ("req-7", 123.5)


def test_request_defaults() -> None:
    request = decode_infer_request(pb.ModelInferRequest(model_name="m"))
    assert (request.model, request.endpoint, request.version) == ("m", None, None)
    assert (request.inputs, request.outputs, request.id, request.deadline) == ({}, [], "", None)


def test_several_raw_inputs_stay_aligned_by_index() -> None:
    inputs = {"a": ("INT32", np.arange(6, dtype=np.int32).reshape(2, 3)),
              "b": ("BYTES", _bytes_array(b"x", b"yz")),
              "c": ("FP64", np.array([[0.5]]))}
    request = decode_infer_request(_raw_request(inputs))
    for name, (_, array) in inputs.items():
        _assert_same(request.inputs[name], array)


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3)])
def test_scalar_and_empty_shapes(shape: tuple[int, ...]) -> None:
    array = np.full(shape, 2.5, dtype=np.float32)
    _assert_same(decode_infer_request(_raw_request({"x": ("FP32", array)})).inputs["x"], array)
    _assert_same(decode_infer_request(_typed_request("x", "FP32", array)).inputs["x"], array)
    empty = _bytes_array(*[b"q"] * array.size, shape=shape)
    _assert_same(decode_infer_request(_raw_request({"s": ("BYTES", empty)})).inputs["s"], empty)


def test_raw_input_outlives_its_message() -> None:
    msg = _raw_request({"x": ("FP32", SAMPLES["FP32"])})
    array = decode_infer_request(msg).inputs["x"]
    del msg
    gc.collect()
    np.testing.assert_array_equal(array, SAMPLES["FP32"])


def test_encode_model_metadata() -> None:
    meta = EndpointMetadata(
        model="ae", endpoint="encoder", versions=(1, 3), platform="keras_tensorflow",
        inputs=(TensorSpec("image", "float32", (None, 28, 28)),),
        outputs=(TensorSpec("code", "float16", (None, 8)), TensorSpec("label", "string", (None,))),
    )
    msg = encode_model_metadata(meta, "ae.encoder")
    assert (msg.name, list(msg.versions), msg.platform) == ("ae.encoder", ["1", "3"],
                                                            "keras_tensorflow")
    assert [(t.name, t.datatype, list(t.shape)) for t in msg.inputs] == [
        ("image", "FP32", [-1, 28, 28])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in msg.outputs] == [
        ("code", "FP16", [-1, 8]), ("label", "BYTES", [-1])
    ]


# Names and versions --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("ae", ("ae", None)), ("ae.encoder", ("ae", "encoder")), ("A-1_b.x_Y-2", ("A-1_b", "x_Y-2")),
])
def test_parse_model_name(name: str, expected: tuple[str, str | None]) -> None:
    assert parse_model_name(name) == expected


@pytest.mark.parametrize("name", ["", ".", "ae.", ".enc", "ae.enc.x", "a b", "ae/enc", "é"])
def test_impossible_model_names_are_not_found(name: str) -> None:
    with pytest.raises(NotFound, match="model name is <model> or <model>.<endpoint>"):
        parse_model_name(name)


@pytest.mark.parametrize(("text", "expected"), [
    ("", None), ("3", "3"), ("12", "12"), ("007", "7"), ("canary", "canary"), ("v1", "v1")])
def test_parse_version_gives_a_number_or_a_label(text: str, expected: str | None) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "1.5", " 3", "+3", "00", "a b", "é",
                                  "1" * 5000])  # past Python's int() limit: was INTERNAL
def test_bad_versions_are_not_found(text: str) -> None:
    with pytest.raises(NotFound, match="positive integer"):
        parse_version(text)


def test_bad_name_or_version_in_infer_request_is_not_found() -> None:
    with pytest.raises(NotFound):
        decode_infer_request(pb.ModelInferRequest(model_name="a..b"))
    with pytest.raises(NotFound):
        decode_infer_request(pb.ModelInferRequest(model_name="m", model_version="v.1"))


# Invalid input -------------------------------------------------------------------------


def _input(msg: pb.ModelInferRequest, name: str, datatype: str, shape: list[int]):
    return msg.inputs.add(name=name, datatype=datatype, shape=shape)


def test_unknown_datatype() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    _input(msg, "x", "FP8", [1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="unknown datatype 'FP8'"):
        decode_infer_request(msg)


def test_negative_dimension() -> None:
    msg = _raw_request({})
    _input(msg, "x", "FP32", [-1, 2])
    msg.raw_input_contents.append(b"")
    with pytest.raises(InvalidInput, match=r"'x': shape \[-1, 2\] has a negative dimension"):
        decode_infer_request(msg)


def test_typed_element_count_mismatch() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    _input(msg, "img", "FP32", [2, 3]).contents.fp32_contents.extend([1.0] * 5)
    with pytest.raises(InvalidInput, match=r"'img': shape \[2, 3\] needs 6 elements "
                                           r"in contents.fp32_contents, got 5"):
        decode_infer_request(msg)


def test_typed_contents_in_the_wrong_field() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    _input(msg, "x", "INT64", [2]).contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidInput, match=r"needs 2 elements in contents.int64_contents, got 0"):
        decode_infer_request(msg)


def test_raw_byte_count_mismatch() -> None:
    msg = pb.ModelInferRequest(model_name="m", raw_input_contents=[bytes(20)])
    _input(msg, "img", "FP32", [2, 3])
    with pytest.raises(InvalidInput, match=r"'img': shape \[2, 3\] of FP32 needs 24 bytes, got 20"):
        decode_infer_request(msg)


def test_raw_bytes_element_count_mismatch() -> None:
    # One 8-byte element: enough bytes for two elements' lengths, yet only one element.
    msg = pb.ModelInferRequest(model_name="m",
                               raw_input_contents=[_serialize_bytes(_bytes_array(b"abcdefgh"))])
    _input(msg, "s", "BYTES", [2])
    with pytest.raises(InvalidInput, match=r"'s': shape \[2\] needs 2 BYTES elements, got 1"):
        decode_infer_request(msg)


def test_raw_bytes_too_short_for_the_shape_is_refused_before_splitting() -> None:
    msg = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\0" * 7])
    _input(msg, "s", "BYTES", [2])
    with pytest.raises(InvalidInput, match=r"needs 2 BYTES elements, at least 8 bytes; got 7"):
        decode_infer_request(msg)


@pytest.mark.parametrize(("raw", "message"), [
    (b"\x01\x00\x00\x00a\x01\x00\x00", "element 1 is cut inside its 4-byte length"),
    (b"\x05\x00\x00\x00abcd", "element 0 declares 5 bytes, only 4 remain"),
    (b"\x01\x00\x00\x00a\x09\x00\x00\x00", "element 1 declares 9 bytes, only 0 remain"),
])
def test_truncated_raw_bytes(raw: bytes, message: str) -> None:
    msg = pb.ModelInferRequest(model_name="m", raw_input_contents=[raw])
    _input(msg, "s", "BYTES", [2])
    with pytest.raises(InvalidInput, match=message):
        decode_infer_request(msg)


def test_duplicate_input_names() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    for _ in range(2):
        _input(msg, "x", "FP32", [1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="input 'x' is given more than once"):
        decode_infer_request(msg)


def test_unnamed_input() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    _input(msg, "", "FP32", [1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="input #0 has no name"):
        decode_infer_request(msg)


def test_raw_contents_count_must_equal_input_count() -> None:
    msg = _raw_request({"a": ("FP32", SAMPLES["FP32"])})
    _input(msg, "b", "FP32", [1])
    with pytest.raises(InvalidInput, match="raw_input_contents has 1 entries for 2 inputs"):
        decode_infer_request(msg)


def test_raw_and_typed_contents_cannot_mix() -> None:
    msg = _raw_request({"a": ("FP32", SAMPLES["FP32"])})
    msg.inputs[0].contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(InvalidInput, match="'a' has `contents` but the request uses raw"):
        decode_infer_request(msg)


def test_fp16_only_raw() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    _input(msg, "h", "FP16", [1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidInput, match="'h': FP16 data must be sent in raw_input_contents"):
        decode_infer_request(msg)


@pytest.mark.parametrize(("datatype", "field", "value"), [
    ("INT8", "int_contents", 128), ("INT8", "int_contents", -129),
    ("INT16", "int_contents", 2**15), ("UINT8", "uint_contents", 256),
    ("UINT16", "uint_contents", 2**16),
])
def test_typed_values_out_of_range(datatype: str, field: str, value: int) -> None:
    msg = pb.ModelInferRequest(model_name="m")
    getattr(_input(msg, "x", datatype, [2]).contents, field).extend([0, value])
    with pytest.raises(InvalidInput, match=f"'x': values out of range for {datatype}"):
        decode_infer_request(msg)


def test_duplicate_requested_outputs() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    msg.outputs.add(name="y")
    msg.outputs.add(name="y")
    with pytest.raises(InvalidInput, match="output 'y' is requested more than once"):
        decode_infer_request(msg)


def test_raw_bytes_past_the_declared_elements_are_refused() -> None:
    # The split stops at the declared count: what follows is not split too.
    msg = pb.ModelInferRequest(model_name="m", raw_input_contents=[
        _serialize_bytes(_bytes_array(b"a", b"b", b"c"))])
    _input(msg, "s", "BYTES", [2])
    with pytest.raises(InvalidInput, match=r"needs 2 BYTES elements; 5 bytes follow the last"):
        decode_infer_request(msg)


# Declared shapes, checked before any data is decoded ------------------------------------

SPECS = {"s": TensorSpec("s", STRING, (None,)), "x": TensorSpec("x", "float32", (None, 3))}


def test_rows_past_max_rows_are_overloaded_before_decoding() -> None:
    # Regression: 15.7 M declared rows of 60 MiB of BYTES were split (18 s) before the
    # queue's row limit refused them; here the data could not even be split.
    msg = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\0" * 8, b"\0" * 12])
    _input(msg, "s", "BYTES", [15_728_640])
    _input(msg, "x", "FP32", [1, 3])
    with pytest.raises(Overloaded, match=r"has 15728640 rows, more than the model's queue "
                                         r"holds \(max_queue_size 1024\)"):
        decode_infer_request(msg, specs=SPECS, max_rows=1024)


@pytest.mark.parametrize(("name", "shape", "words"), [
    ("x", [2, 4], r"input 'x' has shape \[2, 4\]; expected x \(float32 \[-1,3\]\)"),
    ("x", [6], r"input 'x' has shape \[6\]; expected x \(float32 \[-1,3\]\)"),
])
def test_shapes_the_endpoint_cannot_take_are_refused_before_decoding(
        name: str, shape: list[int], words: str) -> None:
    msg = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"", b""])
    _input(msg, "s", "BYTES", [0])
    _input(msg, name, "FP32", shape)  # no bytes: decoding would refuse the byte count
    with pytest.raises(InvalidInput, match=words):
        decode_infer_request(msg, specs=SPECS, max_rows=1024)


@pytest.mark.parametrize("datatype", ["FP32", "INT8", "BYTES"])
def test_typed_contents_of_several_chunks_decode_whole(datatype: str) -> None:
    # Typed contents are copied a chunk at a time (service/protocol/repeated.py).
    count = 2 * CHUNK + 5
    values = np.arange(count) % 100
    msg = pb.ModelInferRequest(model_name="m")
    tensor = _input(msg, "x", datatype, [count])
    if datatype == "BYTES":
        tensor.contents.bytes_contents.extend(str(v).encode() for v in values)
        expected = [str(v).encode() for v in values]
    else:
        getattr(tensor.contents, "fp32_contents" if datatype == "FP32" else "int_contents"
                ).extend(values.tolist())
        expected = values.tolist()
    assert decode_infer_request(msg).inputs["x"].tolist() == expected
