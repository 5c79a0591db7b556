"""KServe v2 REST's conversions alone, in-process: CPU µs to decode one request body into
numpy and encode its answer, for JSON `data` and binary tensor data. CPU time of this
process, so other tenants of a shared machine move it less than req/s.

    PYTHONPATH=/path/to/a/checkout .venv/bin/python bench/rest_micro.py [--seconds 2]

Runs against whichever `service` package PYTHONPATH finds, so two checkouts compare by
running it alternately under each (the signature of the code before this file was added,
which packed JSON into a protobuf request, is called as it was).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from collections.abc import Callable

import numpy as np

from service.protocol import convert, kserve_rest
from service.types import InferResponse, TensorSpec

CASES = {"1-row dense64": [1, 64], "16-row ae28": [16, 28, 28, 1]}


def body(x: np.ndarray, binary: bool) -> tuple[bytes, str | None]:
    tensor: dict[str, object] = {"name": "x", "datatype": "FP32", "shape": list(x.shape)}
    if binary:
        tensor["parameters"] = {"binary_data_size": x.nbytes}
        head = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
        return head.encode() + x.tobytes(), str(len(head))
    tensor["data"] = x.ravel().tolist()
    return json.dumps({"inputs": [tensor]}).encode(), None


def round_trip(x: np.ndarray, binary: bool) -> Callable[[], object]:
    """decode the body, then encode an answer holding the same array."""
    data, length = body(x, binary)
    specs = {"x": TensorSpec("x", "float32", (None, *x.shape[1:]))}
    new = "endpoint" in inspect.signature(kserve_rest.decode_request).parameters

    def once() -> object:
        if new:
            request, outputs = kserve_rest.decode_request(data, length, "m", None, None, specs)
            response = InferResponse("m", "e", 1, {"y": request.inputs["x"]})
            return kserve_rest.encode_infer(response, "m", outputs)
        request, outputs = kserve_rest.decode_request(data, length, "m", "", specs)
        response = InferResponse("m", "e", 1, {"y": request.inputs["x"]})
        return kserve_rest.encode_infer(convert.encode_infer_response(response, "m"), outputs)

    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="CPU seconds per case")
    args = parser.parse_args()
    print(f"service from {convert.__file__.rsplit('/service/', 1)[0]}")
    for case, shape in CASES.items():
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        for binary in (False, True):
            once = round_trip(x, binary)
            for _ in range(20):  # warm up
                once()
            calls, start = 0, time.process_time()
            while (spent := time.process_time() - start) < args.seconds:
                for _ in range(50):
                    once()
                calls += 50
            what = "binary" if binary else "JSON"
            print(f"{case}, {what}: {spent / calls * 1e6:.1f} µs CPU per request")


if __name__ == "__main__":
    main()
