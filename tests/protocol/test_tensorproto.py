"""TensorProto <-> numpy, against TensorFlow's own make_tensor_proto / make_ndarray."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from service.errors import InvalidInput
from service.protocol.tensorproto import from_numpy, to_numpy

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
    packed = tf.make_tensor_proto(array)  # tensor_content, as clients send numbers
    np.testing.assert_array_equal(to_numpy("x", packed), array)
    assert to_numpy("x", packed).dtype == array.dtype
    typed = tensor_pb2.TensorProto(dtype=packed.dtype, tensor_shape=packed.tensor_shape)
    field = {"float16": "half_val", "float32": "float_val", "float64": "double_val",
             "int64": "int64_val", "uint32": "uint32_val", "uint64": "uint64_val",
             "bool": "bool_val"}.get(dtype, "int_val")
    values = array.view(np.uint16).ravel() if dtype == "float16" else array.ravel()
    getattr(typed, field).extend(values.tolist())
    np.testing.assert_array_equal(to_numpy("x", typed), array)


@pytest.mark.parametrize("dtype", SAMPLES)
def test_answers_read_back_with_make_ndarray(dtype: str) -> None:
    array = SAMPLES[dtype]
    back = tf.make_ndarray(from_numpy(array))
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype


def test_strings_round_trip() -> None:
    array = np.array([[b"red", b""], [b"\xff\x00", "é".encode()]], dtype=object)
    assert to_numpy("s", tf.make_tensor_proto(array)).tolist() == array.tolist()
    assert tf.make_ndarray(from_numpy(array)).tolist() == array.tolist()


@pytest.mark.parametrize(("proto", "words"), [
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_COMPLEX64), "DT_COMPLEX64 is not served"),
    (tf.make_tensor_proto(np.zeros((2, 3), np.float32)), None),
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_INT8, int_val=[300],
                            tensor_shape=tf.TensorShape([1]).as_proto()), "out of range"),
    # half_val holds 16-bit patterns: 70000 was an OverflowError (INTERNAL).
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_HALF, half_val=[70000],
                            tensor_shape=tf.TensorShape([1]).as_proto()), "out of range"),
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_HALF, half_val=[-1],
                            tensor_shape=tf.TensorShape([1]).as_proto()), "out of range"),
    (tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1, 2],
                            tensor_shape=tf.TensorShape([3]).as_proto()), "needs 3 values"),
])
def test_what_does_not_add_up_is_invalid(proto: tensor_pb2.TensorProto, words: str | None
                                         ) -> None:
    if words is None:  # a byte count that disagrees with the shape
        proto.tensor_content = proto.tensor_content[:-1]
        words = "needs 24 bytes of tensor_content, got 23"
    with pytest.raises(InvalidInput, match=words):
        to_numpy("x", proto)
