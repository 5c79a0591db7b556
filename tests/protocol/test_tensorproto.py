"""TensorProto <-> numpy, with no TensorFlow: both encodings in, tensor_content out.
TensorFlow's own make_tensor_proto / make_ndarray are the reference in test_tfs_wire.py."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import InvalidInput
from service.protocol.generated.tf_framework_pb2 import (
    DT_COMPLEX64,
    DT_FLOAT,
    DT_HALF,
    DT_INT8,
    TensorProto,
)
from service.protocol.tensorproto import data_type, from_numpy, shape_proto, to_numpy

SAMPLES = {
    "float16": np.array([[0.5, -2.0], [65504, 0]], np.float16),
    "float32": np.array([[1.5, -3.25e30], [0, 1e-30]], np.float32),
    "float64": np.array([1e300, -0.0], np.float64),
    "int8": np.array([-128, 127], np.int8),
    "int16": np.array([-32768, 32767], np.int16),
    "int32": np.array([[-(2**31), 2**31 - 1]], np.int32),
    "int64": np.array([-(2**63), 2**63 - 1], np.int64),
    "uint8": np.array([0, 255], np.uint8),
    "uint16": np.array([0, 65535], np.uint16),
    "uint32": np.array([0, 2**32 - 1], np.uint32),
    "uint64": np.array([0, 2**64 - 1], np.uint64),
    "bool": np.array([[True, False]], bool),
}


@pytest.mark.parametrize("dtype", SAMPLES)
def test_both_encodings_decode_to_the_same_array(dtype: str) -> None:
    array = SAMPLES[dtype]
    packed = TensorProto(dtype=data_type(dtype), tensor_shape=shape_proto(array.shape),
                         tensor_content=array.astype(array.dtype.newbyteorder("<")).tobytes())
    np.testing.assert_array_equal(to_numpy("x", packed), array)  # as clients send numbers
    assert to_numpy("x", packed).dtype == array.dtype
    typed = TensorProto(dtype=packed.dtype, tensor_shape=packed.tensor_shape)
    field = {"float16": "half_val", "float32": "float_val", "float64": "double_val",
             "int64": "int64_val", "uint32": "uint32_val", "uint64": "uint64_val",
             "bool": "bool_val"}.get(dtype, "int_val")
    values = array.view(np.uint16).ravel() if dtype == "float16" else array.ravel()
    getattr(typed, field).extend(values.tolist())
    np.testing.assert_array_equal(to_numpy("x", typed), array)


@pytest.mark.parametrize("dtype", SAMPLES)
def test_answers_are_tensor_content_and_read_back(dtype: str) -> None:
    array = SAMPLES[dtype]
    answer = from_numpy(array)
    assert answer.tensor_content and answer.dtype == data_type(dtype)
    back = to_numpy("y", answer)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype


def test_strings_round_trip() -> None:
    array = np.array([[b"red", b""], [b"\xff\x00", "é".encode()]], dtype=object)
    answer = from_numpy(array)
    assert list(answer.string_val) == array.ravel().tolist()
    assert to_numpy("s", answer).tolist() == array.tolist()


@pytest.mark.parametrize(("proto", "words"), [
    (TensorProto(dtype=DT_COMPLEX64), "DT_COMPLEX64 is not served"),
    (from_numpy(np.zeros((2, 3), np.float32)), None),
    (TensorProto(dtype=DT_INT8, int_val=[300], tensor_shape=shape_proto((1,))),
     "out of range"),
    # half_val holds 16-bit patterns: 70000 was an OverflowError (INTERNAL).
    (TensorProto(dtype=DT_HALF, half_val=[70000], tensor_shape=shape_proto((1,))),
     "out of range"),
    (TensorProto(dtype=DT_HALF, half_val=[-1], tensor_shape=shape_proto((1,))),
     "out of range"),
    (TensorProto(dtype=DT_FLOAT, float_val=[1, 2], tensor_shape=shape_proto((3,))),
     "needs 3 values"),
])
def test_what_does_not_add_up_is_invalid(proto: TensorProto, words: str | None) -> None:
    if words is None:  # a byte count that disagrees with the shape
        proto.tensor_content = proto.tensor_content[:-1]
        words = "needs 24 bytes of tensor_content, got 23"
    with pytest.raises(InvalidInput, match=words):
        to_numpy("x", proto)
