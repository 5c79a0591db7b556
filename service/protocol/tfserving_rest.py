"""Pure conversions for TensorFlow Serving's REST API: `instances` (rows) and `inputs`
(columns) in, `predictions` and `outputs` out, bytes as {"b64": ...}, as TF Serving does.

JSON carries no dtypes: values take the endpoint's declared input dtype, as TF Serving
takes the signature's.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import json_format

from service.errors import InvalidInput, clip
from service.protocol.convert import check_counts
from service.protocol.datatypes import MAX_RANK
from service.protocol.tfserving import signature_def
from service.types import STRING, EndpointMetadata, InferRequest, Target, TensorSpec


def _bytes_in(value: Any, depth: int = 0) -> Any:
    """Nested JSON with {"b64": ...} objects and strings as bytes. Nesting deeper than a
    tensor's rank can be is refused before it exhausts Python's recursion limit."""
    if depth > MAX_RANK:
        raise InvalidInput(f"the values are nested deeper than {MAX_RANK} levels: a tensor "
                           f"has at most {MAX_RANK} dimensions")
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise InvalidInput(f"a JSON object inside a tensor must be {{\"b64\": ...}}, got "
                               f"keys {clip(sorted(value)[:5])}")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except binascii.Error as exc:
            raise InvalidInput(f"b64 value is not base64: {exc}") from None
    if isinstance(value, list):
        return [_bytes_in(v, depth + 1) for v in value]
    return value.encode() if isinstance(value, str) else value


def _array(spec: TensorSpec, values: Any) -> np.ndarray:
    try:
        if spec.dtype == STRING:
            nested = _bytes_in(values)
            array = np.array(nested, dtype=object)
            if any(not isinstance(v, bytes) for v in array.ravel()):
                raise InvalidInput(f"input {clip(spec.name)} takes strings (or {{\"b64\": ...}})")
            return array
        return np.asarray(values, dtype=spec.dtype)  # a {"b64"} object here: TypeError
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"input {clip(spec.name)}: the values are not a rectangular "
                           f"{spec.dtype} tensor: {exc}") from None


def decode_predict(document: Any, model: str, version: str | None,
                   target: Target) -> tuple[InferRequest, bool]:
    """The request, decoded against the endpoint it resolved to, and whether it came in
    row format (so answers go back as rows)."""
    if not isinstance(document, dict):
        raise InvalidInput("the request body must be a JSON object")
    unknown = set(document) - {"signature_name", "instances", "inputs", "output_filter"}
    if unknown or ("instances" in document) == ("inputs" in document):
        raise InvalidInput("the request needs exactly one of `instances` (rows) or `inputs` "
                           "(columns), plus optional `signature_name` and `output_filter`"
                           + (f"; unknown keys {sorted(unknown)}" if unknown else ""))
    specs = {**target.inputs, **target.optional}
    required = target.inputs
    row_format = "instances" in document
    if row_format:
        instances = document["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("`instances` must be a non-empty list of rows")
        if all(isinstance(r, dict) for r in instances) and not (
                len(required) == 1 and spec_takes_objects(required, instances)):
            columns = {name: [r.get(name) for r in instances] for name in specs
                       if name in required or any(r.get(name) is not None for r in instances)}
            unknown = {k for r in instances for k in r} - set(specs)
            missing = [n for n, c in columns.items() if any(v is None for v in c)]
            if unknown or missing:
                raise InvalidInput(f"each instance needs inputs {sorted(specs)}"
                                   + (f"; missing {missing}" if missing else "")
                                   + (f"; unexpected {clip(sorted(unknown))}" if unknown else ""))
        elif len(required) == 1:
            columns = {next(iter(required)): instances}
        else:
            raise InvalidInput(f"the endpoint takes inputs {sorted(specs)}: each instance must "
                               "be an object naming them")
    else:
        given = document["inputs"]
        if isinstance(given, dict) and not (len(required) == 1 and "b64" in given):
            columns = given
        elif len(required) == 1:
            columns = {next(iter(required)): given}
        else:
            raise InvalidInput(f"the endpoint takes inputs {sorted(specs)}: `inputs` must be "
                               "an object naming them")
    extra = sorted(set(columns) - set(specs))
    if extra:
        raise InvalidInput(f"unexpected inputs {clip(extra)}; the endpoint takes "
                           f"{sorted(specs)}")
    outputs = document.get("output_filter") or []
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise InvalidInput("`output_filter` must be a list of output or tap names")
    check_counts(len(columns), len(outputs))  # before any value is converted
    if len(set(outputs)) != len(outputs):
        raise InvalidInput(f"output_filter names an output more than once: {clip(outputs)}")
    inputs = {name: _array(specs[name], value) for name, value in columns.items()}
    return InferRequest(model, inputs, target.endpoint, version, outputs), row_format


def spec_takes_objects(specs: Mapping[str, TensorSpec], instances: list[Any]) -> bool:
    """A single string input whose rows are {"b64": ...} objects, not named inputs."""
    (spec,) = specs.values()
    return spec.dtype == STRING and all(set(r) == {"b64"} for r in instances)


def _json_values(array: np.ndarray) -> Any:
    """Numbers stay numpy (orjson writes them natively); byte strings become JSON."""
    if array.dtype != object:
        return np.ascontiguousarray(array)
    return _bytes_out(array.tolist())


def _bytes_out(value: Any) -> Any:
    if isinstance(value, list):
        return [_bytes_out(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode()}
    return value


def encode_predict(outputs: dict[str, np.ndarray], row_format: bool) -> dict[str, Any]:
    """`predictions` (rows) or `outputs` (columns); one output stands alone, several are
    named."""
    if row_format:
        if len(outputs) == 1:
            return {"predictions": _json_values(next(iter(outputs.values())))}
        columns = {name: _json_values(a) for name, a in outputs.items()}
        count = len(next(iter(columns.values())))
        return {"predictions": [{n: c[i] for n, c in columns.items()} for i in range(count)]}
    if len(outputs) == 1:
        return {"outputs": _json_values(next(iter(outputs.values())))}
    return {"outputs": {name: _json_values(a) for name, a in outputs.items()}}


def model_status(statuses: list[tuple[int, str, str]]) -> dict[str, Any]:
    states = {"READY": "AVAILABLE", "LOADING": "LOADING", "UNLOADING": "UNLOADING",
              "UNAVAILABLE": "END"}
    return {"model_version_status": [
        {"version": str(version), "state": states[state],
         "status": {"error_code": "UNKNOWN" if reason and state != "READY" else "OK",
                    "error_message": reason if state != "READY" else ""}}
        for version, state, reason in statuses]}


def model_metadata(model: str, version: int, default: str,
                   endpoints: list[EndpointMetadata]) -> dict[str, Any]:
    signatures = {meta.endpoint: json_format.MessageToDict(
        signature_def(meta), preserving_proto_field_name=True) for meta in endpoints}
    signatures["serving_default"] = signatures[default]
    return {"model_spec": {"name": model, "signature_name": "", "version": str(version)},
            "metadata": {"signature_def": {"signature_def": signatures}}}
