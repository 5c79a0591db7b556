"""Pure conversions between TensorFlow's TensorProto (TF Serving's tensors) and numpy.

The messages are generated from protos/tf_framework.proto (no TensorFlow needed).

Both of TensorProto's encodings are read: `tensor_content` (raw little-endian bytes, what
`tf.make_tensor_proto` writes for numbers) and the typed `*_val` fields. Answers use
`tensor_content` for numbers (one copy, no per-element boxing) and `string_val` for bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from service.errors import InvalidInput, clip
from service.protocol.datatypes import check_declared, element_count
from service.protocol.generated import tf_framework_pb2 as framework_pb2
from service.protocol.repeated import to_array
from service.types import STRING, TensorSpec

# numpy dtype name (or "string") -> (DataType, the typed field that can hold it)
_TYPES: dict[str, tuple[framework_pb2.DataType, str]] = {
    "float16": (framework_pb2.DT_HALF, "half_val"),
    "float32": (framework_pb2.DT_FLOAT, "float_val"),
    "float64": (framework_pb2.DT_DOUBLE, "double_val"),
    "int8": (framework_pb2.DT_INT8, "int_val"),
    "int16": (framework_pb2.DT_INT16, "int_val"),
    "int32": (framework_pb2.DT_INT32, "int_val"),
    "int64": (framework_pb2.DT_INT64, "int64_val"),
    "uint8": (framework_pb2.DT_UINT8, "int_val"),
    "uint16": (framework_pb2.DT_UINT16, "int_val"),
    "uint32": (framework_pb2.DT_UINT32, "uint32_val"),
    "uint64": (framework_pb2.DT_UINT64, "uint64_val"),
    "bool": (framework_pb2.DT_BOOL, "bool_val"),
    STRING: (framework_pb2.DT_STRING, "string_val"),
}
_NAMES = {enum: name for name, (enum, _) in _TYPES.items()}
# What a typed field holds, where narrower types travel in it (checked for range).
_HELD = {"int_val": np.dtype(np.int64), "uint32_val": np.dtype(np.uint64),
         "half_val": np.dtype(np.int64)}


def data_type(dtype: str) -> framework_pb2.DataType:
    """The DataType enum of an internal dtype name."""
    return _TYPES[dtype][0]


def dtype_name(enum: int) -> str:
    """DT_FLOAT -> "DT_FLOAT", for messages."""
    known = enum in framework_pb2.DataType.values()
    return framework_pb2.DataType.Name(enum) if known else str(enum)


def shape_proto(shape: tuple[int | None, ...]) -> framework_pb2.TensorShapeProto:
    """A shape with unknown dimensions as -1."""
    return framework_pb2.TensorShapeProto(
        dim=[framework_pb2.TensorShapeProto.Dim(size=-1 if d is None else d) for d in shape])


def to_numpy(name: str, proto: framework_pb2.TensorProto,
             specs: Mapping[str, TensorSpec] | None = None, max_rows: int | None = None
             ) -> np.ndarray:
    """One request tensor as numpy; InvalidInput says what does not add up. With `specs`
    (the endpoint's inputs by name), its name, dtype and shape are checked before any
    value is read, and with `max_rows` its rows (Overloaded)."""
    spec = (specs or {}).get(name)
    if proto.dtype not in _NAMES:
        raise InvalidInput(f"input {clip(name)}: dtype {dtype_name(proto.dtype)} is not "
                           f"served; use one of {', '.join(dtype_name(e) for e in _NAMES)}")
    internal = _NAMES[proto.dtype]
    if spec is not None and spec.dtype != internal:
        raise InvalidInput(f"input {clip(name)} must be {spec.dtype}, got {internal} "
                           f"({dtype_name(proto.dtype)}); send "
                           f"{dtype_name(data_type(spec.dtype))}")
    if proto.tensor_shape.unknown_rank:
        raise InvalidInput(f"input {clip(name)}: the tensor has no shape (unknown_rank)")
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    count = element_count(name, shape)
    check_declared(name, shape, specs, max_rows)
    if internal == STRING:
        if len(proto.string_val) != count:
            raise InvalidInput(f"input {clip(name)}: shape {list(shape)} needs {count} strings in "
                               f"string_val, got {len(proto.string_val)}")
        return to_array(proto.string_val, "object", count).reshape(shape)
    dtype = np.dtype(internal)
    if proto.tensor_content:
        expected = count * dtype.itemsize
        if len(proto.tensor_content) != expected:
            raise InvalidInput(f"input {clip(name)}: shape {list(shape)} of {internal} needs "
                               f"{expected} bytes of tensor_content, got "
                               f"{len(proto.tensor_content)}")
        return np.frombuffer(proto.tensor_content, dtype=dtype.newbyteorder("<")).astype(
            dtype, copy=False).reshape(shape)
    field = _TYPES[internal][1]
    values = getattr(proto, field)
    if len(values) != count:
        raise InvalidInput(f"input {clip(name)}: shape {list(shape)} needs {count} values in "
                           f"{field} (or tensor_content), got {len(values)}")
    held = to_array(values, _HELD.get(field, dtype), count)
    if internal == "float16":  # half_val holds the bit patterns, in int32s
        bits = np.dtype(np.uint16)
        _check_range(name, proto.dtype, held, bits)
        return held.astype(bits).view(np.float16).reshape(shape)
    _check_range(name, proto.dtype, held, dtype)
    return held.astype(dtype).reshape(shape)


def _check_range(name: str, enum: int, held: np.ndarray, dtype: np.dtype) -> None:
    """Refuse values a narrower integer type (or half_val's 16 bits) cannot hold."""
    if dtype.kind in "iu" and held.dtype != dtype and held.size:
        info = np.iinfo(dtype)
        if held.min() < info.min or held.max() > info.max:
            raise InvalidInput(f"input {clip(name)}: values out of range for "
                               f"{dtype_name(enum)} [{info.min}, {info.max}]")


def from_numpy(array: np.ndarray) -> framework_pb2.TensorProto:
    """An output as a TensorProto: tensor_content for numbers, string_val for bytes."""
    array = np.asarray(array)
    internal = STRING if array.dtype == object else array.dtype.name
    proto = framework_pb2.TensorProto(dtype=data_type(internal),
                                   tensor_shape=shape_proto(array.shape))
    if internal == STRING:
        proto.string_val.extend(v.encode() if isinstance(v, str) else bytes(v)
                                for v in array.ravel())
    else:
        proto.tensor_content = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return proto
