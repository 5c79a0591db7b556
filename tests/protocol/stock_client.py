"""Runs the stock tritonclient (and descriptor dumps) in a process of its own.

tritonclient's generated modules and ours both define the `inference.*` protobuf messages
under different file names, and one process's default descriptor pool refuses the second
("duplicate symbol"). So the tests run the stock client here, in a subprocess.

Usage: python stock_client.py [HOST:PORT] < plan.json > results.json
The plan is a JSON list of calls ({"op": ..., ...}); the output is one JSON result per call:
{"value": ...} or {"error": {"code": "NOT_FOUND", "message": ...}}.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import numpy as np


def describe_message(message: Any) -> dict[str, Any]:
    """A message descriptor's wire-relevant facts, nested types included."""
    return {
        "map_entry": message.GetOptions().map_entry,
        "fields": {
            f.name: {
                "number": f.number,
                "type": f.type,
                "repeated": f.is_repeated,
                "packed": f.is_packed,
                "message": f.message_type.full_name if f.message_type else None,
                "oneof": f.containing_oneof.name if f.containing_oneof else None,
            }
            for f in message.fields
        },
        "nested": {n.name: describe_message(n) for n in message.nested_types},
    }


def describe(call: dict[str, Any]) -> dict[str, Any]:
    """The descriptors of some messages and service methods of one generated module."""
    file = importlib.import_module(call["module"]).DESCRIPTOR
    service = file.services_by_name[call["service"].rpartition(".")[2]]
    return {
        "package": file.package,
        "service": service.full_name,
        "messages": {name: describe_message(file.message_types_by_name[name])
                     for name in call["messages"]},
        "methods": {m.name: [m.input_type.full_name, m.output_type.full_name,
                             m.client_streaming, m.server_streaming]
                    for m in service.methods if m.name in call["methods"]},
    }


def to_json(array: np.ndarray) -> list[Any]:
    if array.dtype.kind == "O":
        return [item.hex() for item in array.ravel().tolist()]
    return array.ravel().tolist()


def from_json(spec: dict[str, Any]) -> np.ndarray:
    from tritonclient.utils import triton_to_np_dtype

    if spec["datatype"] == "BYTES":
        array = np.empty(len(spec["data"]), dtype=object)
        array[:] = [bytes.fromhex(item) for item in spec["data"]]
    else:
        array = np.array(spec["data"], dtype=triton_to_np_dtype(spec["datatype"]))
    return array.reshape(spec["shape"])


def tensor_metadata(tensors: Any) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


def run(client: Any, call: dict[str, Any]) -> Any:
    import tritonclient.grpc as triton

    op = call["op"]
    if op == "live":
        return client.is_server_live()
    if op == "ready":
        return client.is_server_ready()
    if op == "model_ready":
        return client.is_model_ready(call["name"], call.get("version", ""))
    if op == "server_metadata":
        meta = client.get_server_metadata()
        return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}
    if op == "model_metadata":
        meta = client.get_model_metadata(call["name"], call.get("version", ""))
        return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
                "inputs": tensor_metadata(meta.inputs), "outputs": tensor_metadata(meta.outputs)}
    if op == "infer":
        inputs = []
        for spec in call["inputs"]:
            tensor = triton.InferInput(spec["name"], spec["shape"], spec["datatype"])
            tensor.set_data_from_numpy(from_json(spec))
            inputs.append(tensor)
        outputs = [triton.InferRequestedOutput(name) for name in call.get("outputs", [])]
        result = client.infer(call["name"], inputs, model_version=call.get("version", ""),
                              outputs=outputs or None, request_id=call.get("id", ""),
                              client_timeout=call.get("timeout"))
        response = result.get_response()
        return {
            "model_name": response.model_name,
            "model_version": response.model_version,
            "id": response.id,
            "outputs": [
                {"name": out.name, "datatype": out.datatype, "shape": list(out.shape),
                 "data": to_json(result.as_numpy(out.name))}
                for out in response.outputs
            ],
        }
    raise ValueError(f"unknown op {op!r}")


def main() -> int:
    plan = json.load(sys.stdin)
    client = None
    if len(sys.argv) > 1:
        import tritonclient.grpc as triton

        client = triton.InferenceServerClient(sys.argv[1])
    results = []
    for call in plan:
        if call["op"] == "describe":
            results.append({"value": describe(call)})
            continue
        try:
            results.append({"value": run(client, call)})
        except Exception as error:  # tritonclient raises InferenceServerException
            status = getattr(error, "status", lambda: None)()
            if status is None:
                raise
            results.append({"error": {"code": status.removeprefix("StatusCode."),
                                      "message": error.message()}})
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
