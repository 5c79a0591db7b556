"""Pure conversions between KServe v2 protobuf messages and service.types.

No I/O and no server state: every function here is tested alone (tests/protocol/test_convert.py).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from service.config import LABEL_PATTERN
from service.errors import InvalidInput, NotFound
from service.protocol.datatypes import numpy_dtype, to_internal, to_kserve
from service.protocol.generated import grpc_predict_v2_pb2 as pb
from service.statistics import Duration, VersionStatistics
from service.types import STRING, EndpointMetadata, InferRequest, InferResponse, TensorSpec

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_VERSION = re.compile(r"[0-9]+")
# Each raw BYTES element is prefixed by its length as a 4-byte little-endian unsigned int.
_LENGTH = struct.Struct("<I")

# KServe datatype -> (InferTensorContents field, numpy dtype that field holds). FP16 has none:
# the protocol only carries it raw.
_CONTENTS: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "bool"),
    "INT8": ("int_contents", "int32"),
    "INT16": ("int_contents", "int32"),
    "INT32": ("int_contents", "int32"),
    "INT64": ("int64_contents", "int64"),
    "UINT8": ("uint_contents", "uint32"),
    "UINT16": ("uint_contents", "uint32"),
    "UINT32": ("uint_contents", "uint32"),
    "UINT64": ("uint64_contents", "uint64"),
    "FP32": ("fp32_contents", "float32"),
    "FP64": ("fp64_contents", "float64"),
    "BYTES": ("bytes_contents", "object"),
}


def parse_model_name(name: str) -> tuple[str, str | None]:
    """Split a KServe model name into (model, endpoint): "ae" -> ("ae", None).

    A name that cannot exist ("", "a.", "a b") is NotFound, like any unknown model.
    """
    model, dot, endpoint = name.partition(".")
    if not _NAME.fullmatch(model) or (dot and not _NAME.fullmatch(endpoint)):
        raise NotFound(
            f"no model {name!r}: a model name is <model> or <model>.<endpoint>, "
            "each made of letters, digits, '_' and '-'"
        )
    return model, endpoint if dot else None


def parse_version(version: str) -> str | None:
    """A KServe model_version: a positive number or a label; "" (the highest) is None."""
    if version == "":
        return None
    if _VERSION.fullmatch(version):
        if int(version) == 0:
            raise NotFound(f"no version {version!r}: versions are positive integers")
        return str(int(version))
    if not re.fullmatch(LABEL_PATTERN, version):
        raise NotFound(f"no version {version!r}: a version is a positive integer or a label "
                       "(a letter, then letters, digits, '_' and '-')")
    return version


def check_repository_request(
    msg: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest,
) -> None:
    """The repository API's request: one repository, a model name, no parameters."""
    if msg.repository_name:
        raise NotFound(f"no repository {msg.repository_name!r}: this server serves one "
                       "model repository; leave repository_name empty")
    if not _NAME.fullmatch(msg.model_name):
        raise NotFound(f"no model {msg.model_name!r}: model names are made of letters, "
                       "digits, '_' and '-'")
    # tritonclient's unload always says whether to unload dependents: none exist here.
    unsupported = sorted(set(msg.parameters) - {"unload_dependents"})
    if unsupported:
        raise InvalidInput(f"parameters {unsupported} are not supported: a model is loaded "
                           "from its folder in the repository as it is")


def decode_infer_request(
    msg: pb.ModelInferRequest, deadline: float | None = None
) -> InferRequest:
    """A ModelInferRequest as an InferRequest; raises InvalidInput or NotFound."""
    model, endpoint = parse_model_name(msg.model_name)
    version = parse_version(msg.model_version)
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs: "
            "send one per input, in the order of `inputs`"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(msg.inputs):
        if not tensor.name:
            raise InvalidInput(f"input #{i} has no name")
        if tensor.name in inputs:
            raise InvalidInput(f"input {tensor.name!r} is given more than once")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {tensor.name!r} has `contents` but the request uses "
                    "raw_input_contents: use one or the other for all inputs"
                )
            # Index once: each access of a repeated bytes field copies the bytes.
            inputs[tensor.name] = _decode_raw(tensor, raw[i])
        else:
            inputs[tensor.name] = _decode_typed(tensor)
    return InferRequest(
        model=model,
        endpoint=endpoint,
        version=version,
        inputs=inputs,
        outputs=_requested_outputs(msg.outputs),
        id=msg.id,
        deadline=deadline,
    )


def encode_infer_response(resp: InferResponse, model_name: str) -> pb.ModelInferResponse:
    """An InferResponse as a ModelInferResponse carrying raw_output_contents.

    `model_name` is the name the client asked for ("<model>" or "<model>.<endpoint>"), so
    the client sees its own name echoed back.
    """
    msg = pb.ModelInferResponse(model_name=model_name, model_version=str(resp.version), id=resp.id)
    for name, value in resp.outputs.items():
        array = np.asarray(value)
        datatype = to_kserve(array.dtype)
        msg.outputs.add(name=name, datatype=datatype, shape=array.shape)
        msg.raw_output_contents.append(_encode_raw(array, datatype))
    return msg


def encode_model_metadata(meta: EndpointMetadata, model_name: str) -> pb.ModelMetadataResponse:
    """An endpoint's metadata under the name the client asked for; unknown dims are -1."""
    return pb.ModelMetadataResponse(
        name=model_name,
        versions=[str(v) for v in meta.versions],
        platform=meta.platform,
        inputs=[_tensor_metadata(spec) for spec in meta.inputs],
        outputs=[_tensor_metadata(spec) for spec in meta.outputs],
    )


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name,
        datatype=to_kserve(spec.dtype),
        shape=[-1 if dim is None else dim for dim in spec.shape],
    )


def _shape(tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[tuple[int, ...], int]:
    """The tensor's shape and element count; a negative dimension is InvalidInput."""
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"input {tensor.name!r}: shape {list(shape)} has a negative dimension")
    return shape, math.prod(shape)


def _decode_typed(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    internal = to_internal(tensor.datatype)
    shape, count = _shape(tensor)
    if tensor.datatype not in _CONTENTS:
        raise InvalidInput(
            f"input {tensor.name!r}: {tensor.datatype} data must be sent in raw_input_contents "
            "(InferTensorContents has no field for it)"
        )
    field, held = _CONTENTS[tensor.datatype]
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input {tensor.name!r}: shape {list(shape)} needs {count} elements "
            f"in contents.{field}, got {len(values)}"
        )
    if internal == STRING:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    array = np.fromiter(values, dtype=held, count=count)
    target = np.dtype(internal)
    # INT8/16 and UINT8/16 travel in 32-bit fields: refuse values that do not fit.
    if target != array.dtype and count:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(
                f"input {tensor.name!r}: values out of range for {tensor.datatype} "
                f"[{info.min}, {info.max}]"
            )
    return array.astype(target, copy=False).reshape(shape)


def _decode_raw(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes) -> np.ndarray:
    dtype = numpy_dtype(tensor.datatype)
    shape, count = _shape(tensor)
    if dtype.kind == "O":  # BYTES
        return _split_bytes(tensor.name, raw, shape, count)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input {tensor.name!r}: shape {list(shape)} of {tensor.datatype} needs "
            f"{expected} bytes, got {len(raw)}"
        )
    # frombuffer shares `raw` (an immutable bytes object the array keeps alive): no copy.
    # The array is read-only; astype only copies on a big-endian host.
    array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
    return array.reshape(shape)


def _split_bytes(name: str, raw: bytes, shape: tuple[int, ...], count: int) -> np.ndarray:
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise InvalidInput(
                f"input {name!r}: BYTES element {len(elements)} is cut inside its 4-byte length"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidInput(
                f"input {name!r}: BYTES element {len(elements)} declares {length} bytes, "
                f"only {len(raw) - offset} remain"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} needs {count} BYTES elements, "
            f"got {len(elements)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array.reshape(shape)


def _encode_raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return _join_bytes(array.ravel())
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _join_bytes(items: Iterable[object]) -> bytes:
    parts: list[bytes] = []
    for item in items:
        if isinstance(item, str):
            data = item.encode("utf-8")
        elif isinstance(item, bytes | bytearray | memoryview):
            data = bytes(item)
        else:
            raise TypeError(f"a BYTES output holds {type(item).__name__}, not bytes or str")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _requested_outputs(
    outputs: Iterable[pb.ModelInferRequest.InferRequestedOutputTensor],
) -> list[str]:
    names: list[str] = []
    for out in outputs:
        if out.name in names:
            raise InvalidInput(f"output {out.name!r} is requested more than once")
        names.append(out.name)
    return names


def statistics_document(rows: list[tuple[str, int, VersionStatistics]]) -> dict[str, Any]:
    """Triton's statistics layout (its HTTP JSON; ParseDict makes the gRPC message of it)."""
    def duration(d: Duration) -> dict[str, int]:
        return {"count": d.count, "ns": d.ns}

    empty = duration(Duration())
    return {"model_stats": [{
        "name": name, "version": str(version), "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count, "execution_count": s.execution_count,
        "inference_stats": {
            "success": duration(s.success), "fail": duration(s.fail),
            "queue": duration(s.queue), "compute_input": empty,
            "compute_infer": duration(s.compute_infer), "compute_output": empty,
            "cache_hit": empty, "cache_miss": empty},
        "batch_stats": [{"batch_size": size, "compute_input": empty,
                         "compute_infer": duration(d), "compute_output": empty}
                        for size, d in sorted(s.batches.items())],
    } for name, version, s in rows]}
