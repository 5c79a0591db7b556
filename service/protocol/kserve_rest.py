"""Pure conversions for KServe v2 over HTTP: JSON tensors and Triton's binary tensor data
extension, straight to and from numpy, through the checks and raw decoding the gRPC door
uses (service.protocol.convert), so every check lives once and runs once.

JSON `data` becomes an array of the datatype's dtype; binary data is decoded from the body
as raw contents are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput, clip
from service.protocol import convert
from service.protocol.datatypes import numpy_dtype, to_kserve
from service.protocol.generated import grpc_predict_v2_pb2 as pb
from service.types import EndpointMetadata, InferRequest, InferResponse, TensorSpec

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


def decode_request(body: bytes, header_length: str | None, model: str, endpoint: str | None,
                   version: str | None, specs: Mapping[str, TensorSpec] | None = None,
                   max_rows: int | None = None) -> tuple[InferRequest, set[str] | None]:
    """An HTTP infer request as an InferRequest, and which outputs go back as binary."""
    document, binary = decode_body(body, header_length)
    return decode_infer(document, binary, model, endpoint, version, specs, max_rows)


def decode_infer(document: dict[str, Any], binary: bytes, model: str, endpoint: str | None,
                 version: str | None, specs: Mapping[str, TensorSpec] | None = None,
                 max_rows: int | None = None) -> tuple[InferRequest, set[str] | None]:
    """The request's tensors straight to numpy, through the checks a gRPC request passes
    (service.protocol.convert), and which outputs go back as binary (None: all, as the
    request's `binary_data_output` asks)."""
    request_id = document.get("id", "")
    if not isinstance(request_id, str):  # str() of a list 1,000 deep: RecursionError
        raise InvalidInput(f"`id` must be a string, got {type(request_id).__name__}")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("the request needs `inputs`: a list of {name, shape, datatype, "
                           "data or parameters.binary_data_size}")
    outputs = document.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidInput("`outputs` must be a list of objects with a string `name`")
    convert.check_counts(len(inputs), len(outputs))
    # The cheap checks first, for every input: names, datatypes, shapes; then the data.
    headers = [_header(i, tensor) for i, tensor in enumerate(inputs)]
    shapes = convert.check_inputs(headers, specs, max_rows)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for header, tensor in zip(headers, inputs, strict=True):
        name = header.name
        size = _parameters(tensor, f"input {clip(name)}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input {clip(name)}: binary_data_size {clip(size)} runs "
                                   f"past the {len(binary) - offset} binary bytes left")
            raw = binary[offset:offset + size]
            offset += size
            arrays[name] = convert.decode_raw(header, raw, *shapes[name])
        elif "data" in tensor:
            arrays[name] = _from_json(header, tensor["data"], *shapes[name])
        else:
            raise InvalidInput(f"input {clip(name)} has neither `data` nor "
                               "parameters.binary_data_size")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the inputs "
                           "that no input claims")
    binary_outputs: set[str] | None = set()
    if _parameters(document, "the request").get("binary_data_output"):
        binary_outputs = None
    names: list[str] = []
    for out in outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInput("each of `outputs` must be an object with a string `name`")
        names.append(out["name"])
        if binary_outputs is not None and _parameters(out, f"output {clip(out['name'])}"
                                                      ).get("binary_data"):
            binary_outputs.add(out["name"])
    request = InferRequest(model, arrays, endpoint, version,
                           convert.requested_outputs(names), request_id)
    return request, binary_outputs


def _header(i: int, tensor: Any) -> pb.ModelInferRequest.InferInputTensor:
    """An input's name, datatype and shape, as the gRPC request carries them."""
    if not isinstance(tensor, dict):
        raise InvalidInput(f"input #{i} must be a JSON object")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not (
            isinstance(shape, list) and all(isinstance(d, int) for d in shape)):
        raise InvalidInput(f"input #{i} needs a string `name` and `datatype` and an "
                           "integer list `shape`")
    try:
        return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype,
                                                      shape=shape)
    except ValueError:  # a dimension past int64
        raise InvalidInput(f"input {clip(name)}: shape {clip(shape)} has a dimension "
                           "past int64") from None


def _from_json(header: pb.ModelInferRequest.InferInputTensor, data: Any,
               shape: tuple[int, ...], count: int) -> np.ndarray:
    """JSON `data` (nested or flat, row-major) as an array of the input's datatype."""
    name, datatype = header.name, header.datatype
    if datatype == "BYTES":
        try:
            flat = np.asarray(data, dtype=object).ravel()
        except ValueError as exc:  # ragged lists
            raise InvalidInput(f"input {clip(name)}: data is not BYTES: {exc}") from None
        if not all(isinstance(item, str) for item in flat):
            raise InvalidInput(f"input {clip(name)}: BYTES data must be strings")
        if flat.size != count:
            raise InvalidInput(f"input {clip(name)}: shape {list(shape)} needs {count} BYTES "
                               f"elements, got {flat.size}")
        array = np.empty(count, dtype=object)
        array[:] = [item.encode() for item in flat]
        return array.reshape(shape)
    dtype = numpy_dtype(datatype)
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input {clip(name)}: data is not {datatype}: {exc}") from None
    if array.size != count:
        raise InvalidInput(f"input {clip(name)}: shape {list(shape)} needs {count} "
                           f"values, data has {array.size}")
    return array.reshape(shape)


def _parameters(obj: dict[str, Any], what: str) -> dict[str, Any]:
    """An object's `parameters`: absent or a JSON object."""
    parameters = obj.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{what}: `parameters` must be a JSON object")
    return parameters


def encode_infer(response: InferResponse, model_name: str, binary_outputs: set[str] | None
                 ) -> tuple[bytes, int | None]:
    """An HTTP infer answer under the name the client asked for: the body, and the JSON
    part's length when binary data follows."""
    outputs, chunks = [], []
    for name, value in response.outputs.items():
        array = np.asarray(value)
        datatype = to_kserve(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype,
                                 "shape": list(array.shape)}
        if binary_outputs is None or name in binary_outputs:
            raw = convert.encode_raw(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [_text(item) for item in array.ravel()]
        else:
            entry["data"] = np.ascontiguousarray(array).ravel()  # orjson writes it natively
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": model_name,
                                "model_version": str(response.version), "outputs": outputs}
    if response.id:
        document["id"] = response.id
    head = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    return (head + b"".join(chunks), len(head)) if chunks else (head, None)


def _text(item: object) -> str:
    """A BYTES output element as JSON text (bytes that are not UTF-8 escaped)."""
    if isinstance(item, str):
        return item
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item).decode("utf-8", "backslashreplace")
    raise TypeError(f"a BYTES output holds {type(item).__name__}, not bytes or str")


def model_metadata(meta: EndpointMetadata, model_name: str) -> dict[str, Any]:
    msg = convert.encode_model_metadata(meta, model_name)
    return {"name": msg.name, "versions": list(msg.versions), "platform": msg.platform,
            "inputs": [_tensor(t) for t in msg.inputs],
            "outputs": [_tensor(t) for t in msg.outputs]}


def _tensor(t: pb.ModelMetadataResponse.TensorMetadata) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
