"""Pure conversions for KServe v2 over HTTP: JSON tensors and Triton's binary tensor data
extension, to and from the gRPC messages, so every check lives once (service.protocol.convert).

A request's tensors become raw contents of a ModelInferRequest: JSON `data` is packed with
numpy as the datatype says, binary data is sliced from the body as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput, clip
from service.protocol import convert
from service.protocol.datatypes import check_declared, element_count, numpy_dtype
from service.protocol.generated import grpc_predict_v2_pb2 as pb
from service.types import EndpointMetadata, InferRequest, TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"


def decode_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """Split a request body into its JSON object and the binary data after it."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {clip(header_length)}, the body has "
                               f"{len(body)} bytes")
        json_part, binary = body[:size], body[size:]
    return json_object(json_part), binary


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must hold one JSON object (both REST APIs)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not JSON: {clip(str(exc), 200)}") from None
    if not isinstance(document, dict):
        raise InvalidInput("the request body must be a JSON object")
    return document


def _pack(name: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """JSON `data` (nested or flat, row-major) as the raw bytes of that datatype."""
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).ravel()
        items = [item.encode() if isinstance(item, str) else item for item in flat]
        if not all(isinstance(i, bytes) for i in items):
            raise InvalidInput(f"input {clip(name)}: BYTES data must be strings")
        return b"".join(len(i).to_bytes(4, "little") + i for i in items)
    dtype = numpy_dtype(datatype)  # NotFound-free: an unknown datatype is InvalidInput
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input {clip(name)}: data is not {datatype}: {exc}") from None
    if array.size != math.prod(shape):
        raise InvalidInput(f"input {clip(name)}: shape {shape} needs {math.prod(shape)} "
                           f"values, data has {array.size}")
    return array.astype(dtype.newbyteorder("<"), copy=False).tobytes()


def decode_request(body: bytes, header_length: str | None, model_name: str, version: str,
                   specs: Mapping[str, TensorSpec] | None = None, max_rows: int | None = None
                   ) -> tuple[InferRequest, set[str] | None]:
    """An HTTP infer request as an InferRequest, and which outputs go back as binary."""
    document, binary = decode_body(body, header_length)
    msg, binary_outputs = decode_infer(document, binary, model_name, version, specs, max_rows)
    return (convert.decode_infer_request(msg, specs=specs, max_rows=max_rows),
            binary_outputs)


def decode_infer(document: dict[str, Any], binary: bytes, model_name: str, version: str,
                 specs: Mapping[str, TensorSpec] | None = None, max_rows: int | None = None
                 ) -> tuple[pb.ModelInferRequest, set[str] | None]:
    """The gRPC twin of an HTTP infer request, and which outputs go back as binary
    (None: all, as the request's `binary_data_output` asks)."""
    msg = pb.ModelInferRequest(model_name=model_name, model_version=version)
    request_id = document.get("id", "")
    if not isinstance(request_id, str):  # str() of a list 1,000 deep: RecursionError
        raise InvalidInput(f"`id` must be a string, got {type(request_id).__name__}")
    msg.id = request_id
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("the request needs `inputs`: a list of {name, shape, datatype, "
                           "data or parameters.binary_data_size}")
    outputs = document.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidInput("`outputs` must be a list of objects with a string `name`")
    convert.check_counts(len(inputs), len(outputs))
    offset = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise InvalidInput(f"input #{i} must be a JSON object")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not (
                isinstance(shape, list) and all(isinstance(d, int) for d in shape)):
            raise InvalidInput(f"input #{i} needs a string `name` and `datatype` and an "
                               "integer list `shape`")
        # Cheap checks before any data is packed: the datatype, the shape's size.
        convert.check_datatype(name, datatype, (specs or {}).get(name))
        element_count(name, shape)
        check_declared(name, shape, specs, max_rows)
        size = _parameters(tensor, f"input {clip(name)}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input {clip(name)}: binary_data_size {clip(size)} runs "
                                   f"past the {len(binary) - offset} binary bytes left")
            raw = binary[offset:offset + size]
            offset += size
        elif "data" in tensor:
            raw = _pack(name, datatype, shape, tensor["data"])
        else:
            raise InvalidInput(f"input {clip(name)} has neither `data` nor "
                               "parameters.binary_data_size")
        msg.inputs.add(name=name, datatype=datatype, shape=shape)
        msg.raw_input_contents.append(raw)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the inputs "
                           "that no input claims")
    binary_outputs: set[str] | None = set()
    if _parameters(document, "the request").get("binary_data_output"):
        binary_outputs = None
    for out in outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInput("each of `outputs` must be an object with a string `name`")
        msg.outputs.add(name=out["name"])
        if binary_outputs is not None and _parameters(out, f"output {clip(out['name'])}"
                                                      ).get("binary_data"):
            binary_outputs.add(out["name"])
    return msg, binary_outputs


def _parameters(obj: dict[str, Any], what: str) -> dict[str, Any]:
    """An object's `parameters`: absent or a JSON object."""
    parameters = obj.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{what}: `parameters` must be a JSON object")
    return parameters


def encode_infer(msg: pb.ModelInferResponse, binary_outputs: set[str] | None
                 ) -> tuple[bytes, int | None]:
    """An HTTP infer answer: the body, and the JSON part's length when binary data follows."""
    outputs, chunks = [], []
    for tensor, raw in zip(msg.outputs, msg.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}
        if binary_outputs is None or tensor.name in binary_outputs:
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _unpack(tensor, raw)
        outputs.append(entry)
    document = {"model_name": msg.model_name, "model_version": msg.model_version,
                "outputs": outputs}
    if msg.id:
        document["id"] = msg.id
    head = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    return (head + b"".join(chunks), len(head)) if chunks else (head, None)


def _unpack(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes) -> Any:
    # The gRPC decoder reads our own raw contents back: one implementation of the layout.
    twin = pb.ModelInferRequest(model_name="m")
    twin.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    twin.raw_input_contents.append(raw)
    array = convert.decode_infer_request(twin).inputs[tensor.name].ravel()
    if tensor.datatype == "BYTES":
        return [b.decode("utf-8", "backslashreplace") for b in array]
    return np.ascontiguousarray(array)  # orjson writes numpy arrays natively


def model_metadata(meta: EndpointMetadata, model_name: str) -> dict[str, Any]:
    msg = convert.encode_model_metadata(meta, model_name)
    return {"name": msg.name, "versions": list(msg.versions), "platform": msg.platform,
            "inputs": [_tensor(t) for t in msg.inputs],
            "outputs": [_tensor(t) for t in msg.outputs]}


def _tensor(t: pb.ModelMetadataResponse.TensorMetadata) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
