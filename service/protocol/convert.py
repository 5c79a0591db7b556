"""Pure conversions between KServe v2 protobuf messages and service.types.

No I/O and no server state: every function here is tested alone (tests/protocol/test_convert.py).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from service.config import LABEL_PATTERN
from service.errors import InvalidInput, NotFound, clip
from service.protocol.datatypes import (
    check_declared,
    element_count,
    numpy_dtype,
    to_internal,
    to_kserve,
)
from service.protocol.generated import grpc_predict_v2_pb2 as pb
from service.protocol.repeated import to_array
from service.statistics import Duration, VersionStatistics
from service.types import STRING, EndpointMetadata, InferRequest, InferResponse, TensorSpec

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_VERSION = re.compile(r"[0-9]+")
_MAX_VERSION_DIGITS = 19
# Each raw BYTES element is prefixed by its length as a 4-byte little-endian unsigned int.
_LENGTH = struct.Struct("<I")
# Per request. A model with more inputs than MAX_INPUTS does not exist here; outputs are
# checked one by one against the endpoint, so a flood of them costs time on the event loop.
MAX_INPUTS = 64
MAX_OUTPUTS = 1024
# Requests larger than this are decoded on a thread, not the event loop (service.protocol
# .kserve.decoded): splitting millions of BYTES elements takes seconds.
DECODE_INLINE_BYTES = 1 << 20
DECODE_INLINE_ELEMENTS = 1 << 18  # as many as 1 MiB of FP32

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
            f"no model {clip(name)}: a model name is <model> or <model>.<endpoint>, "
            "each made of letters, digits, '_' and '-'"
        )
    return model, endpoint if dot else None


def client_names(name: str) -> tuple[str, str | None]:
    """(model, endpoint) of a KServe model name for the log and labels of a request refused
    before it was read: parsed, or the name as it is when it cannot be one."""
    try:
        return parse_model_name(name)
    except NotFound:
        return name, None


def parse_version(version: str) -> str | None:
    """A KServe model_version: a positive number or a label; "" (the highest) is None."""
    if version == "":
        return None
    if _VERSION.fullmatch(version):
        # Versions are int64 (19 digits): longer digit strings are no version, and int()
        # refuses 4,300+ digits (ValueError: INTERNAL).
        if len(version) > _MAX_VERSION_DIGITS or int(version) == 0:
            raise NotFound(f"no version {clip(version)}: versions are positive integers")
        return str(int(version))
    if not re.fullmatch(LABEL_PATTERN, version):
        raise NotFound(f"no version {clip(version)}: a version is a positive integer or a label "
                       "(a letter, then letters, digits, '_' and '-')")
    return version


def check_repository_request(
    msg: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest,
) -> None:
    """The repository API's request: one repository, a model name, no parameters."""
    if msg.repository_name:
        raise NotFound(f"no repository {clip(msg.repository_name)}: this server serves one "
                       "model repository; leave repository_name empty")
    if not _NAME.fullmatch(msg.model_name):
        raise NotFound(f"no model {clip(msg.model_name)}: model names are made of letters, "
                       "digits, '_' and '-'")
    # tritonclient's unload always says whether to unload dependents: none exist here.
    unsupported = sorted(set(msg.parameters) - {"unload_dependents"})
    if unsupported:
        raise InvalidInput(f"parameters {clip(unsupported)} are not supported: a model is loaded "
                           "from its folder in the repository as it is")


def infer_target(msg: pb.ModelInferRequest) -> tuple[str, str | None, str | None]:
    """The (model, endpoint, version) a ModelInferRequest asks for; raises NotFound."""
    model, endpoint = parse_model_name(msg.model_name)
    return model, endpoint, parse_version(msg.model_version)


def declared_elements(shapes: Iterable[Iterable[int]]) -> int:
    """The elements a request's shapes declare, all inputs together (unchecked: a bad
    shape counts as large, and its decoder refuses it)."""
    total = 0
    for shape in shapes:
        count = 1
        for dim in shape:
            count *= max(dim, 1)
        total += count
        if total > DECODE_INLINE_ELEMENTS:  # enough to know
            break
    return total


def check_counts(inputs: int, outputs: int) -> None:
    """Refuse more inputs or requested outputs than a request may carry."""
    if inputs > MAX_INPUTS:
        raise InvalidInput(f"the request has {inputs} inputs; at most {MAX_INPUTS} are "
                           "accepted")
    if outputs > MAX_OUTPUTS:
        raise InvalidInput(f"the request asks for {outputs} outputs; at most {MAX_OUTPUTS} "
                           "are accepted per request: split it")


def check_datatype(name: str, datatype: str, spec: TensorSpec | None) -> None:
    """Refuse an input whose datatype is not its endpoint input's, before its data is
    decoded (a BYTES tensor of millions of elements sent to an FP32 input costs nothing)."""
    if spec is not None and to_internal(datatype) != spec.dtype:
        raise InvalidInput(f"input {clip(name)} must be {spec.dtype}, got "
                           f"{to_internal(datatype)} ({datatype}); send {to_kserve(spec.dtype)}")


def decode_infer_request(
    msg: pb.ModelInferRequest, deadline: float | None = None,
    specs: Mapping[str, TensorSpec] | None = None, max_rows: int | None = None,
) -> InferRequest:
    """A ModelInferRequest as an InferRequest; raises InvalidInput, NotFound, or
    Overloaded for more than `max_rows` rows.

    `specs`, the endpoint's inputs by name when known, lets datatypes and declared
    shapes be checked before any tensor is decoded; the full checks against the endpoint
    come after (model.py). Cheap checks come first: counts, names, datatypes, shapes, then
    the data."""
    model, endpoint, version = infer_target(msg)
    check_counts(len(msg.inputs), len(msg.outputs))
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs: "
            "send one per input, in the order of `inputs`"
        )
    shapes = check_inputs(msg.inputs, specs, max_rows)
    outputs = requested_outputs(out.name for out in msg.outputs)
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(msg.inputs):
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {clip(tensor.name)} has `contents` but the request uses "
                    "raw_input_contents: use one or the other for all inputs"
                )
            # Index once: each access of a repeated bytes field copies the bytes.
            inputs[tensor.name] = decode_raw(tensor, raw[i], *shapes[tensor.name])
        else:
            inputs[tensor.name] = _decode_typed(tensor, *shapes[tensor.name])
    return InferRequest(
        model=model,
        endpoint=endpoint,
        version=version,
        inputs=inputs,
        outputs=outputs,
        id=msg.id,
        deadline=deadline,
    )


def check_inputs(tensors: Iterable[pb.ModelInferRequest.InferInputTensor],
                 specs: Mapping[str, TensorSpec] | None, max_rows: int | None = None
                 ) -> dict[str, tuple[tuple[int, ...], int]]:
    """Each input's (shape, element count) by name, after the checks that need no data:
    a name, given once, the endpoint's datatype, a shape numpy can make that the endpoint
    takes, at most `max_rows` rows (both REST and gRPC requests:
    service.protocol.kserve_rest builds the same headers)."""
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    for i, tensor in enumerate(tensors):
        if not tensor.name:
            raise InvalidInput(f"input #{i} has no name")
        if tensor.name in shapes:
            raise InvalidInput(f"input {clip(tensor.name)} is given more than once")
        check_datatype(tensor.name, tensor.datatype, (specs or {}).get(tensor.name))
        shapes[tensor.name] = _shape(tensor)
        check_declared(tensor.name, shapes[tensor.name][0], specs, max_rows)
    return shapes


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
        msg.raw_output_contents.append(encode_raw(array, datatype))
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
    """The tensor's shape and element count (InvalidInput for one numpy cannot make)."""
    shape = tuple(tensor.shape)
    return shape, element_count(tensor.name, shape)


def _decode_typed(tensor: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...],
                  count: int) -> np.ndarray:
    internal = to_internal(tensor.datatype)
    if tensor.datatype not in _CONTENTS:
        raise InvalidInput(
            f"input {clip(tensor.name)}: {tensor.datatype} data must be sent in raw_input_contents "
            "(InferTensorContents has no field for it)"
        )
    field, held = _CONTENTS[tensor.datatype]
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input {clip(tensor.name)}: shape {list(shape)} needs {count} elements "
            f"in contents.{field}, got {len(values)}"
        )
    # held is "object" for BYTES: an array of the bytes themselves.
    array = to_array(values, held, count)
    if internal == STRING:
        return array.reshape(shape)
    target = np.dtype(internal)
    # INT8/16 and UINT8/16 travel in 32-bit fields: refuse values that do not fit.
    if target != array.dtype and count:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(
                f"input {clip(tensor.name)}: values out of range for {tensor.datatype} "
                f"[{info.min}, {info.max}]"
            )
    return array.astype(target, copy=False).reshape(shape)


def decode_raw(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes,
                shape: tuple[int, ...], count: int) -> np.ndarray:
    dtype = numpy_dtype(tensor.datatype)
    if dtype.kind == "O":  # BYTES
        return _split_bytes(tensor.name, raw, shape, count)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input {clip(tensor.name)}: shape {list(shape)} of {tensor.datatype} needs "
            f"{expected} bytes, got {len(raw)}"
        )
    # frombuffer shares `raw` (an immutable bytes object the array keeps alive): no copy.
    # The array is read-only; astype only copies on a big-endian host.
    array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
    return array.reshape(shape)


def _split_bytes(name: str, raw: bytes, shape: tuple[int, ...], count: int) -> np.ndarray:
    if count * _LENGTH.size > len(raw):  # each element has its 4-byte length at least
        raise InvalidInput(f"input {clip(name)}: shape {list(shape)} needs {count} BYTES "
                           f"elements, at least {count * _LENGTH.size} bytes; got {len(raw)}")
    # Read exactly the declared count (however many the bytes hold), with as little per
    # element as Python allows: this loop is most of a large BYTES request's decode.
    elements: list[bytes] = [b""] * count
    unpack, end = _LENGTH.unpack_from, len(raw)
    offset = start = length = 0
    i = -1
    try:
        for i in range(count):
            (length,) = unpack(raw, offset)
            start = offset + _LENGTH.size
            offset = start + length
            elements[i] = raw[start:offset]
    except struct.error:  # element i's length is not all there (or not there at all)
        _refuse_split(name, shape, count, i, end, offset, start, length)
    if offset != end:
        _refuse_split(name, shape, count, count, end, offset, start, length)
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array.reshape(shape)


def _refuse_split(name: str, shape: tuple[int, ...], count: int, i: int, end: int,
                  offset: int, start: int, length: int) -> None:
    """Why splitting stopped at element i (at byte `offset`); the one before it started
    at `start` with `length` bytes."""
    if offset > end:
        raise InvalidInput(f"input {clip(name)}: BYTES element {i - 1} declares {length} "
                           f"bytes, only {end - start} remain")
    if offset == end:
        raise InvalidInput(f"input {clip(name)}: shape {list(shape)} needs {count} BYTES "
                           f"elements, got {i}")
    if i < count:
        raise InvalidInput(f"input {clip(name)}: BYTES element {i} is cut inside its 4-byte "
                           "length")
    raise InvalidInput(f"input {clip(name)}: shape {list(shape)} needs {count} BYTES "
                       f"elements; {end - offset} bytes follow the last of them")


def encode_raw(array: np.ndarray, datatype: str) -> bytes:
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


def requested_outputs(outputs: Iterable[str]) -> list[str]:
    """The output names a request asks for, each once."""
    names: list[str] = []
    seen: set[str] = set()  # a set: 60,000 names checked against a list took 21 s
    for name in outputs:
        if name in seen:
            raise InvalidInput(f"output {clip(name)} is requested more than once")
        seen.add(name)
        names.append(name)
    return names


def statistics_document(versions: list[tuple[str, int, VersionStatistics]]) -> dict[str, Any]:
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
    } for name, version, s in versions]}
